// matmul gradient checks (being written)
