"""GRPO on the bundled SmolLM2-135M: the demo's held-out task metrics before and after, and where a step's time goes.

    python tools/bench_grpo.py [--steps 30] [--timing-steps 6] [--write docs/BENCHMARKS.md]

1. `forge demo --config configs/grpo_demo.yaml` (continuing from the SFT demo adapter, trained first when missing)
   and `configs/grpo_base_demo.yaml` (from the base model), as the user runs them: greedy answers to the 40 held-out
   prompts scored before and after (valid_json, exact, field_acc, strict), and each run's held-out mean reward.
2. Timing: the same recipe with grpo.beta 0.04 (so the reference pass is measured too) for --timing-steps steps;
   per step (median of steps 2.., step 1 compiles) the wall seconds split into sampling / reference / training
   (the rest of the step: the forward and backward, the update, the reward functions), sampling tok/s (new tokens
   per second of sampling), training tok/s (prompt + completion tokens per second of the training part) and the
   peak memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc
from bench_eval import BIN, ensure_adapter, timed

RECIPE = "configs/grpo_demo.yaml"
RECIPES = {"the SFT demo adapter": RECIPE, "the base model": "configs/grpo_base_demo.yaml"}


def demo(recipe: str, steps: int, out: Path) -> dict:
    timed([str(BIN / "forge"), "demo", "--config", recipe, "--set", f"train.steps={steps}",
           "--set", f"train.out_dir={out}", "--set", f"train.eval_every={max(1, steps // 2)}"], bc.ROOT)
    return json.loads((out / "demo_results.json").read_text())


def timing(steps: int, out: Path) -> dict:
    timed([str(BIN / "forge"), "grpo", "--config", RECIPE, "--steps", str(steps), "--out", str(out),
           "--set", "grpo.beta=0.04", "--set", "train.eval_every=0"], bc.ROOT)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["split"] == "train"][1:]  # step 1 traces and compiles

    def med(key):
        return statistics.median(r[key] for r in train)

    step, sample, ref = med("step_s"), med("time/sampling_s"), med("time/reference_s")
    # the loop's tok_s is a step's prompt + completion tokens over the whole step; over its training part alone:
    tokens = med("tok_s") * step
    return {"step_s": step, "sampling_s": sample, "reference_s": ref, "training_s": step - sample - ref,
            "sampling_tok_s": med("sampling_tok_s"), "training_tok_s": tokens / max(step - sample - ref, 1e-9),
            "peak": max(r["peak_memory"] for r in train), "length": med("completions/mean_length"), "steps": len(train)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="the demo run's steps")
    ap.add_argument("--timing-steps", type=int, default=6)
    ap.add_argument("--write", default=None, metavar="MD")
    args = ap.parse_args(argv)
    load_before = bc.machine()["load"]
    ensure_adapter()
    tmp = Path(tempfile.mkdtemp(prefix="forge-bench-grpo-"))
    results = {}
    try:
        for start, recipe in RECIPES.items():
            out = tmp / Path(recipe).stem
            d = demo(recipe, args.steps, out)
            d["valid"] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                          if '"valid"' in line]
            results[start] = d
            print(f"{recipe}: {d['before']} -> {d['after']}", file=sys.stderr)
        t = timing(args.timing_steps, tmp / "timing")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    keys = ["valid_json", "exact", "field_acc", "strict"]
    parts = [bc.provenance(bc.command("bench_grpo.py", argv), load_before), "",
             (f"**Held-out task metrics**: greedy answers to the 40 held-out prompts (data/demo/grpo_valid.jsonl), "
              f"before and after {args.steps} GRPO steps of 4 prompts x 4 completions, reward builtin:json_fields "
              "(field accuracy against the reference, forge eval's field_acc).")]
    for start, d in results.items():
        rows = [[k, f"{d['before'][k]:.4f}", f"{d['after'][k]:.4f}"] for k in keys]
        rewards = ", ".join(f"step {r['step']}: {r['reward']:.4f}" for r in d["valid"])
        parts += ["", f"From {start} (`{RECIPES[start]}`):", "", bc.table(["metric", "before", "after"], rows), "",
                  (f"The run's own held-out mean reward (greedy, at its evals): {rewards}. Median step "
                   f"{d['step_s']:.1f} s, peak {d['peak_memory'] / 2**30:.2f} GiB, {d['seconds']:.0f} s for the whole "
                   "demo (both evaluations included).")]
    split = [[f"{t['step_s']:.1f}", f"{t['sampling_s']:.1f}", f"{t['reference_s']:.2f}", f"{t['training_s']:.1f}",
              f"{t['sampling_tok_s']:.0f}", f"{t['training_tok_s']:.0f}", f"{t['peak'] / 2**30:.2f}"]]
    parts += ["", (f"**Where a step goes** (`{RECIPE}` with grpo.beta 0.04, median of steps 2-{t['steps'] + 1}; "
                   f"completions {t['length']:.0f} tokens on average):"), "",
              bc.table(["step s", "sampling s", "reference s", "training s", "sampling tok/s", "training tok/s",
                        "peak GiB"], split), "",
              ("Sampling decodes the step's 16 completions at once from dense fp32 weights (adapters folded, the 4-bit "
               "base dequantized once and kept); the reference is one no-grad pass with the initial adapter swapped "
               "in; training is the rest of the step (forward + backward on prompt + completion, the update, the "
               "rewards). One run: this machine's noise is about ±15%.")]
    text = "\n".join(parts)
    bc.publish(text, args.write, "GRPO on the bundled model")


if __name__ == "__main__":
    main()
