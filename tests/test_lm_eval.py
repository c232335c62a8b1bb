"""`forge eval --lm-eval`: forge's lm-eval model on both backends gives lm-eval's own Hugging Face model's
results on the same weights (base, and base + adapter against its merged export)."""

import io
import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from click.testing import CliRunner
from rich.console import Console

from forge_core import backend as backends
from forge_core.cli import cli
from forge_core.config import ForgeConfig
from forge_core.eval import lm_eval_bridge
from forge_core.eval.evaluate import _for_inference

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 5, "Pack my box with five dozen liquor jugs."]


def _hf(model_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=4, max_length=64)


def _forge(backend, adapter=None, model=None):
    ops = backends.ops(backend)
    net, tok, _ = _for_inference(ops, adapter, model)
    return lm_eval_bridge.forge_model(ops, net, tok, max_length=64, batch_size=4)


def _samples(lm):
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(model=lm, tasks=lm_eval_bridge.shipped_tasks(), log_samples=True,
                                  task_manager=TaskManager(include_defaults=False))
    logps = [[r[0][0] for r in s["resps"]] for s in res["samples"]["forge_mc"]]
    return res["results"]["forge_mc"], logps


def _check_same(ours, ref):
    (res, logps), (ref_res, ref_logps) = _samples(ours), _samples(ref)
    assert res["acc,none"] == ref_res["acc,none"] and res["acc_norm,none"] == ref_res["acc_norm,none"]
    assert len(logps) == 20
    for a, b in zip(logps, ref_logps):
        assert a == pytest.approx(b, abs=2e-4)
    from lm_eval.api.instance import Instance

    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(TEXTS)]
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(ref.loglikelihood_rolling(rolling), abs=1e-3)
    until = [Instance("generate_until", {}, (t[:30], {"until": ["o"], "max_gen_toks": 8}), i)
             for i, t in enumerate(TEXTS + ["Question: What is two plus two?\nAnswer:"])]
    answers = ours.generate_until(until)
    assert answers == ref.generate_until(until) and all("o" not in a for a in answers)


@pytest.mark.parametrize("backend", ["mlx", "cuda"])
def test_the_base_model_scores_as_lm_evals_hf_model(backend, tiny_model):
    pytest.importorskip("mlx.core" if backend == "mlx" else "torch")
    _check_same(_forge(backend, model=str(tiny_model)), _hf(tiny_model))


@pytest.mark.parametrize("backend", ["mlx", "cuda"])
def test_base_plus_adapter_scores_as_its_merged_export(backend, tiny_model, tmp_path):
    pytest.importorskip("mlx.core" if backend == "mlx" else "torch")
    pytest.importorskip("bitsandbytes" if backend == "cuda" else "mlx.core")
    from tests.bound import bind

    train = bind(backends.ops(backend))[0]
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "blue sky"}]}
            for i in range(12)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = ForgeConfig()
    cfg.backend, cfg.model.path, cfg.data.train = backend, str(tiny_model), str(data)
    # a full-precision base: the merged export is W + s(BA - B0A0) on the full-precision weights, which is the
    # trained model exactly only when the residual was not quantized
    cfg.lora.rank, cfg.lora.alpha, cfg.quant.bits = 4, 4.0, 0
    cfg.train.out_dir, cfg.train.steps, cfg.train.lr, cfg.train.batch_size = str(tmp_path / "run"), 3, 2e-2, 4
    run = train(cfg, console=Console(file=io.StringIO()))
    out = CliRunner().invoke(cli, ["export", str(run), "--format", "merged", "--out", str(tmp_path / "merged")])
    assert out.exit_code == 0, out.output
    _check_same(_forge(backend, adapter=str(run)), _hf(tmp_path / "merged"))


def test_forge_eval_lm_eval_from_the_shell(tiny_model):
    out = CliRunner().invoke(cli, ["eval", "--backend", "mlx", "--model", str(tiny_model), "--lm-eval", "forge_mc",
                                   "--lm-eval-limit", "5", "--max-seq-len", "64", "--json"])
    assert out.exit_code == 0, out.output
    res = json.loads(out.output[out.output.index("{"):])
    assert res["forge_mc/acc"] in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) and "forge_mc/acc_norm" in res


def test_an_unknown_task_names_what_forge_ships(tiny_model):
    out = CliRunner().invoke(cli, ["eval", "--backend", "mlx", "--model", str(tiny_model), "--lm-eval", "nope_task"])
    assert out.exit_code != 0 and "forge ships: forge_mc" in out.output
