"""4/8-bit base weights with bitsandbytes, and the matmul path chosen per device.

    nf4 / fp4  bnb Linear4bit: blocks of BLOCKSIZE=64 values, one absmax each; with double quant
               (cfg.quant.double_quant) the absmaxes are 8-bit quantized again (blocks of 256), QLoRA's
               ~0.37 bit/param saving. Works for any in_features, so quant.group_size (MLX's knob) is unused.
    int8       bnb Linear8bitLt (quant.bits 8): per-row absmax/127, LLM.int8's outlier threshold 6.0.

The matmul (quant.matmul):
  - "fused":   bitsandbytes' own kernels (bnb.matmul_4bit / bnb.matmul) - the fast path on CUDA.
  - "dequant": dequantize the layer's weight transiently and use a dense matmul; backward dequantizes
               again, so no dense copy is kept for the backward pass (peak grows by one layer).
               "auto" picks it on the CPU, like forge_mlx.
Both paths are differentiable with respect to the input; the quantized weights are frozen. We own
forward() so bitsandbytes' CPU inference repacking (a bf16 path that rewrites weight.data and has no
backward) never runs.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from forge_core.errors import ForgeError

# bitsandbytes' CPU backend logs a warning at import when the optional `kernels` package is missing;
# we never use that kernel (see forward below), so the warning is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbF  # noqa: E402

BLOCKSIZE = 64
INT8_THRESHOLD = 6.0


def default_matmul(device="cpu") -> str:
    return "dequant" if torch.device(device).type == "cpu" else "fused"


def quant_kind(q) -> str | None:
    """cfg.quant -> "nf4" | "fp4" | "int8", or None for a full-precision base."""
    if q.bits == 0:
        return None
    if q.bits == 8:
        if q.mode in ("nf4", "fp4", "affine"):
            raise ForgeError(f"quant.mode {q.mode} is not an 8-bit format; with quant.bits 8 set quant.mode auto")
        return "int8"
    if q.bits != 4:
        raise ForgeError(f"quant.bits {q.bits}: the CUDA backend (bitsandbytes) quantizes to 4 or 8 bits "
                         "(0 = full precision); 2, 3 and 6 bits are MLX-only")
    if q.mode == "affine":
        raise ForgeError("quant.mode affine is MLX's format; the CUDA backend has nf4 (auto) and fp4")
    return "nf4" if q.mode == "auto" else q.mode


class _DequantMatmul(torch.autograd.Function):
    """y = x @ Wᵀ with W = layer.dequantized(): dense only inside forward, rebuilt in backward."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x @ layer.dequantized(x.dtype).T

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantized(grad.dtype), None


class _MatmulPath:
    """forward() for a bitsandbytes layer: "fused" (bnb kernels) or "dequant" (see module docstring)."""

    matmul = "fused"

    def forward(self, x):
        if self.matmul == "fused":
            return self._fused(x)
        y = _DequantMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class QuantLinear(_MatmulPath, bnb.nn.Linear4bit):
    """bnb Linear4bit (nf4 / fp4) with a chosen matmul path."""

    def dequantized(self, dtype=None) -> torch.Tensor:
        w = bnbF.dequantize_4bit(self.weight.data, self.weight.quant_state)
        return w if dtype is None else w.to(dtype)

    def _fused(self, x):
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        y = bnb.matmul_4bit(x.to(dtype), self.weight, bias=bias, quant_state=self.weight.quant_state)
        return y.to(x.dtype)


class QuantLinear8bit(_MatmulPath, bnb.nn.Linear8bitLt):
    """bnb Linear8bitLt (int8 rows, W ≈ CB · SCB / 127) with a chosen matmul path."""

    def dequantized(self, dtype=None) -> torch.Tensor:
        scb = self.weight.SCB if self.weight.SCB is not None else self.state.SCB
        w = self.weight.data.float() * (scb.float()[:, None] / 127.0)
        return w if dtype is None else w.to(dtype)

    def _fused(self, x):
        return bnb.nn.Linear8bitLt.forward(self, x)


def quantize_linear(linear: nn.Linear, kind: str, double_quant: bool = True, compute_dtype=torch.float32,
                    device="cpu", matmul: str = "auto") -> nn.Module:
    """A dense nn.Linear -> QuantLinear(8bit) holding Q(W) on `device` (quantized there, by bnb's .to())."""
    out_f, in_f = linear.weight.shape
    has_bias = linear.bias is not None
    w = linear.weight.detach().to(compute_dtype)
    if kind == "int8":
        layer = QuantLinear8bit(in_f, out_f, bias=has_bias, has_fp16_weights=False, threshold=INT8_THRESHOLD,
                                device="meta")
        layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        layer = QuantLinear(in_f, out_f, bias=has_bias, compute_dtype=compute_dtype,
                            compress_statistics=double_quant, quant_type=kind, device="meta")
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=kind, compress_statistics=double_quant,
                                         blocksize=BLOCKSIZE, module=layer)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
    layer.matmul = default_matmul(device) if matmul == "auto" else matmul
    return layer.to(device)  # bnb quantizes on the move to a device


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def quantizable(module: nn.Module) -> bool:
    """A dense linear bitsandbytes can quantize (any shape: bnb pads the last block)."""
    return isinstance(module, nn.Linear) and not is_quantized(module)


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def quantize_rest(model: nn.Module, kind: str, double_quant: bool = True, compute_dtype=torch.float32,
                  device="cpu", matmul: str = "auto", embeddings: bool = False, skip=lambda path: False) -> int:
    """Quantize every remaining dense nn.Linear (not LoRA-wrapped, not skipped), one at a time. Returns how many.

    lm_head stays full precision unless `embeddings` (the CUDA backend keeps the input embedding dense
    either way; tied heads are never quantized, they are the embedding).
    """
    tied = _tied_head(model)
    paths = [p for p, m in model.named_modules()
             if not skip(p) and quantizable(m) and (embeddings and not tied or not p.endswith("lm_head"))]
    for path in paths:
        set_module(model, path, quantize_linear(model.get_submodule(path), kind, double_quant, compute_dtype,
                                                device, matmul))
    return len(paths)


def _tied_head(model: nn.Module) -> bool:
    head, emb = getattr(model, "lm_head", None), getattr(model, "get_input_embeddings", lambda: None)()
    return head is not None and emb is not None and head.weight is emb.weight


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers as stored, plus the 4-bit layers' quantization statistics."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if isinstance(m, QuantLinear) and qs is not None:
            total += qs.absmax.numel() * qs.absmax.element_size()
            if qs.nested:
                total += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    return total
