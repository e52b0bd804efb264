// lora.wgsl: (being written)
