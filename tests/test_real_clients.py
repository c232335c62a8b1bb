"""Round trips through the real clients: adapters made by PEFT and by mlx-lm's own tuner, converted by
forge, loaded by the other client, compared on logits.

Tolerance 1e-4 on fp32 logits: both sides run the same fp32 math in a different order (mlx-lm adds
s·(x A) B to W x, the merged checkpoint folds it into W, PEFT's PiSSA residual is W - s·B0 A0), so the
expected difference is a few fp32 ulps of values of size ~5 (measured ~1e-6); every adapter here moves
the logits by > 0.1, so a wrong transpose, scale or sign fails by orders of magnitude.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from mlx.utils import tree_flatten
from mlx_lm import load as mlx_load
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import save_config
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM

from forge_core.adapters.convert import convert
from forge_core.adapters.export import export
from forge_core.errors import ForgeError
from tests.tiny import make_tiny_model

IDS = [5, 17, 99, 200, 3, 44, 250, 7, 120, 64]
TOL = 1e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("base") / "tiny", seed=3)


def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].float().numpy()


def peft_logits(base, adapter) -> np.ndarray:
    return torch_logits(PeftModel.from_pretrained(hf_model(base), str(adapter)).eval())


def mlx_logits(base, adapter=None) -> np.ndarray:
    model, _ = mlx_load(str(base), adapter_path=str(adapter) if adapter else None)
    return np.array(model(mx.array([IDS]))[0].astype(mx.float32))


def assert_close(got, want, moved_from=None):
    assert np.abs(got - want).max() < TOL
    if moved_from is not None:  # the adapter really changes the model: the comparison can fail
        assert np.abs(want - moved_from).max() > 0.1


def peft_lora(base, **kw):
    """A real PEFT LoRA (rank 4 on every linear of the blocks) on the tiny base."""
    kw = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "task_type": "CAUSAL_LM", **kw}
    return get_peft_model(hf_model(base), LoraConfig(**kw))


def randomize_peft(model, seed: int):
    """Non-zero A and B for every LoRA module (a 'trained' adapter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def make_mlx_adapter(base, out, dora: bool = False, num_layers: int = 1, drop: tuple = ()):
    """An adapter written the way `mlx_lm lora` writes one: its tuner, its safetensors, its save_config.
    `drop`: tensors removed afterwards (mlx-lm then keeps lora_b = 0 there), giving a ragged adapter."""
    model, _ = mlx_load(str(base))
    model.freeze()
    keys = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
    params = {"rank": 4, "scale": 3.0, "dropout": 0.0, "keys": keys}
    linear_to_lora_layers(model, num_layers, params, use_dora=dora)
    mx.random.seed(7)
    for _, mod in model.named_modules():
        if hasattr(mod, "lora_b"):
            mod.lora_b = mx.random.normal(mod.lora_b.shape) * 0.2
            if dora:
                mod.m = mod.m * (1 + 0.2 * mx.random.normal(mod.m.shape))
    out.mkdir(parents=True)
    weights = {k: v for k, v in tree_flatten(model.trainable_parameters()) if not k.startswith(drop)}
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    save_config({"model": str(base), "fine_tune_type": "dora" if dora else "lora", "num_layers": num_layers,
                 "lora_parameters": params, "iters": 100, "learning_rate": 1e-5, "batch_size": 4, "seed": 0},
                out / "adapter_config.json")
    return out


# ---- PEFT -> mlx-lm -----------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [{}, {"layers_to_transform": [1], "rank_pattern": {"v_proj": 2},
                                       "alpha_pattern": {"down_proj": 3.0}}, {"use_dora": True}],
                         ids=["plain", "patterns", "dora"])
def test_peft_lora_to_mlx_gives_peft_logits(base, tmp_path, extra):
    model = peft_lora(base, init_lora_weights=False, **extra)
    randomize_peft(model, seed=2)  # DoRA: moves the magnitudes off ||W + ΔW|| too
    model.save_pretrained(str(tmp_path / "peft"))
    want = torch_logits(model)
    convert(tmp_path / "peft", tmp_path / "mlx", to="mlx", base=str(base))
    assert_close(mlx_logits(base, tmp_path / "mlx"), want, moved_from=mlx_logits(base))


