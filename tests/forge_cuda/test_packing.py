"""Packing on torch: a packed sequence computes exactly what its rows compute alone, and trains."""

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

from rich.console import Console

from forge_core.data import TokenizedRow, collate_sft, pack
from forge_core.rundir import RunDir
from forge_cuda.losses import token_logps
from forge_cuda.model import build_model
from forge_cuda.packing import segment_mask
from tests.forge_cuda.run import train

pytestmark = pytest.mark.cuda


def _row(ids):
    ids = np.array(ids, np.int32)
    return TokenizedRow(tokens=ids, mask=np.ones(len(ids), bool))


def test_segment_mask_is_block_diagonal_causal():
    m = segment_mask(torch.tensor([[1, 1, 2, 2, 0]]), torch.float32)[0, 0]
    allowed = (m == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]


def test_packed_rows_score_as_each_row_run_alone(make_cfg):
    model, _, _, _ = build_model(make_cfg(quant__bits=4, lora__init="pissa"))
    model.eval()
    rows = [_row([257, 84, 82, 68, 81, 198, 71]), _row([257, 64, 82, 82, 72]), _row([90, 91, 92, 93, 94, 95])]
    packed = pack(rows, max_seq_len=24)
    assert len(packed) == 1  # all three fit in one sequence
    b = {k: torch.from_numpy(v) for k, v in collate_sft(packed, pad_id=256, pad_multiple=8).items()}
    with torch.no_grad():
        packed_logps = token_logps(model, b["inputs"], b["targets"], b)  # (1, T)
        seg = b["segment_ids"][0]
        for s in sorted(set(seg.tolist()) - {0}):
            where = torch.nonzero(seg == s)[:, 0]
            alone = token_logps(model, b["inputs"][:, where], b["targets"][:, where])
            assert torch.allclose(packed_logps[0, where], alone[0], atol=1e-4)


def test_packed_training_runs_and_loss_falls(make_cfg, jsonl):
    rows = [{"messages": [{"role": "user", "content": f"n{i}"}, {"role": "assistant", "content": "ok ok"}]}
            for i in range(24)]
    cfg = make_cfg(jsonl("t.jsonl", rows), data__packing=True, train__steps=12, train__batch_size=2,
                   train__max_seq_len=128)
    run = train(cfg, console=Console(file=io.StringIO()))
    losses = [r["loss"] for r in RunDir(run).metrics() if r["split"] == "train"]
    assert losses[-1] < 0.6 * losses[0]
