"""The model side of `forge serve` on MLX (forge_core/serve/scheduler.py's Engine).

Each group of served runs (forge_core/serve/catalog.py: runs that share their base exactly) is built once, as
`forge generate` builds a run: the base, its residual quantized as trained, LoRA layers at the targets. Every
adapter of the group is then only its factors, resident as MLX arrays; switching adapters points the LoRA layers at
another adapter's arrays (and its scale): no weight is read, copied or reloaded. Each adapter has its own mlx-lm
BatchGenerator (continuous batching: rows join and leave between steps), and a step runs one adapter's rows at once
with its factors switched in: requests for different adapters share the base, one batched step per adapter.

On the CPU the quantized base layers are dequantized once into dense weights (as forge generate's for_inference
does) and the adapters stay apart from them, since they are switched per step.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten

from forge_core.config import lora_scale

from . import ops
from .generate import _dense
from .lora import LORA_LAYERS, QUANT_LAYERS, trainable_params


def _dense_base(model) -> None:
    """CPU: every quantized layer (a LoRA layer's base too) as its dense dequantized weight, once."""
    if mx.default_device() != mx.cpu:
        return
    swaps = [(p, _dense(m, m.dequantized(mx.float32))) for p, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    mx.eval(model.parameters())


class MlxEngine:
    def __init__(self, catalog, max_batch: int = 32, log=print):
        from mlx_lm.generate import BatchGenerator

        self.group_of, self.models, self.current, self.adapters = {}, {}, {}, {}
        self.gens, self.live, self._samplers = {}, {}, {}
        self.tokenizer = None
        for key, members in catalog.groups().items():
            cfg = members[0].cfg
            adapted = any(m.adapter_dir for m in members)
            if adapted:
                model, tokenizer, _, _ = ops.build_model(cfg, pissa_init=members[0].factors)
                init = dict(trainable_params(model))  # the initial factors: with them the model is the base
            else:
                model, tokenizer = ops.load_base_for_inference(cfg)
                init = {}
            _dense_base(model)
            model.eval()
            self.tokenizer = self.tokenizer or tokenizer
            self.models[key] = model
            for m in members:
                weights = {k: mx.array(v) for k, v in m.weights.items()} if m.weights is not None else init
                mx.eval(list(weights.values()))
                self.adapters[m.name] = (weights, lora_scale(m.cfg.lora))
                self.group_of[m.name] = key
                self.gens[m.name] = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids],
                                                   completion_batch_size=max_batch, prefill_batch_size=max_batch)
                self.live[m.name] = set()
            log(f"serving {', '.join(m.name for m in members)} on one base ({cfg.model.path})")
        self.base_name = catalog.base_name

    def _activate(self, name: str):
        key = self.group_of[name]
        model = self.models[key]
        if self.current.get(key) != name:
            weights, scale = self.adapters[name]
            if weights:
                model.load_weights(list(weights.items()), strict=False)
                for _, m in model.named_modules():
                    if isinstance(m, LORA_LAYERS):
                        m.scale = scale
            self.current[key] = name
        return model

    def _sampler(self, temp: float, top_p: float):
        from mlx_lm.sample_utils import make_sampler

        key = (temp, top_p if temp > 0 else 1.0)
        if key not in self._samplers:  # one object per setting: rows sharing it sample in one call
            self._samplers[key] = make_sampler(temp, top_p=key[1] if key[1] < 1.0 else 0.0)
        return self._samplers[key]

    def insert(self, name: str, prompt: list[int], max_tokens: int, temp: float, top_p: float) -> int:
        (uid,) = self.gens[name].insert([prompt], max_tokens=[max_tokens], samplers=[self._sampler(temp, top_p)])
        self.live[name].add(uid)
        return uid

    def step(self, name: str) -> list[tuple[int, int, str | None]]:
        self._activate(name)
        out = []
        for r in self.gens[name].next_generated():
            out.append((r.uid, r.token, r.finish_reason))
            if r.finish_reason is not None:
                self.live[name].discard(r.uid)
        if not self.live[name]:
            mx.clear_cache()  # the finished rows' KV cache goes back, not to the allocator's cache
        return out

    def remove(self, name: str, uids: list[int]) -> None:
        gone = [u for u in uids if u in self.live[name]]
        if gone:
            self.gens[name].remove(gone)
            self.live[name].difference_update(gone)
        if not self.live[name]:
            mx.clear_cache()

    def memory(self) -> int:
        """Bytes the framework holds now (the health check reports it)."""
        return int(mx.get_active_memory())

    def pooled(self, ids: list[int]) -> np.ndarray:
        model = self._activate(self.base_name)
        hidden = model.model(mx.array([ids]))  # the final norm's output, (1, L, h)
        return np.array(hidden[0].astype(mx.float32).mean(axis=0))
