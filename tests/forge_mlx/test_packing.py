"""Packing on MLX: a packed sequence computes exactly what its rows compute alone."""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from forge_core.config import ForgeConfig
from forge_core.data import TokenizedRow, collate_sft, pack
from forge_mlx.head import logits as head_logits
from forge_mlx.model import build_model
from forge_mlx.packing import packed_hidden

pytestmark = pytest.mark.mlx


def _row(ids):
    ids = np.array(ids, np.int32)
    return TokenizedRow(tokens=ids, mask=np.ones(len(ids), bool))


def test_packed_logits_equal_each_row_run_alone(tiny_model):
    cfg = ForgeConfig()
    cfg.model.path, cfg.quant.bits, cfg.lora.init = str(tiny_model), 0, "pissa"
    model, _, _, _ = build_model(cfg)
    rows = [_row([257, 84, 82, 68, 81, 198, 71]), _row([257, 64, 82, 82, 72]), _row([90, 91, 92, 93, 94, 95])]
    packed = pack(rows, max_seq_len=24)
    assert len(packed) == 1  # all three fit in one sequence
    b = collate_sft(packed, pad_id=256, pad_multiple=8)
    logits = np.array(head_logits(model, packed_hidden(model, mx.array(b["inputs"]), mx.array(b["segment_ids"]),
                                                       mx.array(b["position_ids"]))))
    seg = b["segment_ids"][0]
    for s in sorted(set(seg.tolist()) - {0}):
        where = np.nonzero(seg == s)[0]
        alone = np.array(model(mx.array(b["inputs"][:, where])))
        np.testing.assert_allclose(logits[0, where], alone[0], atol=1e-4)


def test_packed_training_runs_and_loss_falls(tiny_model, jsonl, tmp_path):
    import json

    from tests.forge_mlx.run import train

    rows = [{"messages": [{"role": "user", "content": f"n{i}"}, {"role": "assistant", "content": "ok ok"}]}
            for i in range(24)]
    cfg = ForgeConfig()
    cfg.model.path, cfg.data.train, cfg.data.packing = str(tiny_model), str(jsonl("t.jsonl", rows)), True
    cfg.quant.group_size, cfg.lora.rank, cfg.lora.alpha = 32, 4, 4.0
    cfg.train.out_dir, cfg.train.steps, cfg.train.batch_size = str(tmp_path / "run"), 12, 2
    cfg.train.max_seq_len, cfg.train.lr, cfg.train.log_every, cfg.train.eval_every = 128, 1e-2, 1, 0
    run = train(cfg)
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.6 * losses[0]
