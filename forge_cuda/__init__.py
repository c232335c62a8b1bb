"""Forge on PyTorch + bitsandbytes: the same interface as forge_mlx, for CUDA machines."""
