"""Adapter files: the forge/mlx-lm/PEFT formats (formats.py), their key mapping as plain dicts (mapping.py),
export to a PEFT dir, a merged HF model or GGUF (export.py), and the one safetensors reader/writer
(safetensors_io.py)."""
