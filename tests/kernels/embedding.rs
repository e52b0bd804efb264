// embedding kernel tests (being written)
