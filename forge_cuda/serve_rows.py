"""Adapters applied per row on torch: one batch decodes requests for different adapters of one base, each row with
its own LoRA factors (`forge serve --mix rows`, forge_cuda/serve.py), as forge_mlx/serve_rows.py does on MLX.

Every LoRA layer of the group becomes a RowLoRA holding each adapter's A (r, in), B (out, r) and scale; a call runs
the base once for the whole batch and adds, for each adapter present, its rank-r product masked to that adapter's
rows (PEFT's mixed-adapter batch does this per sub-batch; at rank r the product costs ~2r/out of the base's, less
than gathering the rows apart): the base matmul is shared whatever the mix. The rows' adapters are set on a
shared Rows object before each model call (the engine knows its batch's rows).
"""

from __future__ import annotations

import torch
from torch import nn

from .quant import set_module


class Rows:
    """The adapter index of each row of the batch being computed: (B,) long, set by the engine, read by RowLoRA."""

    def __init__(self):
        self.idx = torch.zeros(1, dtype=torch.long)
        self.present: list[int] = [0]

    def set(self, idx: list[int], device) -> None:
        self.idx = torch.tensor(idx, dtype=torch.long, device=device)
        self.present = sorted(set(idx))


class RowLoRA(nn.Module):
    def __init__(self, base: nn.Module, a: list[torch.Tensor], b: list[torch.Tensor], scales: list[float], rows: Rows):
        super().__init__()
        self.base_layer = base
        self.a, self.b, self.scales, self.rows = a, b, scales, rows  # plain lists: no parameters, no state dict

    def forward(self, x):
        y = self.base_layer(x)
        rows = self.rows
        for i in rows.present:
            lora = ((x @ self.a[i].to(x.dtype).T) @ self.b[i].to(x.dtype).T) * self.scales[i]
            if len(rows.present) == 1:
                return y + lora.to(y.dtype)
            mask = (rows.idx == i).view(-1, *([1] * (y.dim() - 1)))
            y = torch.where(mask, y + lora.to(y.dtype), y)  # not y + lora·mask: an inf elsewhere would make NaN
        return y


def stack_adapters(model: nn.Module, lora_paths: list[str], adapters: list[tuple[dict, float]]) -> Rows:
    """Replace each LoRALinear at `lora_paths` by a RowLoRA over `adapters` [({param name: tensor}, scale), ...] (their
    order is the row index), keeping the layer's base; returns the Rows that select each row's adapter."""
    rows = Rows()
    for path in lora_paths:
        layer = model.get_submodule(path)
        a = [w[f"{path}.lora_A"].detach() for w, _ in adapters]
        b = [w[f"{path}.lora_B"].detach() for w, _ in adapters]
        set_module(model, path, RowLoRA(layer.base_layer, a, b, [s for _, s in adapters], rows))
    return rows
