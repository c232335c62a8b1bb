"""DoRA training (lora.dora) on both backends: it starts as the model it adapts, MLX and torch agree on the first 5
losses, a forge DoRA adapter exported to PEFT loads with use_dora=True and converted to mlx-lm's layout loads in
mlx_lm.load, each giving forge's own logits to 1e-4, and QDoRA (a 4-bit base) trains and resumes exactly."""

import json

import numpy as np
import pytest

from forge_core.config import ForgeConfig
from forge_core.config_parse import set_value
from tests.conftest import write_jsonl
from tests.test_preference_methods import BACKENDS, HAVE, ops_of, records, train

IDS = [5, 17, 99, 200, 3, 44, 250, 7, 120, 64]
WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "sloe"]


@pytest.fixture
def sft(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"spell {w}"}, {"role": "assistant", "content": " ".join(w)}]}
            for w in WORDS]
    return write_jsonl(tmp_path / "sft.jsonl", rows)


def config(tiny_model, data, out, **sets) -> ForgeConfig:
    cfg = ForgeConfig()
    cfg.model.path, cfg.model.dtype = str(tiny_model), "float32"
    cfg.data.train, cfg.train.out_dir = str(data), str(out)
    base = {"quant.bits": 0, "lora.rank": 4, "lora.alpha": 8, "lora.init": "pissa", "lora.dora": True,
            "train.steps": 5, "train.batch_size": 4, "train.warmup": 0, "train.lr": 2e-2, "train.log_every": 1,
            "train.eval_every": 0, "train.save_every": 100, "data.shuffle": False}
    for key, value in {**base, **sets}.items():
        set_value(cfg, key, value)
    return cfg


def forge_logits(backend: str, run) -> np.ndarray:
    """The trained model as forge computes it (the DoRA layers unfused), on IDS."""
    ops = ops_of(backend)
    cfg, weights, factors = ops.load_adapter_dir(run / "adapter")
    model, _, _, _ = ops.build_model(cfg, pissa_init=factors, adapter_weights=weights)
    if backend == "mlx":
        import mlx.core as mx

        model.eval()
        return np.array(model(mx.array([IDS]))[0].astype(mx.float32))
    import torch

    model.eval()
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].float().numpy()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("init", ["pissa", "lora"])
def test_dora_starts_as_the_model_it_adapts(tiny_model, sft, tmp_path, backend, init):
    """m0 = ||W + s·B0A0||_row: the first loss equals the plain adapter's (the same init), and the magnitudes move."""
    first = {}
    for dora in (False, True):
        cfg = config(tiny_model, sft, tmp_path / f"{dora}", **{"lora.init": init, "lora.dora": dora, "train.steps": 2})
        first[dora] = records(train(cfg, "sft", backend))
    assert first[True][0]["loss"] == pytest.approx(first[False][0]["loss"], abs=1e-5)
    # the magnitudes train: the saved m is no longer the row norms of the saved direction W + s·BA's start
    ops = ops_of(backend)
    _, weights, _ = ops.load_adapter_dir(tmp_path / "True" / "adapter")
    mags = {k: v for k, v in weights.items() if k.endswith((".m", ".lora_magnitude_vector"))}
    model, _, _, _ = ops.build_model(config(tiny_model, sft, tmp_path / "x", **{"lora.init": init}))
    start = {k: np.asarray(v) for k, v in ops.adapter_state(model).items() if k in mags}
    assert mags and start.keys() == mags.keys()
    assert max(np.abs(mags[k] - start[k]).max() for k in mags) > 1e-4


@pytest.mark.slow
@pytest.mark.skipif(not (HAVE["mlx"] and HAVE["cuda"]), reason="needs both backends")
@pytest.mark.parametrize("rslora", [False, True])
def test_mlx_and_torch_agree_on_the_first_5_dora_losses(tiny_model, sft, tmp_path, rslora):
    """PiSSA: the same factors on both backends (the SVD runs in numpy; a random LoRA A differs per framework)."""
    losses = {}
    for backend in ("mlx", "cuda"):
        cfg = config(tiny_model, sft, tmp_path / backend, **{"lora.rslora": rslora})
        losses[backend] = [r["loss"] for r in records(train(cfg, "sft", backend))]
    np.testing.assert_allclose(losses["mlx"], losses["cuda"], rtol=1e-4, atol=1e-4)
    assert losses["mlx"][-1] < losses["mlx"][0] - 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dora_adapter_loads_in_peft_and_mlx_lm_with_forges_logits(tiny_model, sft, tmp_path, backend):
    pytest.importorskip("peft")
    pytest.importorskip("mlx_lm")
    import mlx.core as mx
    import torch
    from mlx_lm import load as mlx_load
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from forge_core.adapters.convert import convert
    from forge_core.adapters.export import export

    run = train(config(tiny_model, sft, tmp_path / "run"), "sft", backend)
    want = forge_logits(backend, run)

    export(run, fmt="peft", out=tmp_path / "peft")  # PiSSA folds into a plain rank-2r LoRA on the original base
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["use_dora"] is True
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    with torch.no_grad():
        before = base(torch.tensor([IDS])).logits[0].numpy()
        peft = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
        got = peft(torch.tensor([IDS])).logits[0].numpy()
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(want - before).max() > 0.05  # training moved the model: the comparison can fail

    convert(run / "adapter", tmp_path / "mlx", to="mlx")
    assert json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())["fine_tune_type"] == "dora"
    model, _ = mlx_load(str(tiny_model), adapter_path=str(tmp_path / "mlx"))
    assert np.abs(np.array(model(mx.array([IDS]))[0].astype(mx.float32)) - want).max() < 1e-4

    export(run, fmt="merged", out=tmp_path / "merged")  # m / ||W + ΔW|| · (W + ΔW) in float64
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert np.abs(merged(torch.tensor([IDS])).logits[0].numpy() - want).max() < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_qdora_trains_and_resumes_exactly(tiny_model, sft, tmp_path, backend):
    """DoRA over a 4-bit PiSSA residual (QDoRA): the magnitudes start at the rows of Q(W_res) + s·B0A0."""
    if backend == "cuda":
        pytest.importorskip("bitsandbytes")
    sets = {"quant.bits": 4, "quant.group_size": 32, "train.steps": 4}
    straight = records(train(config(tiny_model, sft, tmp_path / "a", **sets), "sft", backend))
    assert straight[-1]["loss"] < straight[0]["loss"]
    cfg = config(tiny_model, sft, tmp_path / "b", **sets)
    train(cfg, "sft", backend, stop_at=2)
    resumed = records(train(cfg, "sft", backend, resume=str(tmp_path / "b")))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    meta = json.loads((tmp_path / "b" / "adapter" / "forge.json").read_text())
    assert meta["config"]["lora"]["dora"] is True


