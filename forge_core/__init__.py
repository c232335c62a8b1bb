"""Forge core: config, data, formats, memory planning. Framework-free at import time."""

__version__ = "0.1.0"
