"""forge_mlx model surgery: PiSSA leaves the model unchanged, QPiSSA beats QLoRA, both matmul paths agree."""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from forge_core.config import ForgeConfig
from forge_mlx.lora import LoRALinear, trainable_params
from forge_mlx.model import build_model, load_base
from forge_mlx.quant import QuantLinear

pytestmark = pytest.mark.mlx
PROMPT = [[257, 84, 82, 68, 81, 198, 71, 72, 258, 198, 257, 64, 82, 82, 72, 82, 83]]


def _cfg(model_dir, init="pissa", bits=0, rank=4, **lora):
    cfg = ForgeConfig()
    cfg.model.path = str(model_dir)
    cfg.lora.init, cfg.lora.rank, cfg.lora.alpha = init, rank, float(rank)
    cfg.quant.bits, cfg.quant.group_size = bits, 32
    for k, v in lora.items():
        setattr(cfg.lora, k, v)
    return cfg


def _logits(model):
    return np.array(model(mx.array(PROMPT)).astype(mx.float32))


def test_pissa_init_leaves_full_precision_output_unchanged(tiny_model):
    base, _, _ = load_base(str(tiny_model))
    ref = _logits(base)
    model, _, _, factors = build_model(_cfg(tiny_model, "pissa", bits=0))
    assert len(factors) == 14  # 7 targets x 2 layers
    np.testing.assert_allclose(_logits(model), ref, atol=1e-4)


def test_pissa_niter_init_leaves_output_unchanged(tiny_model):
    base, _, _ = load_base(str(tiny_model))
    model, _, _, _ = build_model(_cfg(tiny_model, "pissa_niter_2", bits=0))
    np.testing.assert_allclose(_logits(model), _logits(base), atol=1e-4)


def test_qpissa_logits_closer_to_original_than_qlora(tiny_model):
    """Quantizing the residual (QPiSSA) loses less than quantizing W (QLoRA init, B = 0)."""
    base, _, _ = load_base(str(tiny_model))
    ref = _logits(base)
    qpissa, _, _, _ = build_model(_cfg(tiny_model, "pissa", bits=4, rank=8))
    qlora, _, _, _ = build_model(_cfg(tiny_model, "lora", bits=4, rank=8))
    err_pissa = np.abs(_logits(qpissa) - ref).max()
    err_lora = np.abs(_logits(qlora) - ref).max()
    assert err_pissa < err_lora
    assert err_lora < 1.0  # both are within 4-bit quantization error of the original


def test_qpissa_quantizes_the_residual_not_w(tiny_model):
    cfg = _cfg(tiny_model, "pissa", bits=4, rank=4)
    model, _, _, factors = build_model(cfg)
    path = "model.layers.0.self_attn.q_proj"
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and isinstance(layer.linear, QuantLinear)
    base, _, _ = load_base(str(tiny_model))
    w = np.array(base.model.layers[0].self_attn.q_proj.weight)
    a0, b0 = factors[path]
    w_res = w - 1.0 * b0 @ a0
    deq = np.array(layer.linear.dequantized())
    err_res = np.abs(deq - w_res).max()
    assert err_res < 0.1 * np.abs(w_res).max()  # the stored weight is Q(W_res), not Q(W)
    # reconstruction: ||W - (Q(W_res) + s B0A0)|| < ||W - Q(W)||
    wq, s, b = mx.quantize(mx.array(w), group_size=32, bits=4)
    q_w = np.array(mx.dequantize(wq, s, b, group_size=32, bits=4))
    assert np.linalg.norm(w - (deq + b0 @ a0)) < np.linalg.norm(w - q_w)


def test_dequant_and_fused_matmul_paths_agree():
    w = mx.random.normal((96, 64), key=mx.random.key(0))
    x = mx.random.normal((3, 5, 64), key=mx.random.key(1))
    deq = QuantLinear.from_weight(w, None, 32, 4, matmul="dequant")
    fused = QuantLinear.from_weight(w, None, 32, 4, matmul="fused")
    np.testing.assert_allclose(np.array(deq(x)), np.array(fused(x)), atol=1e-4)


def test_gradient_flows_to_input_through_dequant_path():
    w = mx.random.normal((96, 64), key=mx.random.key(0))
    x = mx.random.normal((4, 64), key=mx.random.key(1))
    a, b = QuantLinear.from_weight(w, None, 32, 4, "dequant"), QuantLinear.from_weight(w, None, 32, 4, "fused")
    ga = mx.grad(lambda x: a(x).sum())(x)
    gb = mx.grad(lambda x: b(x).sum())(x)
    np.testing.assert_allclose(np.array(ga), np.array(gb), atol=1e-4)