def test_the_planner_counts_doras_magnitudes_and_dense_weights(tiny_model):
    """On a GPU bitsandbytes dequantizes one weight per matmul, but DoRA keeps each adapted weight dense (its norm,
    and x·Wᵀ's backward)."""
    from forge_core.memory.plan import plan_memory

    model_config = json.loads((tiny_model / "config.json").read_text())
    plans = {}
    for dora in (False, True):
        cfg = ForgeConfig()
        cfg.model.path = str(tiny_model)
        set_value(cfg, "lora.dora", dora)
        plans[dora] = plan_memory(cfg, model_config, kind="sft", backend="cuda", on_gpu=True)
    assert plans[True].component("dequantized weights") > 2 * plans[False].component("dequantized weights") > 0
    assert plans[True].component("LoRA params") > plans[False].component("LoRA params")


def test_cli_dora_flag_reaches_the_config(tiny_model, sft, tmp_path):
    from click.testing import CliRunner

    from forge_core.cli import cli

    res = CliRunner().invoke(cli, ["memory", "--model", str(tiny_model), "--data", str(sft), "--dora", "--json"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_norm_needs_no_dense_sum_and_equals_it(backend):
    """||W + s·BA||_row from (out, r) products equals the norm of the formed sum (which DoRA never forms)."""
    rng = np.random.default_rng(0)
    w, a, b = (rng.standard_normal(s).astype(np.float32) for s in ((48, 32), (4, 32), (48, 4)))
    want = np.linalg.norm(w.astype(np.float64) + 1.5 * b.astype(np.float64) @ a, axis=1)
    if backend == "mlx":
        import mlx.core as mx
        from mlx import nn

        from forge_mlx.lora import LoRALinear

        layer = LoRALinear(nn.Linear(32, 48, bias=False), 4, 1.5, lora_a=mx.array(a.T), lora_b=mx.array(b.T))
        got = np.array(layer.row_norm(mx.array(w)))
    else:
        import torch

        from forge_cuda.lora import LoRALinear

        layer = LoRALinear(torch.nn.Linear(32, 48, bias=False), 4, 1.5, lora_A=torch.tensor(a), lora_B=torch.tensor(b))
        got = layer.row_norm(torch.tensor(w)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_zero_row_stays_zero_not_nan(backend):
    """A weight with an all-zero output row (pruned, or a stream a model keeps fixed): m / ||row|| was 0 / 0 = NaN
    in training and in the merge (as in PEFT and mlx-lm); the row's output is 0."""
    from forge_core.dora import dora_weight

    rng = np.random.default_rng(0)
    w, a, b, x = (rng.standard_normal(s).astype(np.float32) for s in ((8, 16), (2, 16), (8, 2), (3, 16)))
    w[5], b[5] = 0.0, 0.0
    if backend == "mlx":
        import mlx.core as mx
        from mlx import nn

        from forge_mlx.lora import LoRALinear

        base = nn.Linear(16, 8, bias=False)
        base.weight = mx.array(w)
        layer = LoRALinear(base, 2, 1.0, lora_a=mx.array(a.T), lora_b=mx.array(b.T), dora=True)
        y = np.array(layer(mx.array(x)))
    else:
        import torch

        from forge_cuda.lora import LoRALinear

        base = torch.nn.Linear(16, 8, bias=False)
        with torch.no_grad():
            base.weight.copy_(torch.tensor(w))
        layer = LoRALinear(base, 2, 1.0, lora_A=torch.tensor(a), lora_B=torch.tensor(b), dora=True)
        y = layer(torch.tensor(x)).detach().numpy()
    assert np.isfinite(y).all() and (y[:, 5] == 0).all()
    merged = dora_weight(np, w + b @ a, np.linalg.norm(w + b @ a, axis=1))
    assert np.isfinite(merged).all() and (merged[5] == 0).all()
