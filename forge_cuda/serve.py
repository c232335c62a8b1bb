"""The model side of `forge serve` on torch (forge_core/serve/scheduler.py's Engine), as forge_mlx/serve.py on MLX.

Each group of served runs is built once as `forge generate --backend cuda` builds a run (NF4 residual, LoRA layers);
every adapter is its factors kept as tensors on the device, and switching adapters points the LoRA parameters at
another adapter's tensors (no copy, no reload). On the CPU each quantized layer is dequantized once into a dense
one (the adapters stay apart: they are switched per step).

Continuous batching, per lane: a new row is prefilled alone and joins its lane's batch, whose KV cache is
left-padded to one length (the padding masked, each row's positions its own); a row that ends leaves the batch
between steps. transformers' generate() batches only rows that start together, so the scheduler here is ours.
A lane is a group's (--mix rows, the default: each row with its own adapter, serve_rows.py) or one adapter's
(grouped: its factors switched in per step); DoRA and expert adapters are served grouped.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from forge_core.serve.engine import GroupEngine

from . import ops
from .experts import LoRAExperts
from .generate import _stop_ids, dense_linear
from .lora import LoRALinear, load_trainable, trainable_params
from .model import _renamed, device
from .quant import is_quantized, set_module
from .serve_rows import stack_adapters


def _dense_base(model: nn.Module) -> None:
    """CPU: every quantized layer (a LoRA layer's base too) as its dense dequantized weight, once."""
    if next(model.parameters()).device.type != "cpu":
        return
    dtype = model.get_input_embeddings().weight.dtype
    for path, m in [(p, m) for p, m in model.named_modules() if is_quantized(m)]:
        set_module(model, path, dense_linear(m, m.dequantized(torch.float32), dtype))


class _Row:
    def __init__(self, uid: int, prompt: list[int], max_tokens: int, temp: float, top_p: float, adapter: int = 0):
        self.uid, self.prompt, self.max_tokens, self.temp, self.top_p = uid, prompt, max_tokens, temp, top_p
        self.adapter = adapter  # rows mode: the row's adapter index in its group
        self.made = 0


class _Batch:
    """One lane's rows decoding together: a left-padded KV cache, each row's padding and last token."""

    def __init__(self):
        self.rows: list[_Row] = []
        self.cache = None  # a transformers DynamicCache over the rows, every layer (B, heads, L, dim)
        self.pad: list[int] = []  # left padding per row
        self.last = None  # (B,) the token each row feeds next

    def length(self) -> int:
        return self.cache.get_seq_length() if self.cache is not None else 0

    def join(self, row: _Row, cache, token: torch.Tensor) -> None:
        n, length = cache.get_seq_length(), self.length()
        width = max(n, length)
        if self.cache is None:
            self.cache, self.pad, self.last = cache, [0], token.view(1)
        else:
            for mine, theirs in zip(self.cache.layers, cache.layers):
                mine.keys = torch.cat([F.pad(mine.keys, (0, 0, width - length, 0)),
                                       F.pad(theirs.keys, (0, 0, width - n, 0))])
                mine.values = torch.cat([F.pad(mine.values, (0, 0, width - length, 0)),
                                         F.pad(theirs.values, (0, 0, width - n, 0))])
            self.pad = [p + width - length for p in self.pad] + [width - n]
            self.last = torch.cat([self.last, token.view(1)])
        self.rows.append(row)

    def keep(self, keep: list[int]) -> None:
        if not keep:
            self.__init__()
            return
        index = torch.tensor(keep, device=self.last.device)
        cut = min(self.pad[i] for i in keep)  # padding every remaining row has: dropped
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, cut:]
            layer.values = layer.values.index_select(0, index)[:, :, cut:]
        self.rows = [self.rows[i] for i in keep]
        self.pad = [self.pad[i] - cut for i in keep]
        self.last = self.last.index_select(0, index)


