"""Expert stacks of a mixture of experts (mlx-lm's SwitchLinear: every expert's (out, in) weight in one (E, out, in)
array, each token multiplied by the experts its router picked, mx.gather_mm): the quantized stack with forge's
CPU matmul path, and a LoRA per expert.

         x, experts e ──► base_e(x) ───────────────────────────┐   base: SwitchLinear, or QuantSwitchLinear
         │                                                    (+)──► y
         └──► dropout ──► @ lora_a[e]ᵀ ──► @ lora_b[e]ᵀ ─────┘ × scale
                           (E, r, in)        (E, out, r)

The layout is mlx-lm's LoRASwitchLinear (`<module>.linear`, `.lora_a` (E, r, in), `.lora_b` (E, out, r)), so the
trainable tree flattens to the keys mlx-lm's own loader expects. PiSSA splits each expert's weight on its own
(forge_core.surgery): lora_a[e], lora_b[e] = A0_e, B0_e and the stack keeps W_res_e.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx
from mlx import nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from .quant import Dequantizable, default_matmul, unpack_affine


def dense_experts(w: mx.array, scales: mx.array, biases: mx.array | None, group_size: int, bits: int,
                  mode: str) -> mx.array:
    """The (E, out, in) stack dequantized (quant.unpack_affine's integer path on the CPU, row by row)."""
    if mode == "affine" and bits in (4, 8) and biases is not None and mx.default_device() == mx.cpu:
        e, out = w.shape[:2]
        flat = unpack_affine(w.reshape(e * out, -1), scales.reshape(e * out, -1), biases.reshape(e * out, -1),
                             group_size, bits)
        return flat.reshape(e, out, -1)
    return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode)


@cache
def dequant_gather_mm(group_size: int, bits: int, mode: str, sorted_indices: bool):
    """x @ dequantize(W)[e]ᵀ for each row's experts e, whose backward dequantizes the stack AGAIN instead of keeping
    the dense copy from the forward (quant.dequant_matmul's reasoning, for expert stacks)."""

    def matmul(x, indices, w):
        return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)

    @mx.custom_function
    def gmm(x, indices, w, scales, biases):
        return matmul(x, indices, dense_experts(w, scales, biases, group_size, bits, mode).astype(x.dtype))

    @gmm.vjp
    def gmm_vjp(primals, cotangent, output):
        x, indices, w, scales, biases = primals
        w, scales, biases = mx.depends([w, scales, biases], [cotangent])  # only once this cotangent exists
        dense = dense_experts(w, scales, biases, group_size, bits, mode).astype(cotangent.dtype)
        _, (dx,) = mx.vjp(lambda x_: matmul(x_, indices, dense), [x], [cotangent])
        return dx, mx.zeros_like(indices), mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases)

    return gmm


class QuantSwitchLinear(Dequantizable, QuantizedSwitchLinear):
    """mlx-lm's QuantizedSwitchLinear with the matmul path chosen per device, as quant.QuantLinear: "fused"
    (mx.gather_qmm) on Metal and CUDA, "dequant" (the stack dequantized transiently, then gather_mm) on the CPU."""

    def __init__(self, *args, matmul: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.matmul = default_matmul() if matmul == "auto" else matmul

    @classmethod
    def from_switch(cls, layer: SwitchLinear, group_size: int, bits: int, matmul: str = "auto"):
        experts, out_dims, in_dims = layer.weight.shape
        q = cls(in_dims, out_dims, experts, bias=False, group_size=group_size, bits=bits, matmul=matmul)
        q.weight, q.scales, q.biases = mx.quantize(layer.weight, group_size=group_size, bits=bits)
        if "bias" in layer:
            q.bias = layer.bias
        q.freeze()
        return q

    def __call__(self, x, indices, sorted_indices=False):
        if self.matmul == "fused" or self.get("biases") is None or self.get("global_scale") is not None:
            return super().__call__(x, indices, sorted_indices=sorted_indices)
        gmm = dequant_gather_mm(self.group_size, self.bits, self.mode, sorted_indices)
        y = gmm(x, indices, self.weight, self.scales, self.biases)
        if "bias" in self:
            y = y + mx.expand_dims(self.bias[indices], -2)
        return y


class LoRASwitchLinear(nn.Module):
    """y = base(x, e) + scale · dropout(x) @ lora_a[e]ᵀ @ lora_b[e]ᵀ for the experts e a row is routed to."""

    def __init__(self, base: nn.Module, scale: float, dropout: float, lora_a: mx.array, lora_b: mx.array):
        super().__init__()
        self.linear = base
        self.scale = scale
        self.dropout = nn.Dropout(p=dropout)
        self.lora_a = lora_a  # (E, r, in)
        self.lora_b = lora_b  # (E, out, r)
        self.num_experts = lora_a.shape[0]

    def base_weight(self) -> mx.array:
        """The stack's weight, dense fp32 (E, out, in)."""
        base = self.linear
        return base.dequantized(mx.float32) if isinstance(base, QuantSwitchLinear) else base.weight.astype(mx.float32)

    def __call__(self, x, indices, sorted_indices=False):
        y = self.linear(x, indices, sorted_indices=sorted_indices)
        z = mx.gather_mm(self.dropout(x), self.lora_a.astype(x.dtype).swapaxes(-1, -2), rhs_indices=indices,
                         sorted_indices=sorted_indices)
        z = mx.gather_mm(z * self.scale, self.lora_b.astype(x.dtype).swapaxes(-1, -2), rhs_indices=indices,
                         sorted_indices=sorted_indices)
        return y + z.astype(y.dtype)

    def delta(self) -> mx.array:
        """scale · B_e A_e for every expert, (E, out, in)."""
        return self.scale * (self.lora_b @ self.lora_a)

    def merged(self, w: mx.array) -> mx.array:
        return w + self.delta()

    def fuse(self, w: mx.array | None = None) -> SwitchLinear:
        """The adapter folded into a dense SwitchLinear (a quantized base dequantized; never requantized)."""
        w = self.base_weight() if w is None else w
        return dense_switch(self.linear, self.merged(w))


def dense_switch(layer: nn.Module, weight: mx.array) -> SwitchLinear:
    """A SwitchLinear holding `weight` (E, out, in), with `layer`'s bias."""
    experts, out_dims, in_dims = weight.shape
    dense = SwitchLinear(in_dims, out_dims, experts, bias="bias" in layer)
    dense.weight = weight
    if "bias" in layer:
        dense.bias = layer.bias
    return dense


def quantizable_switch(module: nn.Module, group_size: int) -> bool:
    return isinstance(module, SwitchLinear) and module.weight.shape[-1] % group_size == 0


def experts_of(module: nn.Module) -> int:
    """E of an expert stack, 0 for anything else."""
    return module.num_experts if isinstance(module, (SwitchLinear, QuantizedSwitchLinear)) else 0
