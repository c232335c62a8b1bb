"""DoRA vs LoRA on the bundled SmolLM2-135M: seconds per step and peak memory, side by side.

    python tools/bench_dora.py [--steps 12] [--rounds 2] [--write docs/BENCHMARKS.md]

Each round trains the SFT demo recipe (configs/demo.yaml: QPiSSA rank 16, 4-bit residual, batch 4) for --steps
steps with lora.dora off and on, alternating which goes first; a run's seconds per step is the median of its
steps after the first (which traces and compiles), its peak the largest the loop logged. Also the full-precision
base (quant.bits 0), where DoRA needs no dequantized copy for its row norms.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc
from bench_eval import BIN, timed


def one(bits: int, dora: bool, out: Path, steps: int) -> dict:
    timed([str(BIN / "forge"), "train", "--config", "configs/demo.yaml", "--steps", str(steps), "--out", str(out),
           "--quant", str(bits) if bits else "none", "--dora" if dora else "--no-dora", "--set", "train.log_every=1",
           "--set", "train.eval_every=0", "--set", "train.save_every=1000", "--set", "data.valid="], bc.ROOT)
    return bc.run_summary(out)


def main(argv=None) -> None:
    args = bc.side_by_side_args(__doc__, argv, steps=12, rounds=2)
    load_before = bc.machine()["load"]
    res = bc.side_by_side((4, 0), (False, True), args.rounds, partial(one, steps=args.steps))
    rows = [["4-bit (QPiSSA / QDoRA)" if bits else "full precision", *bc.compare_cells(res[(bits, False)],
                                                                                       res[(bits, True)])]
            for bits in (4, 0)]
    text = "\n".join([
        bc.provenance(bc.command("bench_dora.py", argv), load_before), "",
        bc.table(["base", "LoRA s/step", "DoRA s/step", "DoRA / LoRA", "LoRA peak GiB", "DoRA peak GiB",
                  f"LoRA loss @{args.steps}", f"DoRA loss @{args.steps}"], rows), "",
        (f"configs/demo.yaml (PiSSA rank 16 on all seven projections, batch 4, rows <= 256 tokens), {args.steps} steps, "
         f"{args.rounds} alternating rounds per pair; seconds per step: the median over rounds of each run's median "
         "step after the first. DoRA's extra work per adapted layer and step: the dense base weight (a 4-bit one "
         "dequantized), W + s·BA and its row norms.")])
    bc.publish(text, args.write, "DoRA vs LoRA")


if __name__ == "__main__":
    main()
