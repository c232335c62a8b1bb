"""Adapters applied per row: one batch decodes requests for different adapters of one base, each row with its own
LoRA factors (`forge serve --mix rows`, forge_mlx/serve.py).

Every LoRA layer of the group becomes a RowLoRA holding all the group's adapters stacked, A (N, in, r) and B (N, r,
out) (ranks padded with zeros to the largest: the padding adds nothing), and their scales (N,). A step computes

    y = base(x) + scale[i] · (x @ A[i]) @ B[i]          i = the row's adapter

with mx.gather_mm, which picks each row's matrices by index without copying them out of the stack. The base's
matmul, the expensive part, runs once for the whole batch whatever adapters the rows use; grouping instead runs one
batch per adapter (forge_mlx/serve.py), each a base matmul of its own.

Which adapter each row uses must follow the rows as mlx-lm's BatchGenerator merges, extends, filters and splits its
batches. It rides in the row's cache list as its last entry (RowAdapters), so every batch operation that moves the
KV cache moves it too; RowModel reads it before each call and hands the model the cache list without it.
"""

from __future__ import annotations

import mlx.core as mx
from mlx import nn


class Rows:
    """The adapter index of each row of the batch being computed, (B,) uint32: set by RowModel, read by RowLoRA."""

    def __init__(self):
        self.idx = mx.array([0], dtype=mx.uint32)


class RowAdapters:
    """The adapter index of each row, as a cache entry: mlx-lm's batch code merges, extends, filters and extracts
    it exactly as it does the rows' KV caches (the methods below are that protocol); it holds no arrays."""

    def __init__(self, rows=()):
        self.rows = list(rows)

    state = property(lambda self: [])
    nbytes = 0

    @classmethod
    def merge(cls, caches):
        return cls([r for c in caches for r in c.rows])

    def extend(self, other):
        self.rows.extend(other.rows)

    def filter(self, keep):
        self.rows = [self.rows[i] for i in keep]

    def extract(self, idx):
        return RowAdapters([self.rows[idx]])

    def prepare(self, **kwargs):
        pass

    def finalize(self):
        pass

    def empty(self):
        return not self.rows

    def size(self):
        return 0


class RowModel:
    """The model as BatchGenerator calls it: the rows' adapter indices are taken off the end of the cache list."""

    def __init__(self, model: nn.Module, rows: Rows):
        self.model, self.rows, self.layers = model, rows, model.layers

    def __call__(self, inputs, cache=None, **kwargs):
        self.rows.idx = mx.array(cache[-1].rows, dtype=mx.uint32)
        return self.model(inputs, cache=cache[:-1], **kwargs)


class RowLoRA(nn.Module):
    """y = linear(x) + scale[i] · (x @ a[i]) @ b[i], i = each row's adapter (Rows.idx); x is (B, L, in)."""

    def __init__(self, linear: nn.Module, a: mx.array, b: mx.array, scales: mx.array, rows: Rows):
        super().__init__()
        self.linear, self.a, self.b, self.scales = linear, a, b, scales  # stacks in the dtype the product runs in
        self.rows = rows  # not an array: kept as a plain attribute, outside the parameter tree

    def __call__(self, x):
        y = self.linear(x)
        idx = self.rows.idx
        if x.ndim != 3 or x.shape[0] != idx.size:
            raise ValueError(f"RowLoRA takes (rows, tokens, features) for {idx.size} rows, got {x.shape}")
        xc = x.astype(self.a.dtype)
        xa = mx.gather_mm(xc, self.a, rhs_indices=idx) * self.scales[idx][:, None, None]
        return y + mx.gather_mm(xa, self.b, rhs_indices=idx).astype(y.dtype)


def product_dtype(linear: nn.Module) -> mx.Dtype:
    """The dtype of a RowLoRA's gathered product: the base's compute dtype, float32 on the CPU (whose gather_mm runs
    in float32 only)."""
    if mx.default_device() == mx.cpu:
        return mx.float32
    return (linear.scales if "scales" in linear else linear.weight).dtype


def stack_adapters(model: nn.Module, lora_paths: list[str], adapters: list[tuple[dict, float]]) -> Rows:
    """Replace each LoRALinear at `lora_paths` by a RowLoRA over `adapters` [({key: array}, scale), ...] (their order is
    the row index), keeping the layer's base; returns the Rows that select each row's adapter. The stacks are cast
    once, here, to the product's dtype."""
    from mlx.utils import tree_unflatten

    rows = Rows()
    modules = dict(model.named_modules())
    swaps = []
    for path in lora_paths:
        linear = modules[path].linear
        dtype = product_dtype(linear)
        a_list = [w[f"{path}.lora_a"] for w, _ in adapters]  # (in, r_k)
        b_list = [w[f"{path}.lora_b"] for w, _ in adapters]  # (r_k, out)
        r = max(a.shape[1] for a in a_list)
        a = mx.stack([mx.pad(x.astype(dtype), [(0, 0), (0, r - x.shape[1])]) for x in a_list])
        b = mx.stack([mx.pad(x.astype(dtype), [(0, r - x.shape[0]), (0, 0)]) for x in b_list])
        scales = mx.array([s for _, s in adapters], dtype=dtype)
        swaps.append((path, RowLoRA(linear, a, b, scales, rows)))
    model.update_modules(tree_unflatten(swaps))
    mx.eval(model.parameters())
    return rows
