"""The training loop: one readable path from a config to an adapter, for SFT and DPO.

    config -> base model -> PiSSA on targets (fp32 SVD) -> quantize W_res and the rest -> LoRA
    -> data -> [DPO: reference log-probs, once] -> loop(loss_fn) -> checkpoints -> RUN/adapter

The loop does not know which loss it runs: `objective` gives it a loss function of (model, batch)
returning (sum of losses, count, metric sums), a batch source, and an eval. Gradients are the
gradient of the SUM; the loop divides by the count over all accumulated micro-batches, so grad
accumulation equals one big batch exactly. (That division is also the one place a data-parallel
all-reduce would go.)
"""

from __future__ import annotations

import math
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map
from rich.console import Console

from forge_core.config import ForgeConfig
from forge_core.errors import ForgeError
from forge_core.progress import TrainProgress
from forge_core.loop import (MemoryGuard, end_of_step, log_due, nonfinite_loss, oom_summary, report_train,
                             resumed_config, save_once)
from forge_core.rundir import RunDir, total_steps

from . import objectives
from .blas import warn_if_slow
from .checkpoint import load_checkpoint, save_checkpoint
from .lora import factors_to_flat, flat_to_factors
from .model import build_model, count_params, load_adapter_dir, save_adapter


def make_optimizer(cfg: ForgeConfig, steps: int):
    """AdamW with linear warmup then cosine/linear decay to lr·min_lr_ratio (or constant)."""
    t = cfg.train
    warmup = min(t.warmup, max(steps - 1, 0))
    end = t.lr * t.min_lr_ratio
    if t.schedule == "cosine":
        decay = optim.cosine_decay(t.lr, max(steps - warmup, 1), end)
    elif t.schedule == "linear":
        decay = optim.linear_schedule(t.lr, end, max(steps - warmup, 1))
    else:
        decay = lambda step: mx.array(t.lr, dtype=mx.float32)  # noqa: E731
    schedule = optim.join_schedules([optim.linear_schedule(t.lr / max(warmup, 1), t.lr, warmup), decay], [warmup]) \
        if warmup > 0 else decay
    if t.optimizer != "adamw":
        raise ForgeError(f"train.optimizer '{t.optimizer}' is a CUDA (bitsandbytes) optimizer; the MLX backend has adamw")
    # bias_correction=True: the AdamW of torch/PEFT/TRL users (MLX's default leaves it off)
    return optim.AdamW(learning_rate=schedule, weight_decay=t.weight_decay, bias_correction=True)


