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

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten


def default_matmul() -> str:
    return "dequant" if mx.default_device() == mx.cpu else "fused"


class QuantLinear(nn.QuantizedLinear):
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

    def dequantized(self, dtype=None) -> mx.array:
        w = mx.dequantize(self.weight, self.scales, self.get("biases"), group_size=self.group_size, bits=self.bits,
                          mode=self.mode)
        return w if dtype is None else w.astype(dtype)

    def __call__(self, x):
        if self.matmul == "fused":
            return super().__call__(x)
        y = x @ self.dequantized(x.dtype).T
        if "bias" in self:
            y = y + self.bias
        return y


def quantize_linear(linear: nn.Linear, bits: int, group_size: int, matmul: str = "auto") -> QuantLinear:
    bias = linear.bias if "bias" in linear else None
    return QuantLinear.from_weight(linear.weight, bias, group_size, bits, matmul)


def quantizable(module: nn.Module, group_size: int) -> bool:
    return isinstance(module, nn.Linear) and module.weight.shape[-1] % group_size == 0


def quantize_rest(model: nn.Module, bits: int, group_size: int, matmul: str = "auto", embeddings: bool = False,
                  skip=lambda path: False) -> int:
    """Quantize every remaining dense nn.Linear (not LoRA-wrapped, not skipped). Returns how many.

    Embeddings (and a tied lm_head through them) stay full precision unless `embeddings`.
    """
    replace = []
    for path, module in model.named_modules():
        if skip(path):
            continue
        if quantizable(module, group_size) and (embeddings or not path.endswith("lm_head")):
            layer = quantize_linear(module, bits, group_size, matmul)
            mx.eval(layer.parameters())  # one dense weight alive at a time (lazy-loaded models)
            replace.append((path, layer))
        elif embeddings and isinstance(module, nn.Embedding) and module.weight.shape[-1] % group_size == 0:
            replace.append((path, nn.QuantizedEmbedding.from_embedding(module, group_size=group_size, bits=bits)))
    if replace:
        model.update_modules(tree_unflatten(replace))
    return len(replace)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters as stored (packed weights count at their packed size)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))
