"""Atomic writes: a file (or a directory) appears whole or not at all.

Every file Forge writes goes through here, so a run killed at any moment leaves either the old
state or the new one, never a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path, is_dir: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700; give the finished file the mode a plain open() would."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp path beside `path`; on success rename it over `path` (same filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _publish_mode(tmp, is_dir=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_dir(path: str | os.PathLike, first_wins: bool = False):
    """Build a directory under a temp name, then swap it in place of `path`.

    The old directory (if any) is moved aside first and deleted only after the new one is in place,
    so at every instant either the old or the new complete directory exists at `path` (or `path.old`).
    `first_wins` (a cache whose name says its content): when another process published `path` while this one
    built it, theirs stays and this build is dropped - never a moment without `path` for a reader of theirs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish_mode(tmp, is_dir=True)
    if first_wins:
        try:
            os.rename(tmp, path)  # atomic; refused when `path` is a directory that holds anything
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not path.is_dir():
                raise
        return
    old = path.with_name(path.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)
