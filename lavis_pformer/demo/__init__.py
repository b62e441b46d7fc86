"""Self-contained demo material for lavis-pformer (a synthetic shapes world; nothing is downloaded)."""