def test_peft_pissa_to_mlx_gives_peft_logits(base, tmp_path):
    """PEFT's PiSSA model (mutated base W_res + s·B·A), saved as a plain LoRA the way PEFT documents."""
    model = peft_lora(base, lora_alpha=4, init_lora_weights="pissa")
    model.peft_config["default"].init_lora_weights = True  # PEFT: save the init as a plain adapter
    model.save_pretrained(str(tmp_path / "pissa_init"))
    model.peft_config["default"].init_lora_weights = "pissa"
    randomize_peft(model, seed=1)
    want = torch_logits(model)
    model.save_pretrained(str(tmp_path / "raw"))  # relative to PEFT's residual: forge must refuse it
    with pytest.raises(ForgeError, match="path_initial_model_for_weight_conversion"):
        convert(tmp_path / "raw", tmp_path / "no", to="mlx")
    model.save_pretrained(str(tmp_path / "lora2r"),
                          path_initial_model_for_weight_conversion=str(tmp_path / "pissa_init"))
    convert(tmp_path / "lora2r", tmp_path / "mlx", to="mlx", base=str(base))
    cfg = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert cfg["lora_parameters"]["rank"] == 8 and cfg["lora_parameters"]["scale"] == 1.0
    assert_close(mlx_logits(base, tmp_path / "mlx"), want, moved_from=mlx_logits(base))


# ---- mlx-lm -> PEFT -----------------------------------------------------------------------------

@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_mlx_adapter_to_peft_gives_mlx_logits(base, tmp_path, dora):
    src = make_mlx_adapter(base, tmp_path / "mlx", dora=dora)
    want = mlx_logits(base, src)
    convert(src, tmp_path / "peft", to="peft", base=str(base))
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_dora"], cfg["layers_to_transform"]) == (4, 12.0, dora, [1])
    assert_close(peft_logits(base, tmp_path / "peft"), want, moved_from=mlx_logits(base))


def test_ragged_mlx_adapter_to_peft_uses_an_exact_regex(base, tmp_path):
    """Blocks x modules not a full grid: PEFT's target_modules becomes a regex matching exactly those."""
    src = make_mlx_adapter(base, tmp_path / "mlx", num_layers=2, drop=("model.layers.0.mlp.down_proj",))
    convert(src, tmp_path / "peft", to="peft", base=str(base))
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert isinstance(cfg["target_modules"], str) and cfg["layers_to_transform"] is None
    model = PeftModel.from_pretrained(hf_model(base), str(tmp_path / "peft"))
    wrapped = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert len(wrapped) == 5  # 2 blocks x 3 modules, minus block 0's down_proj
    assert_close(torch_logits(model.eval()), mlx_logits(base, src), moved_from=mlx_logits(base))


def test_mlx_peft_mlx_round_trip_is_bit_identical(base, tmp_path):
    src = make_mlx_adapter(base, tmp_path / "mlx")
    convert(src, tmp_path / "peft", to="peft")
    convert(tmp_path / "peft", tmp_path / "back", to="mlx")
    before = load_file(src / "adapters.safetensors")
    after = load_file(tmp_path / "back" / "adapters.safetensors")
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and np.array_equal(before[k], after[k]), k
    cfg = lambda d: json.loads((d / "adapter_config.json").read_text())
    assert cfg(tmp_path / "back") == cfg(src)


def test_peft_without_forge_json_to_mlx_derives_a_working_config(base, tmp_path):
    """The derived mlx-lm config (no carried original): num_layers from the base's depth, keys explicit."""
    src = make_mlx_adapter(base, tmp_path / "mlx")
    convert(src, tmp_path / "peft", to="peft")
    (tmp_path / "peft" / "forge.json").unlink()
    convert(tmp_path / "peft", tmp_path / "back", to="mlx", base=str(base))
    cfg = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert cfg["num_layers"] == 1 and cfg["lora_parameters"]["keys"] == ["mlp.down_proj", "self_attn.q_proj",
                                                                          "self_attn.v_proj"]
    assert_close(mlx_logits(base, tmp_path / "back"), mlx_logits(base, src))


# ---- forge PiSSA -> plain LoRA on the ORIGINAL base ----------------------------------------------

