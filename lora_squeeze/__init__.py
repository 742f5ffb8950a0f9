"""lora-squeeze: train LoRA at a high source rank, compress it to a low target rank (arXiv 2602.10993)."""
