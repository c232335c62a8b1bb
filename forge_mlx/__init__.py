"""Forge on MLX: QPiSSA + LoRA SFT and DPO written in MLX arrays."""
