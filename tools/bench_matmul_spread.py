"""How steady is this machine? One fp32 matmul timed in many fresh processes, back to back.

    python tools/bench_matmul_spread.py [--processes 12] [--reps 200] [--write docs/BENCHMARKS.md]

Every throughput figure in docs/BENCHMARKS.md is only as good as the machine under it. This times the
shape that dominates an SFT step here (256 tokens x 576 @ 576 x 1536, MLX on the CPU with the OpenBLAS
forge_mlx preloads) in --processes fresh interpreters, one after another, and reports GFLOP/s per
process. Identical code and inputs: any spread is the machine's (CPU placement by the hypervisor,
neighbours), and the SFT ratios should be read with it in mind. The last column shows where each
process's busy threads ran: two threads on different vCPUs in a slow process means the vCPUs were slow.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc

TITLE = "Machine steadiness"
SHAPE = (256, 576, 1536)


def worker(spec: dict) -> None:
    bc.preload_blas()
    import mlx.core as mx

    m, k, n = SHAPE
    a, b = mx.random.normal((m, k)), mx.random.normal((k, n))
    mx.eval(a, b)
    for _ in range(5):
        mx.eval(a @ b)
    times = []
    for _ in range(spec["reps"]):
        tic = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - tic)
    flops = 2 * m * k * n
    bc.emit_result({"median_gflops": flops / statistics.median(times) / 1e9, "best_gflops": flops / min(times) / 1e9,
                    "blas": bc.loaded_blas(), "threads": busy_threads()})


def busy_threads(min_seconds: float = 0.05) -> str:
    """This process's threads that used CPU: 'cpuN:seconds' each (the vCPU it last ran on), busiest first.

    Tells a slow process whose threads shared one vCPU apart from one whose vCPUs were slow themselves.
    """
    tick = os.sysconf("SC_CLK_TCK")
    seen = []
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        if seconds >= min_seconds:
            seen.append((seconds, int(fields[36])))  # field 39 of stat: the CPU it last ran on
    return " ".join(f"cpu{cpu}:{sec:.1f}s" for sec, cpu in sorted(seen, reverse=True))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--processes", type=int, default=12)
    p.add_argument("--reps", type=int, default=200, help="timed matmuls per process")
    p.add_argument("--label", default="")
    p.add_argument("--write", metavar="MD")
    args = p.parse_args(argv)
    if args.worker:
        import json

        return worker(json.loads(args.worker))
    load_before = bc.machine()["load"]
    runs = [bc.run_worker(Path(__file__).resolve(), {"reps": args.reps}) for _ in range(args.processes)]
    med = [r["median_gflops"] for r in runs]
    rows = [[i + 1, f"{r['median_gflops']:.0f}", f"{r['best_gflops']:.0f}", r["threads"]] for i, r in enumerate(runs)]
    note = (f"fp32 matmul {SHAPE[0]}x{SHAPE[1]} @ {SHAPE[1]}x{SHAPE[2]} on MLX's CPU stream ({runs[0]['blas']}), "
            f"{args.reps} timed calls in each of {args.processes} fresh processes run one after another. "
            f"Median GFLOP/s per process: lowest {min(med):.0f}, highest {max(med):.0f} "
            f"({max(med) / min(med):.2f}x apart), median {statistics.median(med):.0f}.")
    if args.label:
        note += f"\n\n{args.label}"
    text = "\n\n".join([bc.provenance(bc.command("bench_matmul_spread.py", argv), load_before, note),
                        bc.table(["process", "GFLOP/s (median call)", "GFLOP/s (best call)",
                                  "busy threads: last vCPU, CPU seconds"], rows)])
    bc.publish(text, args.write, TITLE)


if __name__ == "__main__":
    main()
