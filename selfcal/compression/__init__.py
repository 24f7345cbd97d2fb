"""Compression methods (llm-compressor recipes) and the code that applies them."""
