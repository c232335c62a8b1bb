"""The LoRA layer and the PiSSA / QPiSSA model surgery (PyTorch), mirroring forge_mlx.lora.

         x ──► base_layer(x) ─────────────────────┐   base_layer: nn.Linear, or QuantLinear holding Q(W_res)
         │                                       (+)──► y
         └──► dropout ──► @ lora_Aᵀ ──► @ lora_Bᵀ ─┘ × scale
                           (r, in)      (out, r)

Names follow PEFT (`<module>.base_layer`, `<module>.lora_A`, `<module>.lora_B`) and the tensors have
PEFT's shapes, so the trainable parameters map 1:1 to PEFT adapter keys
`base_model.model.<module>.lora_A.weight`.

Init "lora": lora_A kaiming-uniform(a=√5) as PEFT does (= uniform(±1/√in), forge_mlx's bound), lora_B = 0.
Init "pissa": (lora_A, lora_B) = (A0, B0) from the top-r SVD of W (forge_core.pissa, numpy: the same
factors as forge_mlx), and the base holds W_res = W − s·B0A0, quantized if the run quantizes (QPiSSA:
the residual, never W), one layer at a time.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from forge_core import surgery
from forge_core.adapters import mapping as mp
from forge_core.adapters.mapping import collect
from forge_core.config import ForgeConfig, lora_scale
from forge_core.dora import dora_weight, nonzero
from forge_core.errors import ForgeError
from forge_core.models.architectures import architecture
from forge_core.surgery import select_targets, under

from .experts import ExpertLinears, LoRAExperts
from .quant import is_quantized, quant_kind, quantize_linear, quantize_rest, set_module


class LoRALinear(nn.Module):
    """y = base_layer(x) + scale · dropout(x) @ lora_Aᵀ @ lora_Bᵀ; A, B are fp32 master weights.

    DoRA (dora=True): PEFT's DoraLinearLayer - a trainable magnitude `lora_magnitude_vector` (out,) starting at
    ||W + s·B0A0||_row, y = Wx + b + (m/n − 1)·W·drop(x) + (m/n)·s·BA·drop(x) with n = ||W + s·BA||_row held
    constant in the backward (forge_mlx.lora.LoRALinear computes the same)."""

    def __init__(self, base: nn.Module, rank: int, scale: float, dropout: float = 0.0,
                 lora_A: torch.Tensor | None = None, lora_B: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, dora: bool = False):
        super().__init__()
        out_f, in_f = base.out_features, base.in_features
        self.base_layer = base
        self.scale = scale
        self.dropout = nn.Dropout(p=dropout)
        if lora_A is None:
            lora_A = torch.empty(rank, in_f)
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5), generator=generator)
        if lora_B is None:
            lora_B = torch.zeros(out_f, rank)
        device = next(base.parameters()).device
        # copy=True: a given A0/B0 (often a view of the numpy PiSSA factors) must not train in place
        self.lora_A = nn.Parameter(lora_A.detach().to(device, torch.float32, copy=True).contiguous())
        self.lora_B = nn.Parameter(lora_B.detach().to(device, torch.float32, copy=True).contiguous())
        self.lora_magnitude_vector = None
        if dora:
            with torch.no_grad():
                m = torch.linalg.norm(self.base_weight() + self.delta(), dim=1)
            self.lora_magnitude_vector = nn.Parameter(m.contiguous())

    def base_weight(self) -> torch.Tensor:
        """The base's weight, dense fp32 (a quantized base dequantized)."""
        base = self.base_layer
        return base.dequantized(torch.float32) if is_quantized(base) else base.weight.float()

    def forward(self, x):
        if self.lora_magnitude_vector is not None:
            return self._dora(x)
        y = self.base_layer(x)
        z = (self.dropout(x) @ self.lora_A.to(x.dtype).T) @ self.lora_B.to(x.dtype).T
        return y + (self.scale * z).to(y.dtype)

    def row_norm(self, w: torch.Tensor) -> torch.Tensor:
        """||W + s·BA||_row from (out, r) products only: ||W||² + 2s·rowsum((W·Aᵀ)∘B) + s²·rowsum((B·AAᵀ)∘B),
        never the (out, in) sum itself (a dense copy per adapted weight per step)."""
        a, b, s = self.lora_A, self.lora_B, self.scale  # a (r, in), b (out, r)
        cross = ((w @ a.T) * b).sum(dim=1)
        gram = ((b @ (a @ a.T)) * b).sum(dim=1)
        return torch.sqrt(torch.clamp(w.square().sum(dim=1) + 2 * s * cross + s * s * gram, min=0.0))

    def _dora(self, x):
        w = self.base_weight()
        with torch.no_grad():  # a constant in the backward (the paper's memory saving): no graph for it
            norm = nonzero(self.row_norm(w))
        mag = self.lora_magnitude_vector / norm  # fp32; m/n − 1 is small, so it is cast after the subtraction
        w = w.to(x.dtype)
        if self.dropout.p > 0 and self.training:  # PEFT's form: the base term sees the dropped input too
            dropped = self.dropout(x)
            lora = ((dropped @ self.lora_A.to(x.dtype).T) * self.scale) @ self.lora_B.to(x.dtype).T
            y = x @ w.T + (mag - 1).to(x.dtype) * (dropped @ w.T) + mag.to(x.dtype) * lora
        else:  # = m/n · (W + s·BA) x: the magnitude's gradient keeps ONE (N, out) product, not two
            lora = ((x @ self.lora_A.to(x.dtype).T) * self.scale) @ self.lora_B.to(x.dtype).T
            y = mag.to(x.dtype) * (x @ w.T + lora)
        return y + self.base_layer.bias.to(y.dtype) if self.base_layer.bias is not None else y

    def delta(self) -> torch.Tensor:
        """scale · B @ A in (out, in) weight layout."""
        return self.scale * (self.lora_B @ self.lora_A)

    def merged(self, w: torch.Tensor) -> torch.Tensor:
        """The dense weight this layer computes with, given its base's dense weight w (fp32): W + s·BA, or under
        DoRA m / ||W + s·BA||_row · (W + s·BA)."""
        return dora_weight(torch, w + self.delta(), self.lora_magnitude_vector)

    def fuse(self, w: torch.Tensor | None = None) -> nn.Linear:
        """Fold the adapter into a dense nn.Linear (dequantizing a quantized base; never requantizing). `w`: the
        base's dense fp32 weight when the caller keeps it (GRPO's sampler dequantizes the frozen base once)."""
        base = self.base_layer
        w = self.base_weight() if w is None else w
        fused = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=w.device)
        with torch.no_grad():
            fused.weight.copy_(self.merged(w))
            if base.bias is not None:
                fused.bias.copy_(base.bias.float())
        return fused


