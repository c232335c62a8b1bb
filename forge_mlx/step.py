"""One optimizer step on MLX (forge_core.backend.Stepper): AdamW and two compiled functions.

    micro(batch)          -> loss sum, count, metric sums, gradients of the SUM   (per micro-batch)
    apply(grads, count)   -> grad norm; grads / count, clipped, AdamW update        (once per step)
Both are compiled with the model, optimizer and random state as implicit inputs/outputs, so a step is
one graph MLX evaluates in finish(). MLX arrays are immutable: references taken in begin() ARE the
pre-step weights and optimizer state, which is all rollback() needs.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from forge_core.config import ForgeConfig
from forge_core.errors import ForgeError

from . import distributed
from .lora import load_trainable, trainable_params


def make_optimizer(cfg: ForgeConfig):
    """AdamW at train.lr; the loop sets each step's rate from forge_core.schedule."""
    t = cfg.train
    if t.optimizer != "adamw":
        raise ForgeError(f"train.optimizer '{t.optimizer}' is a CUDA (bitsandbytes) optimizer; the MLX backend has adamw")
    # bias_correction=True: the AdamW of torch/PEFT/TRL users (MLX's default leaves it off)
    return optim.AdamW(learning_rate=t.lr, weight_decay=t.weight_decay, bias_correction=True)


def _add(acc, new):
    return new if acc is None else tree_map(lambda a, b: a + b, acc, new)


class Stepper:
    def __init__(self, cfg: ForgeConfig, model: nn.Module, loss_fn):
        self.model, self.loss_fn, self.cfg = model, loss_fn, cfg
        self.optimizer = make_optimizer(cfg)
        self._fns = None  # built at the first step: after a resume has put the optimizer state in place
        self._grads = self._saved = None

    def _build(self):
        model, optimizer = self.model, self.optimizer
        max_norm = self.cfg.train.max_grad_norm
        loss_and_grad = nn.value_and_grad(model, self.loss_fn)
        state = [model.state, optimizer.state, mx.random.state]

        def micro(batch):
            (loss_sum, count, metrics), grads = loss_and_grad(model, batch)
            # each metric as a node of its own: MLX 0.32's compile merges equal subexpressions and fails
            # ("_Map_base::at") when a merged one is both inside the differentiated loss and an aux output
            # (CPO's NLL and its logps/chosen metric are both sum(log p(chosen)))
            metrics = {k: v + 0.0 for k, v in metrics.items()}
            return loss_sum, count, metrics, grads

        def apply(grads, count):
            # the averaging point: gradients of the loss sums, summed over ranks, / the global count
            if distributed.size() > 1:
                flat = tree_flatten(grads)
                grads = tree_unflatten(list(zip([k for k, _ in flat], distributed.all_sum([g for _, g in flat]))))
            grads = tree_map(lambda g: g / count, grads)
            grads, norm = optim.clip_grad_norm(grads, max_norm if max_norm > 0 else float("inf"))
            optimizer.update(model, grads)
            return norm

        if self.cfg.train.compile:
            micro = mx.compile(micro, inputs=state, outputs=state)
            apply = mx.compile(apply, inputs=state, outputs=state)
        return micro, apply

    def begin(self) -> None:
        self._fns = self._fns or self._build()
        self._grads = None
        self._saved = (self.model.trainable_parameters(), tree_map(lambda x: x, self.optimizer.state))

    def accumulate(self, batch):
        loss_sum, count, metrics, grads = self._fns[0](batch)
        self._grads = _add(self._grads, grads)
        if distributed.size() > 1:  # this rank's part now: an out-of-memory error surfaces before any exchange
            mx.eval(loss_sum, count, metrics, self._grads)
        return loss_sum, count, metrics

    def update(self, count, lr: float):
        self.optimizer.learning_rate = lr
        grads, self._grads = self._grads, None
        return self._fns[1](grads, count)

    def finish(self, values: list) -> None:
        mx.eval(self.model.parameters(), self.optimizer.state, values)

    def rollback(self) -> bool:
        params, opt_state = self._saved
        self._grads = None
        self.model.update(params)
        self.optimizer.state.clear()  # in place: the compiled functions hold this dict
        self.optimizer.state.update(opt_state)
        return True

    def state_arrays(self) -> tuple[dict, dict, dict]:
        # ascontiguousarray: safetensors writes raw memory, and an mx array may be a strided view
        def numpy(tree):
            return {k: np.ascontiguousarray(np.array(v)) for k, v in tree_flatten(tree) if isinstance(v, mx.array)}

        return numpy(trainable_params(self.model)), numpy(self.optimizer.state), {}

    def load_state_arrays(self, weights: dict, tensors: dict, scalars: dict) -> None:
        load_trainable(self.model, {k: mx.array(v) for k, v in weights.items()})
        self.optimizer.init(self.model.trainable_parameters())  # the full state tree, then overwrite its leaves
        flat = dict(tree_flatten(self.optimizer.state))
        flat.update({k: mx.array(v) for k, v in tensors.items()})
        self.optimizer.state = tree_unflatten(list(flat.items()))
        mx.eval(self.model.parameters(), self.optimizer.state)


def make_stepper(cfg: ForgeConfig, model, loss_fn) -> Stepper:
    return Stepper(cfg, model, loss_fn)
