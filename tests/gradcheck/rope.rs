// rope gradient checks (being written)
