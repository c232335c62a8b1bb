"""`forge eval --text`: the windows score every token once, and both backends give the perplexity a plain
transformers loop computes on the same model and text."""

import math

import numpy as np
import pytest

from forge_core.errors import ForgeError
from forge_core.eval.perplexity import window_batch, windows

TEXT = "The quick brown fox jumps over the lazy dog. " * 6 + "Pack my box with five dozen liquor jugs.\n"


@pytest.mark.parametrize("n,window,stride", [(10, 4, 2), (10, 4, 4), (3, 8, 4), (57, 16, 5), (16, 16, 8), (2, 2, 1)])
def test_windows_score_every_token_once_with_enough_context(n, window, stride):
    spans = windows(n, window, stride)
    scored = [t for _, end, first in spans for t in range(first, end)]
    if stride < window:
        assert scored == list(range(1, n))  # each token after the first, once, in order
    else:  # non-overlapping chunks: each chunk's first token is only context
        assert scored == [t for t in range(1, n) if t % window]
    for begin, end, first in spans:
        assert end - begin <= window and begin <= first - 1
        if begin:  # after the first window: at least window - stride tokens of context
            assert first - begin >= min(window - stride, first)


def test_window_batch_masks_only_the_scored_targets():
    ids = np.arange(100, 110)
    b = window_batch(ids, windows(10, 4, 2), pad_id=0)
    rows = [(ids[1 + np.flatnonzero(m) + 2 * k]).tolist() for k, m in enumerate(b["mask"])]
    assert [t for row in rows for t in row] == ids[1:].tolist()
    assert (b["targets"][b["mask"] > 0] == ids[1:]).all()


def test_bad_windows_are_refused():
    with pytest.raises(ForgeError, match="stride"):
        windows(10, 4, 5)


def _reference_nll(model_dir, text, window, stride):
    """Sum of -log p over the scored tokens, by a plain transformers forward per window."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(text)["input_ids"]
    total = 0.0
    for begin, end, first in windows(len(ids), window, stride):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[begin:end]])).logits[0].double(), -1)
        total -= sum(logp[t - begin - 1, ids[t]].item() for t in range(first, end))
    return total, len(ids) - 1


@pytest.mark.parametrize("backend", ["mlx", "cuda"])
def test_text_perplexity_equals_a_transformers_loop(backend, tiny_model, tmp_path):
    pytest.importorskip("mlx.core" if backend == "mlx" else "torch")
    from forge_core import backend as backends
    from forge_core.config import ForgeConfig
    from forge_core.eval.evaluate import evaluate

    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    cfg = ForgeConfig()
    cfg.model.path, cfg.train.max_seq_len, cfg.train.batch_size = str(tiny_model), 64, 3
    cfg.eval.text, cfg.eval.stride = str(path), 24
    res = evaluate(backends.ops(backend), cfg)
    nll, n = _reference_nll(str(tiny_model), TEXT, 64, 24)
    assert res["text_tokens"] == n > 64 * 3  # several windows
    assert res["text_loss"] == pytest.approx(nll / n, abs=1e-4)
    assert res["text_ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert (res["window"], res["stride"]) == (64, 24)


def test_eval_help_lists_no_training_flags():
    from click.testing import CliRunner

    from forge_core.cli import cli

    text = CliRunner().invoke(cli, ["eval", "--help"]).output
    for flag in ("--steps", "--epochs", "--lr", "--rank", "--alpha", "--dora", "--init", "--out ", "--grad-accum"):
        assert flag not in text, flag
    for flag in ("--model", "--adapter", "--valid", "--text", "--stride", "--max-seq-len", "--batch-size"):
        assert flag in text, flag


def test_eval_text_windows_are_the_runs_max_seq_len_unless_given(tiny_model, jsonl, tmp_path):
    pytest.importorskip("mlx.core")
    import json

    from click.testing import CliRunner

    from forge_core.cli import cli
    from forge_core.config import ForgeConfig
    from tests.forge_mlx.run import train

    cfg = ForgeConfig()
    cfg.model.path, cfg.train.out_dir = str(tiny_model), str(tmp_path / "run")
    cfg.data.train = str(jsonl("train.jsonl", [{"messages": [{"role": "user", "content": f"q {i}"},
                                                             {"role": "assistant", "content": "a"}]} for i in range(4)]))
    cfg.lora.rank, cfg.train.steps, cfg.train.batch_size, cfg.train.max_seq_len = 4, 1, 2, 40
    run = train(cfg)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    base = ["eval", "--backend", "mlx", "--adapter", str(run), "--text", str(text), "--json"]
    got = [json.loads(CliRunner().invoke(cli, base + extra).stdout) for extra in ([], ["--max-seq-len", "24"])]
    assert [g["window"] for g in got] == [40, 24]  # the run trained on 40-token rows; the flag wins
    assert got[0]["text_tokens"] == got[1]["text_tokens"] and got[0]["text_loss"] != got[1]["text_loss"]
