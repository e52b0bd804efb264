// activation gradient checks (being written)
