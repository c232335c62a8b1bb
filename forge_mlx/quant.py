"""4/8-bit base weights with MLX affine quantization, and the matmul path chosen per device.

Weights stay packed (uint32) + scales + biases per group of `group_size` in memory. The matmul:
  - "fused":   mx.quantized_matmul - the fast path on Metal and CUDA.
  - "dequant": dequantize the layer's weight transiently, then a dense BLAS matmul. On MLX's CPU
               backend quantized_matmul runs ~85x slower than this (docs/BENCHMARKS.md), so "auto"
               picks it whenever the default device is the CPU. The dense copy lives only inside
               the layer's call (and its backward), so peak memory grows by one layer, not the model.
Both paths are differentiable with respect to the input; the quantized weights are frozen.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten


@cache
def dequant_matmul(group_size: int, bits: int, mode: str):
    """y = x @ dequantize(W)ᵀ whose backward dequantizes W AGAIN instead of keeping the dense copy.

    Plain autodiff would hold every layer's dense weight from the forward until the backward (the
    whole model, dense, at the loss); re-dequantizing costs one cheap elementwise pass per layer.
    The quantized weight is frozen: its cotangents are zeros.
    """

    def dense(w, scales, biases):
        return dense_weight(w, scales, biases, group_size, bits, mode)

    @mx.custom_function
    def qmm(x, w, scales, biases):
        return x @ dense(w, scales, biases).astype(x.dtype).T

    @qmm.vjp
    def qmm_vjp(primals, cotangent, output):
        x, w, scales, biases = primals
        # depends(): dequantize only once this layer's cotangent exists, else MLX may run every
        # layer's re-dequantization up front and hold them all at once
        w, scales, biases = mx.depends([w, scales, biases], [cotangent])
        dx = cotangent @ dense(w, scales, biases).astype(cotangent.dtype)
        return dx, mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases)

    return qmm


def dense_weight(w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int,
                 mode: str = "affine") -> mx.array:
    """A quantized weight, dequantized: unpack_affine's integer path for affine 4/8-bit on the CPU (faster there),
    mx.dequantize otherwise."""
    if mode == "affine" and bits in (4, 8) and mx.default_device() == mx.cpu:
        return unpack_affine(w, scales, biases, group_size, bits)
    return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode)


def unpack_affine(w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> mx.array:
    """mx.dequantize for affine 4/8-bit, written as integer ops that MLX compiles into the step: q·scale + bias.

    MLX packs 4-bit values little-endian into uint32, so byte k holds values 2k (low nibble) and 2k+1
    (high nibble). Widening each byte to uint16 with the high nibble moved up 4 bits puts value 2k in the
    low byte and 2k+1 in the high byte: viewed as uint8 again (little-endian), the values are in order,
    with no stack/concatenate pass. Same result as mx.dequantize to the bit (tests) and faster on the
    CPU backend, where re-dequantizing every layer in the forward and the backward is most of what the
    4-bit path costs over full precision (docs/BENCHMARKS.md, "MLX CPU kernels").
    """
    out = w.shape[0]
    q = mx.view(w, mx.uint8)  # (out, in·bits/8)
    if bits == 4:
        q = q.astype(mx.uint16)
        q = mx.view((q & 0x0F) | ((q & 0xF0) << 4), mx.uint8)  # (out, in): lo, hi, lo, hi, ...
    q = q.reshape(out, -1, group_size).astype(scales.dtype)
    return (q * scales[..., None] + biases[..., None]).reshape(out, -1)


def default_matmul() -> str:
    return "dequant" if mx.default_device() == mx.cpu else "fused"


class Dequantizable:
    """dequantized() of a quantized layer that holds weight, scales, biases, group_size, bits and mode (QuantLinear,
    experts.QuantSwitchLinear)."""

    def dequantized(self, dtype=None) -> mx.array:
        w = mx.dequantize(self.weight, self.scales, self.get("biases"), group_size=self.group_size, bits=self.bits,
                          mode=self.mode)
        return w if dtype is None else w.astype(dtype)


class QuantLinear(Dequantizable, nn.QuantizedLinear):
    """nn.QuantizedLinear whose matmul path is chosen per device ("dequant" or "fused")."""

    def __init__(self, *args, matmul: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.matmul = default_matmul() if matmul == "auto" else matmul

    @classmethod
    def from_weight(cls, weight: mx.array, bias: mx.array | None, group_size: int, bits: int, matmul: str = "auto"):
        out_dims, in_dims = weight.shape
        layer = cls(in_dims, out_dims, bias=bias is not None, group_size=group_size, bits=bits, matmul=matmul)
        layer.weight, layer.scales, layer.biases = mx.quantize(weight, group_size=group_size, bits=bits)
        if bias is not None:
            layer.bias = bias
        layer.freeze()
        return layer

    def __call__(self, x):
        if self.matmul == "fused":
            return super().__call__(x)
        biases = self.get("biases")
        if biases is None:  # modes without biases: plain autodiff through the dense copy
            y = x @ self.dequantized(x.dtype).T
        else:
            y = dequant_matmul(self.group_size, self.bits, self.mode)(x, self.weight, self.scales, biases)
        if "bias" in self:
            y = y + self.bias
        return y


class QuantEmbedding(Dequantizable, nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose tied-head product (as_linear) takes the per-device path of QuantLinear."""

    def as_linear(self, x):
        if self.matmul == "fused":
            return super().as_linear(x)
        return x @ self.dequantized(x.dtype).T


