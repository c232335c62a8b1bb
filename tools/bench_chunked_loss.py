"""The chunked loss head (train.chunked_loss) against the whole logits, on the bundled SmolLM2-135M: seconds per
step and peak memory, side by side.

    python tools/bench_chunked_loss.py [--steps 8] [--rounds 1] [--write docs/BENCHMARKS.md]

Each round trains three recipes with train.chunked_loss on and off, alternating which goes first: the SFT demo
(configs/demo.yaml: QPiSSA rank 16, 4-bit residual, batch 4), the same with gradient checkpointing, and the DPO demo
(configs/dpo_demo.yaml, chosen + rejected in one forward). A run's seconds per step is the median of its steps after
the first (which traces and compiles), its peak the largest the loop logged (mx.get_peak_memory).
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc
from bench_eval import BIN, timed

RECIPES = {  # name -> (forge command, config, extra --set items)
    "SFT demo": ("train", "configs/demo.yaml", []),
    "SFT demo, checkpointing": ("train", "configs/demo.yaml", ["train.grad_checkpoint=true"]),
    "DPO demo": ("dpo", "configs/dpo_demo.yaml", []),
}


def one(recipe: str, chunked: bool, out: Path, steps: int) -> dict:
    command, config, sets = RECIPES[recipe]
    sets = [*sets, f"train.chunked_loss={str(chunked).lower()}", "train.log_every=1", "train.eval_every=0",
            "train.save_every=1000", "data.valid="]
    timed([str(BIN / "forge"), command, "--config", config, "--steps", str(steps), "--out", str(out),
           *[x for s in sets for x in ("--set", s)]], bc.ROOT)
    return bc.run_summary(out)


def main(argv=None) -> None:
    args = bc.side_by_side_args(__doc__, argv, steps=8, rounds=1)
    load_before = bc.machine()["load"]
    res = bc.side_by_side(RECIPES, (True, False), args.rounds, partial(one, steps=args.steps))
    rows = [[recipe, *bc.compare_cells(res[(recipe, False)], res[(recipe, True)])] for recipe in RECIPES]
    text = "\n".join([
        bc.provenance(bc.command("bench_chunked_loss.py", argv), load_before), "",
        bc.table(["recipe", "whole s/step", "chunked s/step", "chunked / whole", "whole peak GiB", "chunked peak GiB",
                  f"whole loss @{args.steps}", f"chunked loss @{args.steps}"], rows), "",
        (f"{args.steps} steps, {args.rounds} alternating round(s) per pair; seconds per step: the median over rounds of "
         "each run's median step after the first. The chunked head recomputes each chunk's logits in the backward "
         "(one more h·Wᵀ matmul over the loss positions) and never holds the (positions x 49152) logits.")])
    bc.publish(text, args.write, "Chunked loss head")


if __name__ == "__main__":
    main()
