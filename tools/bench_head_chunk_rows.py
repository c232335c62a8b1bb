"""How many positions a chunk of the chunked loss head should hold (forge_core/memory/constants.py
head_chunk_rows): forge's SFT step (tools/bench_sft.py's forge worker: LoRA rank 16, full-precision base, demo data,
batch 2 x 256) with the chunk size forced to each of --rows, and with the whole logits (train.chunked_loss off),
each in a fresh process; seconds per step and MLX's peak, side by side.

    python tools/bench_head_chunk_rows.py [--model DIR] [--rows 8,16,32,64,128] [--steps 2] [--write MD]

Each chunk reads the whole (V, D) head weight: few rows make the head's matmuls bound by that read. --model: the
bundled SmolLM2-135M (V 49152) by default, or a float32 copy of a real shape (tools/bench_real_sizes.py builds
`<dir>-fp32`, e.g. /tmp/shapes/llama-3.2-1b-fp32: V 128256, D 2048).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc

TITLE = "Chunked head: positions per chunk"


def one(model: str, rows: int, steps: int) -> dict:
    """In this process: forge's step with `rows` positions a chunk (0: the whole logits)."""
    bc.preload_blas()
    import bench_sft
    import mlx.core as mx
    from rich.console import Console

    from forge_core import objectives
    from forge_mlx import head, ops
    from forge_mlx.model import build_model

    cfg = bc.forge_config(0, "lora", 16, 1.0, 2, 256, steps + 1, bench_sft.TRAIN)
    cfg.model.path = model
    if rows:
        head.head_chunk_rows = lambda vocab, *shape: rows
    else:
        cfg.train.chunked_loss = False
    mx.random.seed(0)
    net, tok, _, _ = build_model(cfg)
    obj = objectives.build("sft", cfg, ops, net, tok, None, Console(stderr=True, quiet=True))

    def batches():
        while True:
            picked = [obj.rows[i] for i in obj.order.next_batch()]
            b = obj.batch(picked)
            yield b, int(b["loss_positions"].size) if "loss_positions" in b else 0

    step = bc.forge_step(cfg, net, obj.loss_fn, steps + 1)
    mx.reset_peak_memory()
    timed = bc.time_steps(step, batches(), 1, steps)
    return {"s": sorted(t for _, t in timed)[len(timed) // 2], "positions": [n for n, _ in timed],
            "peak": mx.get_peak_memory()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", default="8,16,32,64,128")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--write", default=None, metavar="MD")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one(args.model, args.one, args.steps)))
        return
    load_before = bc.machine()["load"]
    results = {}
    for rows in [int(r) for r in args.rows.split(",")] + [0]:
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--steps", str(args.steps),
                              "--one", str(rows)], capture_output=True, text=True, check=True).stdout
        results[rows] = json.loads(out.strip().splitlines()[-1])
        print(f"{rows or 'whole'}: {results[rows]['s']:.2f} s/step", file=sys.stderr, flush=True)
    whole = results[0]["s"]
    table = bc.table(["positions per chunk", "s/step (median)", "vs whole logits", "MLX peak MiB"],
                     [[r or "whole logits", f"{v['s']:.2f}", f"{v['s'] / whole:.2f}x", v["peak"] >> 20]
                      for r, v in results.items()])
    text = "\n".join([
        bc.provenance("python tools/bench_head_chunk_rows.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                      load_before),
        "",
        (f"forge's SFT step on `{args.model}` (LoRA rank 16, full-precision base, demo data, batch 2 x 256; loss "
         f"positions per step, padded as the loop pads them: {results[0]['positions']}), 1 warm-up + {args.steps} timed steps, a fresh process "
         "per row; the chunk size forced, or train.chunked_loss off."),
        "", table])
    bc.publish(text, args.write, TITLE)


if __name__ == "__main__":
    main()
