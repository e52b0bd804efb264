// lora kernel tests (being written)
