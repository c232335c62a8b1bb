"""MLX CPU kernels: MLX's own ops against forge_mlx/cpu_math.py's, and glibc's malloc settings on/off.

    python tools/bench_cpu_kernels.py [--reps 30] [--write docs/BENCHMARKS.md]

Two workers (fresh processes, forge_mlx imported first, so the same OpenBLAS): one with forge's malloc
settings (forge_mlx/allocator.py), one with FORGE_NO_MALLOC_TUNING=1. Each times every op pair
interleaved (MLX, forge, MLX, forge, ...), compiled with mx.compile as the trainer's step is, and
reports medians. "fwd+bwd" is mx.grad of the op's sum (times a fixed random tensor) wrt its inputs.
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

TITLE = "MLX CPU kernels"


def _cases(mx, nn, cm, unpack_affine):
    """(name, shape text, elements, MLX fn, forge fn, args)."""
    r = lambda *s: mx.random.normal(s)
    a, b = r(256, 1536), r(256, 1536)
    big = r(256, 49152)
    scores = r(2, 3, 384, 128) * 3
    targets = mx.zeros((256,), mx.int32)

    def grad(f, n):
        return mx.grad(lambda *xs: (f(*xs) * 1.0).sum(), argnums=tuple(range(n)))

    def attn(t):
        q, k, v = r(2, 9, t, 64), r(2, 3, t, 64), r(2, 3, t, 64)
        ref = lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal")
        ours = lambda q, k, v: cm.attention(q, k, v, 0.125, "causal")
        return ("causal attention fwd+bwd", f"B2 H9/3 T{t} d64", 2 * 9 * t * t, grad(ref, 3), grad(ours, 3), (q, k, v))

    silu = lambda g, x: nn.silu(g) * x
    packed = mx.quantize(r(1536, 576) * 0.02, group_size=64, bits=4)
    ce = lambda x: nn.losses.cross_entropy(x, targets, reduction="none")
    return [
        ("exp", "256x1536", a.size, mx.exp, cm.fast_exp, (a,)),
        ("exp", "256x49152", big.size, mx.exp, cm.fast_exp, (big - 5,)),
        ("softmax fwd+bwd", "2x3x384x128", scores.size, grad(lambda x: mx.softmax(x, axis=-1), 1),
         grad(cm.softmax, 1), (scores,)),
        ("SwiGLU fwd+bwd", "256x1536", a.size, grad(silu, 2), grad(cm.swiglu, 2), (a, b)),
        ("cross-entropy fwd+bwd", "256x49152", big.size, grad(ce, 1),
         grad(lambda x: cm.nll(x, targets), 1), (big,)),
        attn(128),
        attn(512),
        ("4-bit dequantize (forge: unpack_affine)", "1536x576 g64", 1536 * 576,
         lambda w, s, b: mx.dequantize(w, s, b, group_size=64, bits=4),
         lambda w, s, b: unpack_affine(w, s, b, 64, 4), packed),
        ("add (allocation cost)", "256x49152", big.size, lambda x: x + 1.0, lambda x: x + 1.0, (big,)),
    ]


def worker(spec: dict) -> None:
    if not spec["malloc"]:
        os.environ["FORGE_NO_MALLOC_TUNING"] = "1"
    import mlx.core as mx
    from mlx import nn

    import forge_mlx  # noqa: F401  (BLAS preload, malloc settings)
    from forge_mlx import allocator, cpu_math
    from forge_mlx.quant import unpack_affine

    mx.random.seed(0)
    out = []
    for name, shape, n, ref, ours, args in _cases(mx, nn, cpu_math, unpack_affine):
        mx.eval(*args)
        fns = [mx.compile(ref), mx.compile(ours)]
        times = [[], []]
        for i in range(spec["reps"] + 2):
            for j, f in enumerate(fns):
                t0 = time.perf_counter()
                mx.eval(f(*args))
                if i >= 2:  # the first two calls compile
                    times[j].append(time.perf_counter() - t0)
        out.append({"name": name, "shape": shape, "n": n, "mlx_ms": 1e3 * statistics.median(times[0]),
                    "forge_ms": 1e3 * statistics.median(times[1])})
    bc.emit_result({"malloc": allocator.keep_freed_memory(), "rows": out})


def report(with_m: dict, without: dict, command: str, load_before: str, label: str = "") -> str:
    rows = []
    for a, b in zip(with_m["rows"], without["rows"]):
        ns = lambda ms: ms * 1e6 / a["n"]
        rows.append([a["name"], a["shape"], f"{b['mlx_ms']:.2f} ({ns(b['mlx_ms']):.1f})",
                     f"{b['forge_ms']:.2f} ({ns(b['forge_ms']):.1f})", f"{b['mlx_ms'] / b['forge_ms']:.2f}x",
                     f"{a['mlx_ms']:.2f} ({ns(a['mlx_ms']):.1f})", f"{a['forge_ms']:.2f} ({ns(a['forge_ms']):.1f})",
                     f"{a['mlx_ms'] / a['forge_ms']:.2f}x"])
    note = ("ms per call, median, compiled (ns per element, or per attention score, in brackets). MLX: MLX's own "
            "op (mx.exp, mx.softmax, nn.silu, nn.losses.cross_entropy, mx.fast.scaled_dot_product_attention, "
            "mx.dequantize); forge: forge_mlx/cpu_math.py (dequantize: forge_mlx/quant.py unpack_affine). Left half: glibc defaults (FORGE_NO_MALLOC_TUNING=1); right half: with forge's "
            "malloc settings (forge_mlx/allocator.py), as forge trains. The last row is the same op on both sides: "
            "it shows the allocator's effect alone." + (f"\n\n{label}" if label else ""))
    header = ["op", "shape", "MLX, glibc default", "forge, glibc default", "ratio",
              "MLX, forge malloc", "forge, forge malloc", "ratio"]
    return bc.provenance(command, load_before, note) + "\n\n" + bc.table(header, rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--label", default="")
    p.add_argument("--write", metavar="MD")
    args = p.parse_args(argv)
    if args.worker:
        import json

        worker(json.loads(args.worker))
        return 0
    load_before = bc.machine()["load"]
    script = Path(__file__)
    without = bc.run_worker(script, {"name": "glibc-default", "malloc": False, "reps": args.reps})
    with_m = bc.run_worker(script, {"name": "forge-malloc", "malloc": True, "reps": args.reps})
    bc.publish(report(with_m, without, bc.command("bench_cpu_kernels.py", argv), load_before, args.label),
               args.write, TITLE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