def checkpoint_blocks(model: nn.Module) -> None:
    """Gradient checkpointing per transformer block: recompute activations in backward.

    Each block gets its own subclass with a checkpointed __call__, so parameter paths (and adapter
    keys) stay unchanged and no other model in the process is affected.
    """
    for block in model.layers:
        cls = type(block)
        call = cls.__call__

        def checkpointed(self, *args, _call=call, **kwargs):
            def inner(params, *args, **kwargs):
                self.update(params)
                return _call(self, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        block.__class__ = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": checkpointed})


def _step_functions(model, optimizer, loss_fn, max_grad_norm: float, compile_: bool):
    """micro(batch) -> (loss_sum, count, metrics, grads); apply(grads, count) -> grad norm."""
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    def micro(batch):
        (loss_sum, count, metrics), grads = loss_and_grad(model, batch)
        return loss_sum, count, metrics, grads

    def apply(grads, count):
        grads = tree_map(lambda g: g / count, grads)
        if max_grad_norm > 0:
            grads, norm = optim.clip_grad_norm(grads, max_grad_norm)
        else:
            norm = optim.clip_grad_norm(grads, float("inf"))[1]
        optimizer.update(model, grads)
        return norm

    if compile_:
        micro = mx.compile(micro, inputs=state, outputs=state)
        apply = mx.compile(apply, inputs=state, outputs=state)
    return micro, apply


def _add(acc, new):
    return new if acc is None else tree_map(lambda a, b: a + b, acc, new)


def train(cfg: ForgeConfig, kind: str = "sft", resume: str | None = None, console: Console | None = None,
          stop_at: int | None = None, memory_limit: int = 0):
    """Run (or resume) a training run; returns the run dir. `stop_at` ends early as a kill would (tests).

    Resume: the run's saved config, with memory.* from `cfg`. `memory_limit`: the memory plan's budget
    (launch passes it); the loop stops cleanly, with a checkpoint, when the measured peak passes it or
    memory.limit (forge_core.loop.MemoryGuard), and on an out-of-memory error.
    """
    console = console or Console(stderr=True)
    warn_if_slow(console)
    run = RunDir(resume or cfg.train.out_dir)
    if resume:
        cfg = resumed_config(run, cfg)
    else:
        if run.latest() is not None:
            raise ForgeError(f"{run.path} already holds a run; pass --resume {run.path} or choose another --out")
        run.save_config(cfg.to_dict())

    # ---- model: PiSSA factors come from the run dir (resume) or the SFT adapter we continue (DPO)
    pissa_init, adapter_weights = None, None
    if run.file("pissa_init.safetensors").is_file():
        from safetensors.numpy import load_file

        pissa_init = flat_to_factors(load_file(str(run.file("pissa_init.safetensors"))))
    if kind == "dpo" and cfg.dpo.adapter:
        _, adapter_weights, start_factors = load_adapter_dir(cfg.dpo.adapter)
        pissa_init = pissa_init or start_factors
    t0 = time.perf_counter()
    mx.random.seed(cfg.train.seed)  # LoRA's random A init (and dropout before step 1) follow the seed
    model, tokenizer, model_dir, factors = build_model(cfg, pissa_init=pissa_init, adapter_weights=adapter_weights)
    if factors and not run.file("pissa_init.safetensors").is_file():
        from forge_core.atomic import save_safetensors

        save_safetensors(run.file("pissa_init.safetensors"), factors_to_flat(factors))
    trainable, total = count_params(model)
    console.print(f"model {cfg.model.path}: {total / 1e6:.1f}M stored params, {trainable / 1e6:.2f}M trainable "
                  f"({cfg.lora.init}, rank {cfg.lora.rank}, base {cfg.quant.bits or 'full'}-bit), "
                  f"built in {time.perf_counter() - t0:.1f}s")

    obj = objectives.build(kind, cfg, model, tokenizer, run, console)
    steps = total_steps(cfg.train, obj.n_rows)
    optimizer = make_optimizer(cfg, steps)
    loop = load_checkpoint(run, model, optimizer) if resume else {"step": 0}
    start = loop["step"]
    obj.restore(loop.get("data"))
    if resume:
        run.truncate_metrics(start)
        console.print(f"resuming {run.path} at step {start}/{steps}")
    if cfg.train.grad_checkpoint:
        checkpoint_blocks(model)

    micro, apply = _step_functions(model, optimizer, obj.loss_fn, cfg.train.max_grad_norm, cfg.train.compile)
    guard = MemoryGuard.for_run(cfg, kind, memory_limit)
    _loop(cfg, run, model, optimizer, obj, (micro, apply), start, steps, console, stop_at, guard)
    if stop_at is not None and stop_at < steps:
        return run.path
    save_adapter(run.file("adapter"), model, cfg, factors, model_dir, extra={"kind": kind, "steps": steps})
    run.plot(title=f"{kind.upper()} {cfg.model.path}")
    console.print(f"adapter written to {run.file('adapter')}")
    return run.path


def _step(model, optimizer, obj, micro, apply, grad_accum: int):
    """One optimizer step over `grad_accum` micro-batches, evaluated.
    Returns (loss_sum, count, metric sums, grad norm, tokens)."""
    grads, loss_sum, count, msum, tokens = None, 0.0, 0.0, None, 0
    for _ in range(grad_accum):
        batch = obj.next_batch()
        ls, c, m, g = micro(batch)
        grads, msum = _add(grads, g), _add(msum, m)
        loss_sum, count = loss_sum + ls, count + c
        tokens += int(batch["inputs"].size)
    norm = apply(grads, count)
    mx.eval(model.parameters(), optimizer.state, loss_sum, count, norm, msum)
    return loss_sum, count, msum, norm, tokens


def _step_or_stop(run, step: int, model, optimizer, obj, fns, grad_accum: int, guard: MemoryGuard):
    """_step, with an out-of-memory error turned into a clean stop (ForgeError, never a traceback).

    The failed step never happened: MLX arrays are immutable, so references taken before it ARE the
    pre-step weights and optimizer state; they go back, step - 1 is checkpointed (with the data position
    from before the step) unless it already is, and the guard's stop error names that checkpoint.
    """
    params, opt_state = model.trainable_parameters(), tree_map(lambda x: x, optimizer.state)
    data = obj.state()  # a fresh dict of scalars: the position before this step
    try:
        return _step(model, optimizer, obj, *fns, grad_accum)
    except Exception as exc:  # anything but out-of-memory is re-raised as it is
        if not guard.is_oom(exc):
            raise
        oom = oom_summary(exc)
    model.update(params)
    optimizer.state = opt_state
    save_once(run, step - 1, lambda s: save_checkpoint(run, s, model, optimizer, {"data": data}))
    raise guard.stop_error(run, step, mx.get_peak_memory(), oom=oom)


def _loop(cfg, run, model, optimizer, obj, fns, start, steps, console, stop_at, guard: MemoryGuard):
    t = cfg.train
    tokens, tic = 0, time.perf_counter()
    model.train()

    def save(s):
        save_checkpoint(run, s, model, optimizer, {"data": obj.state()})

    with TrainProgress(steps, start, label=obj.kind, console=console) as bar:
        for step in range(start + 1, steps + 1):
            mx.random.seed(t.seed * 1_000_003 + step)  # RNG is a function of the step: exact resume
            loss_sum, count, msum, norm, n_tok = _step_or_stop(run, step, model, optimizer, obj, fns,
                                                               t.grad_accum, guard)
            tokens += n_tok
            loss = (loss_sum / count).item()
            if not math.isfinite(loss):
                raise nonfinite_loss(run, loss, step)
            if log_due(step, start, steps, t.log_every):
                elapsed = time.perf_counter() - tic
                rec = {"split": "train", "step": step, "loss": loss, "lr": optimizer.learning_rate.item(),
                       "grad_norm": norm.item(), "tok_s": tokens / max(elapsed, 1e-9),
                       "peak_memory": mx.get_peak_memory(), "epoch": obj.epoch()}
                rec.update({k: (v / count).item() for k, v in (msum or {}).items()})
                report_train(run, bar, console, rec)
                tokens, tic = 0, time.perf_counter()
            else:
                bar.update(step)
            stop = end_of_step(t, step, steps, stop_at, run, console, obj, model.train, save)
            if step < steps:  # over the limit: checkpoint this step and stop (after the last: just finish)
                guard.check(run, step, mx.get_peak_memory(), save)
            if stop:
                return


def set_memory_limit(nbytes: int) -> None:
    """The memory plan's budget as MLX's allocator limit (a guideline: MLX frees its cache to stay under it).
    The loop's MemoryGuard (train's memory_limit) is what stops a run whose measured peak passes it."""
    mx.set_memory_limit(int(nbytes))
