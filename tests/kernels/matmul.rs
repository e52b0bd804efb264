// matmul kernel tests (being written)
