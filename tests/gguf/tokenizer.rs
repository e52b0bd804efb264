// helper-11 writes the GGUF tokenizer tests here.
