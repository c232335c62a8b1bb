"""Shared plumbing for tools/bench_sft.py, tools/bench_dpo.py and tools/fidelity.py.

Each measured configuration runs in its own subprocess (`python tools/X.py --worker SPEC_JSON`): the
BLAS preload is per process, and a fresh process gives a clean peak-memory reading. A worker prints
one line `RESULT {json}` on stdout; the parent collects it. Nothing here imports mlx at module import
time: the "newcomer" worker of bench_sft must start MLX with its own reference BLAS.

Numbers go into docs/BENCHMARKS.md, one `## Title` section per tool, replaced whole on --write.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULT_PREFIX = "RESULT "
DOC_TITLE = """# Forge benchmarks

Measured numbers only: every section gives the command that produced it (tools/*.py), the date, the
machine and its load. A tool rewrites its own `## ` section whole (`--write docs/BENCHMARKS.md`) and
leaves the others alone.
"""


# ---------------------------------------------------------------- subprocess workers

def emit_result(result: dict) -> None:
    """Worker side: the one line the parent reads back."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_worker(script: Path, spec: dict, env: dict | None = None, timeout: float = 7200,
               verbose: bool = False) -> dict:
    """Parent side: run `script --worker SPEC` in a fresh interpreter; returns the worker's RESULT dict."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
    cmd = [sys.executable, str(script), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, check=False, env=full_env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"worker {spec.get('name', spec)} ran past {timeout:.0f}s") from None
    if verbose:
        sys.stderr.write(proc.stderr[-4000:])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-3000:]
        raise RuntimeError(f"worker {spec.get('name', spec)} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def preload_blas() -> str | None:
    """Load forge's optimized BLAS for MLX; must run before anything in the process imports mlx.core."""
    import forge_mlx.blas  # the package __init__ preloads; calling again returns the path (or None)

    return forge_mlx.blas.preload()


def loaded_blas() -> str:
    """Which BLAS MLX can call in this process, from /proc/self/maps.

    MLX's wheel bundles netlib's reference BLAS (`mlx_cpu.libs/libblas-*.so`); a BLAS preloaded before
    mlx.core (forge_mlx.blas) takes its symbols over. numpy's OpenBLAS (scipy_openblas, prefixed
    symbols) is ignored: MLX cannot use it.
    """
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    paths = {ln.split()[-1] for ln in maps.splitlines() if "blas" in ln.lower() and "/" in ln}
    preloaded = sorted({Path(p).name for p in paths if "scipy_openblas" not in p and "mlx" not in p})
    if preloaded:
        return "preloaded: " + ", ".join(preloaded)
    return "mlx wheel's reference BLAS only" if any("mlx" in p for p in paths) else "none mapped"


# ---------------------------------------------------------------- timing

def time_steps(step, batches, warmup: int, steps: int) -> list[tuple[int, float]]:
    """Run warmup + steps calls of step(batch) (each must block until done); returns the timed ones.

    `batches` yields (batch, tokens); each timed entry is (tokens, seconds). Warm-up steps absorb
    compilation of the first batch shape; a later new shape recompiles, as it does in a real run.
    """
    timed = []
    for i in range(warmup + steps):
        batch, tokens = next(batches)
        tic = time.perf_counter()
        step(batch)
        dt = time.perf_counter() - tic
        if i >= warmup:
            timed.append((tokens, dt))
    return timed


def summarize(timed: list[tuple[int, float]]) -> dict:
    """tok/s = sum of tokens / sum of seconds over the timed steps; also the median step time."""
    tokens = sum(t for t, _ in timed)
    seconds = sum(s for _, s in timed)
    return {"tok_s": tokens / seconds, "step_s": statistics.median(s for _, s in timed),
            "tokens_per_step": tokens / len(timed), "timed_steps": len(timed)}


def median_of(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


# ---------------------------------------------------------------- forge_mlx helpers (lazy imports)

def forge_config(bits: int, init: str, rank: int, scale: float, batch: int, seq: int, steps: int,
                 train: str, seed: int = 0, lr: float = 2e-4):
    """A ForgeConfig for a benchmark run: constant lr (speed does not depend on it), no eval, no saves."""
    from forge_core.config import ForgeConfig

    cfg = ForgeConfig()
    cfg.model.path = "smollm2-135m"
    cfg.data.train, cfg.data.valid = train, ""
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.init = rank, scale * rank, init
    cfg.quant.bits, cfg.quant.group_size = bits, 64
    t = cfg.train
    t.batch_size, t.max_seq_len, t.steps, t.seed, t.lr = batch, seq, steps, seed, lr
    t.schedule, t.warmup, t.eval_every = "constant", 0, 0
    return cfg


def forge_step(cfg, model, loss_fn, steps: int):
    """One optimizer step exactly as forge_core.train's loop does it on MLX (grad_accum 1), blocking.

    Uses forge_mlx's own stepper (its compiled micro/apply functions), so the work per step is forge's.
    """
    from forge_core.schedule import lr_schedule
    from forge_mlx import ops

    stepper = ops.make_stepper(cfg, model, loss_fn)
    lr_at = lr_schedule(cfg.train, steps)
    counter = [0]

    def step(batch):
        counter[0] += 1
        ops.seed(cfg.train.seed * 1_000_003 + counter[0])
        stepper.begin()
        loss_sum, count, metrics = stepper.accumulate(batch)
        norm = stepper.update(count, lr_at(counter[0] - 1))
        stepper.finish([loss_sum, count, norm, metrics])

    model.train()
    return step


def row_tokens(lengths, width: int) -> int:
    """Tokens of a padded batch counted as mlx-lm counts them: each row's length, capped at the width."""
    return int(sum(min(n, width) for n in lengths))


# ---------------------------------------------------------------- the report

def run_summary(out: Path) -> dict:
    """A forge run's training records (RUN/metrics.jsonl, log_every 1): the median seconds per step after the first
    (which traces and compiles), the largest logged peak, the last loss."""
    recs = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["split"] == "train"]
    return {"step_s": statistics.median(r["step_s"] for r in train[1:]), "peak": max(r["peak_memory"] for r in train),
            "loss": train[-1]["loss"]}


def compare_cells(base: list[dict], other: list[dict]) -> list[str]:
    """Table cells for two variants' run summaries over rounds: the median seconds per step of each, other / base,
    each one's largest peak in GiB, each one's last loss (of its last round)."""
    s_b, s_o = (statistics.median(x["step_s"] for x in runs) for runs in (base, other))
    p_b, p_o = (max(x["peak"] for x in runs) for runs in (base, other))
    return [f"{s_b:.2f}", f"{s_o:.2f}", f"{s_o / s_b:.2f}x", f"{p_b / 2**30:.2f}", f"{p_o / 2**30:.2f}",
            f"{base[-1]['loss']:.4f}", f"{other[-1]['loss']:.4f}"]


def side_by_side(groups, pair: tuple, rounds: int, run) -> dict:
    """{(group, variant): [run(group, variant, out) for each round]}: per group, `rounds` rounds over the two
    variants of `pair`, alternating which goes first (this machine drifts; a fixed order would favour one side).
    Each run gets a fresh run directory `out` of its own (not yet made: forge makes it), removed after it."""
    import shutil
    import tempfile

    res: dict = {}
    root = Path(tempfile.mkdtemp(prefix="forge-bench-"))
    try:
        for group in groups:
            for r in range(rounds):
                for variant in (pair if r % 2 == 0 else pair[::-1]):
                    out = root / f"run{sum(map(len, res.values()))}"
                    try:
                        res.setdefault((group, variant), []).append(run(group, variant, out))
                    finally:
                        shutil.rmtree(out, ignore_errors=True)
                    print(f"{group} round {r} {variant}: {res[(group, variant)][-1]}", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return res


def side_by_side_args(doc: str, argv, steps: int, rounds: int):
    """The side-by-side benchmarks' command line: --steps per run, --rounds per pair, --write MD."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--write", default=None, metavar="MD")
    return ap.parse_args(argv)


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        ram = f"{kb / 2**20:.0f} GiB"
    except (OSError, IndexError, ValueError):
        pass
    osname = platform.platform()
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                osname = f"{line.split('=', 1)[1].strip(chr(34))} ({platform.system()} {platform.release()})"
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram": ram, "os": osname,
            "load": "{:.2f} {:.2f} {:.2f}".format(*load)}


def versions(*dists: str) -> str:
    out = []
    for d in dists:
        try:
            out.append(f"{d} {importlib.metadata.version(d)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{d} (not installed)")
    return ", ".join(out)


def provenance(command: str, load_before: str, note: str = "") -> str:
    """The lines every section starts with: command, date, machine, load, versions."""
    m = machine()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Command: `{command}`  ",
        f"Date: {date}  ",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram']} RAM, {m['os']}  ",
        f"Load average (1/5/15 min) before / after: {load_before} / {m['load']}  ",
        f"Versions: {versions('mlx', 'mlx-lm', 'numpy')}, Python {platform.python_version()}",
    ]
    if note:
        lines += ["", note]
    return "\n".join(lines)


def command(script: str, argv) -> str:
    """The command line to record in a section: `python tools/SCRIPT ARGS`, quoted as a shell would need."""
    args = sys.argv[1:] if argv is None else argv
    return f"python tools/{script} {shlex.join(args)}".strip()


def publish(text: str, path: str | None, title: str) -> None:
    """Print a tool's report; with --write, replace its `## title` section of that markdown file."""
    print(text)
    if path:
        write_section(path, title, text)
        print(f"wrote the '{title}' section of {path}", file=sys.stderr)


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def replace_section(text: str, title: str, body: str) -> str:
    """Replace the `## title` section of a markdown text (up to the next `## `), or append it."""
    head = f"## {title}\n"
    section = head + "\n" + body.strip() + "\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln == head or ln.rstrip("\n") == head.rstrip("\n")), None)
    if start is None:
        return text.rstrip("\n") + "\n\n" + section
    end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
    after = "".join(lines[end:])
    return "".join(lines[:start]) + section + ("\n" + after if after else "")


def write_section(path: str | Path, title: str, body: str) -> None:
    from forge_core.atomic import write_text

    path = Path(path)
    text = path.read_text() if path.is_file() else DOC_TITLE
    write_text(path, replace_section(text, title, body))