def adopt_quantized(model: nn.Module) -> int:
    """Give an already quantized model (an mlx-lm export: rtn, AWQ, GPTQ) forge's per-device matmul paths, in place.

    mlx-lm's layers always call mx.quantized_matmul, whose CPU kernel is slow enough here that a 135M model's
    4x256 forward took ~3 minutes; the dequant path computes the same product from the same packed weights. The
    layers keep their arrays; only their class changes (no weight is re-read, re-quantized or copied). Returns how
    many layers were adopted.
    """
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    from .experts import QuantSwitchLinear  # experts.py builds on this module

    adopt = {nn.QuantizedLinear: QuantLinear, nn.QuantizedEmbedding: QuantEmbedding,
             QuantizedSwitchLinear: QuantSwitchLinear}
    count = 0
    for _, module in model.named_modules():
        cls = adopt.get(type(module))
        if cls is not None:
            module.__class__ = cls
            module.matmul = default_matmul()
            count += 1
    return count


def quantize_linear(linear: nn.Linear, bits: int, group_size: int, matmul: str = "auto") -> QuantLinear:
    bias = linear.bias if "bias" in linear else None
    return QuantLinear.from_weight(linear.weight, bias, group_size, bits, matmul)


def quantizable(module: nn.Module, group_size: int) -> bool:
    return isinstance(module, nn.Linear) and module.weight.shape[-1] % group_size == 0


def quantize_rest(model: nn.Module, bits: int, group_size: int, matmul: str = "auto", embeddings: bool = False,
                  skip=lambda path: False) -> int:
    """Quantize every remaining dense nn.Linear and expert stack (not LoRA-wrapped, not skipped). Returns how many.

    Embeddings (and a tied lm_head through them) stay full precision unless `embeddings`.
    """
    from .experts import QuantSwitchLinear, quantizable_switch  # experts.py builds on this module

    count = 0
    for path, module in list(model.named_modules()):
        if skip(path):
            continue
        if quantizable(module, group_size) and (embeddings or not path.endswith("lm_head")):
            layer = quantize_linear(module, bits, group_size, matmul)
        elif quantizable_switch(module, group_size):
            layer = QuantSwitchLinear.from_switch(module, group_size, bits, matmul)
        elif embeddings and isinstance(module, nn.Embedding) and module.weight.shape[-1] % group_size == 0:
            layer = nn.QuantizedEmbedding.from_embedding(module, group_size=group_size, bits=bits)
        else:
            continue
        mx.eval(layer.parameters())
        model.update_modules(tree_unflatten([(path, layer)]))  # one dense weight alive at a time
        count += 1
    return count


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters as stored (packed weights count at their packed size)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))
