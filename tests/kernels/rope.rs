// rope kernel tests (being written)
