// lora gradient checks (being written)
