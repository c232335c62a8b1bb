"""The training loop (PyTorch): one readable path from a config to an adapter, for SFT and DPO.

    config -> base model (CPU) -> PiSSA on targets (fp32 SVD) -> quantize W_res and the rest onto the
    device, layer by layer -> LoRA -> data -> [DPO: reference log-probs, once] -> loop(loss_fn)
    -> checkpoints -> RUN/adapter (PEFT layout)

The same loop as forge_mlx.trainer: `objective` gives a loss function of (model, batch) returning
(sum of losses, count, metric sums), a batch source and an eval. backward() runs on the SUM; before the
optimizer step the gradients are divided by the count over all accumulated micro-batches, so grad
accumulation equals one big batch exactly (and that division is where a DDP all-reduce would go).
The learning rate of update k is schedule(k - 1), the same schedule forge_mlx builds from mlx's
warmup/cosine/linear pieces. train.compile is not used here: the loop runs eagerly.
"""

from __future__ import annotations

import math
import resource
import time

import torch
from rich.console import Console
from torch import nn

from forge_core.config import ForgeConfig
from forge_core.errors import ForgeError
from forge_core.loop import (MemoryGuard, end_of_step, log_due, nonfinite_loss, oom_summary, report_train,
                             resumed_config, save_once)
from forge_core.progress import TrainProgress
from forge_core.rundir import RunDir, total_steps

from . import objectives
from .checkpoint import load_checkpoint, save_checkpoint
from .lora import factors_to_flat, flat_to_factors, trainable_params
from .model import build_model, count_params, load_adapter_dir, save_adapter


def lr_schedule(train_cfg, steps: int):
    """i (0-based update index) -> lr: linear warmup lr/warmup -> lr over `warmup` updates, then cosine /
    linear decay to lr·min_lr_ratio over the remaining updates (or constant). forge_mlx's formulas."""
    t = train_cfg
    warmup = min(t.warmup, max(steps - 1, 0))
    end, n = t.lr * t.min_lr_ratio, max(steps - warmup, 1)

    def decay(s):
        s = min(s, n)
        if t.schedule == "cosine":
            return end + 0.5 * (1.0 + math.cos(math.pi / n * s)) * (t.lr - end)
        if t.schedule == "linear":
            return t.lr + (end - t.lr) * s / n
        return t.lr

    def schedule(i: int) -> float:
        if warmup > 0 and i < warmup:
            start = t.lr / warmup
            return start + (t.lr - start) * i / warmup
        return decay(i - warmup if warmup > 0 else i)

    return schedule


def make_optimizer(cfg: ForgeConfig, steps: int, params):
    """AdamW (torch), or bitsandbytes' 8-bit AdamW / paged 8-bit AdamW (train.optimizer). lr is set per step."""
    t, params = cfg.train, list(params)
    lr = lr_schedule(t, steps)(0)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay)
    if t.optimizer == "paged_adamw8bit" and not params[0].is_cuda:
        raise ForgeError("train.optimizer paged_adamw8bit pages optimizer state between GPU and CPU memory and "
                         "needs a CUDA GPU; on this machine use adamw8bit or adamw")
    from .quant import bnb

    cls = bnb.optim.AdamW8bit if t.optimizer == "adamw8bit" else bnb.optim.PagedAdamW8bit
    return cls(params, lr=lr, weight_decay=t.weight_decay)


