"""Data-parallel overhead: 1 process vs 2 processes (mlx.launch ring / torchrun gloo) on THIS machine, and
the expected scaling on real multi-device setups, computed from the measured step time and the all-reduce
volume (adapter gradients only).

    python tools/bench_data_parallel.py [--write docs/BENCHMARKS.md] [--backend mlx] [--steps 12]

Both runs are `forge train` on the bundled SmolLM2-135M with data/demo/sft_train.jsonl at the SAME global
batch: 1 process at batch 2·B, 2 processes at B each. Each run's metrics.jsonl (log_every 1) gives the
global tok/s of every step; the first --warmup steps are dropped, the median of the rest is reported. This
machine has 2 cores: two processes split them, so the figure is the cost of running data-parallel (the
all-reduce, duplicated work, the launcher), NOT a speed-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc

TRAIN = "data/demo/sft_train.jsonl"
# On-paper interconnects (assumptions, stated in the report): effective all-reduce bus bandwidth in GB/s
# and a per-all-reduce latency in ms.
LINKS = {
    "2 Macs, Thunderbolt 5 ring (MLX ring backend)": (2, 5.0, 0.5),
    "4 Macs, Thunderbolt 5 ring (MLX ring backend)": (4, 5.0, 0.5),
    "8 GPUs, NVLink (NCCL)": (8, 150.0, 0.05),
}


def run(nproc: int, batch: int, args, out: Path) -> dict:
    from forge_core.relaunch import launcher_command

    argv = ["train", "--backend", args.backend, "--model", "smollm2-135m", "--data", TRAIN, "--steps",
            str(args.warmup + args.steps), "--rank", str(args.rank), "--quant", str(args.quant), "--init", "lora",
            "--out", str(out), "--set", f"train.batch_size={batch}", "--set", f"train.max_seq_len={args.seq_len}",
            "--set", "train.log_every=1", "--set", "train.eval_every=0", "--set", "train.save_every=1000"]
    cmd = [sys.executable, "-m", "forge_core.cli", *argv] if nproc == 1 else launcher_command(nproc, args.backend, argv)
    tic = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=bc.ROOT)
    if res.returncode != 0:
        raise SystemExit(f"run with {nproc} process(es) failed:\n{res.stderr[-3000:]}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["split"] == "train"][args.warmup:]
    return {"tok_s": statistics.median(r["tok_s"] for r in train), "step_s": statistics.median(r["step_s"] for r in train),
            "wall_s": time.perf_counter() - tic, "runs": [r["tok_s"] for r in train]}


def adapter_params(args) -> int:
    """Trainable LoRA parameters of this configuration (the all-reduce volume in fp32 elements)."""
    from forge_core.config import ForgeConfig
    from forge_core.memory.estimate import ModelShape, lora_tensor_sizes, make_run
    from forge_core.models.known import known_model_config

    cfg = ForgeConfig()
    cfg.lora.rank = args.rank
    shape = ModelShape.from_config(known_model_config("smollm2-135m"))
    return sum(lora_tensor_sizes(make_run(cfg, shape, "sft", args.backend, False)))


def report(one: dict, two: dict, args, command: str, load_before: str) -> str:
    params = adapter_params(args)
    volume = 4 * params  # bytes of fp32 gradients summed per step (one buffer)
    step_one = one["step_s"]
    note = (f"SmolLM2-135M-Instruct (bundled), {TRAIN}, backend {args.backend}, LoRA rank {args.rank} on all 7 "
            f"targets of 30 blocks ({params / 1e6:.2f}M trainable parameters), base "
            f"{'full precision' if args.quant == 'none' else args.quant + '-bit'}, max seq len "
            f"{args.seq_len}; global batch {2 * args.batch_size} rows: 1 process x {2 * args.batch_size} vs 2 "
            f"processes x {args.batch_size}. tok/s counts padded rows x width, all ranks together; step s and tok/s: "
            f"medians of "
            f"{args.steps} steps after {args.warmup} warm-up steps. This machine has 2 cores: the 2-process run "
            "shares them, so its ratio is the overhead of data-parallel training here, not a speed-up.")
    rows = [[name, f"{r['step_s']:.2f}", f"{r['tok_s']:.1f}", f"{r['wall_s']:.0f}", " / ".join(f"{x:.0f}" for x in r["runs"])]
            for name, r in (("1 process", one), ("2 processes (mlx.launch ring)", two))]
    paper = []
    for name, (n, gbps, lat_ms) in LINKS.items():
        ring = 2 * (n - 1) / n * volume / (gbps * 1e9) + lat_ms / 1e3  # ring all-reduce: 2(n-1)/n of the buffer
        paper.append([name, f"{volume / 2**20:.1f} MiB", f"{gbps:g} GB/s, {lat_ms:g} ms",
                      f"{ring * 1e3:.2f} ms", f"{step_one / (step_one + ring):.1%}"])
    return "\n\n".join([
        bc.provenance(command, load_before, note),
        bc.table(["run", "step s", "tok/s", "wall s (incl. start-up and model build)", "tok/s per step"], rows),
        bc.table(["comparison", "ratio"], [["2 processes / 1 process, tok/s at the same global batch",
                                            f"{two['tok_s'] / one['tok_s']:.2f}x"]]),
        "Expected scaling elsewhere, on paper: each rank computes its share of the batch in the single-device "
        f"step time measured here ({step_one:.2f} s for {2 * args.batch_size} rows, a stand-in: a Mac or a GPU "
        "is faster, which makes the all-reduce share larger), then the ring all-reduce of the adapter "
        "gradients. Efficiency = step / (step + all-reduce); the bandwidths and latencies are assumptions, "
        "not measurements.",
        bc.table(["setup", "all-reduce volume", "assumed bus bandwidth, latency", "all-reduce time",
                  "efficiency per rank"], paper),
    ])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", metavar="MD", help="replace the '## Data-parallel' section of this markdown file")
    p.add_argument("--backend", default="mlx", choices=["mlx", "cuda"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2, help="rows per process in the 2-process run")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--quant", default="none", choices=["none", "4", "8"])
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    load_before = bc.machine()["load"]
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, 2 * args.batch_size, args, Path(tmp) / "one")
        two = run(2, args.batch_size, args, Path(tmp) / "two")
    bc.publish(report(one, two, args, bc.command("bench_data_parallel.py", argv), load_before), args.write,
               "Data-parallel")


if __name__ == "__main__":
    main()
