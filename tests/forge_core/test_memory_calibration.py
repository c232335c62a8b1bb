"""The memory planner's estimate stays near the peak a real run reaches (tools/bench_memory.py, small rows).

Each row runs the backend's own trainer for 3 steps in a fresh subprocess and compares
estimate = plan total - framework overhead with the measured peak (MLX: mx.get_peak_memory();
torch on CPU: sampled anonymous RSS above the post-import baseline). The bench's target is
0.90..1.15; this regression guard allows 0.75..1.25 so machine noise does not fail it.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))
bench_memory = pytest.importorskip("bench_memory")

BAND = (0.75, 1.25)


def _row(name: str) -> dict:
    row = next(r for r in bench_memory.MATRIX if r["name"] == name)
    assert row["small"], f"{name} is not one of the matrix's small rows"
    return row


def _check(name: str, tmp_path) -> dict:
    result = bench_memory.measure(_row(name), tmp_path)
    assert result["measured"] > 10 * 2**20, "the measurement must see the run's tensors"
    assert BAND[0] <= result["ratio"] <= BAND[1], (
        f"{name}: estimate {result['estimate'] / 2**20:.1f} MiB vs measured {result['measured'] / 2**20:.1f} MiB "
        f"(ratio {result['ratio']:.2f})")
    return result


needs_mlx = pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="needs mlx")
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None or not Path("/proc/self/status").is_file(),
                                 reason="needs torch and Linux /proc")


@pytest.mark.mlx
@needs_mlx
def test_mlx_full_precision_sft_estimate_within_25_percent(tmp_path):
    _check("mlx-h128-fp", tmp_path)


@pytest.mark.mlx
@needs_mlx
def test_mlx_4bit_sft_estimate_within_25_percent(tmp_path):
    _check("mlx-h128-q4", tmp_path)


@pytest.mark.cuda
@needs_torch
def test_torch_cpu_full_precision_sft_estimate_within_25_percent(tmp_path):
    _check("torch-h128-fp", tmp_path)