def checkpoint_blocks(model: nn.Module) -> None:
    """Gradient checkpointing per transformer block (transformers' own, non-reentrant): recompute
    activations in backward. Parameter names are unchanged."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def peak_memory() -> int:
    """Peak bytes: CUDA allocator peak on a GPU, the process's peak RSS on the CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _guard_peak() -> int | None:
    """The peak the MemoryGuard compares with its limit: the CUDA allocator's; None on the CPU, where the
    process's max RSS counts the interpreter and libraries too and never comes down (no reliable peak)."""
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def _model_and_factors(cfg, kind, run):
    """Build the model; PiSSA factors come from the run dir (resume) or the SFT adapter we continue (DPO)."""
    from safetensors.numpy import load_file

    from forge_core.atomic import save_safetensors

    pissa_init, adapter_weights = None, None
    if run.file("pissa_init.safetensors").is_file():
        pissa_init = flat_to_factors(load_file(str(run.file("pissa_init.safetensors"))))
    if kind == "dpo" and cfg.dpo.adapter:
        _, adapter_weights, start_factors = load_adapter_dir(cfg.dpo.adapter)
        pissa_init = pissa_init or start_factors
    torch.manual_seed(cfg.train.seed)
    model, tokenizer, model_dir, factors = build_model(cfg, pissa_init=pissa_init, adapter_weights=adapter_weights)
    if factors and not run.file("pissa_init.safetensors").is_file():
        save_safetensors(run.file("pissa_init.safetensors"), factors_to_flat(factors))
    return model, tokenizer, model_dir, factors


def train(cfg: ForgeConfig, kind: str = "sft", resume: str | None = None, console: Console | None = None,
          stop_at: int | None = None, memory_limit: int = 0):
    """Run (or resume) a training run; returns the run dir. `stop_at` ends early as a kill would (tests).

    Resume: the run's saved config, with memory.* from `cfg`. `memory_limit`: the memory plan's budget
    (launch passes it); the loop stops cleanly, with a checkpoint, when the CUDA peak passes it or
    memory.limit (forge_core.loop.MemoryGuard; not checked on the CPU), and on an out-of-memory error.
    """
    console = console or Console(stderr=True)
    run = RunDir(resume or cfg.train.out_dir)
    if resume:
        cfg = resumed_config(run, cfg)
    else:
        if run.latest() is not None:
            raise ForgeError(f"{run.path} already holds a run; pass --resume {run.path} or choose another --out")
        run.save_config(cfg.to_dict())

    t0 = time.perf_counter()
    model, tokenizer, model_dir, factors = _model_and_factors(cfg, kind, run)
    trainable, total = count_params(model)
    console.print(f"model {cfg.model.path}: {total / 1e6:.1f}M stored params, {trainable / 1e6:.2f}M trainable "
                  f"({cfg.lora.init}, rank {cfg.lora.rank}, base {cfg.quant.bits or 'full'}-bit), "
                  f"built in {time.perf_counter() - t0:.1f}s on {next(model.parameters()).device}")

    obj = objectives.build(kind, cfg, model, tokenizer, run, console)
    steps = total_steps(cfg.train, obj.n_rows)
    optimizer = make_optimizer(cfg, steps, trainable_params(model).values())
    loop = load_checkpoint(run, model, optimizer) if resume else {"step": 0}
    start = loop["step"]
    obj.restore(loop.get("data"))
    if resume:
        run.truncate_metrics(start)
        console.print(f"resuming {run.path} at step {start}/{steps}")
    if cfg.train.grad_checkpoint:
        checkpoint_blocks(model)

    guard = MemoryGuard.for_run(cfg, kind, memory_limit)
    if guard.limit and _guard_peak() is None and cfg.memory.limit:
        console.print(f"memory.limit {cfg.memory.limit}: not checked on the CPU (torch reports no allocator "
                      "peak there); out-of-memory errors still stop the run with a checkpoint")
    schedule = lr_schedule(cfg.train, steps)
    _loop(cfg, run, model, optimizer, obj, schedule, start, steps, console, stop_at, guard)
    if stop_at is not None and stop_at < steps:
        return run.path
    save_adapter(run.file("adapter"), model, cfg, factors, model_dir, extra={"kind": kind, "steps": steps})
    run.plot(title=f"{kind.upper()} {cfg.model.path}")
    console.print(f"adapter written to {run.file('adapter')}")
    return run.path


def _add(acc: dict | None, new: dict) -> dict:
    new = {k: v.detach() for k, v in new.items()}
    return new if acc is None else {k: acc[k] + v for k, v in new.items()}


