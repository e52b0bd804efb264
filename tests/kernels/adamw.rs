// adamw kernel tests (being written)