def make_forge_pissa(base, out, r=4, alpha=8.0, seed=0):
    """A forge PiSSA adapter dir written by hand from the format spec, plus the residual model it trains on.

    W = W_res + s·B0·A0 with the top-r SVD of W; trained A, B = A0, B0 + noise. Returns the residual dir.
    """
    rng = np.random.default_rng(seed)
    s = alpha / r
    weights = load_file(base / "model.safetensors")
    lora, init = {}, {}
    for name in [k for k in weights if k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight"))]:
        module = name[: -len(".weight")]
        u, sv, vh = np.linalg.svd(weights[name].astype(np.float64), full_matrices=False)
        a0 = (np.sqrt(sv[:r] / s)[:, None] * vh[:r]).astype(np.float32)  # (r, in)
        b0 = (u[:, :r] * np.sqrt(sv[:r] / s)).astype(np.float32)  # (out, r)
        weights[name] = (weights[name] - s * b0 @ a0).astype(np.float32)  # W_res
        a = a0 + 0.3 * rng.standard_normal(a0.shape).astype(np.float32)
        b = b0 + 0.3 * rng.standard_normal(b0.shape).astype(np.float32)
        lora.update({f"{module}.lora_a": a.T.copy(), f"{module}.lora_b": b.T.copy()})
        init.update({f"{module}.lora_a": a0.T.copy(), f"{module}.lora_b": b0.T.copy()})
    out.mkdir(parents=True)
    save_file(lora, str(out / "adapters.safetensors"))
    save_file(init, str(out / "pissa_init.safetensors"))
    keys = ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]
    (out / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": 2,
        "lora_parameters": {"rank": r, "scale": s, "dropout": 0.0, "keys": keys}}))
    (out / "forge.json").write_text(json.dumps({
        "format": "forge-adapter", "version": 1, "base_model": str(base), "base_model_hash": None,
        "init": "pissa",
        "rank": r, "alpha": alpha, "scale": s, "rslora": False, "targets": ["down_proj", "q_proj", "v_proj"],
        "layers": [0, 1], "quantization": {"bits": 4, "group_size": 64, "mode": "affine"}, "config": {}}))
    res = out.parent / "residual"
    shutil.copytree(base, res)
    save_file(weights, str(res / "model.safetensors"), metadata={"format": "pt"})
    return res


