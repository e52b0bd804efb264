// embedding gradient checks (being written)
