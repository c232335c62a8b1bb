"""THE training loop: one readable path from a config to an adapter, for every objective and both backends.

    config -> run dir (new, or resumed) -> ops.build_model: base -> PiSSA on targets (fp32 SVD) -> quantize
    W_res and the rest -> LoRA -> objective (data, loss, eval; DPO: reference log-probs, once) -> stepper
    (optimizer + step functions) -> for each step: seed, step, log, eval, save, memory guard -> RUN/adapter

Nothing here touches a tensor framework: `ops` is the backend's ops module (forge_core.backend.BackendOps).
The loop does not know which loss it runs either: obj.loss_fn(model, batch) returns (loss SUM, count,
metric sums); the stepper adds up gradients of the sums over `grad_accum` micro-batches and update()
divides them by the total count, so accumulation equals one big batch exactly (and that division is
the one averaging point a data-parallel all-reduce goes through).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from rich.console import Console
from safetensors.numpy import load_file

from forge_core import init_cache, objectives, run_config, tracking
from forge_core.adapters import safetensors_io as sio
from forge_core.checkpoint import load_checkpoint, save_checkpoint
from forge_core.config import ForgeConfig
from forge_core.data.eval_rows import shared_system_prompt
from forge_core.distributed import World
from forge_core.errors import ForgeError
from forge_core.memory.budget import human
from forge_core.memory.guard import MemoryGuard, oom_summary, save_once
from forge_core.methods import method, start_adapter
from forge_core.models.sources import resolve_model
from forge_core.progress import TrainProgress
from forge_core.rundir import RunDir, total_steps
from forge_core.schedule import lr_schedule
from forge_core.stopping import Stopped, StopRequest, signal_name
from forge_core.surgery import uses_pissa


def train(cfg: ForgeConfig, kind: str = "sft", *, ops, resume: str | None = None, console: Console | None = None,
          stop_at: int | None = None, memory_limit: int = 0) -> Path:
    """Run (or resume) a training run with the backend `ops`; returns the run dir.

    `stop_at` ends after that step as a kill would (tests). Resume: the run's saved config, with memory.*
    from `cfg`. `memory_limit`: the memory plan's budget (launch passes it); the loop stops cleanly, with a
    checkpoint, when the measured peak passes it or memory.limit, and on an out-of-memory error. Under a
    launcher (mlx.launch, torchrun) every rank runs this function; rank 0 alone writes (distributed.py).
    """
    world = World(ops)
    console = console or Console(stderr=True, soft_wrap=True)
    if not world.main:  # one voice: the other ranks print nothing (their errors reach rank 0 or the CLI)
        console = Console(stderr=True, quiet=True)
    ops.preflight(console)
    run = RunDir(resume or cfg.train.out_dir)
    if resume:
        if not run_config.is_resolved(cfg):  # called directly (tests, tools): resolve the resume here
            cfg = run_config.for_resume(run, cfg)
    else:
        run.check_free()
        if world.main:
            run.save_config(cfg.to_dict())
    t = cfg.train

    model, tokenizer, model_dir, factors = _build_model(cfg, kind, ops, run, console, world)
    obj = objectives.build(kind, cfg, ops, model, tokenizer, run, console, world)
    steps = total_steps(t, obj.n_rows, world.size)
    lr_at = lr_schedule(t, steps)
    stepper = ops.make_stepper(cfg, model, obj.loss_fn)
    start = 0
    if resume:  # weights, optimizer state and data position of the newest complete checkpoint
        state = load_checkpoint(run, stepper, say=console.print)
        start = state["step"]
        obj.restore(state.get("data"), state.get("arrays"))
        if world.main:
            run.truncate_metrics(start)  # records after the checkpoint are redone
        console.print(f"resuming {run.path} at step {start}/{steps}")
    if world.size > 1:
        console.print(f"data-parallel over {world.size} ranks: global batch = {t.batch_size} rows per rank x "
                      f"{world.size} ranks x {t.grad_accum} accumulation = {obj.global_micro_batch * t.grad_accum} rows")
    if t.grad_checkpoint:
        ops.checkpoint_blocks(model)
    guard = MemoryGuard.for_run(cfg, kind, memory_limit)
    if guard.limit and cfg.memory.limit and ops.guard_peak() is None:
        console.print(f"memory.limit {cfg.memory.limit}: not checked here ({ops.name} reports no allocator peak "
                      "on this device); out-of-memory errors still stop the run with a checkpoint")

    def save(step: int, data: dict | None = None) -> None:
        if world.main:
            data = data or obj.state()
            save_checkpoint(run, step, stepper, {"data": data}, obj.checkpoint_arrays(data))

    # the system prompt every training row shares, for forge.json (generate/eval ask the model as it was taught):
    # read now, so that nothing after the last step can stand between the run and its adapter
    system_prompt = shared_system_prompt(cfg.data.train, cfg.data) if world.main else ""
    tokens, tic, step, last_log = 0, time.perf_counter(), start, start
    last_save, slowest = time.monotonic(), 0.0  # for save_every_minutes; the slowest step, for a stop's patience
    model.train()
    with TrainProgress(steps, start, label=obj.kind, console=console) as bar, StopRequest() as stop, \
            world.stops_cleanly(run, lambda: step, patience=lambda: 3 * slowest), \
            tracking.opened(t.report_to, run.path, cfg.to_dict(), world.main, console, start) as tracker:
        for step in range(start + 1, steps + 1):
            began = time.monotonic()
            # the RNG is a function of the step (exact resume) and of the rank (each rank its own dropout masks)
            ops.seed((t.seed * 1_000_003 + step) * world.size + world.rank)
            lr = lr_at(step - 1)
            before, oom = obj.state(), ""  # the data position before this step, for an out-of-memory stop
            stepper.begin()
            try:  # this rank's micro-batches: forward, backward, gradients of the loss sums
                loss_sum = count = msums = None
                obj.prepare_step(t.grad_accum)
                for _ in range(t.grad_accum):
                    batch = obj.next_batch()
                    tokens += math.prod(batch["inputs"].shape)
                    ls, c, m = stepper.accumulate(batch)
                    loss_sum, count, msums = _add(loss_sum, ls), _add(count, c), _add(msums, m)
            except Exception as exc:  # anything but out-of-memory goes up as it is
                if not guard.is_oom(exc):
                    raise
                oom = oom_summary(exc)
            failed = world.which(bool(oom))  # every rank learns of an out-of-memory error on any rank
            if failed and not oom:
                oom = f"on rank {', '.join(map(str, failed))}"
            if not oom:
                try:  # the global batch's sums, then the update (gradients summed over ranks / global count)
                    loss_sum, count, msums = world.all_sum([loss_sum, count, msums])
                    norm = stepper.update(count, lr)
                    stepper.finish([loss_sum, count, norm, msums])
                except Exception as exc:
                    if not guard.is_oom(exc):
                        raise
                    if world.size > 1:  # one rank failed inside the exchange: no agreement possible any more
                        raise guard.stop_error(run, step, ops.guard_peak(), oom=f"{oom_summary(exc)} - on rank "
                                               f"{world.rank}, during the gradient exchange or the update") from None
                    oom = oom_summary(exc)
            if oom:  # outside the except: the traceback's frames (holding the step's activations) are gone
                raise _out_of_memory(run, step, stepper, guard, oom, world.max(ops.guard_peak()),
                                     lambda s: save(s, before))

            loss = (loss_sum / count).item()  # the global loss: every rank takes the same decisions on it
            if not math.isfinite(loss):
                raise _nonfinite_loss(run, loss, step)
            if (t.log_every and step % t.log_every == 0) or step == steps or step == start + 1:
                elapsed = max(time.perf_counter() - tic, 1e-9)
                rec = {"split": "train", "step": step, "loss": loss, "lr": lr, "grad_norm": norm.item(),
                       "tok_s": world.size * tokens / elapsed, "step_s": elapsed / (step - last_log),
                       "peak_memory": ops.peak_memory(), "epoch": obj.epoch(),
                       **obj.metric_means({k: v.item() for k, v in (msums or {}).items()}, count.item())}
                if world.main:
                    run.log(rec)
                    tracker.log(rec)
                bar.update(step, rec["loss"], rec["tok_s"], rec["peak_memory"], record=rec)
                if not bar.progress.live.is_started or bar.progress.disable:
                    console.print(log_line(rec), soft_wrap=True)
                tokens, tic, last_log = 0, time.perf_counter(), step
            else:
                bar.update(step)

            if (t.eval_every and step % t.eval_every == 0) or step == steps:
                rec = {"split": "valid", "step": step, **obj.evaluate()}
                if len(rec) > 2:  # no validation data: nothing to log
                    if world.main:
                        run.log(rec)
                        tracker.log(rec)
                    console.print(log_line(rec), soft_wrap=True)
                model.train()
            # a signal heard on any rank (every rank the same answer); the last step just finishes the run
            heard = int(world.max(float(stop.requested)) or 0) if step < steps else 0
            due = (t.save_every and step % t.save_every == 0) or step == steps or step == stop_at or heard or \
                (t.save_every_minutes and time.monotonic() - last_save >= 60 * t.save_every_minutes)
            if due:
                save(step)
                last_save = time.monotonic()
            if heard:
                raise _stopped(run, kind, step, steps, heard, world.size)
            slowest = max(slowest, time.monotonic() - began)
            if step < steps:  # measured peak (the largest of any rank) over the limit: checkpoint, stop
                guard.check(run, step, world.max(ops.guard_peak()), save)
            if step == stop_at and step < steps:  # tests: stop here as a kill would
                return run.path

    if world.main:
        extra = {"kind": kind, "steps": steps, "system_prompt": system_prompt}
        ops.save_adapter(run.file("adapter"), model, cfg, factors, model_dir, extra=extra)
        run.plot(title=f"{kind.upper()} {cfg.model.path}")
    console.print(f"adapter written to {run.file('adapter')}")
    return run.path


def _build_model(cfg: ForgeConfig, kind: str, ops, run: RunDir, console, world: World):
    """The model as step 0 trains it. PiSSA factors come from the run dir (resume) or from the SFT adapter a
    preference run continues, so the SVD runs once per run and a resume rebuilds the same residual. Under a
    launcher rank 0 builds first and writes the factors; the other ranks then build from that file, so
    every rank holds the same model even where SVDs would differ in sign across machines."""
    pissa_file = run.file("pissa_init.safetensors")
    if not world.main:
        world.any(False)  # wait for rank 0's factors
    pissa_init = ops.flat_to_factors(load_file(str(pissa_file))) if pissa_file.is_file() else None
    adapter_weights, adapter = None, start_adapter(cfg, kind)
    if adapter:
        _, adapter_weights, start_factors = ops.load_adapter_dir(adapter)
        pissa_init = pissa_init or start_factors
    cache_key = None
    if pissa_init is None and world.main and uses_pissa(cfg):  # a new PiSSA run: the SVD's result may be cached
        dtype = str(ops.compute_dtype(cfg)).rsplit(".", 1)[-1]
        cache_key = init_cache.key_fields(cfg, resolve_model(cfg.model.path), ops.name, dtype)
        pissa_init = init_cache.lookup(cache_key, say=console.print)
        if pissa_init is not None:
            console.print(f"PiSSA factors from the init cache ({init_cache.entry_dir(cache_key)}): no SVD")
            cache_key = None
    t0 = time.perf_counter()
    ops.seed(cfg.train.seed)  # LoRA's random A init follows the seed
    model, tokenizer, model_dir, factors = ops.build_model(cfg, pissa_init=pissa_init, adapter_weights=adapter_weights)
    if cache_key is not None and factors:
        entry = init_cache.store(cache_key, factors, model_dir, time.perf_counter() - t0)
        console.print(f"PiSSA factors cached in {entry} (the next run on this base skips the SVD; "
                      "`forge cache ls` / `forge cache rm`)")
    if world.main and factors and not pissa_file.is_file():
        sio.save(pissa_file, ops.factors_to_flat(factors))
    if world.main and world.size > 1:
        world.any(False)  # the factors are on disk: the other ranks may build
    trainable, total = ops.count_params(model)
    console.print(f"model {cfg.model.path}: {total / 1e6:.1f}M stored params, {trainable / 1e6:.2f}M trainable "
                  f"({cfg.lora.init}, rank {cfg.lora.rank}, base {cfg.quant.bits or 'full'}-bit), "
                  f"built in {time.perf_counter() - t0:.1f}s{ops.describe(model)}")
    return model, tokenizer, model_dir, factors


def _add(acc, new):
    """Running sum of a framework scalar or a {name: scalar} dict (None to start)."""
    if acc is None:
        return new
    if isinstance(new, dict):
        return {k: acc[k] + v for k, v in new.items()}
    return acc + new


def _out_of_memory(run: RunDir, step: int, stepper, guard: MemoryGuard, oom: str, peak, save_before) -> ForgeError:
    """The failed step never happened: the stepper puts the pre-step state back, step - 1 is checkpointed
    (with the data position from before the step) unless it already is, and the stop names that checkpoint.
    A failure inside an in-place optimizer update cannot be undone: nothing is saved then."""
    if stepper.rollback():
        save_once(run, step - 1, save_before)
    else:
        oom += " - inside the optimizer's in-place update, so the half-updated weights are not saved"
    return guard.stop_error(run, step, peak, oom=oom)


def _stopped(run: RunDir, kind: str, step: int, steps: int, signum: int, ranks: int) -> Stopped:
    command = method(kind).command
    again = f" --nproc {ranks} (or the same launcher)" if ranks > 1 else ""
    return Stopped(f"stopped by {signal_name(signum)} after step {step}/{steps}, saved in {run.checkpoint_dir(step)}; "
                   f"continue with `forge {command} --resume {run.path}{again}`", signum)


def _nonfinite_loss(run: RunDir, loss: float, step: int) -> ForgeError:
    """The error a NaN/inf loss stops the run with; the last good checkpoint stays in place."""
    last = run.latest()
    where = f"last good checkpoint: step {last[0]} ({last[1]})" if last else "no checkpoint was saved yet"
    return ForgeError(f"loss became {loss} at step {step}; stopped - {where}. Lower train.lr or check the data.")


def log_line(rec: dict) -> str:
    """One metrics record as a readable line (used when no live progress bar is shown)."""
    parts = [f"{rec['split']} step {rec['step']}"]
    for k, v in rec.items():
        if k in ("split", "step") or not isinstance(v, (int, float)):
            continue
        if k == "peak_memory":
            parts.append(f"peak {human(v)}")
        elif k == "tok_s":
            parts.append(f"{v:.0f} tok/s")
        else:
            parts.append(f"{k} {v:.4g}")
    return "  ".join(parts)
