"""The model and its formats: config, the Llama modules, KV caches, weights (safetensors, GGUF, quantized), the tokenizer and the streaming detokenizer."""
