"""Zero-shot accuracy through lm-evaluation-harness, and perplexity."""
