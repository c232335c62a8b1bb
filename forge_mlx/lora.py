"""The LoRA layer and the PiSSA / QPiSSA model surgery.

         x ──► base(x) ─────────────────────────┐      base: nn.Linear, or QuantLinear holding Q(W_res)
         │                                      (+)──► y
         └──► dropout ──► @ lora_a ──► @ lora_b ─┘ × scale
                          (in, r)      (r, out)

Parameter names follow mlx-lm (`<module>.lora_a`, `<module>.lora_b`, `<module>.linear`), so the
trainable tree flattens to exactly the keys of an mlx-lm `adapters.safetensors`.

Init "lora": lora_a uniform(±1/sqrt(in)), lora_b = 0 - the model starts unchanged.
Init "pissa": (lora_a, lora_b) = (A0ᵀ, B0ᵀ) from the top-r SVD of W (forge_core.pissa), and the
base holds W_res = W − s·B0A0, quantized if the run quantizes (QPiSSA: the residual, never W).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from forge_core import surgery
from forge_core.adapters.mapping import mlx_pair
from forge_core.config import ForgeConfig, lora_scale
from forge_core.dora import dora_weight, nonzero
from forge_core.errors import ForgeError
from forge_core.models.experts import is_router
from forge_core.surgery import select_targets, under

from .experts import LoRASwitchLinear, QuantSwitchLinear, experts_of, quantizable_switch
from .quant import QuantLinear, quantizable, quantize_linear, quantize_rest


class LoRALinear(nn.Module):
    """y = base(x) + scale · dropout(x) @ lora_a @ lora_b.

    DoRA (dora=True, Liu et al. 2024): a trainable magnitude m (out,) over the direction of W + s·BA, each output
    row renormalised: y = m / ||W + s·BA||_row · (W + s·BA) x + bias, the norm a constant in the backward (the
    paper's memory saving, as PEFT and mlx-lm do). m starts at ||W + s·B0A0||_row, so the model starts unchanged
    (PiSSA: the original W's row norms; QPiSSA: those of Q(W_res) + s·B0A0). With dropout in training the base
    term sees the dropped input too, PEFT's formula: y = Wx + b + (m/n − 1)·W·drop(x) + (m/n)·s·BA·drop(x).
    """

    def __init__(self, base: nn.Module, rank: int, scale: float, dropout: float = 0.0,
                 lora_a: mx.array | None = None, lora_b: mx.array | None = None, dora: bool = False):
        super().__init__()
        out_dims, in_dims = _shape(base)
        self.linear = base
        self.scale = scale
        self.dropout = nn.Dropout(p=dropout)
        self.dropout_p = dropout
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = lora_a if lora_a is not None else mx.random.uniform(-bound, bound, (in_dims, rank))
        self.lora_b = lora_b if lora_b is not None else mx.zeros((rank, out_dims))
        if dora:  # mlx-lm's name for the magnitude: the adapter keys stay mlx-lm's (`<module>.m`)
            self.m = mx.linalg.norm(self.base_weight() + self.delta(), axis=1)

    @property
    def dora(self) -> bool:
        return "m" in self

    def base_weight(self) -> mx.array:
        """The base's weight, dense fp32 (a quantized base dequantized)."""
        base = self.linear
        return base.dequantized(mx.float32) if isinstance(base, QuantLinear) else base.weight.astype(mx.float32)

    def __call__(self, x):
        if self.dora:
            return self._dora(x)
        y = self.linear(x)
        # the scale goes on the rank-r product (N, r), not on the (N, out) one: one pass fewer per call
        xa = (self.dropout(x) @ self.lora_a.astype(x.dtype)) * self.scale
        return y + (xa @ self.lora_b.astype(x.dtype)).astype(y.dtype)

    def row_norm(self, w: mx.array) -> mx.array:
        """||W + s·BA||_row from (out, r) products only: ||W||² + 2s·rowsum((W·Aᵀ)∘B) + s²·rowsum((B·AAᵀ)∘B),
        never the (out, in) sum itself (PEFT and mlx-lm form it, and the backward keeps it: a dense copy per
        adapted weight per step)."""
        a, b, s = self.lora_a, self.lora_b.T, self.scale  # a (in, r), b (out, r)
        cross = ((w @ a) * b).sum(axis=1)
        gram = ((b @ (a.T @ a)) * b).sum(axis=1)
        return mx.sqrt(mx.maximum(mx.square(w).sum(axis=1) + 2 * s * cross + s * s * gram, 0.0))

    def _dora(self, x):
        w = self.base_weight()
        norm = mx.stop_gradient(nonzero(self.row_norm(w)))
        mag = self.m / norm  # fp32; m/n − 1 is small, so it is cast after the subtraction
        w = w.astype(x.dtype)
        if self.dropout_p > 0 and self.training:  # PEFT's form: the base term sees the dropped input too
            dropped = self.dropout(x)
            lora = ((dropped @ self.lora_a.astype(x.dtype)) * self.scale) @ self.lora_b.astype(x.dtype)
            y = x @ w.T + (mag - 1).astype(x.dtype) * (dropped @ w.T) + mag.astype(x.dtype) * lora
        else:  # = m/n · (W + s·BA) x: the magnitude's gradient keeps ONE (N, out) product, not two
            lora = ((x @ self.lora_a.astype(x.dtype)) * self.scale) @ self.lora_b.astype(x.dtype)
            y = mag.astype(x.dtype) * (x @ w.T + lora)
        return y + self.linear.bias if "bias" in self.linear else y

    def delta(self) -> mx.array:
        """scale · Bᵀ... in (out, in) weight layout: scale · lora_bᵀ @ lora_aᵀ."""
        return self.scale * (self.lora_b.T @ self.lora_a.T)

    def merged(self, w: mx.array) -> mx.array:
        """The dense weight this layer computes with, given its base's dense weight w (fp32): W + s·BA, or under
        DoRA m / ||W + s·BA||_row · (W + s·BA)."""
        return dora_weight(mx, w + self.delta(), self.m if self.dora else None)

    def fuse(self, w: mx.array | None = None) -> nn.Linear:
        """Fold the adapter into a dense nn.Linear (dequantizing a quantized base; never requantizing). `w`: the
        base's dense fp32 weight when the caller keeps it (GRPO's sampler dequantizes the frozen base once)."""
        base = self.linear
        w = self.base_weight() if w is None else w
        out_dims, in_dims = w.shape
        fused = nn.Linear(in_dims, out_dims, bias="bias" in base)
        fused.weight = self.merged(w)
        if "bias" in base:
            fused.bias = base.bias
        return fused


# What the model's adapted layers and its other quantized layers are (generate.py folds them for inference)
LORA_LAYERS = (LoRALinear, LoRASwitchLinear)
QUANT_LAYERS = (QuantLinear, QuantSwitchLinear)
LINEARS = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)
QUANTIZED = (nn.QuantizedLinear, QuantizedSwitchLinear)


def _shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear, or of ONE expert of an expert stack."""
    out_dims, in_dims = module.weight.shape[-2:]
    if isinstance(module, QUANTIZED):
        in_dims = in_dims * 32 // module.bits
    return out_dims, in_dims


class Layers:
    """The MLX side of forge_core.surgery.adapt_model: mlx-lm's nn.Linear, QuantLinear and LoRALinear, and for a
    mixture of experts its SwitchLinear stacks, QuantSwitchLinear and LoRASwitchLinear (experts.py). A mixture's
    router (an nn.Linear here, a parameter in transformers) is a target only when lora.targets names it
    (`gate`), and stays full precision."""

    def __init__(self, model_type: str | None = None):
        self.model_type = model_type

    def targets(self, model: nn.Module, cfg: ForgeConfig) -> list[str]:
        model.freeze()  # the base is frozen: only what the LoRA layers add trains
        named_router = "gate" in (cfg.lora.targets or [])
        linears = [p for p, m in model.named_modules() if isinstance(m, LINEARS)
                   and (named_router or not is_router(self.model_type, p))]
        return select_targets(linears, cfg, len(model.layers))

    get = staticmethod(lambda model, path: _get(model, path))
    is_quantized = staticmethod(lambda layer: isinstance(layer, QUANTIZED))
    shape = staticmethod(lambda layer: _shape(layer))
    experts = staticmethod(experts_of)

    @staticmethod
    def weight(layer) -> np.ndarray:
        return np.array(layer.weight.astype(mx.float32))

    @staticmethod
    def set_weight(layer, w: np.ndarray) -> None:
        layer.weight = mx.array(w).astype(layer.weight.dtype)

    def quantize(self, layer, cfg: ForgeConfig, path: str = ""):
        q = cfg.quant
        if is_router(self.model_type, path):
            return layer
        if q.bits and quantizable_switch(layer, q.group_size):
            return QuantSwitchLinear.from_switch(layer, q.group_size, q.bits, q.matmul)
        return quantize_linear(layer, q.bits, q.group_size, q.matmul) if q.bits and quantizable(layer, q.group_size) \
            else layer

    @staticmethod
    def wrap(layer, a: np.ndarray, b: np.ndarray, cfg: ForgeConfig) -> nn.Module:
        if a.ndim == 3:  # one LoRA per expert: mlx-lm's LoRASwitchLinear layout is the canonical (E, r, in), (E, out, r)
            lora = LoRASwitchLinear(layer, lora_scale(cfg.lora), cfg.lora.dropout, mx.array(a), mx.array(b))
            mx.eval(lora.parameters())
            return lora
        # contiguous copies in mlx-lm's layout: a transposed view would be saved with its raw (transposed) memory
        lora = LoRALinear(layer, cfg.lora.rank, lora_scale(cfg.lora), cfg.lora.dropout,
                          mx.array(np.ascontiguousarray(a.T)), mx.array(np.ascontiguousarray(b.T)), dora=cfg.lora.dora)
        mx.eval(lora.parameters())
        return lora

    @staticmethod
    def swap(model: nn.Module, path: str, layer) -> None:
        model.update_modules(tree_unflatten([(path, layer)]))

    def finish(self, model: nn.Module, cfg: ForgeConfig, adapted: list[str]) -> None:
        q = cfg.quant
        if q.bits:  # a mixture's router stays full precision (torch's is no nn.Linear: both keep it dense)
            adapted_or_under = under(adapted)
            quantize_rest(model, q.bits, q.group_size, q.matmul, q.embeddings,
                          skip=lambda p: adapted_or_under(p) or is_router(self.model_type, p))


def adapt_model(model: nn.Module, cfg: ForgeConfig, pissa_init: dict | None = None) -> dict:
    """forge_core.surgery.adapt_model with MLX's layers: returns the PiSSA factors used ({} for plain LoRA)."""
    return surgery.adapt_model(model, cfg, Layers(getattr(model, "model_type", None)), pissa_init)


def _get(model: nn.Module, path: str) -> nn.Module:
    module = model
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def trainable_params(model: nn.Module) -> dict[str, mx.array]:
    """Flat {mlx-lm adapter key: array} of the LoRA factors."""
    return dict(tree_flatten(model.trainable_parameters()))


def load_trainable(model: nn.Module, weights: dict[str, mx.array]) -> None:
    expected = set(trainable_params(model))
    missing, unknown = expected - set(weights), set(weights) - expected
    if missing or unknown:
        raise ForgeError(f"adapter weights do not match the model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unknown)[:3]}")
    model.load_weights(list(weights.items()), strict=False)


def factors_to_flat(factors: dict) -> dict[str, np.ndarray]:
    """{path: (A0, B0)} -> mlx-lm keys {path.lora_a: A0ᵀ (in,r), path.lora_b: B0ᵀ (r,out)} (an expert stack's
    (E, r, in), (E, out, r) as they are: mapping.mlx_pair)."""
    flat = {}
    for path, (a0, b0) in factors.items():
        a, b = mlx_pair(a0, b0)
        flat[f"{path}.lora_a"], flat[f"{path}.lora_b"] = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return flat


def flat_to_factors(flat: dict) -> dict:
    paths = {k.rsplit(".", 1)[0] for k in flat}
    return {p: mlx_pair(np.asarray(flat[f"{p}.lora_a"]), np.asarray(flat[f"{p}.lora_b"])) for p in paths}
