"""The model and its formats: the config, our Llama modules, KV caches, weights (safetensors,
GGUF, quantized) and how they load, the tokenizer and the streaming detokenizer, and the one
opener every process uses (opener.py)."""