def num_blocks(model: nn.Module) -> int:
    return model.config.get_text_config().num_hidden_layers


class Layers:
    """The torch side of forge_core.surgery.adapt_model. The dense model stays in host memory; each target is
    factorized there (fp32) and its residual quantized onto `device`, one at a time, so the device never holds the
    dense model. A mixture's expert projections (experts.py: ExpertLinears of E nn.Linear) are targets of their
    own; the linears inside them are not."""

    def __init__(self, device="cpu", compute_dtype=torch.float32):
        self.device, self.compute_dtype = device, compute_dtype

    @staticmethod
    def targets(model: nn.Module, cfg: ForgeConfig) -> list[str]:
        model.requires_grad_(False)  # the base is frozen: only what the LoRA layers add trains
        if "gate" in (cfg.lora.targets or []) and architecture(model.config.model_type).experts:
            raise ForgeError("lora.targets: 'gate', the router of a mixture of experts, is adapted on the MLX backend "
                             "only (transformers keeps it as a parameter, not a linear); drop it or use --backend mlx")
        modules = dict(model.named_modules())
        stacks = [p for p, m in modules.items() if isinstance(m, ExpertLinears)]
        inside = under(stacks)
        linears = [p for p, m in modules.items() if isinstance(m, nn.Linear) and not inside(p)]
        return select_targets(linears + stacks, cfg, num_blocks(model))

    get = staticmethod(lambda model, path: model.get_submodule(path))
    experts = staticmethod(lambda layer: layer.num_experts if isinstance(layer, ExpertLinears) else 0)

    @staticmethod
    def is_quantized(layer) -> bool:
        return is_quantized(layer.experts[0] if isinstance(layer, ExpertLinears) else layer)

    @staticmethod
    def shape(layer) -> tuple[int, int]:
        return layer.shape if isinstance(layer, ExpertLinears) else tuple(layer.weight.shape)

    @staticmethod
    def weight(layer) -> np.ndarray:
        if isinstance(layer, ExpertLinears):
            return np.stack([m.weight.detach().float().cpu().numpy() for m in layer.experts])
        return layer.weight.detach().float().cpu().numpy()

    @staticmethod
    def set_weight(layer, w: np.ndarray) -> None:
        for m, we in zip(layer.experts, w, strict=True) if isinstance(layer, ExpertLinears) else [(layer, w)]:
            m.weight.data = torch.from_numpy(np.ascontiguousarray(we)).to(m.weight.dtype)

    def quantize(self, layer, cfg: ForgeConfig, path: str = ""):
        if isinstance(layer, ExpertLinears):  # bitsandbytes per expert
            return ExpertLinears([self.quantize(m, cfg) for m in layer.experts])
        q, kind = cfg.quant, quant_kind(cfg.quant)
        if kind:
            return quantize_linear(layer, kind, q.double_quant, self.compute_dtype, self.device, q.matmul)
        return layer.to(self.device)

    @staticmethod
    def wrap(layer, a: np.ndarray, b: np.ndarray, cfg: ForgeConfig) -> nn.Module:
        if a.ndim == 3:  # one LoRA per expert
            return LoRAExperts(layer, lora_scale(cfg.lora), cfg.lora.dropout, torch.from_numpy(a),
                               torch.from_numpy(b))
        return LoRALinear(layer, cfg.lora.rank, lora_scale(cfg.lora), cfg.lora.dropout, torch.from_numpy(a),
                          torch.from_numpy(b), dora=cfg.lora.dora)

    swap = staticmethod(set_module)

    def finish(self, model: nn.Module, cfg: ForgeConfig, adapted: list[str]) -> None:
        q, kind = cfg.quant, quant_kind(cfg.quant)
        if kind:
            quantize_rest(model, kind, q.double_quant, self.compute_dtype, self.device, q.matmul, q.embeddings,
                          skip=under(adapted))
        model.to(self.device)


