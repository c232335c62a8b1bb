"""Memory planner calibration: forge_core.memory.plan's estimate against the peak a real run reaches.

    python tools/bench_memory.py [--only mlx-h128-fp,...] [--backend mlx|cuda] [--bundled] [--write docs/BENCHMARKS.md]

Each `h...` row of MATRIX builds a random Llama (tests/tiny.py, byte vocab 259), writes a JSONL whose rows are
longer than max_seq_len (every batch is B x T, no short padding, every position trained); each `smol-...` row
takes the bundled SmolLM2-135M-Instruct and the first rows of the demo task's data (real lengths, the prompt
masked out of the loss). Each runs forge_core's training loop on the backend (forge_core.train.train with
forge_mlx.ops / forge_cuda.ops) for 3 steps, eval off, in a fresh subprocess (forge_mlx is imported FIRST there:
its BLAS preload must precede mlx.core), and is planned from its data as `forge train` plans it
(forge_core/memory/data_shape.py). Like is compared with like:

    MLX:          measured = mx.get_peak_memory() over the whole run (model build + training): the MLX
                  allocator's arrays only, no interpreter or library code.
    torch (CPU):  measured = peak anonymous RSS (RssAnon sampled every 1 ms) - RssAnon after the
                  torch/transformers/peft/forge imports; tracemalloc cannot see torch's allocator, and
                  plain RSS (ru_maxrss) also counts library code paged in by the first backward
                  (reported as rss_delta). The worker runs with MALLOC_MMAP_THRESHOLD_=65536 (see
                  TORCH_CPU_ENV) so freed tensors leave RSS.
    torch (CUDA): measured = torch.cuda.max_memory_allocated() (no CUDA context, no cache slack).
    estimate    = plan.total_bytes - plan.component("framework overhead"): the plan's peak without the
                  constant for the interpreter + libraries (or the CUDA context), which neither
                  measurement includes.

ratio = estimate / measured. Target: 0.90 <= ratio <= 1.15 (within +-15%, never under by more than 10%).
tests/forge_core/test_memory_calibration.py runs the rows marked `small` with a looser band (0.75..1.25).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc

TITLE = "Memory planner calibration"
TARGET = (0.90, 1.15)  # estimate / measured
STEPS = 3
# glibc raises its mmap threshold (up to 32 MiB) each time a large mmapped block is freed, so later
# tensors land in the heap, whose freed pages stay resident: RSS then counts dead activations (the
# h256 B4 T512 row read 792 MiB against ~420 MiB with this fixed). A fixed threshold sends every
# allocation over 64 KiB to mmap and back to the OS on free, so RssAnon follows live tensor bytes.
TORCH_CPU_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
BUNDLED_ROWS = 32  # rows of the demo data a bundled-model row reads (the reference scoring stays short)


def _row(name, backend, hidden, layers, inter, batch, seq, rank, bits, ckpt=False, kind="sft", small=False):
    return {"name": name, "backend": backend, "hidden": hidden, "layers": layers, "intermediate": inter,
            "batch": batch, "seq": seq, "rank": rank, "bits": bits, "ckpt": ckpt, "kind": kind, "small": small}


def _smol(name, kind="sft", bits=4, ckpt=False, packing=False, batch=4, seq=256, dora=False, rows=None):
    """A row on the bundled SmolLM2-135M-Instruct with the demo task's real rows (the first `rows` (BUNDLED_ROWS) of
    data/demo/*_train.jsonl): prompts masked out of the loss, batches as long as the data makes them."""
    return {"name": name, "backend": "mlx", "model": "smollm2-135m", "batch": batch, "seq": seq, "rank": 16,
            "bits": bits, "ckpt": ckpt, "kind": kind, "packing": packing, "small": False, "dora": dora,
            "rows": rows or BUNDLED_ROWS}


# Model size, batch, seq len, rank, bits, checkpointing, SFT/DPO; heads = hidden/32, kv heads = heads/2.
MATRIX = [
    _row("mlx-h128-fp", "mlx", 128, 4, 512, 2, 256, 8, 0, small=True),
    _row("mlx-h128-q4", "mlx", 128, 4, 512, 2, 256, 8, 4, small=True),
    _row("mlx-h128-q4-dpo", "mlx", 128, 4, 512, 2, 256, 8, 4, kind="dpo", small=True),
    _row("mlx-h128-q8-r32", "mlx", 128, 8, 512, 4, 512, 32, 8),
    _row("mlx-h256-fp", "mlx", 256, 8, 768, 4, 512, 16, 0),
    _row("mlx-h256-q4", "mlx", 256, 8, 1024, 4, 512, 16, 4),
    _row("mlx-h256-q4-ckpt", "mlx", 256, 8, 1024, 4, 512, 16, 4, ckpt=True),
    _row("mlx-h256-q4-dpo", "mlx", 256, 8, 1024, 2, 512, 16, 4, kind="dpo"),
    _row("mlx-h256-q4-dpo-ckpt", "mlx", 256, 8, 1024, 2, 512, 16, 4, ckpt=True, kind="dpo"),
    _row("torch-h128-fp", "cuda", 128, 4, 512, 2, 256, 8, 0, small=True),
    _row("torch-h128-nf4", "cuda", 128, 4, 512, 2, 256, 8, 4),
    _row("torch-h256-nf4", "cuda", 256, 8, 1024, 4, 512, 16, 4),
    _row("torch-h256-nf4-ckpt", "cuda", 256, 8, 1024, 4, 512, 16, 4, ckpt=True),
    _row("torch-h256-nf4-dpo", "cuda", 256, 8, 1024, 2, 512, 16, 4, kind="dpo"),
    # the bundled model on the demo data, planned from the data as `forge train` plans it
    _smol("smol-sft-q4"),
    _smol("smol-sft-fp", bits=0),
    _smol("smol-sft-q4-ckpt", ckpt=True),
    _smol("smol-sft-q4-pack", packing=True),
    _smol("smol-sft-q4-b8", batch=8),
    _smol("smol-dpo-q4", kind="dpo"),
    _smol("smol-dpo-q4-ckpt", kind="dpo", ckpt=True),
    _smol("smol-dpo-fp", kind="dpo", bits=0),
    _smol("smol-orpo-q4", kind="orpo"),
    _smol("smol-kto-q4", kind="kto"),
    _smol("smol-sft-q4-dora", dora=True),
    # GRPO plans its widest prompt + max_new_tokens: the row reads the 6 prompts its 3 steps of 2 prompts x 4
    # completions train on, so the widest batch of the plan is one the run meets
    _smol("smol-grpo-q4", kind="grpo", batch=8, rows=STEPS * 2),
    # the demo configs as a user runs them with torch on this CPU: the plan `forge` prints at launch against the
    # peak the run itself reports (max RSS), the same quantity on both sides, no allocator settings
    {"name": "torch-demo-sft", "backend": "cuda", "demo": "configs/demo.yaml", "kind": "sft", "small": False},
    {"name": "torch-demo-dpo", "backend": "cuda", "demo": "configs/dpo_demo.yaml", "kind": "dpo", "small": False},
    # data-parallel: `forge train --nproc 2` (mlx.launch, ring), each rank batch 4; rank 0's peak against one
    # rank's plan (forge_core.memory.estimate with nproc=2)
    {**_smol("smol-sft-q4-dp2"), "nproc": 2},
    {**_smol("smol-dpo-q4-dp2", kind="dpo"), "nproc": 2},
    # a mixture of experts (tests/moe.py's Mixtral with the Hub's keys): 8 experts of width 256, top-2, every
    # expert adapted (one LoRA each) and quantized
    {**_row("mlx-moe-q4", "mlx", 128, 4, 256, 2, 256, 8, 4), "moe": "mixtral", "experts": 8, "top_k": 2},
    {**_row("torch-moe-nf4", "cuda", 128, 4, 256, 2, 256, 8, 4), "moe": "mixtral", "experts": 8, "top_k": 2},
]


# ---------------------------------------------------------------- inputs (parent side)

def make_model(root: Path, row: dict) -> Path:
    """The random HF dir for a row's shape (cached per shape under root)."""
    from tests.tiny import make_tiny_model

    heads = row["hidden"] // 32
    out = root / f"h{row['hidden']}_L{row['layers']}_i{row['intermediate']}"
    if row.get("moe"):
        from tests.moe import make_tiny_moe

        out = root / f"{row['moe']}_h{row['hidden']}_L{row['layers']}_e{row['experts']}_i{row['intermediate']}"
        if not (out / "model.safetensors").is_file():
            make_tiny_moe(out, row["moe"], hidden_size=row["hidden"], num_hidden_layers=row["layers"],
                          num_attention_heads=heads, num_key_value_heads=heads // 2, experts=row["experts"],
                          top_k=row["top_k"], expert_width=row["intermediate"])
        return out
    if not (out / "model.safetensors").is_file():
        make_tiny_model(out, hidden=row["hidden"], layers=row["layers"], heads=heads, kv_heads=heads // 2,
                        intermediate=row["intermediate"])
    return out


def make_data(root: Path, kind: str, seq: int, n: int = 16) -> Path:
    """n rows, each longer than seq byte tokens, so truncation gives every row exactly seq tokens."""
    path = root / f"{kind}_{seq}.jsonl"
    letters = "abcdefghijklmnop"
    rows = []
    for i in range(n):
        c = letters[i % len(letters)]
        if kind == "sft":
            rows.append({"messages": [{"role": "user", "content": c * (seq // 2)},
                                      {"role": "assistant", "content": c.upper() * seq}]})
        else:  # the prompt is kept whole; the completions are cut to fill the rest
            rows.append({"prompt": c * (seq // 4), "chosen": c.upper() * seq, "rejected": c * seq})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def demo_subset(root: Path, kind: str, rows: int = BUNDLED_ROWS) -> Path:
    """The first `rows` rows of the demo task's SFT, preference or prompt data."""
    name = {"sft": "sft_train", "grpo": "grpo_train"}.get(kind, "dpo_train")
    src = Path(bc.ROOT) / "data" / "demo" / f"{name}.jsonl"
    out = root / f"demo_{name}_{rows}.jsonl"
    out.write_text("".join(src.read_text().splitlines(keepends=True)[:rows]))
    return out


def bundled_sets(row: dict, data: Path, out_dir: Path) -> list[str]:
    """The demo recipe's settings (QPiSSA rank 16, pissa_niter_4), 3 steps, the row's changes."""
    return ["backend=mlx", "model.path=smollm2-135m", f"data.train={data}", "data.valid=",
            f"data.packing={str(row['packing']).lower()}", f"lora.rank={row['rank']}", f"lora.alpha={row['rank']}",
            "lora.init=pissa_niter_4", f"quant.bits={row['bits']}", f"train.steps={STEPS}",
            f"train.batch_size={row['batch']}", f"train.max_seq_len={row['seq']}",
            f"train.grad_checkpoint={str(row['ckpt']).lower()}", "train.schedule=constant", "train.warmup=0",
            "train.eval_every=0", "train.save_every=1000", "train.log_every=1", f"train.out_dir={out_dir}",
            f"lora.dora={str(row.get('dora', False)).lower()}",
            *(["grpo.rewards=builtin:json_fields", "grpo.num_generations=4", "grpo.max_new_tokens=48"]
              if row["kind"] == "grpo" else [])]


def config_sets(row: dict, model: Path, data: Path, out_dir: Path) -> list[str]:
    """--set items for the row: constant lr, no eval, no saves before the end, full-SVD PiSSA (the default)."""
    return [f"backend={row['backend']}", f"model.path={model}", f"data.train={data}", "data.valid=",
            "data.train_on_prompt=true", f"lora.rank={row['rank']}", f"lora.alpha={row['rank']}",
            f"quant.bits={row['bits']}", f"train.steps={STEPS}", f"train.batch_size={row['batch']}",
            f"train.max_seq_len={row['seq']}", f"train.grad_checkpoint={str(row['ckpt']).lower()}",
            "train.schedule=constant", "train.warmup=0", "train.eval_every=0", "train.save_every=1000",
            "train.log_every=1", f"train.out_dir={out_dir}"]


# ---------------------------------------------------------------- worker (one row, fresh process)

def _status_kib(field: str) -> int:
    """One `field: N kB` line of /proc/self/status, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class AnonPeak:
    """Samples RssAnon (heap + anonymous mmaps: where torch's CPU tensors live) every `every` seconds
    on a thread; torch ops release the GIL, so the sampler runs during them. Unlike VmHWM it leaves out
    file-backed pages: library code that the first forward/backward pages in is not the run's data."""

    def __init__(self, every: float = 0.001):
        import threading

        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kib("RssAnon") * 1024)
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _measure_mlx(cfg, kind: str, console) -> dict:
    import mlx.core as mx

    from forge_core.train import train
    from forge_mlx import ops

    mx.reset_peak_memory()
    train(cfg, kind, ops=ops, console=console)
    return {"measured": int(mx.get_peak_memory()), "how": "mx.get_peak_memory()", "on_gpu": False}


def _measure_torch(cfg, kind: str, console) -> dict:
    import resource

    import torch

    from forge_core.train import train
    from forge_cuda import ops

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        train(cfg, kind, ops=ops, console=console)
        return {"measured": int(torch.cuda.max_memory_allocated()), "how": "cuda max_memory_allocated",
                "on_gpu": True}
    import gc

    gc.collect()
    base_rss, base_anon = _status_kib("VmRSS") * 1024, _status_kib("RssAnon") * 1024
    with AnonPeak() as anon:
        train(cfg, kind, ops=ops, console=console)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"measured": int(anon.peak - base_anon), "how": "sampled peak RssAnon - RssAnon after imports",
            "on_gpu": False, "rss_delta": int(peak_rss - base_rss)}


def worker(spec: dict) -> dict:
    if spec["backend"] == "mlx":
        import forge_mlx  # noqa: F401  (BLAS preload before mlx.core)
    else:
        import bitsandbytes  # noqa: F401  (import cost belongs to the baseline, not the run)
        import peft  # noqa: F401
        import transformers  # noqa: F401

        import forge_cuda.ops  # noqa: F401
    from rich.console import Console

    from forge_core.config_parse import build_config

    cfg = build_config(None, spec["sets"])
    console = Console(stderr=True, quiet=True)
    tic = time.perf_counter()
    got = (_measure_mlx if spec["backend"] == "mlx" else _measure_torch)(cfg, spec["kind"], console)
    seconds = time.perf_counter() - tic
    return {**got, "name": spec["name"], "seconds": seconds,
            **planned(cfg, spec["kind"], spec["backend"], got["on_gpu"])}


def planned(cfg, kind: str, backend: str, on_gpu: bool, nproc: int = 1) -> dict:
    """The plan of one process of the run, made from its rows as `forge <method>` makes it (estimate: without the
    framework-overhead constant, which no measurement here includes)."""
    from forge_core.memory.plan import data_shape_of, plan_memory
    from forge_core.models.known import load_model_config

    data = data_shape_of(cfg, kind)
    plan = plan_memory(cfg, load_model_config(cfg.model.path)[0], kind=kind, backend=backend, on_gpu=on_gpu,
                       nproc=nproc, data=data)
    # neither the worker's MLX peak nor its torch RssAnon under TORCH_CPU_ENV (freed tensors go back to the OS)
    # holds what a C heap keeps of freed memory
    overhead = plan.component("framework overhead") + plan.component("allocator retention")
    return {"estimate": plan.total_bytes - overhead, "data_seq": data.seq, "head_per_row": data.head_per_row,
            "train": plan.phase_bytes("train") - overhead, "init": plan.phase_bytes("init") - overhead,
            "overhead": overhead, "components": {c.name: c.bytes for c in plan.components}}


# ---------------------------------------------------------------- parent

def measure_ranks(row: dict, sets: list[str], out_dir: Path) -> dict:
    """A data-parallel row: `forge <method> --nproc N` as a user launches it (each rank a process of its own, under
    mlx.launch); measured = the MLX peak rank 0 logs (mx.get_peak_memory over its build and steps), estimate = one
    rank's plan, made here from the same settings and rows."""
    import subprocess

    from forge_core.config_parse import build_config

    command = "train" if row["kind"] == "sft" else row["kind"]
    argv = [sys.executable, "-m", "forge_core.cli", command, "--nproc", str(row["nproc"]), "--force",
            *[x for s in sets for x in ("--set", s)]]
    tic = time.perf_counter()
    proc = subprocess.run(argv, check=False, cwd=bc.ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PYTHONPATH": str(bc.ROOT)})
    if proc.returncode != 0:
        raise RuntimeError(f"{row['name']}: forge {command} --nproc failed:\n{proc.stderr[-3000:]}")
    return {"measured": bc.run_summary(out_dir)["peak"], "name": row["name"], "how": "rank 0's mx.get_peak_memory()",
            "on_gpu": False, "seconds": time.perf_counter() - tic,
            **planned(build_config(None, sets), row["kind"], "mlx", False, row["nproc"])}


def _forge(argv: list[str], what: str) -> str:
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "forge_core.cli", *argv], check=False, cwd=bc.ROOT,
                          capture_output=True, text=True, timeout=3600, env={**os.environ, "PYTHONPATH": str(bc.ROOT)})
    if proc.returncode != 0:
        raise RuntimeError(f"{what}: forge {argv[0]} failed:\n{proc.stderr[-3000:]}")
    return proc.stderr


def measure_demo(row: dict, root: Path) -> dict:
    """A demo config as a user runs it (`forge train|dpo --backend cuda --config ...`; DPO continues a 2-step SFT run):
    estimate = the planned peak the launch prints (it measures its own process for the overhead), measured = the
    largest peak the run logs (the process's max RSS on the CPU). Both are the whole process's resident memory."""
    import re

    out = root / row["name"]
    argv = ["train" if row["kind"] == "sft" else row["kind"], "--backend", row["backend"], "--config", row["demo"],
            "--out", str(out)]
    if row["kind"] != "sft":  # the reference/start adapter the demo names is runs/demo-sft's: make one here
        _forge(["train", "--backend", row["backend"], "--config", "configs/demo.yaml", "--steps", "2",
                "--set", "train.eval_every=0", "--out", str(root / "sft-for-dpo")], row["name"])
        argv += ["--adapter", str(root / "sft-for-dpo" / "adapter")]
    tic = time.perf_counter()
    err = _forge(argv, row["name"])
    got = re.search(r"memory: planned peak ([0-9.]+) (GiB|MiB) \(arrays", err)
    if got is None:
        raise RuntimeError(f"{row['name']}: no plan line in the run's output:\n{err[-2000:]}")
    estimate = float(got.group(1)) * (2**30 if got.group(2) == "GiB" else 2**20)
    return {"name": row["name"], "estimate": estimate, "measured": bc.run_summary(out)["peak"], "train": 1, "init": 0,
            "how": "the launch's plan vs the run's own max RSS", "on_gpu": False, "seconds": time.perf_counter() - tic}


def measure(row: dict, root: Path, verbose: bool = False) -> dict:
    """Run one MATRIX row in a fresh subprocess; returns the worker's result with ratio = estimate / measured."""
    if row.get("demo"):
        result = measure_demo(row, root)
        result["ratio"] = result["estimate"] / max(result["measured"], 1)
        return result
    out_dir = Path(tempfile.mkdtemp(prefix=f"run_{row['name']}_", dir=root))
    if row.get("nproc"):
        shutil.rmtree(out_dir)  # forge makes the run dir itself
        result = measure_ranks(row, bundled_sets(row, demo_subset(root, row["kind"], row["rows"]), out_dir), out_dir)
        result["ratio"] = result["estimate"] / max(result["measured"], 1)
        return result
    if row.get("model"):
        sets = bundled_sets(row, demo_subset(root, row["kind"], row["rows"]), out_dir)
    else:
        sets = config_sets(row, make_model(root, row), make_data(root, row["kind"], row["seq"]), out_dir)
    spec = {"name": row["name"], "backend": row["backend"], "kind": row["kind"], "sets": sets}
    env = TORCH_CPU_ENV if row["backend"] == "cuda" else None
    result = bc.run_worker(Path(__file__), spec, env=env, timeout=900, verbose=verbose)
    result["ratio"] = result["estimate"] / max(result["measured"], 1)
    return result


def describe(row: dict, result: dict | None = None) -> str:
    if row.get("demo"):
        return f"`forge {'train' if row['kind'] == 'sft' else row['kind']} --backend cuda --config {row['demo']}` as is"
    bits = "fp" if row["bits"] == 0 else f"{row['bits']}-bit"
    extra = (f"{', ckpt' if row['ckpt'] else ''}{', packed' if row.get('packing') else ''}"
             f"{', per rank of ' + str(row['nproc']) if row.get('nproc') else ''}"
             f"{', DoRA' if row.get('dora') else ''}, {row['kind'].upper()}")
    if row.get("model"):
        seq = f"T<={result['data_seq']} (data)" if result else f"T<={row['seq']}"
        return f"SmolLM2-135M, demo rows, B{row['batch']} {seq}, r{row['rank']}, {bits}{extra}"
    moe = f" {row['moe']} {row['experts']} experts top-{row['top_k']}" if row.get("moe") else ""
    return (f"h{row['hidden']} L{row['layers']} i{row['intermediate']}{moe}, B{row['batch']} T{row['seq']}, "
            f"r{row['rank']}, {bits}{extra}")


def verdict(ratio: float) -> str:
    lo, hi = TARGET
    return "ok" if lo <= ratio <= hi else ("UNDER" if ratio < lo else "OVER")


def report_rows(rows: list[dict], results: list[dict]) -> list[list]:
    mib = 2**20
    return [[r["name"], "MLX" if r["backend"] == "mlx" else "torch", describe(r, x), f"{x['estimate'] / mib:.1f}",
             f"{x['measured'] / mib:.1f}", f"{x['ratio']:.2f}", verdict(x["ratio"]),
             "init" if x["init"] > x["train"] else "train"] for r, x in zip(rows, results)]


HEADER = ["row", "backend", "config", "estimate MiB", "measured MiB", "est/meas", "+-15%", "planned peak phase"]


def section(command: str, load_before: str, rows, results) -> str:
    note = ("estimate = the plan's total minus its `framework overhead` constant. measured: MLX "
            "`mx.get_peak_memory()` over model build + 3 training steps; torch on CPU: peak anonymous RSS "
            "(`RssAnon` sampled every 1 ms: tensors, not library code) minus RssAnon after imports, with "
            "`MALLOC_MMAP_THRESHOLD_=65536` so glibc returns freed tensors to the OS (so the plan's `allocator "
            "retention` is left out too). The torch-demo rows are the demo configs run as a user runs them: the "
            "planned peak the launch prints against the largest peak the run logs (its max RSS), both the "
            "whole process. Target "
            "0.90 <= est/meas <= 1.15; rows outside are marked UNDER / OVER.")
    body = bc.provenance(command, load_before, note)
    body += "\n\n" + bc.table(HEADER, report_rows(rows, results))
    misses = [x["name"] for x in results if verdict(x["ratio"]) != "ok"]
    body += "\n\n" + (f"Outside the target: {', '.join(misses)}." if misses else "Every row is within the target.")
    return body


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--only", default="", help="comma-separated row names")
    ap.add_argument("--backend", choices=["mlx", "cuda"], help="only this backend's rows")
    ap.add_argument("--small", action="store_true", help="only the rows the regression test runs")
    ap.add_argument("--bundled", action="store_true", help="only the rows on the bundled SmolLM2")
    ap.add_argument("--write", help="rewrite this file's '## Memory planner calibration' section")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.worker:
        bc.emit_result(worker(json.loads(args.worker)))
        return 0
    only = {n for n in args.only.split(",") if n}
    rows = [r for r in MATRIX if (not only or r["name"] in only) and (not args.backend or r["backend"] == args.backend)
            and (not args.small or r["small"]) and (not args.bundled or r.get("model") or r.get("demo"))]
    load_before = bc.machine()["load"]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        for row in rows:
            res = measure(row, Path(tmp), args.verbose)
            results.append(res)
            print(f"{row['name']:24s} est {res['estimate'] / 2**20:8.1f} MiB  meas {res['measured'] / 2**20:8.1f} MiB"
                  f"  ratio {res['ratio']:.2f}  {verdict(res['ratio'])}  ({res['seconds']:.1f}s)", flush=True)
    print(bc.table(HEADER, report_rows(rows, results)))
    if args.write:
        bc.write_section(args.write, TITLE, section(bc.command("bench_memory.py", argv), load_before, rows, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
