"""DPO vs SFT step time and peak memory at equal tokens, forge_mlx on SmolLM2 with a 4-bit QPiSSA base.

    python tools/bench_dpo.py [--write docs/BENCHMARKS.md] [--repeats 2] [--steps 10] [--batch-size 4]

Equal tokens, exactly: both configurations read the same batches - B preference pairs from
data/demo/dpo_train.jsonl collated as ONE concatenated (2B, T) batch (prompt+chosen rows, then
prompt+rejected rows), in the same order (same BatchOrder seed). The SFT step trains on it with the SFT
loss (token NLL over the completion tokens); the DPO step with forge's DPO loss (sigmoid, beta 0.1)
against reference log-probs precomputed once before training (their scoring time is reported apart,
it is not in the step time). Both use forge's trainer step functions (forward + backward + AdamW).

Each configuration runs in its own subprocess, interleaved, --repeats times; medians are reported.
Target from the issue: DPO step time <= 2.2x SFT step time at equal tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc

TRAIN = "data/demo/dpo_train.jsonl"
TARGET = 2.2


def worker(spec: dict) -> None:
    bc.preload_blas()  # before mlx.core is imported
    import mlx.core as mx
    import numpy as np
    from rich.console import Console

    from forge_core import data as fdata
    from forge_core import objectives
    from forge_core.rundir import RunDir
    from forge_mlx import ops
    from forge_mlx.model import build_model

    total = spec["warmup"] + spec["steps"]
    cfg = bc.forge_config(4, spec["init"], spec["rank"], spec["scale"], spec["batch"], spec["seq"], total,
                          spec["train"], seed=spec["seed"])
    mx.random.seed(spec["seed"])
    model, tokenizer, _, _ = build_model(cfg)
    console = Console(stderr=True, quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        if spec["name"] == "dpo":  # scores every pair with the policy at init, once
            obj = objectives.build("dpo", cfg, ops, model, tokenizer, RunDir(tmp), console)
            rows, ref, pad, loss_fn = obj.rows, obj.ref, obj.pad, obj.loss_fn
        else:
            tok = ops.hf_tokenizer(tokenizer)
            rows, _ = fdata.load_preferences(cfg.data.train, tok, cfg.data, cfg.train.max_seq_len)
            ref, pad = None, fdata.pad_token_id(tok)
            loss_fn = lambda m, b: (*ops.sft_loss(m, b), {})
        setup_s = time.perf_counter() - tic
    order = fdata.BatchOrder(len(rows), cfg.train.batch_size, cfg.train.seed, cfg.data.shuffle)
    cap = fdata.loss_row_cap(rows)

    def batches():
        while True:
            idx = np.array(order.next_batch())
            chunk = [rows[i] for i in idx]
            b = fdata.add_loss_positions(fdata.collate_dpo(chunk, pad), cap)  # as the trainer batches
            if ref is not None:
                b["ref_logps"] = np.concatenate([ref[idx, 0], ref[idx, 1]]).astype(np.float32)
            lengths = [len(r.prompt) + len(r.chosen) for r in chunk] + [len(r.prompt) + len(r.rejected) for r in chunk]
            yield {k: mx.array(v) for k, v in b.items()}, bc.row_tokens(lengths, b["inputs"].shape[1])

    step = bc.forge_step(cfg, model, loss_fn, total)
    mx.reset_peak_memory()
    timed = bc.time_steps(step, batches(), spec["warmup"], spec["steps"])
    bc.emit_result({**bc.summarize(timed), "peak_bytes": mx.get_peak_memory(), "setup_s": setup_s,
                    "blas": bc.loaded_blas()})


def spec_for(name: str, args, train: str) -> dict:
    return {"name": name, "train": train, "batch": args.batch_size, "seq": args.seq_len, "rank": args.rank, "scale": args.scale,
            "init": args.init, "steps": args.steps, "warmup": args.warmup, "seed": args.seed}


def train_file(max_rows: int, tmp: str) -> str:
    """TRAIN, or its first max_rows rows (the DPO reference scores every training row before step 1)."""
    if not max_rows:
        return TRAIN
    from forge_core.atomic import write_text

    lines = (bc.ROOT / TRAIN).read_text().splitlines(keepends=True)[:max_rows]
    write_text(Path(tmp) / "dpo_train.jsonl", "".join(lines))
    return str(Path(tmp) / "dpo_train.jsonl")


def run_all(args) -> dict[str, list[dict]]:
    results = {"sft": [], "dpo": []}
    script = Path(__file__).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        train = train_file(args.max_rows, tmp)
        for rep in range(args.repeats):
            for name, runs in results.items():
                res = bc.run_worker(script, spec_for(name, args, train), {"FORGE_NO_BLAS_PRELOAD": None},
                                    verbose=args.verbose)
                runs.append(res)
                print(f"[{rep + 1}/{args.repeats}] {name}: step {res['step_s']:.3f}s  {res['tok_s']:.1f} tok/s  "
                      f"peak {res['peak_bytes'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    return results


def report(results: dict[str, list[dict]], args, command: str, load_before: str) -> str:
    note = (f"forge_mlx, SmolLM2-135M-Instruct (bundled; fp32 dequantized from its Q4_1 GGUF), 4-bit base "
            f"(affine, group 64), {args.init} rank {args.rank} scale {args.scale:g}, {TRAIN} "
            f"({args.max_rows or 'all'} pairs), {args.batch_size} pairs per step = one "
            f"({2 * args.batch_size}, T) batch for both losses, "
            f"max seq len {args.seq_len}, {args.warmup} warm-up + {args.steps} timed steps. The DPO reference "
            "log-probs are computed once before training (setup column; not in the step time). Peak = "
            "mx.get_peak_memory() over the timed loop, reset after setup.")
    if args.label:
        note += f"\n\n{args.label}"
    rows = []
    for name, runs in results.items():
        rows.append([name.upper(), f"{bc.median_of(runs, 'step_s'):.3f}", f"{bc.median_of(runs, 'tokens_per_step'):.0f}",
                     f"{bc.median_of(runs, 'tok_s'):.1f}", f"{bc.median_of(runs, 'peak_bytes') / 2**20:.0f}",
                     f"{bc.median_of(runs, 'setup_s'):.1f}", len(runs),
                     " / ".join(f"{r['step_s']:.3f}" for r in runs)])
    step = bc.median_of(results["dpo"], "step_s") / bc.median_of(results["sft"], "step_s")
    mem = bc.median_of(results["dpo"], "peak_bytes") / bc.median_of(results["sft"], "peak_bytes")
    ratios = [["DPO / SFT step time", f"{step:.2f}x", f"<= {TARGET:g}x", "meets" if step <= TARGET else "MISSES"],
              ["DPO / SFT peak memory", f"{mem:.2f}x", "-", "info"]]
    return "\n\n".join([
        bc.provenance(command, load_before, note),
        bc.table(["loss", "step s (median)", "tokens/step", "tok/s", "peak MiB", "setup s", "runs",
                  "step s per run"], rows),
        bc.table(["comparison", "measured", "target", "verdict"], ratios),
    ])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--write", metavar="MD", help="replace the '## DPO vs SFT' section of this markdown file")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4, help="preference pairs per step (2x sequences)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--init", default="pissa_niter_4", help="lora.init of the 4-bit run (QPiSSA by default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rows", type=int, default=0,
                   help="use only the first N pairs of the train file (0 = all; the reference scores them all)")
    p.add_argument("--label", default="", help="a note printed under the provenance (e.g. 'machine was loaded')")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    load_before = bc.machine()["load"]
    text = report(run_all(args), args, bc.command("bench_dpo.py", argv), load_before)
    bc.publish(text, args.write, "DPO vs SFT")


if __name__ == "__main__":
    main()