def adapt_model(model: nn.Module, cfg: ForgeConfig, pissa_init: dict | None = None, device="cpu",
                compute_dtype=torch.float32) -> dict:
    """forge_core.surgery.adapt_model with torch's layers: returns the PiSSA factors used ({} for plain LoRA)."""
    return surgery.adapt_model(model, cfg, Layers(device, compute_dtype), pissa_init)


def trainable_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Flat {"<module>.lora_A" | "<module>.lora_B": parameter}, in module order."""
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: nn.Module, weights: dict) -> None:
    """Copy {trainable name: array/tensor} into the LoRA parameters; every key must match."""
    params = trainable_params(model)
    missing, unknown = set(params) - set(weights), set(weights) - set(params)
    if missing or unknown:
        raise ForgeError(f"adapter weights do not match the model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unknown)[:3]}")
    with torch.no_grad():
        for k, p in params.items():
            v = torch.as_tensor(np.asarray(weights[k]) if not torch.is_tensor(weights[k]) else weights[k])
            if tuple(v.shape) != tuple(p.shape):
                raise ForgeError(f"adapter weight {k}: shape {tuple(v.shape)}, the model needs {tuple(p.shape)}")
            p.copy_(v.to(p.device, p.dtype))


MAGNITUDE = "lora_magnitude_vector"


def tensors_to_flat(tensors: dict, magnitudes: dict | None = None) -> dict[str, np.ndarray]:
    """Canonical {module: (A (r,in), B (out,r))} (+ DoRA {module: m}) -> trainable names {module.lora_A: A,
    module.lora_B: B, module.lora_magnitude_vector: m}."""
    flat = {}
    for m, (a, b) in tensors.items():
        flat[f"{m}.lora_A"], flat[f"{m}.lora_B"] = np.asarray(a, np.float32), np.asarray(b, np.float32)
    for m, mag in (magnitudes or {}).items():
        flat[f"{m}.{MAGNITUDE}"] = np.asarray(mag, np.float32)
    return flat


def flat_to_tensors(flat: dict) -> tuple[dict, dict | None]:
    """Inverse of tensors_to_flat: ({module: (A, B)}, {module: m} or None)."""
    mods = {k.rsplit(".", 1)[0] for k in flat}
    tensors = {m: (np.asarray(flat[f"{m}.lora_A"]), np.asarray(flat[f"{m}.lora_B"])) for m in sorted(mods)}
    mags = {m: np.asarray(flat[f"{m}.{MAGNITUDE}"]) for m in sorted(mods) if f"{m}.{MAGNITUDE}" in flat}
    return tensors, mags or None


def factors_to_flat(factors: dict) -> dict[str, np.ndarray]:
    """{path: (A0, B0)} -> PEFT keys {base_model.model.<path>.lora_A.weight: A0 (r,in), ...lora_B.weight: B0}."""
    flat = {}
    for path, (a0, b0) in factors.items():
        flat[mp.peft_key(path, "A")] = np.ascontiguousarray(a0, np.float32)
        flat[mp.peft_key(path, "B")] = np.ascontiguousarray(b0, np.float32)
    return flat


def flat_to_factors(flat: dict) -> dict:
    """PEFT-layout keys (ours) or mlx-lm keys (a forge_mlx run's pissa_init) -> {path: (A0, B0)}."""
    peft = all(k.startswith(mp.PEFT_PREFIX) for k in flat)
    factors, _ = collect(dict(flat), mp.parse_peft_key if peft else mp.parse_mlx_key, "pissa_init",
                         transposed=not peft)
    return factors