def _cache_kw(model: nn.Module) -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.25 (`past_key_values` deprecated), before it
    `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _sample(logits: torch.Tensor, temp: float, top_p: float) -> torch.Tensor:
    if temp <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temp, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the nucleus (at least the top token)
        sorted_p = sorted_p.masked_fill(outside, 0)
        return order.gather(-1, torch.multinomial(sorted_p, 1)).squeeze(-1)
    return torch.multinomial(probs, 1).squeeze(-1)


class TorchEngine(GroupEngine):
    def __init__(self, catalog, max_batch: int = 16, log=print, mix: str = "rows"):
        self.waiting, self.batches, self.stop = {}, {}, {}
        self._uid = 0
        super().__init__(catalog, mix, log)

    def _build(self, members, adapted):
        if adapted:
            model, tokenizer, _, _ = ops.build_model(members[0].cfg, pissa_init=members[0].factors)
        else:
            model, tokenizer = ops.load_base_for_inference(members[0].cfg)
        model.eval()
        _dense_base(model)
        if not adapted:  # the base alone: nothing to switch (its parameters all require grad: cloned, a second copy)
            return model, tokenizer, {}
        return model, tokenizer, {k: p.detach().clone() for k, p in trainable_params(model).items()}

    def _weights(self, model, member, init):
        if member.weights is None:
            return init
        load_trainable(model, _renamed(member.weights, model, to_torch=True, keys=True))
        return {k: p.detach().clone() for k, p in trainable_params(model).items()}

    def _lora_layers(self, model):
        return [(p, isinstance(m, LoRALinear) and m.lora_magnitude_vector is None) for p, m in model.named_modules()
                if isinstance(m, (LoRALinear, LoRAExperts))]

    _stack = staticmethod(stack_adapters)

    def _open(self, key, model, tokenizer, lanes):
        self.stop[key] = set(_stop_ids(model, tokenizer))
        for lane in lanes:
            self.waiting[lane], self.batches[lane] = [], _Batch()

    def _activate(self, name: str) -> nn.Module:
        key = self.group_of[name]
        model = self.models[key]
        if key in self.rows:
            return model
        if self.current[key] != name:
            weights, scale = self.adapters[name]
            params = trainable_params(model)
            for k, t in weights.items():
                params[k].data = t  # the adapter's own tensor: nothing copied
            for m in model.modules():
                if isinstance(m, (LoRALinear, LoRAExperts)):
                    m.scale = scale
            self.current[key] = name
        return model

    def _model(self, lane: str, rows: list[_Row]) -> nn.Module:
        """The lane's model, ready for a call on `rows` (rows mode: their adapters set)."""
        key = self.group_of.get(lane, lane)
        if key in self.rows:
            self.rows[key].set([r.adapter for r in rows], device())
            return self.models[key]
        return self._activate(lane)

    def insert(self, name: str, prompt: list[int], max_tokens: int, temp: float, top_p: float) -> int:
        self._uid += 1
        self.waiting[self.lane_of[name]].append(_Row(self._uid, list(prompt), max_tokens, temp, top_p,
                                                     self.index.get(name, 0)))
        return self._uid

    def _finish(self, row: _Row, token: int, stop: set) -> str | None:
        row.made += 1
        if token in stop:
            return "stop"
        return "length" if row.made >= row.max_tokens else None

    @torch.no_grad()
    def step(self, lane: str) -> list[tuple[int, int, str | None]]:
        from transformers import DynamicCache

        batch, stop = self.batches[lane], self.stop[self.group_of.get(lane, lane)]
        dev = device()
        out, keep = [], []
        if batch.rows:  # one decode step of the rows already in the batch
            model = self._model(lane, batch.rows)
            width = batch.length()
            mask = torch.ones(len(batch.rows), width + 1, dtype=torch.long, device=dev)
            for i, p in enumerate(batch.pad):
                mask[i, :p] = 0
            positions = torch.tensor([[width - p] for p in batch.pad], device=dev)
            logits = model(input_ids=batch.last[:, None], attention_mask=mask, position_ids=positions,
                           use_cache=True, **{_cache_kw(model): batch.cache}).logits[:, -1]
            tokens = [int(_sample(logits[i], r.temp, r.top_p)) for i, r in enumerate(batch.rows)]
            batch.last = torch.tensor(tokens, device=dev)
            for i, (row, token) in enumerate(zip(batch.rows, tokens)):
                finish = self._finish(row, token, stop)
                out.append((row.uid, token, finish))
                if finish is None:
                    keep.append(i)
            batch.keep(keep)
        while self.waiting[lane]:  # new rows: prefilled alone, their first token, then into the batch
            row = self.waiting[lane].pop(0)
            cache = DynamicCache()
            model = self._model(lane, [row])
            logits = model(input_ids=torch.tensor([row.prompt], device=dev), use_cache=True,
                           **{_cache_kw(model): cache}).logits[0, -1]
            token = int(_sample(logits, row.temp, row.top_p))
            finish = self._finish(row, token, stop)
            out.append((row.uid, token, finish))
            if finish is None:
                batch.join(row, cache, torch.tensor([token], device=dev))
        return out

    def remove(self, lane: str, uids: list[int]) -> None:
        gone = set(uids)
        self.waiting[lane] = [r for r in self.waiting[lane] if r.uid not in gone]
        batch = self.batches[lane]
        if any(r.uid in gone for r in batch.rows):
            batch.keep([i for i, r in enumerate(batch.rows) if r.uid not in gone])

    def memory(self) -> int:
        return int(torch.cuda.memory_allocated()) if torch.cuda.is_available() else 0

    @torch.no_grad()
    def pooled(self, ids: list[int]) -> np.ndarray:
        model = self._model(self.base_name, [_Row(0, ids, 1, 0.0, 1.0, self.index.get(self.base_name, 0))])
        out = model(input_ids=torch.tensor([ids], device=device()), output_hidden_states=True)
        return out.hidden_states[-1][0].float().mean(0).cpu().numpy()
