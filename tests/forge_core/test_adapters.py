"""Adapter formats and the converter, framework-free: numpy + safetensors only (fast).

The real PEFT / mlx-lm round trips live in tests/test_real_clients.py.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from forge_core.adapters import mapping as mp
from forge_core.adapters import safetensors_io as sio
from forge_core.adapters.convert import convert, delta_weights, merged_weight, to_plain_lora
from forge_core.adapters.formats import Adapter, read_adapter, write_mlx_adapter, write_peft_adapter
from forge_core.cli import cli
from forge_core.errors import ForgeError

SHAPES = {"self_attn.q_proj": (8, 8), "self_attn.v_proj": (4, 8), "mlp.down_proj": (8, 16)}  # (out, in)


def modules(layers=(0, 1)):
    return {f"model.layers.{n}.{rel}": shape for n in layers for rel, shape in SHAPES.items()}


def rand_adapter(r=4, scale=2.0, seed=0, init="lora", rslora=False, dora=False, layers=(0, 1), base=None):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    tensors = {m: (f(r, i), f(o, r)) for m, (o, i) in modules(layers).items()}
    pissa = {m: (f(r, i), f(o, r)) for m, (o, i) in modules(layers).items()} if init == "pissa" else None
    mags = {m: np.abs(f(o)) + 1 for m, (o, _) in modules(layers).items()} if dora else None
    alpha = mp.alpha_for(scale, r, rslora)
    return Adapter(tensors, scale, r, alpha, rslora, init=init, pissa_init=pissa, magnitudes=mags,
                   base_model=str(base) if base else None)


def fake_base(d, dtype="float32", files=2, seed=1, quantized=False):
    """A minimal HF dir: config.json, weights split over `files` shards + index, tokenizer files."""
    rng = np.random.default_rng(seed)
    w = {"model.embed_tokens.weight": (16, 8), "model.norm.weight": (8,), "lm_head.weight": (16, 8)}
    w.update({f"{m}.weight": s for m, s in modules().items()})
    w.update({f"model.layers.{n}.input_layernorm.weight": (8,) for n in (0, 1)})
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in sorted(w.items())}
    d.mkdir(parents=True)
    names = sorted(tensors)
    weight_map = {}
    for i in range(files):
        part = names[i::files]
        fname = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        sio.save(d / fname, {k: tensors[k] for k in part}, metadata={"format": "pt"}, as_dtype=dtype)
        weight_map.update(dict.fromkeys(part, fname))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = {"model_type": "llama", "num_hidden_layers": 2, "torch_dtype": dtype}
    if quantized:
        cfg["quantization"] = {"bits": 4, "group_size": 64}
    (d / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "README.md"):
        (d / name).write_text(f"{name} of the base")
    if dtype == "bfloat16":  # what the base holds, exactly (bf16-rounded)
        tensors = {k: sio.bf16_to_f32(sio.f32_to_bf16(v)) for k, v in tensors.items()}
    return d, tensors


def adapter_effect(a: Adapter) -> dict:
    """{module: s·B·A} in float64 - the quantity every layout must preserve."""
    return {m: a.scale * (b.astype(np.float64) @ x.astype(np.float64)) for m, (x, b) in a.tensors.items()}


# ---- safetensors_io ------------------------------------------------------------------------------

def test_bf16_rounding_is_nearest_even_and_read_back_exactly():
    # bf16 keeps 7 mantissa bits: near 1 the spacing is 2^-7, so 1 + 2^-8 and 1 + 3·2^-8 are exact ties
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -2.5, np.inf, np.nan], np.float32)
    back = sio.bf16_to_f32(sio.f32_to_bf16(x))
    assert back[:6].tolist() == [1.0, 1.0, 1 + 2**-6, 1 + 2**-7, -2.5, np.inf]  # ties go to the even mantissa
    assert np.isnan(back[6])
    assert sio.bf16_to_f32(sio.f32_to_bf16(np.array([np.finfo(np.float32).max])))[0] == np.inf  # overflow


def test_safetensors_io_round_trip_is_readable_by_the_reference_reader(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    tensors = {"x": x, "i": np.arange(3, dtype=np.int64), "h": x.astype(np.float16)}
    sio.save(tmp_path / "a.safetensors", tensors, metadata={"format": "pt"})
    ref = load_file(tmp_path / "a.safetensors")
    assert np.array_equal(ref["x"], x) and ref["i"].tolist() == [0, 1, 2] and ref["h"].dtype == np.float16
    infos, meta = sio.read_header(tmp_path / "a.safetensors")
    assert meta == {"format": "pt"} and infos["x"].shape == (3, 4) and infos["x"].dtype == "F32"
    assert all(i.begin % 8 == 0 for i in infos.values())  # widest first: aligned


# ---- layouts -------------------------------------------------------------------------------------

def test_mlx_layout_holds_transposed_canonical_tensors(tmp_path):
    a = rand_adapter()
    write_mlx_adapter(a, tmp_path / "mlx")
    raw = load_file(tmp_path / "mlx" / "adapters.safetensors")
    m = "model.layers.1.mlp.down_proj"
    assert raw[f"{m}.lora_a"].shape == (16, 4) and np.array_equal(raw[f"{m}.lora_a"], a.tensors[m][0].T)
    assert raw[f"{m}.lora_b"].shape == (4, 8) and np.array_equal(raw[f"{m}.lora_b"], a.tensors[m][1].T)
    cfg = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert cfg == {"fine_tune_type": "lora", "num_layers": -1, "lora_parameters": {
        "rank": 4, "scale": 2.0, "dropout": 0.0,
        "keys": ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]}}
    back = read_adapter(tmp_path / "mlx")
    assert all(np.array_equal(back.tensors[k][i], a.tensors[k][i]) for k in a.tensors for i in (0, 1))


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_layout_keys_and_alpha(tmp_path, rslora):
    a = rand_adapter(r=4, scale=2.0, rslora=rslora)
    write_peft_adapter(a, tmp_path / "peft")
    raw = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    m = "model.layers.0.self_attn.v_proj"
    assert np.array_equal(raw[f"base_model.model.{m}.lora_A.weight"], a.tensors[m][0])  # (r, in)
    assert raw[f"base_model.model.{m}.lora_B.weight"].shape == (4, 4)  # (out, r)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == (4.0 if rslora else 8.0)  # scale·sqrt(r) | scale·r
    assert (cfg["r"], cfg["use_rslora"], cfg["peft_type"]) == (4, rslora, "LORA")
    assert cfg["task_type"] == "CAUSAL_LM"
    assert cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"] and cfg["layers_to_transform"] == [0, 1]
    meta = json.loads((tmp_path / "peft" / "forge.json").read_text())
    assert (meta["rank"], meta["scale"], meta["rslora"], meta["layers"]) == (4, 2.0, rslora, [0, 1])
    assert read_adapter(tmp_path / "peft").scale == 2.0


def test_peft_rank_and_alpha_patterns_fold_into_b(tmp_path):
    """PEFT's per-module r/alpha -> one mlx-lm scale: s_m/s is folded into B, s·B'·A = s_m·B·A."""
    rng = np.random.default_rng(0)
    d = tmp_path / "peft"
    d.mkdir()
    flat, want = {}, {}
    for m, (o, i) in modules().items():
        r = 2 if m.endswith("v_proj") else 4
        alpha = 3.0 if m.endswith("down_proj") else 8.0
        a, b = rng.standard_normal((r, i)).astype(np.float32), rng.standard_normal((o, r)).astype(np.float32)
        flat[f"base_model.model.{m}.lora_A.weight"], flat[f"base_model.model.{m}.lora_B.weight"] = a, b
        want[m] = alpha / r * (b.astype(np.float64) @ a)
    save_file(flat, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
        "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3.0}}))
    a = read_adapter(d)
    assert a.scale == 2.0
    for m, eff in adapter_effect(a).items():
        np.testing.assert_allclose(eff, want[m], rtol=1e-6, atol=1e-6)
    convert(d, tmp_path / "mlx", to="mlx")  # mlx-lm has one rank: v_proj is zero-padded 2 -> 4
    raw = load_file(tmp_path / "mlx" / "adapters.safetensors")
    assert raw["model.layers.0.self_attn.v_proj.lora_a"].shape == (8, 4)
    assert not raw["model.layers.0.self_attn.v_proj.lora_a"][:, 2:].any()
    for m, eff in adapter_effect(read_adapter(tmp_path / "mlx")).items():
        np.testing.assert_allclose(eff, want[m], rtol=1e-6, atol=1e-6)


def test_peft_writer_puts_other_ranks_in_rank_pattern_at_the_same_scale(tmp_path):
    a = rand_adapter(r=4, scale=0.5)
    m = "model.layers.1.self_attn.q_proj"
    a.tensors[m] = (a.tensors[m][0][:2], a.tensors[m][1][:, :2])
    write_peft_adapter(a, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    key = re.escape(m)
    assert cfg["rank_pattern"] == {key: 2} and cfg["alpha_pattern"] == {key: 1.0}  # 0.5 = 1.0 / 2
    assert mp.peft_pattern_value(cfg["rank_pattern"], m, 4) == 2
    assert mp.peft_pattern_value(cfg["rank_pattern"], "model.layers.11.self_attn.q_proj", 4) == 4


def test_bf16_peft_adapter_stays_bf16_when_converted(tmp_path):
    a = rand_adapter()
    a.dtype = "bfloat16"
    write_peft_adapter(a, tmp_path / "peft")
    convert(tmp_path / "peft", tmp_path / "mlx", to="mlx")
    infos, _ = sio.read_header(tmp_path / "mlx" / "adapters.safetensors")
    assert {i.dtype for i in infos.values()} == {"BF16"}
    back = read_adapter(tmp_path / "mlx")
    m = "model.layers.0.self_attn.q_proj"
    assert back.dtype == "bfloat16"
    assert np.array_equal(back.tensors[m][0], sio.bf16_to_f32(sio.f32_to_bf16(a.tensors[m][0])))


# ---- PiSSA and deltas ----------------------------------------------------------------------------

@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_to_plain_lora_gives_the_same_delta_at_rank_2r(rslora):
    a = rand_adapter(r=4, scale=2.0, init="pissa", rslora=rslora)
    p = to_plain_lora(a)
    assert (p.rank, p.init, p.pissa_init, p.scale) == (8, "lora", None, 2.0)
    assert p.alpha == pytest.approx(a.alpha * (math.sqrt(2) if rslora else 2))
    assert mp.scale_for(p.alpha, p.rank, rslora) == pytest.approx(a.scale)  # PEFT recomputes the same scale
    for m, (x, b) in a.tensors.items():
        x0, b0 = a.pissa_init[m]
        want = 2.0 * (b.astype(np.float64) @ x - b0.astype(np.float64) @ x0)
        np.testing.assert_allclose(adapter_effect(p)[m], want, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(delta_weights(a)[m], want, rtol=1e-5, atol=1e-5)
        assert p.tensors[m][0].shape == (8, x.shape[1]) and np.array_equal(p.tensors[m][1][:, 4:], -b0)


def test_delta_weights_of_plain_lora_is_scale_b_a():
    a = rand_adapter(r=2, scale=0.25)
    m = "model.layers.0.mlp.down_proj"
    x, b = a.tensors[m]
    d = delta_weights(a)[m]
    assert d.dtype == np.float32 and d.shape == (8, 16)
    np.testing.assert_allclose(d, 0.25 * (b.astype(np.float64) @ x), rtol=1e-6)


def test_dora_merged_weight_rescales_rows_to_the_magnitude():
    a = rand_adapter(dora=True)
    m = "model.layers.0.self_attn.q_proj"
    w = np.random.default_rng(5).standard_normal((8, 8)).astype(np.float32)
    got = merged_weight(a, m, w)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), a.magnitudes[m], rtol=1e-5)
    v = w + adapter_effect(a)[m]
    want = v / np.linalg.norm(v, axis=1)[:, None] * a.magnitudes[m][:, None]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    with pytest.raises(ForgeError, match="DoRA"):
        delta_weights(a)


@pytest.mark.parametrize("write", [write_mlx_adapter, write_peft_adapter], ids=["mlx", "peft"])
def test_forge_pissa_dir_round_trips_with_its_init(tmp_path, write):
    """forge_mlx writes PiSSA in mlx-lm layout, forge_cuda in PEFT layout: both read back, both convert."""
    a = rand_adapter(init="pissa")
    a.forge = {"config": {"lora": {"rank": 4}},
               "quantization": {"bits": 4, "group_size": 64, "mode": "affine"}}
    write(a, tmp_path / "forge")
    meta = json.loads((tmp_path / "forge" / "forge.json").read_text())
    assert (meta["init"], meta["format"], meta["quantization"]["bits"]) == ("pissa", "forge-adapter", 4)
    back = read_adapter(tmp_path / "forge")
    m = "model.layers.1.self_attn.v_proj"
    assert back.init == "pissa" and np.array_equal(back.pissa_init[m][1], a.pissa_init[m][1])
    convert(tmp_path / "forge", tmp_path / "plain", to="mlx")
    assert not (tmp_path / "plain" / "pissa_init.safetensors").exists()
    meta = json.loads((tmp_path / "plain" / "forge.json").read_text())
    assert (meta["init"], meta["rank"], meta["pissa_to_lora"]) == ("lora", 8, {"rank": 4, "alpha": 8.0})


# ---- mlx-lm config rules ---------------------------------------------------------------------------

def test_mlx_num_layers_covers_every_adapted_block():
    assert mp.mlx_num_layers([1], 2) == 1  # the last block
    assert mp.mlx_num_layers([0], 2) == 2  # not a suffix: cover down to block 0 (block 1 gets B = 0)
    assert mp.mlx_num_layers([3, 5], 30) == 27
    assert mp.mlx_num_layers([0, 1], None) == -1  # depth unknown: all blocks
    assert mp.mlx_keys(["model.layers.0.self_attn.q_proj", "lm_head"]) == ["lm_head", "self_attn.q_proj"]


def test_carried_mlx_config_is_kept_only_while_it_describes_the_tensors():
    mods = list(modules((1,)))
    carried = {"fine_tune_type": "lora", "num_layers": 16, "iters": 600,
               "lora_parameters": {"rank": 4, "scale": 20.0, "dropout": 0.0}}
    derived = mp.mlx_config(mods, 4, 20.0, 0.0, False, None)
    assert mp.keep_mlx_config(carried, derived, mods, None) is carried
    rank8 = mp.mlx_config(mods, 8, 20.0, 0.0, False, None)
    assert mp.keep_mlx_config(carried, rank8, mods, None) is rank8
    assert mp.keep_mlx_config({**carried, "num_layers": 1}, derived, list(modules((0, 1))), 2) != carried


def test_peft_targets_select_exactly_the_adapted_modules():
    grid = list(modules((0, 1)))
    assert mp.peft_targets(grid, 2) == (["down_proj", "q_proj", "v_proj"], None)
    assert mp.peft_targets(grid, 4) == (["down_proj", "q_proj", "v_proj"], [0, 1])
    ragged = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "lm_head"]
    regex, layers = mp.peft_targets(ragged, 2)
    every = list(modules((0, 1, 11))) + ["lm_head", "model.embed_tokens"]
    assert layers is None and [m for m in every if re.fullmatch(regex, m)] == sorted(ragged, key=every.index)


# ---- refusals ------------------------------------------------------------------------------------

def _mlx_dir(tmp_path, tensors=None, cfg=None):
    d = tmp_path / "bad"
    d.mkdir()
    a = np.zeros((8, 4), np.float32)
    save_file(tensors or {"model.layers.0.self_attn.q_proj.lora_a": a,
                          "model.layers.0.self_attn.q_proj.lora_b": np.ones((4, 8), np.float32)},
              str(d / "adapters.safetensors"))
    cfg = cfg or {"num_layers": 1, "lora_parameters": {"rank": 4, "scale": 1.0}}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("tensors,cfg,message", [
    ({"model.layers.0.self_attn.q_proj.weight": np.zeros((8, 8), np.float32)}, None, "unknown tensor"),
    ({"model.layers.0.self_attn.q_proj.lora_a": np.zeros((8, 4), np.float32)}, None, "needs both A and B"),
    (None, {"num_layers": 1, "lora_parameters": {"rank": 4}}, "'scale'"),
    (None, {"lora_parameters": {"rank": 4, "scale": 1.0}}, "'num_layers'"),
    (None, {"num_layers": 1, "lora_parameters": {"rank": 8, "scale": 1.0}}, "rank 4, adapter_config says 8"),
    (None, {"num_layers": 1, "fine_tune_type": "full", "lora_parameters": {"rank": 4, "scale": 1.0}}, "full"),
])
def test_bad_mlx_adapters_are_refused_by_name(tmp_path, tensors, cfg, message):
    with pytest.raises(ForgeError, match=re.escape(message)):
        read_adapter(_mlx_dir(tmp_path, tensors, cfg))


@pytest.mark.parametrize("cfg,message", [
    ({"peft_type": "LORA", "lora_alpha": 8}, "'r'"),
    ({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "init_lora_weights": "pissa_niter_4"},
     "path_initial_model_for_weight_conversion"),
    ({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3", "r": 4, "lora_alpha": 8}, "LORA adapters only"),
])
def test_bad_peft_adapters_are_refused_by_name(tmp_path, cfg, message):
    write_peft_adapter(rand_adapter(), tmp_path / "p")
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(cfg))
    (tmp_path / "p" / "forge.json").unlink()
    with pytest.raises(ForgeError, match=re.escape(message)):
        read_adapter(tmp_path / "p")


def test_forge_pissa_without_its_init_is_refused(tmp_path):
    write_mlx_adapter(rand_adapter(init="pissa"), tmp_path / "f")
    (tmp_path / "f" / "pissa_init.safetensors").unlink()
    with pytest.raises(ForgeError, match="pissa_init.safetensors is missing"):
        read_adapter(tmp_path / "f")


def test_shapes_are_checked_against_the_base(tmp_path):
    base, _ = fake_base(tmp_path / "base")
    write_mlx_adapter(rand_adapter(), tmp_path / "ok")
    convert(tmp_path / "ok", tmp_path / "out", to="peft", base=str(base))
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] is None and cfg["base_model_name_or_path"] == str(base)  # all 2 blocks
    bad = rand_adapter(base=base)
    m = "model.layers.0.self_attn.v_proj"
    bad.tensors[m] = (np.zeros((4, 8), np.float32), np.zeros((5, 4), np.float32))
    write_mlx_adapter(bad, tmp_path / "bad")
    with pytest.raises(ForgeError, match=r"needs a weight of shape \(5, 8\), the base .* has \(4, 8\)"):
        convert(tmp_path / "bad", tmp_path / "out2", to="peft")  # forge.json's base is a local dir: checked
    extra = rand_adapter()
    extra.tensors["model.layers.7.self_attn.q_proj"] = extra.tensors["model.layers.0.self_attn.q_proj"]
    write_mlx_adapter(extra, tmp_path / "extra")
    with pytest.raises(ForgeError, match="'model.layers.7.self_attn.q_proj' is not a linear layer of the"):
        convert(tmp_path / "extra", tmp_path / "out3", to="mlx", base=str(base))
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def test_a_4bit_mlx_base_is_checked_on_its_unpacked_shapes(tmp_path):
    """mlx-lm stores 4-bit weights packed 8 per uint32: (out, in/8) with .scales - in = 8 · packed."""
    d = tmp_path / "q4"
    d.mkdir()
    packed = {f"{m}.weight": np.zeros((o, i // 8), np.uint32) for m, (o, i) in modules().items()}
    packed.update({f"{m}.scales": np.ones((o, 1), np.float16) for m, (o, _) in modules().items()})
    sio.save(d / "model.safetensors", packed)
    (d / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "quantization": {"bits": 4,
                                                                                       "group_size": 8}}))
    write_mlx_adapter(rand_adapter(), tmp_path / "a")
    convert(tmp_path / "a", tmp_path / "out", to="peft", base=str(d))
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["layers_to_transform"] is None


def test_run_dir_is_read_through_its_adapter_subdir(tmp_path):
    write_mlx_adapter(rand_adapter(), tmp_path / "run" / "adapter")
    assert read_adapter(tmp_path / "run").rank == 4
    with pytest.raises(ForgeError, match="must not be the source"):
        convert(tmp_path / "run", tmp_path / "run" / "adapter", to="mlx")


def test_cli_convert_error_is_one_line_exit_2(tmp_path):
    d = _mlx_dir(tmp_path, cfg={"num_layers": 1, "lora_parameters": {"rank": 4}})
    res = CliRunner().invoke(cli, ["convert", str(d), str(tmp_path / "o"), "--to", "peft"])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and res.output.startswith("forge: error:")
    assert "'scale'" in res.output
