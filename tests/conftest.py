"""Shared fixtures. forge_mlx is imported first so its BLAS preload happens before mlx.core loads."""

import importlib.util
import json

import pytest

if importlib.util.find_spec("mlx") is not None:
    import forge_mlx  # noqa: F401  (preloads an optimized BLAS for MLX's CPU backend)

from tests.tiny import make_tiny_model


@pytest.fixture(scope="session", autouse=True)
def init_cache_dir(tmp_path_factory):
    """The PiSSA init cache of this test session: never the user's FORGE_HOME (subprocesses inherit it)."""
    import os

    path = tmp_path_factory.mktemp("init_cache")
    os.environ["FORGE_INIT_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random tiny Llama HF dir (hidden 64, 2 layers, byte tokenizer with a ChatML template)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def jsonl(tmp_path):
    """jsonl(name, rows) -> path of a JSONL file written in tmp_path."""
    return lambda name, rows: write_jsonl(tmp_path / name, rows)
