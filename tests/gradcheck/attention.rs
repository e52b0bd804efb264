// attention gradient checks (being written)
