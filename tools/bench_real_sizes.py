"""At real sizes: `forge train` on random-weight models with the shapes of public checkpoints.

    python tools/bench_real_sizes.py [--shapes llama-3.2-1b,qwen2.5-1.5b,llama-3.2-3b] [--models-dir DIR]
        [--steps 4] [--write docs/BENCHMARKS.md] [--skip-warm] [--skip-torch] [--skip-mlxlm]
        [--torch-shape llama-3.2-1b] [--mlxlm-shape llama-3.2-1b] [--mlxlm-steps 3] [--mlxlm-as-loaded]
        [--layers N] [--vocab N]          # smaller builds, for quick smoke runs only

Each shape's HF dir (bf16 random weights, SmolLM2's tokenizer; tools/make_real_shapes.py) is built once
into --models-dir (default ~/.cache/forge-bench/shapes) and reused; a --layers / --vocab build gets a dir
name of its own (llama-3.2-1b-L2-V49152), never taken for a full-size one. The data is a JSONL of SFT chat
rows written here, each longer than 256 tokens: every batch is 2 x 256, the loss on the reply only.

Per shape, on the MLX backend, 4-bit base, QPiSSA rank 16 (pissa_niter_4, the default init), batch 2 x 256:

    cold   `forge train ...` as a user runs it, a subprocess of its own, with FORGE_HOME and
           FORGE_INIT_CACHE at fresh empty dirs: the build runs the randomized SVD, fills the init cache.
    warm   the same command again (a new run dir) on the same init cache: the build reads the factors back
           (the run must say "PiSSA factors from the init cache", else it is reported as failed).

What each figure is:

    build s          the run's own "model ...: built in X.Xs" (load, PiSSA, quantize; not the imports)
    first step s     wall seconds from the process start to its "train step 1" line: imports, memory
                     plan, data, build and the first (compiling) step - what a user waits for
    run wall s       process start to exit (the steps, the adapter save)
    planned arrays   forge_core.memory.plan.plan_memory on the same config and rows, made here in the
                     parent, minus its `framework overhead` (the plan's arrays, exact bytes; checked against
                     the "arrays" the run printed); against the MLX peak: the largest `peak_memory`
                     (mx.get_peak_memory()) in RUN/metrics.jsonl
    planned total    the run's own "memory: planned peak X" (2 decimals): on the CPU its overhead is the
                     process's RSS measured at the plan, which a plan made outside it cannot know; against
                     max RSS: the child's VmHWM (the kernel's high-water mark of its resident set, read every
                     20 ms until it exits; file-backed pages such as the mmapped safetensors count too; not
                     ru_maxrss, which also counts the copy of this process a fork makes before the exec)
    s/step, tok/s    medians over the steps >= 2 of RUN/metrics.jsonl (step 1 traces and compiles); tok/s
                     counts the padded batch, B x T
    ratio            planned / measured: above 1 the plan is generous, below 1 it under-plans

The memory and speed columns are the cold run's. --torch-shape: the same cold run with `--backend cuda`
(torch on the CPU here). --mlxlm-shape: tools/bench_sft.py's forge-fp, mlxlm-blas-fp, forge-q4 and
mlxlm-blas-q4 (its own workers, its --model set to the shape's dir; demo data, batch 2 x 256, LoRA init,
one round) for forge's tokens/s against mlx-lm's own trainer at this size; mlx-lm's 4-bit
(quantized_matmul on the CPU) is slow: it times 1 step after 1 warm-up. Both trainers get a float32 copy
of the shape (built once beside it, `<dir>-fp32`), as `make bench` gives both the fp32 SmolLM2: mlx-lm
computes in the dtype it loads, and bf16 on the CPU has no BLAS (on a 1-layer build mlx-lm's bf16 steps
were 7x (full) and 160x (4-bit) slower than forge's float32 ones). --mlxlm-as-loaded hands it the bf16
dir instead, as `mlx_lm.lora` on the Hub checkpoint would run (forge computes in float32 either way).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc
import make_real_shapes

TITLE = "At real sizes"
SHAPES = ["llama-3.2-1b", "qwen2.5-1.5b", "llama-3.2-3b"]
MODELS_DIR = Path("~/.cache/forge-bench/shapes")
BATCH, SEQ, RANK, BITS = 2, 256, 16, 4
DATA_ROWS = 32
MLXLM_CONFIGS = ["forge-fp", "mlxlm-blas-fp", "forge-q4", "mlxlm-blas-q4"]
RUN_TIMEOUT = 4 * 3600  # a cold 3B on a small CPU machine takes long; a hung run must still end
MIB = 2**20

CACHE_HIT = "PiSSA factors from the init cache"
FIRST_STEP = re.compile(r"^train step 1\b")
BUILT = re.compile(r"^model .* built in ([0-9.]+)s")
PLAN = re.compile(r"^memory: planned peak ([0-9.]+ [KMGT]?i?B) \(arrays ([0-9.]+ [KMGT]?i?B) \+")
ROWS = re.compile(r": (\d+) rows, (\d+) truncated to max_seq_len")
UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


# ---------------------------------------------------------------- inputs

def model_dir_for(models_dir: Path, shape: str, layers: int | None, vocab: int | None) -> Path:
    """The dir a shape is built in; a --layers / --vocab build says so in its name."""
    name = shape + (f"-L{layers}" if layers is not None else "") + (f"-V{vocab}" if vocab is not None else "")
    return Path(models_dir).expanduser() / name


def ensure_model(models_dir: Path, shape: str, layers: int | None, vocab: int | None) -> Path:
    """The shape's HF dir, written once (write_model builds under a temp name: a dir that exists is whole)."""
    out = model_dir_for(models_dir, shape, layers, vocab)
    if not (out / "config.json").is_file():
        print(f"building {out} (random weights, once)", file=sys.stderr, flush=True)
        make_real_shapes.write_model(shape, out, layers=layers, vocab=vocab)
    return out