def test_only_lora_factors_are_trainable_with_mlx_lm_key_names(tiny_model):
    model, _, _, _ = build_model(_cfg(tiny_model, "lora", bits=4, layers="-1:"))
    keys = sorted(trainable_params(model))
    assert keys[0].startswith("model.layers.1.") and all(k.endswith((".lora_a", ".lora_b")) for k in keys)
    assert len(keys) == 14  # 7 targets in the last layer only


def test_fuse_folds_the_adapter_into_a_dense_linear():
    base = nn.Linear(64, 32, bias=False)
    layer = LoRALinear(base, rank=4, scale=2.0)
    layer.lora_b = mx.random.normal((4, 32), key=mx.random.key(2))
    x = mx.random.normal((2, 64), key=mx.random.key(3))
    np.testing.assert_allclose(np.array(layer.fuse()(x)), np.array(layer(x)), atol=1e-5)


def test_adapter_saved_straight_after_init_holds_the_init_values(tiny_model, tmp_path):
    """No optimizer step yet: lora_a/lora_b on disk must equal A0ᵀ/B0ᵀ (no strided-memory mix-up)."""
    from safetensors.numpy import load_file

    from forge_mlx.model import save_adapter

    cfg = _cfg(tiny_model, "pissa", bits=4)
    model, _, model_dir, factors = build_model(cfg)
    out = save_adapter(tmp_path / "adapter", model, cfg, factors, model_dir)
    saved, init = load_file(str(out / "adapters.safetensors")), load_file(str(out / "pissa_init.safetensors"))
    assert saved.keys() == init.keys() and len(saved) == 28
    for k in saved:
        np.testing.assert_array_equal(saved[k], init[k])


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (8, 64), (4, 128)])
def test_cpu_unpack_equals_mx_dequantize_bit_for_bit(bits, group_size):
    from forge_mlx.quant import unpack_affine

    w = mx.random.normal((48, 256))
    q, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    want = mx.dequantize(q, s, b, group_size=group_size, bits=bits)
    assert mx.array_equal(unpack_affine(q, s, b, group_size, bits), want).item()
    compiled = mx.compile(lambda q, s, b: unpack_affine(q, s, b, group_size, bits))  # as inside the train step
    assert mx.array_equal(compiled(q, s, b), want).item()


def test_an_mlx_lm_quantized_model_gets_forges_cpu_matmul_with_the_same_logits(tiny_model):
    """load_base(quantized_ok=True) (inference on an rtn/AWQ/GPTQ export) switches mlx-lm's quantized layers, the
    embedding's tied-head product included, to forge's per-device path in place; the logits are mlx-lm's own."""
    import mlx_lm.utils
    from mlx import nn

    from forge_mlx.quant import QuantEmbedding, adopt_quantized

    model, _ = mlx_lm.utils.load_model(tiny_model)
    nn.quantize(model, group_size=32, bits=4)  # every Linear and the Embedding, as mlx_lm.convert -q does
    ids = mx.array([[3, 17, 42, 99, 5, 250]])
    want = np.array(model(ids))
    quantized = [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert adopt_quantized(model) == len(quantized) >= 2 * 7 + 1
    assert {type(m) for m in quantized} == {QuantLinear, QuantEmbedding}
    assert all(m.matmul == "dequant" for m in quantized)
    np.testing.assert_allclose(np.array(model(ids)), want, atol=1e-4)


def test_awqs_quantized_blocks_compute_with_forges_cpu_path_only_inside_the_export(tiny_model):
    """forge export --quantize awq on the CPU: inside posttrain_quant's context, mlx_lm.quant.awq's nn.quantize leaves
    forge's dequant layers (the same outputs as mlx-lm's own); outside it, that module sees mlx.nn again."""
    import mlx_lm.utils
    from mlx import nn
    from mlx_lm.quant import awq

    from forge_mlx.posttrain_quant import _fast_quantized_blocks

    model, _ = mlx_lm.utils.load_model(tiny_model)
    block, x = model.model.layers[0], mx.random.normal((2, 5, model.args.hidden_size))
    mask = "causal"
    plain = model.model.layers[1]
    plain.update(block.parameters())  # the same weights, quantized by mlx-lm itself
    nn.quantize(plain, group_size=32, bits=4)
    with _fast_quantized_blocks(awq):
        assert awq.nn is not nn and awq.nn.Linear is nn.Linear
        awq.nn.quantize(block, group_size=32, bits=4)
    assert awq.nn is nn
    assert {type(m) for _, m in block.named_modules() if isinstance(m, nn.QuantizedLinear)} == {QuantLinear}
    np.testing.assert_allclose(np.array(block(x, mask=mask)), np.array(plain(x, mask=mask)), atol=1e-4)
