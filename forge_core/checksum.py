"""File checksums: what a checkpoint's manifest and an init cache entry are checked against before use."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(Path(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_entry(path) -> dict:
    """{"size", "sha256"} of a file, as a manifest records it."""
    return {"size": Path(path).stat().st_size, "sha256": sha256_file(path)}


def mismatch(path, entry: dict) -> str | None:
    """Why `path` is not the file `entry` describes, or None."""
    path = Path(path)
    if not path.is_file():
        return f"{path.name} missing"
    if path.stat().st_size != entry["size"]:
        return f"{path.name} is {path.stat().st_size} bytes, {entry['size']} were written"
    if sha256_file(path) != entry["sha256"]:
        return f"{path.name} does not match its checksum"
    return None
