"""Choosing tokens from logits: the generate loop, sampling, speculative decoding and its
drafters, perplexity, a generation's statistics."""
