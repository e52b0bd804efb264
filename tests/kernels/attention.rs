// attention kernel tests (being written)
