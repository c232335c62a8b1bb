"""tools/make_real_shapes.py: real-shape random checkpoints that mlx-lm and transformers both load.

Built with --layers 1 (the full vocab kept: the embedding is the shape most likely to go wrong), then
loaded by mlx_lm.utils.load_model and by transformers; the two give the same logits.
"""

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from tests.tool_modules import load_tool

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]

# the parameter counts of the Hub checkpoints (model cards / safetensors metadata)
PUBLISHED = {"llama-3.2-1b": 1_235_814_400, "qwen2.5-1.5b": 1_543_714_304,
             "llama-3.2-3b": 3_212_749_824, "llama-3.1-8b": 8_030_261_248}




shapes = load_tool("make_real_shapes")


def formula(cfg: dict) -> int:
    """Parameters of a Llama/Qwen2 decoder, written out independently of the tool's tensor list."""
    h, v, inter, n = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    q = cfg["num_attention_heads"] * (cfg.get("head_dim") or h // cfg["num_attention_heads"])
    kv = cfg["num_key_value_heads"] * (cfg.get("head_dim") or h // cfg["num_attention_heads"])
    bias = (q + 2 * kv) if cfg["model_type"] == "qwen2" else 0
    layer = 2 * h * q + 2 * h * kv + bias + 3 * h * inter + 2 * h
    return v * h * (1 if cfg["tie_word_embeddings"] else 2) + n * layer + h


def headers(model_dir: Path) -> dict:
    """{tensor name: (dtype, shape)} over every shard, read from the safetensors headers."""
    out = {}
    for f in sorted(model_dir.glob("model-*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        assert n % 8 == 0
        header.pop("__metadata__")
        end = max(t["data_offsets"][1] for t in header.values())
        assert f.stat().st_size == 8 + n + end
        out.update({k: (t["dtype"], tuple(t["shape"])) for k, t in header.items()})
    return out


@pytest.mark.parametrize("shape", list(shapes.SHAPES))
def test_parameter_counts_are_the_published_ones(shape):
    cfg = shapes.SHAPES[shape]
    assert shapes.param_count(cfg) == formula(cfg) == PUBLISHED[shape]


def test_bf16_rounding_matches_torch_and_chunks_are_deterministic():
    x = np.random.default_rng(0).standard_normal(100_000, dtype=np.float32) * 3
    ours = shapes.to_bf16(x.copy())
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, ref)
    assert shapes._chunk(0, 7, 3, 1000, 0.1) == shapes._chunk(0, 7, 3, 1000, 0.1)
    assert shapes._chunk(0, 7, 3, 1000, 0.1) != shapes._chunk(1, 7, 3, 1000, 0.1)


def test_shards_split_at_the_limit():
    specs = [(f"t{i}", (1000,), 1.0) for i in range(10)]  # 2000 bytes each
    assert [len(s) for s in shapes.plan_shards(specs, max_bytes=5000)] == [2, 2, 2, 2, 2]


@pytest.mark.parametrize("shape", ["llama-3.2-1b", "qwen2.5-1.5b"])
def test_one_layer_build_loads_in_mlx_lm_and_transformers_alike(shape, tmp_path):
    from mlx_lm.utils import load_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / shape
    shapes.main([shape, str(out), "--layers", "1", "--vocab", "49152", "--seed", "3"])
    cfg = json.loads((out / "config.json").read_text())
    real = shapes.SHAPES[shape]

    # the Hub config's keys and values; only the layer count and the tokenizer's bos/eos differ
    assert list(cfg) == list(real)
    assert {k for k in real if cfg[k] != real[k]} <= {"num_hidden_layers", "vocab_size", "bos_token_id", "eos_token_id"}
    assert cfg["num_hidden_layers"] == 1

    # tensors: HF names, bf16, the formula's shapes; the index names every one of them
    found = headers(out)
    specs = shapes.tensor_specs(cfg)
    assert found == {name: ("BF16", shape_) for name, shape_, _ in specs}
    assert sum(int(np.prod(s)) for _, s in found.values()) == formula(cfg)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(found)
    assert index["metadata"]["total_size"] == 2 * formula(cfg)
    assert ("lm_head.weight" in found) == (not cfg["tie_word_embeddings"])
    assert ("model.layers.0.self_attn.q_proj.bias" in found) == (shape == "qwen2.5-1.5b")

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The quick brown fox jumps over the lazy dog")["input_ids"][:8]
    assert cfg["eos_token_id"] == tok.eos_token_id

    model, _ = load_model(out)
    mlx_logits = np.array(model(mx.array([ids])).astype(mx.float32))
    del model

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    with torch.no_grad():
        hf_logits = hf(torch.tensor([ids])).logits.float().numpy()
    assert mlx_logits.shape == hf_logits.shape == (1, len(ids), cfg["vocab_size"])
    scale = float(np.abs(hf_logits).mean())
    assert 0.1 < scale < 10  # the init keeps activations in range (no inf/nan, not all zero)
    # both bf16 with different accumulation orders: close, not equal
    assert float(np.abs(mlx_logits - hf_logits).max()) < 0.1 * float(np.abs(hf_logits).max())
    assert (mlx_logits.argmax(-1) == hf_logits.argmax(-1)).mean() >= 0.75
