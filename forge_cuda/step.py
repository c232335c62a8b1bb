"""One optimizer step in PyTorch (forge_core.backend.Stepper): backward per micro-batch, one update.

backward() runs on each micro-batch's loss SUM, so p.grad holds the gradient of the total; update()
divides it by the total count (the averaging point), clips and steps. Eager: train.compile is not used.
Checkpointed optimizer state is keyed "<param NAME>/<state key>[/<key>]" (not by index), tensors as
numpy (bitsandbytes' 8-bit state included) and the rest as JSON scalars.
"""

from __future__ import annotations

import numpy as np
import torch

from forge_core.config import ForgeConfig
from forge_core.errors import ForgeError

from . import distributed
from .lora import load_trainable, trainable_params
from .quant import bnb


def make_optimizer(cfg: ForgeConfig, params):
    """AdamW (torch), or bitsandbytes' 8-bit AdamW / paged 8-bit AdamW (train.optimizer). lr is set per step."""
    t, params = cfg.train, list(params)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "paged_adamw8bit" and not params[0].is_cuda:
        raise ForgeError("train.optimizer paged_adamw8bit pages optimizer state between GPU and CPU memory and "
                         "needs a CUDA GPU; on this machine use adamw8bit or adamw")
    cls = bnb.optim.AdamW8bit if t.optimizer == "adamw8bit" else bnb.optim.PagedAdamW8bit
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


class Stepper:
    def __init__(self, cfg: ForgeConfig, model, loss_fn):
        self.model, self.loss_fn = model, loss_fn
        self.params = trainable_params(model)
        self.optimizer = make_optimizer(cfg, self.params.values())
        self.max_norm = cfg.train.max_grad_norm
        self._updating = False

    def begin(self) -> None:
        self._updating = False

    def accumulate(self, batch):
        loss_sum, count, metrics = self.loss_fn(self.model, batch)
        loss_sum.backward()  # gradient of the SUM; divided by the total count in update()
        return loss_sum.detach(), count.detach(), {k: v.detach() for k, v in metrics.items()}

    def update(self, count, lr: float):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        params = list(self.params.values())
        # the averaging point: gradients of the loss sums, summed over ranks, / the global count
        distributed.all_sum_([p.grad for p in params if p.grad is not None])
        for p in params:
            if p.grad is not None:
                p.grad.div_(count)
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_norm if self.max_norm > 0 else float("inf"))
        self._updating = True  # from here an out-of-memory error leaves some parameters updated
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._updating = False
        return norm

    def finish(self, values: list) -> None:
        """Eager: the step already happened."""

    def rollback(self) -> bool:
        """Drop the step's gradients; the weights are the pre-step ones unless optimizer.step() had begun."""
        self.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return not self._updating

    def state_arrays(self) -> tuple[dict, dict, dict]:
        weights = {k: p.detach().float().cpu().contiguous().numpy() for k, p in self.params.items()}
        names, tensors, scalars = list(self.params), {}, {}
        for idx, st in self.optimizer.state_dict()["state"].items():
            _flatten(names[idx], st, tensors, scalars)
        return weights, tensors, scalars

    def load_state_arrays(self, weights: dict, tensors: dict, scalars: dict) -> None:
        load_trainable(self.model, weights)
        index = {name: i for i, name in enumerate(self.params)}
        state: dict[int, dict] = {}
        for key, v in {**{k: torch.from_numpy(np.array(a)) for k, a in tensors.items()}, **scalars}.items():
            name, *fields = key.split("/")
            if name not in index:
                raise ForgeError(f"checkpoint: optimizer state for '{name}', which this model does not train")
            node = state.setdefault(index[name], {})
            for f in fields[:-1]:
                node = node.setdefault(f, {})
            node[fields[-1]] = v
        sd = self.optimizer.state_dict()
        sd["state"] = state
        self.optimizer.load_state_dict(sd)  # moves tensors to each parameter's device


def _flatten(prefix: str, state: dict, tensors: dict, scalars: dict) -> None:
    for key, v in state.items():
        if isinstance(v, dict):  # bitsandbytes nests its 8-bit state one level down
            _flatten(f"{prefix}/{key}", v, tensors, scalars)
        elif torch.is_tensor(v):
            tensors[f"{prefix}/{key}"] = v.detach().cpu().clone().numpy()  # clone: bnb shares its qmaps
        else:
            scalars[f"{prefix}/{key}"] = v


def make_stepper(cfg: ForgeConfig, model, loss_fn) -> Stepper:
    return Stepper(cfg, model, loss_fn)
