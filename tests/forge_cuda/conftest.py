"""Fixtures for the torch backend tests: small SFT/DPO data and a config on the tiny model.

Every test here runs torch and numpy's OpenBLAS on ONE thread: on a busy 2-core machine the tiny
model's 64x128 matmuls and SVDs were 20-200x slower with two spinning threads than with one.
"""

from __future__ import annotations

import ctypes
import glob
import os

import numpy as np
import pytest

from tests.conftest import write_jsonl

WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "sloe"]


def _openblas_threads():
    """(get, set) for numpy's bundled OpenBLAS, or None where it is not the scipy-openblas build."""
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "libscipy_openblas*.so"))
    if not libs:
        return None
    lib = ctypes.CDLL(libs[0])
    try:
        return lib.scipy_openblas_get_num_threads64_, lib.scipy_openblas_set_num_threads64_
    except AttributeError:
        return None


@pytest.fixture(autouse=True)
def one_thread():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    blas = _openblas_threads()
    blas_before = blas[0]() if blas else None
    torch.set_num_threads(1)
    if blas:
        blas[1](1)
    yield
    torch.set_num_threads(before)
    if blas:
        blas[1](blas_before)


def sft_rows(n: int = 8):
    return [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w} {w}"}]}
            for w in (WORDS * 4)[:n]]


def dpo_rows(n: int = 8):
    return [{"prompt": f"spell {w}", "chosen": " ".join(w), "rejected": w[::-1]} for w in (WORDS * 4)[:n]]


@pytest.fixture
def sft_file(tmp_path):
    return write_jsonl(tmp_path / "sft.jsonl", sft_rows())


@pytest.fixture
def dpo_file(tmp_path):
    return write_jsonl(tmp_path / "dpo.jsonl", dpo_rows())


@pytest.fixture
def make_cfg(tiny_model, tmp_path):
    """make_cfg(**sections) -> a ForgeConfig on the tiny model: rank 4, 6 steps, logging every step."""
    from forge_core.config import ForgeConfig
    from forge_core.config_parse import set_value

    def make(data: str = "", out: str = "run", **sets):
        cfg = ForgeConfig()
        cfg.model.path = str(tiny_model)
        cfg.data.train = str(data)
        cfg.train.out_dir = str(tmp_path / out)
        base = {"lora.rank": 4, "lora.alpha": 4, "train.steps": 6, "train.batch_size": 4, "train.warmup": 0,
                "train.lr": 1e-2, "train.log_every": 1, "train.eval_every": 0}
        for key, value in {**base, **{k.replace("__", "."): v for k, v in sets.items()}}.items():
            set_value(cfg, key, value)
        return cfg

    return make
