"""bitsandbytes base layers on the CPU: NF4 / FP4 / int8, both matmul paths, and the QPiSSA error claim."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

from forge_core.config import QuantConfig
from forge_core.errors import ForgeError
from forge_core.pissa import pissa_factors
from forge_cuda.quant import (
    QuantLinear,
    QuantLinear8bit,
    quant_kind,
    quantize_linear,
    quantize_rest,
    weight_bytes,
)

pytestmark = pytest.mark.cuda


def _linear(out_f=128, in_f=64, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.normal_(0, in_f ** -0.5)
    return lin


@pytest.mark.parametrize("kind,cls,max_err", [("nf4", QuantLinear, 0.1), ("fp4", QuantLinear, 0.12),
                                              ("int8", QuantLinear8bit, 0.005)])
def test_quantized_weight_is_close_and_packed(kind, cls, max_err):
    lin = _linear()
    q = quantize_linear(lin, kind, double_quant=True, compute_dtype=torch.float32, device="cpu")
    assert isinstance(q, cls) and not q.weight.requires_grad
    assert q.weight.dtype == (torch.int8 if kind == "int8" else torch.uint8)
    err = (q.dequantized() - lin.weight).abs().max().item()
    assert 0 < err < max_err  # really quantized, and to the right values


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_fused_and_dequant_paths_agree_in_value_and_input_gradient(kind):
    lin = _linear()
    x = torch.randn(3, 5, 64)
    outs = {}
    for path in ("fused", "dequant"):
        q = quantize_linear(lin, kind, compute_dtype=torch.float32, device="cpu", matmul=path)
        xi = x.clone().requires_grad_(True)
        y = q(xi)
        y.square().sum().backward()
        outs[path] = (y.detach(), xi.grad)
    w = q.dequantized()
    assert torch.allclose(outs["dequant"][0], x @ w.T + lin.bias.detach(), atol=1e-5)
    assert torch.allclose(outs["dequant"][1], 2 * outs["dequant"][0] @ w, atol=1e-4)  # d/dx sum(y²) = 2y·W
    tol = 1e-5 if kind != "int8" else 1e-3  # LLM.int8 also rounds the input to int8 on the fused path
    assert torch.allclose(outs["fused"][0], outs["dequant"][0], atol=tol)
    assert torch.allclose(outs["fused"][1], outs["dequant"][1], atol=tol * 10)


def test_eval_mode_no_grad_uses_the_same_weights():
    """bitsandbytes repacks 4-bit weights for a bf16 CPU kernel in eval+no_grad; our forward never does."""
    q = quantize_linear(_linear(), "nf4", device="cpu", matmul="fused")
    x = torch.randn(4, 64)
    y_train = q(x)
    before = q.weight.data.clone()
    q.eval()
    with torch.no_grad():
        y_eval = q(x)
    assert torch.equal(y_train.detach(), y_eval) and torch.equal(before, q.weight.data)


def test_double_quant_saves_memory():
    lin = _linear(512, 512)
    single = quantize_linear(lin, "nf4", double_quant=False, device="cpu")
    double = quantize_linear(lin, "nf4", double_quant=True, device="cpu")
    dense = 512 * 512 * 4 + 512 * 4
    # 4 bits/weight + one fp32 absmax per 64 weights (0.5 bit) vs an 8-bit absmax (+ second-level stats)
    assert weight_bytes(single) == 512 * 512 // 2 + 512 * 512 // 64 * 4 + 512 * 4
    assert weight_bytes(double) < weight_bytes(single) < dense / 6


def test_qpissa_residual_quantizes_better_than_the_weight():
    """DESIGN.md: ||Q(W_res) + s·B0A0 − W|| < ||Q(W) − W|| (the principal part stays full precision)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((128, 16)) @ rng.standard_normal((16, 128)) / 8
         + 0.05 * rng.standard_normal((128, 128))).astype(np.float32)
    a0, b0, w_res = pissa_factors(w, 16, 1.0)

    def q(m):
        lin = torch.nn.Linear(128, 128, bias=False)
        lin.weight.data = torch.from_numpy(m)
        return quantize_linear(lin, "nf4", device="cpu").dequantized().numpy()

    err_qpissa = np.linalg.norm(q(w_res) + b0 @ a0 - w)
    err_plain = np.linalg.norm(q(w) - w)
    assert err_qpissa < 0.5 * err_plain


def test_quantize_rest_skips_lm_head_and_the_given_paths(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    n = quantize_rest(model, "nf4", skip=lambda p: p.startswith("model.layers.0."))
    assert n == 7  # the 7 linears of block 1; block 0 skipped, lm_head kept dense
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert type(model.lm_head) is torch.nn.Linear
    assert quantize_rest(model, "nf4", embeddings=True) == 8  # block 0's 7 linears + the (untied) lm_head
    assert isinstance(model.lm_head, QuantLinear)
    assert type(model.model.embed_tokens) is torch.nn.Embedding  # the input embedding stays dense


@pytest.mark.parametrize("bits,mode,expected", [(4, "auto", "nf4"), (4, "fp4", "fp4"), (8, "auto", "int8"),
                                                (0, "auto", None)])
def test_quant_kind_from_config(bits, mode, expected):
    assert quant_kind(QuantConfig(bits=bits, mode=mode)) == expected


@pytest.mark.parametrize("bits,mode,words", [(3, "auto", "quant.bits 3"), (4, "affine", "quant.mode affine"),
                                             (8, "nf4", "quant.mode nf4")])
def test_quant_kind_refuses_what_bitsandbytes_cannot_do(bits, mode, words):
    with pytest.raises(ForgeError, match=words):
        quant_kind(QuantConfig(bits=bits, mode=mode))