WORDS = ("river", "stone", "market", "lantern", "copper", "orchard", "signal", "harbor", "meadow", "engine",
         "thunder", "violet", "ledger", "canyon", "pepper", "quartz", "window", "saddle", "falcon", "garden",
         "ribbon", "marble", "pocket", "summit")


def write_data(path: Path, rows: int = DATA_ROWS) -> Path:
    """SFT chat rows whose reply alone has 2 x SEQ words (a token or more each): every row is cut to SEQ
    tokens, every batch is BATCH x SEQ, and the loss (train_on_prompt false) covers most of it."""
    out = []
    for i in range(rows):
        words = [WORDS[(i * 7 + j * 3 + j // 5) % len(WORDS)] for j in range(2 * SEQ)]
        out.append({"messages": [
            {"role": "user", "content": f"Question {i}: describe the " + " ".join(words[:24]) + "."},
            {"role": "assistant", "content": " ".join(words) + "."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


# ---------------------------------------------------------------- one `forge train`, timed from outside

SETS = [f"train.batch_size={BATCH}", f"train.max_seq_len={SEQ}", "train.log_every=1", "train.eval_every=0"]


def run_options(backend: str, model: Path, data: Path, steps: int, out: Path) -> dict:
    """The run's `forge train` options (CLI name -> value): the argv and the parent's config both come
    from these, so the plan made here is the plan of the run."""
    return {"backend": backend, "model": str(model), "data": str(data), "rank": RANK, "quant": BITS,
            "steps": steps, "out": str(out)}


def forge_argv(opts: dict) -> list[str]:
    argv = [sys.executable, "-m", "forge_core.cli", "train"]
    for name, value in opts.items():
        argv += ["--" + name.replace("_", "-"), str(value)]
    return argv + [x for s in SETS for x in ("--set", s)]


def run_config(opts: dict):
    """The ForgeConfig the child builds from the same options (cli.TRAIN_OPTIONS maps them to config keys)."""
    from forge_core.cli import TRAIN_OPTIONS
    from forge_core.config_parse import build_config

    return build_config(None, [f"{TRAIN_OPTIONS[k]}={v}" for k, v in opts.items()] + SETS)


def forge_env(home: Path, init_cache: Path) -> dict:
    """The user's environment, with forge's state in the bench's own dirs and lines that arrive as printed."""
    return {**os.environ, "PYTHONPATH": str(bc.ROOT), "FORGE_HOME": str(home),
            "FORGE_INIT_CACHE": str(init_cache), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def timed_process(argv: list[str], env: dict, timeout: float = RUN_TIMEOUT) -> dict:
    """Run argv, stamping each line of its output (stderr, stdout merged in) with seconds since the start.

    max_rss = the child's VmHWM (/proc/PID/status: the high-water mark of its resident set), read every 20 ms
    until it exits. Not ru_maxrss: that counts the pages the child had between fork and exec too - a copy of
    THIS process's resident set (2.3 GB under pytest) - while VmHWM belongs to the image exec started.
    """
    tic = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=bc.ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    killer = threading.Timer(timeout, proc.kill)  # a hung run must not hang the benchmark
    killer.start()
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _hwm_bytes(proc.pid))
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append((time.perf_counter() - tic, line.rstrip("\n")))
        proc.wait()
    finally:
        done.set()
        sampler.join()
        killer.cancel()
        proc.stdout.close()
    return {"rc": proc.returncode, "lines": lines, "wall_s": time.perf_counter() - tic, "max_rss": peak[0]}


def _hwm_bytes(pid: int) -> int:
    """VmHWM of a live process, 0 once it is gone (or a zombie: no memory any more)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------- reading a run

def parse_human(text: str) -> int:
    """'747.65 MiB' (forge_core.memory.budget.human) -> bytes."""
    number, unit = text.split()
    return int(float(number) * UNITS[unit])


def parse_output(lines: list[tuple[float, str]]) -> dict:
    """What the run's own lines say: seconds to its first step line, its build seconds, the plan it printed,
    whether the PiSSA factors came from the init cache, the rows it read / cut. A missing line stays None."""
    got: dict = {"first_step_s": None, "build_s": None, "printed_total": None, "printed_arrays": None,
                 "cache_hit": False, "rows": None, "truncated": None}
    for t, line in lines:
        if got["first_step_s"] is None and FIRST_STEP.match(line):
            got["first_step_s"] = t
        elif m := BUILT.match(line):
            got["build_s"] = float(m.group(1))
        elif m := PLAN.match(line):
            got["printed_total"], got["printed_arrays"] = parse_human(m.group(1)), parse_human(m.group(2))
        elif line.startswith(CACHE_HIT):
            got["cache_hit"] = True
        elif (m := ROWS.search(line)) and got["rows"] is None:
            got["rows"], got["truncated"] = int(m.group(1)), int(m.group(2))
    return got


def metrics_summary(run_dir: Path) -> dict:
    """Medians of step_s and tok_s over the train records of steps >= 2 (step 1's alone if there is no
    other) and the largest logged peak_memory."""
    recs = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in recs if r["split"] == "train"]
    later = [r for r in train if r["step"] >= 2] or train
    return {"step_s": statistics.median(r["step_s"] for r in later),
            "tok_s": statistics.median(r["tok_s"] for r in later),
            "peak": max(r["peak_memory"] for r in train), "timed_steps": len(later)}


def planned(cfg, backend: str) -> dict:
    """The plan `forge train` makes before it launches (launch.memory_check): same config, same rows; its
    framework overhead is the backend's constant (the run's own is its measured RSS at the plan)."""
    from forge_core.memory.plan import data_shape_of, plan_memory
    from forge_core.models.known import load_model_config

    plan = plan_memory(cfg, load_model_config(cfg.model.path)[0], kind="sft", backend=backend,
                       data=data_shape_of(cfg, "sft"))
    return {"planned_total": plan.total_bytes,
            "planned_arrays": plan.total_bytes - plan.component("framework overhead")}


def plan_disagrees(res: dict) -> bool:
    """Do the arrays planned here differ from those the run printed by more than human()'s rounding?"""
    printed = res["printed_arrays"]
    return printed is None or abs(res["planned_arrays"] - printed) > 0.005 * res["planned_arrays"]


class RunFailed(RuntimeError):
    """A forge run that did not finish as expected; carries its whole output for the report."""

    def __init__(self, what: str, why: str, output: str):
        super().__init__(f"{what}: {why}")
        self.output = output


def forge_run(what: str, opts: dict, home: Path, init_cache: Path, expect_cache_hit: bool = False) -> dict:
    """One `forge train`, timed and read: its lines, its metrics.jsonl, its max RSS, its plan (made here)."""
    print(f"{what}: {' '.join(forge_argv(opts)[1:])}", file=sys.stderr, flush=True)
    proc = timed_process(forge_argv(opts), forge_env(home, init_cache))
    output = "\n".join(line for _, line in proc["lines"])
    if proc["rc"] != 0:
        raise RunFailed(what, f"exit {proc['rc']}", output)
    got = parse_output(proc["lines"])
    if expect_cache_hit and not got["cache_hit"]:
        raise RunFailed(what, f"no '{CACHE_HIT}' line: the warm run computed the factors again", output)
    if got["first_step_s"] is None or got["build_s"] is None:
        raise RunFailed(what, "no 'train step 1' or 'built in' line to read", output)
    res = {**got, **metrics_summary(Path(opts["out"])), **planned(run_config(opts), opts["backend"]),
           "wall_s": proc["wall_s"], "max_rss": proc["max_rss"], "what": what}
    if got["printed_total"] is not None:  # the run's total: its overhead is what it measured of itself
        res["planned_total"] = got["printed_total"]
    print(f"{what}: first step {res['first_step_s']:.1f}s, build {res['build_s']:.1f}s, "
          f"{res['step_s']:.2f} s/step, {res['tok_s']:.1f} tok/s, max RSS {res['max_rss'] / MIB:.0f} MiB, "
          f"peak {res['peak'] / MIB:.0f} MiB, wall {res['wall_s']:.1f}s", file=sys.stderr, flush=True)
    return res


def bench_shape(label: str, model: Path, data: Path, work: Path, steps: int, failures: list,
                backend: str = "mlx", warm: bool = True) -> dict | None:
    """The cold run (fresh FORGE_HOME and init cache) and, with warm, the same run again on the filled
    cache. None when the cold run failed; "warm" None when that one did (each failure goes to failures)."""
    base = work / f"{label}-{backend}"
    home, cache = base / "home", base / "init-cache"
    home.mkdir(parents=True)
    cache.mkdir()
    res: dict = {"warm": None}
    for name in ("cold", "warm") if warm else ("cold",):
        opts = run_options(backend, model, data, steps, base / f"run-{name}")
        try:
            res[name] = forge_run(f"{label} {backend} {name}", opts, home, cache,
                                  expect_cache_hit=name == "warm")
        except RunFailed as e:
            print(e.output, file=sys.stderr)  # the whole output here; the report keeps its end
            failures.append(e)
            if name == "cold":
                return None
    return res


# ---------------------------------------------------------------- forge vs mlx-lm (tools/bench_sft.py)

def fp32_copy(model: Path) -> Path:
    """`<model>-fp32` beside the shape's dir, built once: the same weights (bf16 -> float32 is exact), the
    same tokenizer, config.json's torch_dtype float32. A shard is converted whole (a 1B's: 5 GB in memory)."""
    import mlx.core as mx

    from forge_core.atomic import atomic_dir

    out = model.with_name(model.name + "-fp32")
    if (out / "config.json").is_file():
        return out
    print(f"building {out} (a float32 copy for mlx-lm, once)", file=sys.stderr, flush=True)
    with atomic_dir(out) as tmp:
        for f in sorted(model.iterdir()):
            if f.suffix == ".safetensors":
                weights = {k: v.astype(mx.float32) for k, v in mx.load(str(f)).items()}
                mx.save_safetensors(str(tmp / f.name), weights, metadata={"format": "pt"})
                del weights
            elif f.name in ("config.json", "model.safetensors.index.json"):
                meta = json.loads(f.read_text())
                if "torch_dtype" in meta:
                    meta["torch_dtype"] = "float32"
                if "total_size" in meta.get("metadata", {}):
                    meta["metadata"]["total_size"] *= 2
                (tmp / f.name).write_text(json.dumps(meta, indent=2) + "\n")
            else:
                shutil.copyfile(f, tmp / f.name)
    return out


def mlxlm_compare(model: Path, steps: int):
    """bench_sft's four configurations on this model, one round: (results, failed, bench_sft's args)."""
    import bench_sft

    args = bench_sft.parse_args([
        "--model", str(model), "--only", ",".join(MLXLM_CONFIGS), "--repeats", "1", "--slow-repeats", "1",
        "--batch-size", str(BATCH), "--seq-len", str(SEQ), "--rank", str(RANK), "--steps", str(steps),
        "--warmup", "1", "--slow-steps", "1", "--slow-warmup", "1"])
    results, failed = bench_sft.run_all(MLXLM_CONFIGS, args)
    return results, failed, args


def mlxlm_section(label: str, results: dict, failed: dict, sft_args) -> str:
    """bench_sft's own tables: each configuration's tok/s, then the ratios forge / mlx-lm."""
    import bench_sft

    dtype = ("the float32 copy of the bf16 shape: both compute in float32, as in `make bench`"
             if label.endswith("-fp32") else
             "the bf16 dir as loaded: mlx-lm computes in bf16, forge in float32")
    head = (f"forge vs mlx-lm's own LoRA trainer on {label} ({dtype}; tools/bench_sft.py's workers with "
            f"`--model` that dir; {bench_sft.TRAIN}, batch {sft_args.batch_size} x {sft_args.seq_len}, "
            f"LoRA rank {sft_args.rank}, init lora; {sft_args.warmup} + {sft_args.steps} steps, mlx-lm 4-bit "
            f"{sft_args.slow_warmup} + {sft_args.slow_steps}; one round).")
    return "\n\n".join([head, bench_sft.result_table(results, failed, sft_args),
                        bench_sft.ratio_table(results)])


# ---------------------------------------------------------------- the report

def params(shape: str, layers: int | None, vocab: int | None) -> str:
    n = make_real_shapes.param_count(make_real_shapes.model_config(shape, layers, vocab))
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _s(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def _vs(planned_bytes: int, measured: int) -> str:
    """'planned / measured MiB (ratio)'."""
    return f"{planned_bytes / MIB:.0f} / {measured / MIB:.0f} MiB ({planned_bytes / max(measured, 1):.2f})"


SHAPE_HEADER = ["shape", "params", "build s cold", "build s warm", "first step s cold / warm",
                "planned arrays / MLX peak (ratio)", "planned total / max RSS (ratio)", "s/step", "tok/s",
                "run wall s cold / warm"]


def shape_row(label: str, n_params: str, res: dict) -> list:
    """One shape's cells; memory and speed are the cold run's (the warm one trains the same steps)."""
    cold, warm = res["cold"], res["warm"] or {}
    return [label, n_params, _s(cold["build_s"]), _s(warm.get("build_s")),
            f"{_s(cold['first_step_s'])} / {_s(warm.get('first_step_s'))}",
            _vs(cold["planned_arrays"], cold["peak"]), _vs(cold["planned_total"], cold["max_rss"]),
            f"{cold['step_s']:.2f}", f"{cold['tok_s']:.1f}",
            f"{_s(cold['wall_s'])} / {_s(warm.get('wall_s'))}"]


TORCH_HEADER = ["shape", "params", "build s", "first step s", "planned total / max RSS (ratio)", "s/step",
                "tok/s", "run wall s"]


def torch_row(label: str, n_params: str, cold: dict) -> list:
    return [label, n_params, _s(cold["build_s"]), _s(cold["first_step_s"]),
            _vs(cold["planned_total"], cold["max_rss"]), f"{cold['step_s']:.2f}", f"{cold['tok_s']:.1f}",
            _s(cold["wall_s"])]


def notes(runs: list[dict], failures: list[RunFailed]) -> str:
    """What did not go as planned: a run without its plan line or whose planned arrays are not those made
    here, rows not cut to the batch width, each failed run with the end of its output (all of it: stderr)."""
    out = []
    for r in runs:
        if r["printed_total"] is None:
            out.append(f"{r['what']}: no 'memory: planned peak' line; its planned total is the plan made "
                       "here, with the backend's constant overhead.")
        if plan_disagrees(r):
            printed = "none" if r["printed_arrays"] is None else f"{r['printed_arrays'] / MIB:.1f} MiB"
            out.append(f"{r['what']}: the run printed planned arrays of {printed}, the plan made here "
                       f"has {r['planned_arrays'] / MIB:.1f} MiB.")
        if r["rows"] is not None and r["truncated"] != r["rows"]:
            out.append(f"{r['what']}: only {r['truncated']} of {r['rows']} rows reached {SEQ} tokens.")
    for f in failures:
        out.append(f"FAILED: {f}\n\n```\n{f.output[-3000:]}\n```")
    return "\n\n".join(out)


def report(args, argv, load_before: str, tables: list[str], runs: list[dict], failures: list) -> str:
    size = ""
    if args.layers is not None or args.vocab is not None:
        size = (f" NOT full size: built with --layers {args.layers} --vocab {args.vocab} (a smoke run; the "
                "params column counts that build).")
    note = (f"Random bf16 weights at each checkpoint's shape (tools/make_real_shapes.py), SmolLM2's "
            f"tokenizer.{size} `forge train` as a subprocess: MLX backend, {BITS}-bit base, QPiSSA rank "
            f"{RANK} (pissa_niter_4), batch {BATCH} x {SEQ} (every row longer than {SEQ} tokens), "
            f"{args.steps} steps, eval off. cold = fresh FORGE_HOME and FORGE_INIT_CACHE (the SVD runs); "
            "warm = the same command on the filled init cache (the factors read back). build s = the run's "
            "own `built in`; first step s = process start to its `train step 1` line; planned arrays = "
            "forge_core.memory.plan on the same config and rows, less its framework overhead; MLX peak = the "
            "largest peak_memory in metrics.jsonl; planned total = the run's own `memory: planned peak` (its "
            "overhead on the CPU: its RSS measured at the plan); max RSS = the process's VmHWM "
            "(/proc, read every 20 ms), file-backed pages included; s/step and tok/s (B x T per second) = medians over "
            "steps >= 2; memory and speed are the cold run's.")
    parts = [bc.provenance(bc.command("bench_real_sizes.py", argv), load_before, note), *tables]
    extra = notes(runs, failures)
    return "\n\n".join(parts + ([extra] if extra else []))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES),
                   help=f"comma-separated, of: {', '.join(make_real_shapes.SHAPES)}")
    p.add_argument("--models-dir", type=Path, default=MODELS_DIR, help="where the shapes are built, once")
    p.add_argument("--steps", type=int, default=4, help="steps of each forge run (s/step, tok/s: steps >= 2)")
    p.add_argument("--write", metavar="MD", help=f"replace the '## {TITLE}' section of this markdown file")
    p.add_argument("--skip-warm", action="store_true", help="no second run on the filled init cache")
    p.add_argument("--skip-torch", action="store_true", help="no torch (--backend cuda) run")
    p.add_argument("--skip-mlxlm", action="store_true", help="no forge vs mlx-lm comparison")
    p.add_argument("--torch-shape", default="llama-3.2-1b")
    p.add_argument("--mlxlm-shape", default="llama-3.2-1b")
    p.add_argument("--mlxlm-steps", type=int, default=3, help="timed steps of bench_sft's fast configs")
    p.add_argument("--mlxlm-as-loaded", action="store_true",
                   help="give mlx-lm the bf16 dir (it then computes in bf16), not a float32 copy")
    p.add_argument("--layers", type=int, default=None, help="build with this many blocks (smoke runs only)")
    p.add_argument("--vocab", type=int, default=None, help="build with this vocab (smoke runs; >= 49152)")
    args = p.parse_args(argv)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = sorted({*args.shapes, args.torch_shape, args.mlxlm_shape} - set(make_real_shapes.SHAPES))
    if unknown:
        p.error(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(make_real_shapes.SHAPES)}")
    if args.steps < 2:
        p.error("--steps must be >= 2: step 1 compiles; the figures are the later steps'")
    return args


def torch_device() -> str:
    """Where `--backend cuda` trained (torch imported here, after the runs: each ran in its own process)."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "torch on the CPU"


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = bc.machine()["load"]
    wanted = args.shapes + ([] if args.skip_torch else [args.torch_shape]) + \
        ([] if args.skip_mlxlm else [args.mlxlm_shape])
    models = {s: ensure_model(args.models_dir, s, args.layers, args.vocab) for s in dict.fromkeys(wanted)}
    label = {s: models[s].name for s in models}  # a smoke build's name says it is one
    size = {s: params(s, args.layers, args.vocab) for s in models}
    tables, runs, failures = [], [], []
    work = Path(tempfile.mkdtemp(prefix="forge-real-sizes-"))
    try:
        data = write_data(work / "sft.jsonl")
        rows = []
        for shape in args.shapes:
            res = bench_shape(label[shape], models[shape], data, work, args.steps, failures,
                              warm=not args.skip_warm)
            if res is not None:
                rows.append(shape_row(label[shape], size[shape], res))
                runs += [r for r in (res["cold"], res["warm"]) if r]
        if rows:
            tables.append(bc.table(SHAPE_HEADER, rows))
        if not args.skip_torch:
            res = bench_shape(label[args.torch_shape], models[args.torch_shape], data, work, args.steps,
                              failures, backend="cuda", warm=False)
            if res is not None:
                runs.append(res["cold"])
                tables += [f"The same cold run on torch (`--backend cuda`, {torch_device()}):",
                           bc.table(TORCH_HEADER, [torch_row(label[args.torch_shape], size[args.torch_shape],
                                                             res["cold"])])]
        if not args.skip_mlxlm:
            model = models[args.mlxlm_shape]
            model = model if args.mlxlm_as_loaded else fp32_copy(model)
            tables.append(mlxlm_section(model.name, *mlxlm_compare(model, args.mlxlm_steps)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bc.publish(report(args, argv, load_before, tables, runs, failures), args.write, TITLE)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
