"""The model side of `forge serve` on MLX (forge_core/serve/scheduler.py's Engine).

Each group of served runs (forge_core/serve/catalog.py: runs that share their base exactly) is built once, as
`forge generate` builds a run: the base, its residual quantized as trained, LoRA layers at the targets. Every
adapter of the group is then only its factors, resident as MLX arrays. Requests are decoded by mlx-lm's
BatchGenerator (continuous batching: rows join and leave between steps), in one of two ways (--mix):
- rows (the default): one generator per group; each row of a batch decodes with its own adapter's factors, gathered
  per row (serve_rows.py), so requests for different adapters share every step;
- grouped: one generator per adapter, and a step runs one adapter's rows with its factors switched in (the LoRA
  layers pointed at another adapter's arrays: nothing read, copied or reloaded), one batched step per adapter.
DoRA and expert (mixture) adapters are served grouped. docs/BENCHMARKS.md "Serving" measures the two.

On the CPU the quantized base layers are dequantized once into dense weights (as forge generate's for_inference
does) and the adapters stay apart from them, since they are switched per step.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx.utils import tree_unflatten

from forge_core.serve.engine import GroupEngine

from . import ops
from .generate import _dense
from .lora import LORA_LAYERS, QUANT_LAYERS, LoRALinear, trainable_params
from .serve_rows import RowAdapters, RowModel, stack_adapters


def _dense_base(model) -> None:
    """CPU: every quantized layer (a LoRA layer's base too) as its dense dequantized weight, once."""
    if mx.default_device() != mx.cpu:
        return
    swaps = [(p, _dense(m, m.dequantized(mx.float32))) for p, m in model.named_modules() if isinstance(m, QUANT_LAYERS)]
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    mx.eval(model.parameters())


def _materialize(model) -> None:
    """Evaluate every array the model's modules hold, not only its parameters. MLX ties a lazy array to the thread
    that made it: the decode runs on the scheduler's thread, and an array left lazy at build (mlx-lm's Llama 3 rope
    keeps its frequencies in a private `_freqs`) made every step there fail: "There is no Stream(cpu, 0) in current
    thread"."""
    for _, module in model.named_modules():
        mx.eval([v for v in module.values() if isinstance(v, mx.array)])


class MlxEngine(GroupEngine):
    def __init__(self, catalog, max_batch: int = 32, log=print, mix: str = "rows"):
        self.max_batch = max_batch
        self.gens, self.live, self._samplers = {}, {}, {}
        super().__init__(catalog, mix, log)

    def _build(self, members, adapted):
        if adapted:
            model, tokenizer, _, _ = ops.build_model(members[0].cfg, pissa_init=members[0].factors)
            init = dict(trainable_params(model))  # the initial factors: with them the model is the base
        else:
            model, tokenizer = ops.load_base_for_inference(members[0].cfg)
            init = {}
        _dense_base(model)
        model.eval()
        return model, tokenizer, init

    def _weights(self, model, member, init):
        weights = {k: mx.array(v) for k, v in member.weights.items()} if member.weights is not None else init
        mx.eval(list(weights.values()))
        return weights

    def _lora_layers(self, model):
        return [(p, isinstance(m, LoRALinear) and not m.dora) for p, m in model.named_modules()
                if isinstance(m, LORA_LAYERS)]

    _stack = staticmethod(stack_adapters)

    def _open(self, key, model, tokenizer, lanes):
        from mlx_lm.generate import BatchGenerator

        _materialize(model)
        runner = RowModel(model, self.rows[key]) if key in self.rows else model  # rows: one generator, each row its adapter
        stop = [[t] for t in tokenizer.eos_token_ids]
        for lane in lanes:
            self.gens[lane] = BatchGenerator(runner, stop_tokens=stop, completion_batch_size=self.max_batch,
                                             prefill_batch_size=self.max_batch)
            self.live[lane] = set()

    def _activate(self, name: str):
        key = self.group_of[name]
        model = self.models[key]
        if key in self.rows:  # rows mode: a lone call (the router's features) runs as one row of `name`
            self.rows[key].idx = mx.array([self.index[name]], dtype=mx.uint32)
        elif self.current.get(key) != name:
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
        """A row for adapter `name`; its id is unique within its lane (self.lane(name))."""
        from mlx_lm.models.cache import make_prompt_cache

        lane = self.lane_of[name]
        caches = None
        if name in self.index:  # the row's adapter rides in its cache list (serve_rows.py)
            caches = [make_prompt_cache(self.models[lane]) + [RowAdapters([self.index[name]])]]
        (uid,) = self.gens[lane].insert([prompt], max_tokens=[max_tokens], caches=caches,
                                        samplers=[self._sampler(temp, top_p)])
        self.live[lane].add(uid)
        return uid

    def step(self, lane: str) -> list[tuple[int, int, str | None]]:
        if lane not in self.rows:
            self._activate(lane)
        out = []
        for r in self.gens[lane].next_generated():
            out.append((r.uid, r.token, r.finish_reason))
            if r.finish_reason is not None:
                self.live[lane].discard(r.uid)
        if not self.live[lane]:
            mx.clear_cache()  # the finished rows' KV cache goes back, not to the allocator's cache
        return out

    def remove(self, lane: str, uids: list[int]) -> None:
        gone = [u for u in uids if u in self.live[lane]]
        if gone:
            self.gens[lane].remove(gone)
            self.live[lane].difference_update(gone)
        if not self.live[lane]:
            mx.clear_cache()

    def memory(self) -> int:
        """Bytes the framework holds now (the health check reports it)."""
        return int(mx.get_active_memory())

    def pooled(self, ids: list[int]) -> np.ndarray:
        model = self._activate(self.base_name)
        hidden = model.model(mx.array([ids]))  # the final norm's output, (1, L, h)
        return np.array(hidden[0].astype(mx.float32).mean(axis=0))