def test_forge_pissa_exports_equal_residual_plus_adapter(base, tmp_path):
    residual = make_forge_pissa(base, tmp_path / "forge")
    want = mlx_logits(residual, tmp_path / "forge")  # W_res + s·B·A: what training optimised
    assert np.abs(mlx_logits(base, tmp_path / "forge") - want).max() > 0.1  # as a plain LoRA it is wrong
    convert(tmp_path / "forge", tmp_path / "mlx", to="mlx")
    assert_close(mlx_logits(base, tmp_path / "mlx"), want, moved_from=mlx_logits(base))
    convert(tmp_path / "forge", tmp_path / "peft", to="peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (8, 16.0, True)
    assert_close(peft_logits(base, tmp_path / "peft"), want)
    export(tmp_path / "forge", fmt="merged", out=tmp_path / "merged")
    assert_close(torch_logits(hf_model(tmp_path / "merged")), want)


# ---- merged and peft exports ---------------------------------------------------------------------

def test_merged_export_loads_in_transformers_with_peft_logits(base, tmp_path):
    model = peft_lora(base, init_lora_weights=False)
    model.save_pretrained(str(tmp_path / "peft"))
    export(tmp_path / "peft", fmt="merged", out=tmp_path / "merged", base=str(base), shard_bytes=60_000)
    shards = sorted(p.name for p in (tmp_path / "merged").glob("model-*.safetensors"))
    assert len(shards) > 1 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    got = torch_logits(hf_model(tmp_path / "merged"))
    assert_close(got, torch_logits(model), moved_from=torch_logits(hf_model(base)))


def test_peft_export_of_a_run_loads_unmodified_with_a_model_card(base, tmp_path):
    src = make_mlx_adapter(base, tmp_path / "run" / "adapter")
    rows = '{"step": 10, "train_loss": 2.5}\n{"step": 20, "val_loss": 1.25}\n'
    (tmp_path / "run" / "metrics.jsonl").write_text(rows)
    export(tmp_path / "run", fmt="peft", out=tmp_path / "out", base=str(base))
    assert_close(peft_logits(base, tmp_path / "out"), mlx_logits(base, src))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "val_loss | 1.25 |" in card and "train_loss | 2.5 |" in card and str(base) in card


def test_merged_quantize_keeps_the_delta_through_4bit(base, tmp_path):
    """--quantize: an mlx-lm 4-bit model of the MERGED weights; an adapted layer dequantizes to the merged
    W + s·B·A (within 4-bit rounding), not to the base W."""
    src = make_mlx_adapter(base, tmp_path / "mlx")
    export(src, fmt="merged", out=tmp_path / "q4", base=str(base), quantize=True)
    cfg = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 64
    q = {}
    for f in (tmp_path / "q4").glob("*.safetensors"):
        q.update(mx.load(str(f)))
    name = "model.layers.1.self_attn.q_proj"
    deq = np.array(mx.dequantize(q[name + ".weight"], q[name + ".scales"], q[name + ".biases"],
                                 group_size=64, bits=4))
    lora = load_file(src / "adapters.safetensors")
    w = load_file(base / "model.safetensors")[name + ".weight"]
    merged = w + 3.0 * (lora[name + ".lora_a"] @ lora[name + ".lora_b"]).T
    err, delta = np.abs(deq - merged).mean(), np.abs(merged - w).mean()
    assert err < 0.25 * delta, (err, delta)
    assert "model.embed_tokens.scales" not in q  # embeddings stay full precision (quant.embeddings = false)
    assert mlx_logits(tmp_path / "q4").shape == (len(IDS), 259)  # mlx_lm loads it


def _calibration_rows(path, n: int = 24):
    rows = [{"messages": [{"role": "user", "content": f"question {i}: what colour is the sky?"},
                          {"role": "assistant", "content": f"blue, of course ({i})"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("method", ["awq", "gptq", "dwq"])
def test_awq_gptq_and_dwq_exports_are_mlx_lm_models_forge_loads_too(method, base, tmp_path):
    """--quantize awq|gptq|dwq: mlx-lm's own quantizers on the exact merge, calibrated on chat-templated rows; the
    result loads in mlx_lm.load and in forge's inference path with the same logits. GPTQ and DWQ keep the calibration
    rows' logits closer to the float merge than plain rounding does (rtn: the bare --quantize)."""
    from forge_core.adapters.calibration import calibration_tokens
    from forge_mlx import ops

    src = make_mlx_adapter(base, tmp_path / "adapter")
    calib = _calibration_rows(tmp_path / "calib.jsonl")
    export(src, fmt="merged", out=tmp_path / method, base=str(base), quantize=method, calib=str(calib))
    cfg = json.loads((tmp_path / method / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4
    model, _ = mlx_load(str(tmp_path / method))
    assert any(type(m).__name__ == "QuantizedLinear" for _, m in model.named_modules())
    forge_cfg = __import__("forge_core.config", fromlist=["ForgeConfig"]).ForgeConfig()
    forge_cfg.model.path = str(tmp_path / method)
    forge_model, _ = ops.load_base_for_inference(forge_cfg)
    np.testing.assert_allclose(np.array(forge_model(mx.array([IDS]))[0]), mlx_logits(tmp_path / method),
                               atol=TOL)
    if method in ("gptq", "dwq"):
        export(src, fmt="merged", out=tmp_path / "f32", base=str(base))
        export(src, fmt="merged", out=tmp_path / "rtn", base=str(base), quantize=True)
        tokens = mx.array(calibration_tokens({}, base, str(calib)))
        want = np.array(mlx_load(str(tmp_path / "f32"))[0](tokens))
        errors = {q: np.abs(np.array(mlx_load(str(tmp_path / q))[0](tokens)) - want).mean() for q in ("rtn", method)}
        if method == "gptq":
            assert errors["gptq"] < 0.8 * errors["rtn"], errors
        else:  # DWQ starts from rtn's very layers and only trains their scales and biases
            rtn_quant = json.loads((tmp_path / "rtn" / "config.json").read_text())["quantization"]
            rtn_layers = {k for k, v in rtn_quant.items() if isinstance(v, dict)}
            assert rtn_layers == {k for k, v in cfg["quantization"].items() if isinstance(v, dict)}
            assert errors["dwq"] < errors["rtn"], errors


def test_a_quantize_export_with_bad_calibration_rows_is_one_line_and_writes_nothing(base, tmp_path):
    src = make_mlx_adapter(base, tmp_path / "adapter")
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    with pytest.raises(ForgeError, match=r"bad\.jsonl:1: .*no assistant turn"):
        export(src, fmt="merged", out=tmp_path / "out", base=str(base), quantize="gptq", calib=str(tmp_path / "bad.jsonl"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ForgeError, match="records no training data to calibrate on; pass --calib"):
        export(src, fmt="merged", out=tmp_path / "out", base=str(base), quantize="awq")
    (tmp_path / "one.jsonl").write_text('{"messages": [{"role": "user", "content": "q"}, '
                                        '{"role": "assistant", "content": "a"}]}\n')
    with pytest.raises(ForgeError, match=r"--quantize dwq: .*one\.jsonl gives 1 calibration sequence\(s\) of \d+ tokens; "
                                         r"it needs 2 at least"):
        export(src, fmt="merged", out=tmp_path / "out", base=str(base), quantize="dwq", calib=str(tmp_path / "one.jsonl"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ForgeError, match="--calib calibrates --quantize awq, gptq or dwq"):
        export(src, fmt="merged", out=tmp_path / "out", base=str(base), quantize=True, calib=str(tmp_path / "bad.jsonl"))
    assert not (tmp_path / "out").exists()
