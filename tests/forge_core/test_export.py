"""`forge export` without frameworks: merged weights by the formula, shards, dtypes, card, upload errors.

Loading the outputs in transformers / PEFT / mlx-lm is in tests/test_real_clients.py.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from forge_core.adapters import safetensors_io as sio
from forge_core.adapters.export import export, push
from forge_core.adapters.formats import write_mlx_adapter, write_peft_adapter
from forge_core.errors import ForgeError
from tests.forge_core.test_adapters import fake_base, rand_adapter


def read_checkpoint(d):
    """{name: float array} and {name: dtype tag} over every shard listed in the index."""
    index = json.loads((d / "model.safetensors.index.json").read_text())
    tensors, tags = {}, {}
    for f in sorted(set(index["weight_map"].values())):
        infos, _ = sio.read_header(d / f)
        tensors.update(sio.load(d / f))
        tags.update({k: i.dtype for k, i in infos.items()})
    assert set(index["weight_map"]) == set(tensors)
    return tensors, tags, index


def test_merged_is_base_plus_delta_and_leaves_other_tensors_bit_identical(tmp_path):
    base, weights = fake_base(tmp_path / "base")
    a = rand_adapter(init="pissa", base=base)
    write_mlx_adapter(a, tmp_path / "forge")
    export(tmp_path / "forge", fmt="merged", out=tmp_path / "m", shard_bytes=1200)
    got, tags, index = read_checkpoint(tmp_path / "m")
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(v.size * 4 for v in got.values())
    assert set(tags.values()) == {"F32"} and set(got) == set(weights)
    for name, w in weights.items():
        m = name[: -len(".weight")]
        if m in a.tensors:  # W + s·(B A - B0 A0), one float32 rounding of the float64 sum
            (x, b), (x0, b0) = a.tensors[m], a.pissa_init[m]
            want = (w.astype(np.float64) + 2.0 * (b.astype(np.float64) @ x - b0.astype(np.float64) @ x0))
            assert np.array_equal(got[name], want.astype(np.float32)), name
        else:
            assert np.array_equal(got[name], w), name
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["torch_dtype"] == "float32" and cfg["num_hidden_layers"] == 2
    assert (tmp_path / "m" / "chat_template.jinja").read_text() == "chat_template.jinja of the base"
    assert (tmp_path / "m" / "tokenizer.json").exists()
    assert "of the base" not in (tmp_path / "m" / "README.md").read_text()  # our card, not the base's


def test_bf16_base_merges_to_f32_by_default_and_stays_bf16_on_request(tmp_path):
    base, weights = fake_base(tmp_path / "base", dtype="bfloat16")
    a = rand_adapter(base=base)
    write_peft_adapter(a, tmp_path / "peft")
    export(tmp_path / "peft", fmt="merged", out=tmp_path / "f32")
    export(tmp_path / "peft", fmt="merged", out=tmp_path / "bf16", dtype="base")
    f32, tags32, _ = read_checkpoint(tmp_path / "f32")
    bf16, tags16, _ = read_checkpoint(tmp_path / "bf16")
    assert set(tags32.values()) == {"F32"} and set(tags16.values()) == {"BF16"}
    name = "model.layers.1.self_attn.q_proj.weight"
    x, b = a.tensors["model.layers.1.self_attn.q_proj"]
    want = (weights[name].astype(np.float64) + 2.0 * (b.astype(np.float64) @ x)).astype(np.float32)
    assert np.array_equal(f32[name], want)
    assert np.array_equal(bf16[name], sio.bf16_to_f32(sio.f32_to_bf16(want)))
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_dora_merge_in_a_checkpoint_has_the_magnitude_row_norms(tmp_path):
    base, _ = fake_base(tmp_path / "base")
    a = rand_adapter(dora=True, base=base)
    write_peft_adapter(a, tmp_path / "dora")
    export(tmp_path / "dora", fmt="merged", out=tmp_path / "m")
    got, _, _ = read_checkpoint(tmp_path / "m")
    m = "model.layers.0.mlp.down_proj"
    np.testing.assert_allclose(np.linalg.norm(got[m + ".weight"], axis=1), a.magnitudes[m], rtol=1e-5)


@pytest.mark.parametrize("kw,message", [
    ({"fmt": "merged"}, "pass --base"),
    ({"fmt": "peft", "quantize": True}, "--format merged only"),
    ({"fmt": "gguf"}, "pass --base"),
    ({"fmt": "onnx"}, "choose peft, merged, mlx or gguf"),
    ({"fmt": "merged", "dtype": "int8"}, "dtype 'int8'"),
])
def test_export_refusals(tmp_path, kw, message):
    write_mlx_adapter(rand_adapter(), tmp_path / "a")
    with pytest.raises(ForgeError, match=message):
        export(tmp_path / "a", out=tmp_path / "out", **kw)


def test_quantized_base_is_refused_for_merging(tmp_path):
    base, _ = fake_base(tmp_path / "base", quantized=True)
    write_mlx_adapter(rand_adapter(base=base), tmp_path / "a")
    with pytest.raises(ForgeError, match="the base is quantized"):
        export(tmp_path / "a", fmt="merged", out=tmp_path / "out")


def test_failed_export_leaves_the_previous_output_in_place(tmp_path, monkeypatch):
    base, _ = fake_base(tmp_path / "base")
    write_mlx_adapter(rand_adapter(base=base), tmp_path / "a")
    export(tmp_path / "a", fmt="peft", out=tmp_path / "out")
    before = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    import forge_core.adapters.export as ex

    monkeypatch.setattr(ex, "model_card", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        export(tmp_path / "a", fmt="mlx", out=tmp_path / "out")
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_mlx_export_of_pissa_is_the_plain_rank_2r_lora(tmp_path):
    write_mlx_adapter(rand_adapter(init="pissa", r=3), tmp_path / "forge")
    export(tmp_path / "forge", fmt="mlx", out=tmp_path / "mlx")
    cfg = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert cfg["lora_parameters"]["rank"] == 6 and not (tmp_path / "mlx" / "pissa_init.safetensors").exists()


def test_model_card_names_base_method_data_and_final_metrics(tmp_path):
    a = rand_adapter(init="pissa", base="HuggingFaceTB/SmolLM2-135M-Instruct")
    a.forge = {"config": {"data": {"train": "data/train.jsonl"},
                          "train": {"lr": 2e-4, "steps": 50, "epochs": 1.0}}}
    write_mlx_adapter(a, tmp_path / "run" / "adapter")
    (tmp_path / "run" / "metrics.jsonl").write_text(
        '{"step": 10, "train_loss": 3.0}\nnot json\n{"step": 50, "train_loss": 1.5, "val_loss": 1.75}\n')
    export(tmp_path / "run", fmt="peft", out=tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlibrary_name: peft\n")
    for line in ["| method | PiSSA rank 4 as plain LoRA rank 8 |", "| training data | `data/train.jsonl` |",
                 "| train_loss | 1.5 |", "| val_loss | 1.75 |", "| step | 50 |", "over 2 logged rows"]:
        assert line in card, line


def test_push_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ForgeError, match="HF_HUB_OFFLINE is set"):
        push(tmp_path, "me/adapter")


def test_push_unreachable_hub_is_one_clear_error(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    (tmp_path / "README.md").write_text("x")
    with pytest.raises(ForgeError, match=r"--push-to-hub me/adapter: upload failed .* saved in"):
        push(tmp_path, "me/adapter")


def test_quantize_without_mlx_lm_is_one_clear_error(tmp_path, monkeypatch):
    base, _ = fake_base(tmp_path / "base")
    write_mlx_adapter(rand_adapter(base=base), tmp_path / "a")
    monkeypatch.setitem(sys.modules, "mlx_lm", None)  # import mlx_lm -> ImportError
    with pytest.raises(ForgeError, match="--quantize needs mlx-lm"):
        export(tmp_path / "a", fmt="merged", out=tmp_path / "q", quantize=True)
    assert not (tmp_path / "q").exists()


def test_cli_export_writes_the_adapter_and_reports_errors_in_one_line(tmp_path):
    from click.testing import CliRunner

    from forge_core.cli import cli

    base, _ = fake_base(tmp_path / "base")
    write_mlx_adapter(rand_adapter(base=base), tmp_path / "a")
    src = str(tmp_path / "a")
    ok = CliRunner().invoke(cli, ["export", src, "--format", "peft", "--out", str(tmp_path / "o")])
    assert ok.exit_code == 0 and (tmp_path / "o" / "adapter_model.safetensors").exists(), ok.output
    bad = CliRunner().invoke(cli, ["export", src, "--format", "mlx", "--out", str(tmp_path / "o2"),
                                   "--base", str(tmp_path)])  # a dir that is no model
    assert bad.exit_code == 2 and bad.output.startswith("forge: error:") and bad.output.count("\n") == 1


def test_a_base_with_another_hash_than_recorded_is_warned_about(tmp_path, capsys):
    base, _ = fake_base(tmp_path / "base")
    a = rand_adapter(base=base)
    a.forge = {"base_model_hash": "0123456789abcdef"}
    write_mlx_adapter(a, tmp_path / "a")
    export(tmp_path / "a", fmt="merged", out=tmp_path / "m")
    err = capsys.readouterr().err
    assert "warning: base" in err and "the adapter was trained on 0123456789abcdef" in err
