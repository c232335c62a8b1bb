"""Expert stacks on torch. transformers 5 keeps a mixture's experts fused in one module (`experts.gate_up_proj`
(E, 2i, h) and `experts.down_proj` (E, h, i) parameters); forge splits that module at load into mlx-lm's three
projections - gate_proj, up_proj, down_proj - each an ExpertLinears of E nn.Linear, so the surgery factorizes,
quantizes (bitsandbytes, per expert) and adapts each expert like any linear, one LoRA per expert (LoRAExperts),
and both backends train the same parameterization (separate gate and up adapters, as mlx-lm's SwitchGLU has).

    SplitExperts(h, top_k_index, top_k_weights): for each expert e some token picked,
        y[tokens of e] += weight · down_e(act(gate_e(x)) · up_e(x))                 (transformers' own loop)

Module paths: `<block>.mlp.experts.gate_proj` here; forge's adapters name the stack as mlx-lm does
(`<block>.<moe>.switch_mlp.gate_proj`): forge_core/models/experts.py maps the two.
"""

from __future__ import annotations

import torch
from torch import nn

from forge_core.models.experts import PROJECTIONS


class ExpertLinears(nn.Module):
    """E linears of one projection of a mixture's experts, called one expert at a time: y = experts[e](x)."""

    def __init__(self, linears: list[nn.Module]):
        super().__init__()
        self.experts = nn.ModuleList(linears)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of one expert."""
        first = self.experts[0]
        return first.out_features, first.in_features

    def forward(self, x, e: int):
        return self.experts[e](x)


class LoRAExperts(nn.Module):
    """y = base(x, e) + scale · dropout(x) @ lora_A[e]ᵀ @ lora_B[e]ᵀ, lora_A (E, r, in), lora_B (E, out, r) fp32."""

    def __init__(self, base: ExpertLinears, scale: float, dropout: float, lora_A: torch.Tensor,
                 lora_B: torch.Tensor):
        super().__init__()
        self.base_layer = base
        self.scale = scale
        self.dropout = nn.Dropout(p=dropout)
        device = next(base.parameters()).device
        self.lora_A = nn.Parameter(lora_A.detach().to(device, torch.float32, copy=True).contiguous())
        self.lora_B = nn.Parameter(lora_B.detach().to(device, torch.float32, copy=True).contiguous())

    @property
    def num_experts(self) -> int:
        return self.base_layer.num_experts

    def forward(self, x, e: int):
        y = self.base_layer(x, e)
        z = (self.dropout(x) @ self.lora_A[e].to(x.dtype).T) @ self.lora_B[e].to(x.dtype).T
        return y + (self.scale * z).to(y.dtype)

    def base_weight(self) -> torch.Tensor:
        """Every expert's weight, dense fp32 (E, out, in)."""
        from .quant import is_quantized

        return torch.stack([m.dequantized(torch.float32) if is_quantized(m) else m.weight.float()
                            for m in self.base_layer.experts])

    def delta(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ self.lora_A)

    def merged(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.delta()

    def fuse(self, w: torch.Tensor | None = None) -> ExpertLinears:
        """The adapters folded into dense per-expert nn.Linear (a quantized base dequantized; never requantized)."""
        w = self.merged(self.base_weight() if w is None else w)
        return dense_experts(w, self.base_layer)


def dense_experts(w: torch.Tensor, like: ExpertLinears | None = None) -> ExpertLinears:
    """ExpertLinears of plain nn.Linear holding copies of `w` (E, out, in), no bias (built on the meta device: no
    random init to overwrite)."""
    linears = []
    for e in range(w.shape[0]):
        lin = nn.Linear(w.shape[2], w.shape[1], bias=False, device="meta")
        lin.weight = nn.Parameter(w[e].detach().clone(), requires_grad=False)
        linears.append(lin)
    return ExpertLinears(linears)


class SplitExperts(nn.Module):
    """transformers 5's fused experts module as three ExpertLinears, computing what its forward computes."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        gate_up, down = fused.gate_up_proj.detach(), fused.down_proj.detach()
        width = gate_up.shape[1] // 2  # transformers chunks gate_up's output as (gate, up)
        self.gate_proj = dense_experts(gate_up[:, :width])
        self.up_proj = dense_experts(gate_up[:, width:])
        self.down_proj = dense_experts(down)
        self.act_fn = fused.act_fn
        self.num_experts = gate_up.shape[0]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.unique(top_k_index).tolist()
        for e in hit:
            if not 0 <= e < self.num_experts:  # transformers pads dropped choices with E
                continue
            token, slot = torch.where(top_k_index == e)
            x = hidden_states[token]
            y = self.down_proj(self.act_fn(self.gate_proj(x, e)) * self.up_proj(x, e), e)
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def splittable(module: nn.Module) -> bool:
    """transformers 5's fused experts, without biases (gpt-oss's have them: left as they are)."""
    params = dict(module.named_parameters(recurse=False))
    return (set(params) == {"gate_up_proj", "down_proj"} and params["gate_up_proj"].dim() == 3
            and hasattr(module, "act_fn"))


def split_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module by its SplitExperts, one at a time: only paths are listed up front, so
    each fused module is freed once its split copy replaces it (one block's experts twice at most, never the
    model's). Returns the paths of the expert projections, `<...>.experts.gate_proj` etc."""
    fused = [path for path, module in model.named_modules() if splittable(module)]
    for path in fused:
        parent, _, name = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, name, SplitExperts(getattr(owner, name)))
    return [f"{path}.{p}" for path in fused for p in PROJECTIONS]
