"""Data for continual learning: the embedded multi-domain corpus, tokenizers and token streams."""
