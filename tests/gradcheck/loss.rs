// loss gradient checks (being written)