def train_step(model, optimizer, obj, grad_accum: int, lr: float, max_grad_norm: float):
    """One optimizer step over `grad_accum` micro-batches -> (loss_sum, count, metric sums, grad norm, tokens)."""
    out = _gradients(model, optimizer, obj, grad_accum, lr, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out


def _gradients(model, optimizer, obj, grad_accum: int, lr: float, max_grad_norm: float):
    """train_step up to the update: the lr set, the averaged and clipped gradients in p.grad."""
    params = list(trainable_params(model).values())
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum, count, msum, tokens = 0.0, 0.0, None, 0
    for _ in range(grad_accum):
        batch = obj.next_batch()
        ls, c, m = obj.loss_fn(model, batch)
        ls.backward()  # gradient of the SUM; divided by the total count below
        loss_sum, count, msum = loss_sum + ls.detach(), count + c.detach(), _add(msum, m)
        tokens += batch["inputs"].numel()
    for p in params:
        if p.grad is not None:
            p.grad.div_(count)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    return loss_sum, count, msum or {}, norm, tokens


def _step_or_stop(run, step: int, model, optimizer, obj, t, lr: float, guard: MemoryGuard):
    """train_step, with an out-of-memory error turned into a clean stop (ForgeError, never a traceback).

    Out of memory before optimizer.step(): the weights and optimizer state are still step - 1's, so the
    gradients are dropped and step - 1 is checkpointed (with the data position from before the step)
    unless it already is. Inside optimizer.step() some parameters may be updated and others not: nothing
    is saved, and the stop error points to the newest periodic checkpoint.
    """
    data, updating = obj.state(), False  # a fresh dict of scalars: the position before this step
    try:
        out = _gradients(model, optimizer, obj, t.grad_accum, lr, t.max_grad_norm)
        updating = True
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out
    except Exception as exc:  # anything but out-of-memory is re-raised as it is
        if not guard.is_oom(exc):
            raise
        oom = oom_summary(exc)
    # here the exception and its traceback (whose frames hold the step's activations) are gone
    optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if updating:
        oom += " - inside optimizer.step(), so the half-updated weights are not saved"
    else:
        save_once(run, step - 1, lambda s: save_checkpoint(run, s, model, optimizer, {"data": data}))
    raise guard.stop_error(run, step, _guard_peak(), oom=oom)


def _loop(cfg, run, model, optimizer, obj, schedule, start, steps, console, stop_at, guard: MemoryGuard):
    t = cfg.train
    tokens, tic = 0, time.perf_counter()
    model.train()

    def save(s):
        save_checkpoint(run, s, model, optimizer, {"data": obj.state()})

    with TrainProgress(steps, start, label=obj.kind, console=console) as bar:
        for step in range(start + 1, steps + 1):
            torch.manual_seed(t.seed * 1_000_003 + step)  # RNG is a function of the step: exact resume
            lr = schedule(step - 1)
            loss_sum, count, msum, norm, n_tok = _step_or_stop(run, step, model, optimizer, obj, t, lr, guard)
            tokens += n_tok
            loss = (loss_sum / count).item()
            if not math.isfinite(loss):
                raise nonfinite_loss(run, loss, step)
            if log_due(step, start, steps, t.log_every):
                elapsed = time.perf_counter() - tic
                rec = {"split": "train", "step": step, "loss": loss, "lr": lr, "grad_norm": float(norm),
                       "tok_s": tokens / max(elapsed, 1e-9), "peak_memory": peak_memory(), "epoch": obj.epoch()}
                rec.update({k: (v / count).item() for k, v in msum.items()})
                report_train(run, bar, console, rec)
                tokens, tic = 0, time.perf_counter()
            else:
                bar.update(step)
            stop = end_of_step(t, step, steps, stop_at, run, console, obj, model.train, save)
            if step < steps:  # over the limit: checkpoint this step and stop (after the last: just finish)
                guard.check(run, step, _guard_peak(), save)
            if stop:
                return


def set_memory_limit(nbytes: int) -> None:
    """The memory plan's budget as the CUDA caching allocator's cap: past `nbytes` torch raises
    OutOfMemoryError (which the loop turns into a clean stop) instead of thrashing the machine.
    The CPU has no such allocator knob: no-op."""
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, max(int(nbytes), 1) / total))
