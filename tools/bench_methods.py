"""The preference methods side by side on the bundled model: the demo recipes, the same data, steps and start.

    python tools/bench_methods.py [--write docs/BENCHMARKS.md] [--methods dpo,orpo,simpo,kto,cpo] [--steps 30]

Every method trains from the base SmolLM2-135M-Instruct (4-bit QPiSSA, rank 16) on data/demo/dpo_train.jsonl
with its configs/<method>_demo.yaml (DPO's recipe continues from the SFT demo adapter; here it starts from the
base like the others: --set dpo.adapter=), the same steps and batch, each at its method's default lr. The
starting policy is measured once; each method runs in its own subprocess (a clean peak-memory reading).
Held-out, on data/demo/dpo_valid.jsonl:
    policy prefers chosen   share of pairs with log π(y_w) > log π(y_l)
    implicit reward         h = [log π(y_w) − log π_0(y_w)] − [log π(y_l) − log π_0(y_l)] against the base π_0:
                            accuracy = share with h > 0, margin = mean h (the same yardstick for every method)
    own reward acc / margin the method's own held-out rewards from the run's last eval (DPO/KTO: β·log-ratio vs
                            the reference; ORPO/SimPO/CPO: β·log-prob, mean or sum)
    JSON task               greedy answers (40 new tokens) to the first 24 prompts, scored against chosen
plus the median seconds per step (after the first) and the MLX peak memory of the run.
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

METHODS = ["dpo", "orpo", "simpo", "kto", "cpo"]


def _config(method: str, out: str, steps: int):
    from forge_core.run_config import resolve

    sets = [f"train.out_dir={out}", f"train.steps={steps}"]
    if method == "dpo":
        sets.append("dpo.adapter=")  # from the base, like the others
    recipe = "configs/demo.yaml" if method == "base" else f"configs/{method}_demo.yaml"
    cfg = resolve("sft" if method == "base" else method, recipe, sets)  # as `forge <method>` resolves it
    if method == "base":  # the pairs, for measuring the starting policy
        cfg.data.train, cfg.data.valid = "data/demo/dpo_train.jsonl", "data/demo/dpo_valid.jsonl"
        cfg.eval.max_new_tokens, cfg.eval.limit = 40, 24
    return cfg


def worker(spec: dict) -> None:
    bc.preload_blas()
    import statistics

    from forge_core.eval.evaluate import evaluate_preferences
    from forge_core.launch import launch
    from forge_core.rundir import RunDir
    from forge_mlx import ops

    cfg = _config(spec["method"], spec["out"], spec["steps"])
    if spec["method"] == "base":
        res = evaluate_preferences(ops, cfg, adapter=None, with_task=True)
        res["logps"] = res["logps"].tolist()
        return bc.emit_result(res)
    tic = time.perf_counter()
    launch(cfg, kind=spec["method"])
    train_s = time.perf_counter() - tic
    res = evaluate_preferences(ops, cfg, adapter=str(Path(spec["out"]) / "adapter"), with_task=True)
    res["logps"] = res["logps"].tolist()
    recs = RunDir(spec["out"]).metrics()
    train = [r for r in recs if r["split"] == "train"]
    valid = [r for r in recs if r["split"] == "valid"]
    res.update({"lr": cfg.train.lr, "train_s": train_s, "own": valid[-1] if valid else {},
                "step_s": statistics.median(r["step_s"] for r in train[1:] or train),
                "peak_bytes": max(r["peak_memory"] for r in train)})
    bc.emit_result(res)


def run_all(args) -> dict:
    import numpy as np

    from forge_core.eval.evaluate import implicit_rewards

    script = Path(__file__).resolve()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ["base", *args.methods]:
            spec = {"method": method, "out": str(Path(tmp) / method), "steps": args.steps}
            tic = time.perf_counter()
            res = bc.run_worker(script, spec, {"FORGE_NO_BLAS_PRELOAD": None}, verbose=args.verbose)
            res["wall_s"] = time.perf_counter() - tic
            out[method] = res
            print(f"{method}: {res['wall_s']:.0f}s, prefers chosen {res['pref_accuracy']:.3f}, "
                  f"field_acc {res.get('field_acc', float('nan')):.3f}", file=sys.stderr, flush=True)
    base = np.array(out["base"]["logps"])
    for method in args.methods:
        out[method].update(implicit_rewards(base, np.array(out[method]["logps"])))
    return out


def _f(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def report(results: dict, args, command: str, load_before: str) -> str:
    base = results["base"]
    note = ("forge_mlx, SmolLM2-135M-Instruct (bundled), 4-bit QPiSSA base (pissa_niter_4, rank 16, alpha 16), "
            f"{args.steps} steps of 4 pairs (KTO: 4 rows, the pairs split in two) from data/demo/dpo_train.jsonl, "
            "max_seq_len 256, each method at its own default lr (forge_core/config.py), all from the base model. "
            "Held-out: the 30 pairs of data/demo/dpo_valid.jsonl; JSON task: greedy answers (40 new tokens) to "
            "their first 24 prompts, scored against chosen. Implicit reward: h = Δ log π(chosen) − Δ log π(rejected) "
            "against the base, per pair. Own reward: the method's own held-out reward accuracy / margin from its "
            "run's last eval. s/step: median over the logged steps after the first; peak: MLX peak memory of the run.")
    head = ["method", "lr", "prefers chosen", "implicit acc", "implicit margin", "own reward acc",
            "own reward margin", "valid JSON", "field acc", "exact", "s/step", "peak MiB", "wall s"]
    rows = [["base (before)", "-", _f(base["pref_accuracy"]), "0", "0", "-", "-", _f(base.get("valid_json")),
             _f(base.get("field_acc")), _f(base.get("exact")), "-", "-", f"{base['wall_s']:.0f}"]]
    for m in args.methods:
        r = results[m]
        own = r.get("own", {})
        rows.append([m.upper(), f"{r['lr']:g}", _f(r["pref_accuracy"]), _f(r["implicit_accuracy"]),
                     _f(r["implicit_margin"], 2), _f(own.get("rewards/accuracy")), _f(own.get("rewards/margin")),
                     _f(r.get("valid_json")), _f(r.get("field_acc")), _f(r.get("exact")), _f(r["step_s"], 2),
                     f"{r['peak_bytes'] / 2**20:.0f}", f"{r['wall_s']:.0f}"])
    if args.label:
        note += f"\n\n{args.label}"
    return "\n\n".join([bc.provenance(command, load_before, note), bc.table(head, rows)])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--write", metavar="MD", help="replace the '## Preference methods' section of this file")
    p.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m], default=METHODS)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--label", default="")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    load_before = bc.machine()["load"]
    text = report(run_all(args), args, bc.command("bench_methods.py", argv), load_before)
    bc.publish(text, args.write, "Preference methods")


if __name__ == "__main__":
    main()
