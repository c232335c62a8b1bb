"""Model sources: resolving a model spec (bundled name, HF dir, hub id, GGUF) to a local HF dir (sources.py),
the GGUF importer (gguf_import.py), and the shapes of known models for the planner (known.py)."""
