// loss kernel tests (being written)
