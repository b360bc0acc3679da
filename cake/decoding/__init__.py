"""Choosing tokens: sampling, the step scheduler, speculative decoding and drafters, perplexity."""
