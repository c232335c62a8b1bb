"""SFT throughput: forge_mlx against mlx-lm's own LoRA trainer, same model, data and shapes.

    python tools/bench_sft.py [--write docs/BENCHMARKS.md] [--repeats 2] [--only forge-fp,mlxlm-blas-fp]
                              [--model smollm2-135m | HF_DIR]

Configurations (each in its own subprocess; run interleaved in rounds, medians reported; the slow ones
only in the first --slow-repeats rounds: their ratios are far from the targets, and each costs minutes):
    mlxlm-ref-*   (a) mlx-lm as a newcomer installs it: `mlx[cpu]` with the wheel's reference BLAS
                  (FORGE_NO_BLAS_PRELOAD=1, forge_mlx never imported), model as loaded (fp32 here)
    mlxlm-blas-*  (b) the same stock mlx-lm, but an optimized BLAS is preloaded (forge_mlx.blas) first
    forge-*       forge_mlx: its model build and its stepper's compiled step functions
    *-fp / *-q4   full-precision base / 4-bit base (affine, group 64). mlx-lm: quantize_model then
                  LoRA (QuantizedLinear -> quantized_matmul, embeddings quantized too, as mlx_lm.convert
                  -q does). forge: quant.bits=4 with init=lora (like for like); forge-qpissa for information.

mlx-lm is driven as `mlx_lm.lora --train` drives it: mlx_lm.load, linear_to_lora_layers on every
block, its ChatDataset over the same JSONL with mask_prompt on (--mask-prompt: loss on the assistant
tokens only, as forge trains by default; mlx-lm's compute does not depend on the mask, forge runs its
vocabulary head only where the loss is), CacheDataset, mlx_lm.tuner.trainer.train with TrainingArgs. Its own per-step reports
(steps_per_report=1) give tokens/sec and peak memory. forge counts tokens the way mlx-lm does (each
row's length, capped at the batch width), so tok/s compares like with like.

tok/s = tokens / seconds over the timed steps (after --warmup steps), tokens counted alike for both (each row's length capped at the batch width). Peak memory is
mx.get_peak_memory() over training, reset after the model is built (weights + training transients).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc

TRAIN = "data/demo/sft_train.jsonl"
MODEL = "smollm2-135m"  # --model's default: the bundled model every recorded `make bench` ran on
TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]

# name -> what runs; "slow" configs use --slow-steps/--slow-warmup (reference BLAS or quantized_matmul on CPU)
CONFIGS = {
    "mlxlm-ref-fp": {"kind": "mlxlm", "blas": False, "bits": 0, "slow": True, "label": "(a) mlx-lm, reference BLAS"},
    "mlxlm-ref-q4": {"kind": "mlxlm", "blas": False, "bits": 4, "slow": True, "label": "(a) mlx-lm, reference BLAS"},
    "mlxlm-blas-fp": {"kind": "mlxlm", "blas": True, "bits": 0, "slow": False, "label": "(b) mlx-lm, OpenBLAS preloaded"},
    "mlxlm-blas-q4": {"kind": "mlxlm", "blas": True, "bits": 4, "slow": True, "label": "(b) mlx-lm, OpenBLAS preloaded"},
    "mlxlm-tuned-fp": {"kind": "mlxlm", "blas": True, "malloc": True, "bits": 0, "slow": False,
                       "label": "mlx-lm, OpenBLAS + forge's malloc settings (info)"},
    "forge-fp": {"kind": "forge", "bits": 0, "init": "lora", "slow": False, "label": "forge_mlx, LoRA"},
    "forge-q4": {"kind": "forge", "bits": 4, "init": "lora", "slow": False, "label": "forge_mlx, QLoRA"},
    "forge-qpissa": {"kind": "forge", "bits": 4, "init": "pissa_niter_4", "slow": False,
                     "label": "forge_mlx, QPiSSA (info)"},
}

# (numerator, denominator, target or None, what the issue asks)
RATIOS = [
    ("forge-fp", "mlxlm-ref-fp", 15.0, "forge vs (a), full precision"),
    ("forge-q4", "mlxlm-ref-q4", 15.0, "forge vs (a), 4-bit"),
    ("forge-fp", "mlxlm-blas-fp", 1.5, "forge vs (b), full precision"),
    ("forge-q4", "mlxlm-blas-q4", 10.0, "forge vs (b), 4-bit"),
    ("forge-q4", "forge-fp", 0.8, "forge 4-bit vs forge full precision"),
    ("forge-qpissa", "forge-q4", None, "forge QPiSSA vs forge QLoRA (info)"),
    ("forge-fp", "mlxlm-tuned-fp", None, "forge vs mlx-lm with forge's BLAS and malloc settings (info)"),
]


# ---------------------------------------------------------------- workers (one configuration each)

def mlxlm_worker(spec: dict) -> dict:
    """Stock mlx-lm, set up as `mlx_lm.lora --train` does; the timing is mlx-lm's own report."""
    if not spec.get("malloc"):
        os.environ["FORGE_NO_MALLOC_TUNING"] = "1"  # importing forge_mlx would otherwise apply them
    if spec["blas"]:
        bc.preload_blas()  # (b); nothing else of forge_mlx is used
    import mlx.core as mx
    import mlx.optimizers as optim
    import mlx_lm
    import mlx_lm.utils
    import numpy as np
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset
    from mlx_lm.tuner.trainer import TrainingArgs, iterate_batches, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from forge_core.models.sources import resolve_model

    model_dir = resolve_model(spec.get("model", MODEL))
    np.random.seed(spec["seed"])
    model, tokenizer = mlx_lm.load(str(model_dir))
    if spec["bits"]:
        config = json.loads((model_dir / "config.json").read_text())
        mlx_lm.utils.quantize_model(model, config, group_size=64, bits=spec["bits"])
    mx.random.seed(spec["seed"])
    model.freeze()
    linear_to_lora_layers(model, len(model.layers),
                          {"rank": spec["rank"], "scale": spec["scale"], "dropout": 0.0, "keys": TARGETS})
    mx.eval(model.parameters())  # quantize_model is lazy: free the fp32 weights, as a quantized checkpoint would
    with open(TRAIN) as f:
        rows = [json.loads(line) for line in f]
    train_set = create_dataset(rows, tokenizer, types.SimpleNamespace(mask_prompt=True))

    class Reports(TrainingCallback):
        def __init__(self):
            self.items = []

        def on_train_loss_report(self, info):
            self.items.append(info)

    reports, row_tokens = Reports(), []

    def recording_batches(*a, **kw):
        """mlx-lm's own batches, counting each step's tokens as forge counts them: with mask_prompt its
        report counts only the loss tokens, so its step time is converted back with these."""
        for batch, lengths in iterate_batches(*a, **kw):
            width = batch.shape[1] - 1  # the model sees batch[:, :-1]
            row_tokens.append(int(sum(min(int(n), width) for n in lengths[:, 1].tolist())))
            yield batch, lengths

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArgs(batch_size=spec["batch"], iters=spec["warmup"] + spec["steps"], val_batches=0,
                            steps_per_report=1, steps_per_eval=10**9, steps_per_save=10**9,
                            max_seq_length=spec["seq"], adapter_file=str(Path(tmp) / "adapters.safetensors"))
        resident = mx.get_active_memory()
        mx.reset_peak_memory()
        train(model, optim.AdamW(learning_rate=spec["lr"]), CacheDataset(train_set), None, args,
              training_callback=reports, iterate_batches=recording_batches)
    return {**_from_reports(reports.items, spec["warmup"], row_tokens), "resident_bytes": resident,
            "blas": bc.loaded_blas(),
            "dtype": _dtype(model)}


def _from_reports(items: list[dict], warmup: int, row_tokens: list[int]) -> dict:
    """mlx-lm reports cumulative trained (loss) tokens and their rate per report (one step each here):
    step seconds = trained tokens / rate; the step's tokens are counted as forge counts them."""
    timed, prev = [], 0
    for i, info in enumerate(items):
        trained = info["trained_tokens"] - prev
        prev = info["trained_tokens"]
        if i >= warmup:
            timed.append((row_tokens[i], trained / info["tokens_per_second"]))
    return {**bc.summarize(timed), "peak_bytes": max(info["peak_memory"] for info in items) * 1e9}


def forge_worker(spec: dict) -> dict:
    """forge_mlx's model build and its stepper's step functions, over forge's own SFT batches."""
    bc.preload_blas()  # before mlx.core is imported
    import mlx.core as mx
    from rich.console import Console

    from forge_core import objectives
    from forge_mlx import ops
    from forge_mlx.model import build_model

    total = spec["warmup"] + spec["steps"]
    cfg = bc.forge_config(spec["bits"], spec["init"], spec["rank"], spec["scale"], spec["batch"], spec["seq"],
                          total, TRAIN, seed=spec["seed"], lr=spec["lr"])
    cfg.model.path = spec.get("model", MODEL)  # forge_config names the bundled model
    mx.random.seed(spec["seed"])
    model, tokenizer, _, _ = build_model(cfg)
    obj = objectives.build("sft", cfg, ops, model, tokenizer, None, Console(stderr=True, quiet=True))

    def batches():
        while True:
            rows = [obj.rows[i] for i in obj.order.next_batch()]
            b = obj.batch(rows)  # exactly the trainer's batches
            yield b, bc.row_tokens([len(r.tokens) for r in rows], b["inputs"].shape[1])

    step = bc.forge_step(cfg, model, obj.loss_fn, total)
    resident = mx.get_active_memory()
    mx.reset_peak_memory()
    timed = bc.time_steps(step, batches(), spec["warmup"], spec["steps"])
    return {**bc.summarize(timed), "peak_bytes": mx.get_peak_memory(), "resident_bytes": resident,
            "blas": bc.loaded_blas(), "dtype": _dtype(model)}


def _dtype(model) -> str:
    """The compute dtype: that of the (never quantized) norm weights, e.g. 'float32'."""
    return str(model.layers[0].input_layernorm.weight.dtype).replace("mlx.core.", "")


def worker(spec: dict) -> None:
    bc.emit_result((mlxlm_worker if spec["kind"] == "mlxlm" else forge_worker)(spec))


# ---------------------------------------------------------------- parent: run, tabulate, write

def spec_for(name: str, args) -> dict:
    c = CONFIGS[name]
    slow = c["slow"]
    return {"name": name, "kind": c["kind"], "blas": c.get("blas", True), "bits": c["bits"],
            "init": c.get("init", "lora"), "batch": args.batch_size, "seq": args.seq_len, "rank": args.rank,
            "scale": args.scale, "lr": args.lr, "seed": args.seed, "model": args.model,
            "steps": args.slow_steps if slow else args.steps, "warmup": args.slow_warmup if slow else args.warmup}


def env_for(name: str) -> dict:
    """(a) must start MLX with its own BLAS; everything else may not have preloading disabled."""
    blas = CONFIGS[name].get("blas", True)
    return {"FORGE_NO_BLAS_PRELOAD": None if blas else "1"}


def run_all(names: list[str], args) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Every configuration, interleaved, in --repeats rounds (slow ones: the first --slow-repeats rounds).

    Each result records its round, so ratios can also be taken within a round (ratio_table). A failing
    configuration is reported, not fatal.
    """
    results, failed = {n: [] for n in names}, {}
    script = Path(__file__).resolve()
    for rep in range(args.repeats):
        for name in names:  # interleaved: slow drifts in machine load hit every configuration alike
            if name in failed or (CONFIGS[name]["slow"] and rep >= args.slow_repeats):
                continue
            try:
                res = bc.run_worker(script, spec_for(name, args), env_for(name), verbose=args.verbose)
            except RuntimeError as e:
                failed[name] = str(e).strip().splitlines()[-1]
                print(f"[{rep + 1}/{args.repeats}] {name:14s} FAILED: {failed[name]}", file=sys.stderr, flush=True)
                continue
            results[name].append({**res, "round": rep})
            print(f"[{rep + 1}/{args.repeats}] {name:14s} {res['tok_s']:9.1f} tok/s  "
                  f"step {res['step_s']:.2f}s  peak {res['peak_bytes'] / 2**20:.0f} MiB  blas: {res['blas']}",
                  file=sys.stderr, flush=True)
    return {n: r for n, r in results.items() if r}, failed


def result_table(results: dict[str, list[dict]], failed: dict[str, str], args) -> str:
    rows = []
    for name, c in CONFIGS.items():
        spec = spec_for(name, args)
        base = "4-bit g64" if c["bits"] else "full"
        if name in failed:
            rows.append([f"`{name}`", c["label"], base, f"FAILED: {failed[name]}"] + [""] * 7)
        if name not in results:
            continue
        runs = results[name]
        rows.append([f"`{name}`", c["label"], f"{base}, {runs[0]['dtype']} compute", runs[0]["blas"],
                     f"{bc.median_of(runs, 'tok_s'):.1f}", f"{bc.median_of(runs, 'step_s'):.2f}",
                     f"{bc.median_of(runs, 'resident_bytes') / 2**20:.0f}",
                     f"{bc.median_of(runs, 'peak_bytes') / 2**20:.0f}",
                     f"{spec['warmup']} + {spec['steps']}", len(runs),
                     " / ".join(f"{r['tok_s']:.1f}" for r in runs)])
    return bc.table(["config", "what", "base", "BLAS", "tok/s (median)", "step s",
                     "resident MiB", "peak MiB", "warm-up + timed steps", "runs", "tok/s per run"], rows)


def round_ratios(num: list[dict], den: list[dict]) -> list[float]:
    """tok/s ratio within each round both ran in: the two ran minutes apart, under the same machine state."""
    by_round = {r["round"]: r["tok_s"] for r in den}
    return [r["tok_s"] / by_round[r["round"]] for r in num if r["round"] in by_round]


def ratio_table(results: dict[str, list[dict]]) -> str:
    """Verdict on the ratio of the medians; the per-round ratios show how much it moves with the machine."""
    rows = []
    for num, den, target, what in RATIOS:
        if num not in results or den not in results:
            continue
        r = bc.median_of(results[num], "tok_s") / bc.median_of(results[den], "tok_s")
        verdict = "info" if target is None else ("meets" if r >= target else "MISSES")
        per_round = round_ratios(results[num], results[den])
        rounds = " / ".join(f"{x:.2f}" for x in per_round)
        if target is not None and per_round:
            rounds += f" ({sum(x >= target for x in per_round)} of {len(per_round)} meet)"
        rows.append([what, f"`{num}` / `{den}`", f"{r:.2f}x", rounds, "-" if target is None else f">= {target:g}x",
                     verdict])
    return bc.table(["comparison", "tok/s ratio", "ratio of medians", "ratio per round", "target", "verdict"], rows)


def report(results: dict[str, list[dict]], failed: dict[str, str], args, command: str, load_before: str) -> str:
    model = (f"model {args.model}" if args.model != MODEL
             else "SmolLM2-135M-Instruct (bundled; fp32 weights dequantized from its Q4_1 GGUF)")
    blocks = "all 30 blocks" if args.model == MODEL else "all blocks"
    note = (f"{model}, "
            f"{TRAIN}, batch {args.batch_size}, max seq len {args.seq_len}, LoRA rank {args.rank}, "
            f"scale {args.scale:g}, targets q,k,v,o,gate,up,down on {blocks}, AdamW lr {args.lr:g}. "
            "tok/s counts each row's tokens (capped at the batch width) the way mlx-lm reports them; "
            "resident = mx.get_active_memory() after the model is built (weights, LoRA); peak = "
            "mx.get_peak_memory() over training, reset after the build (so it includes the resident bytes). "
            f"Slow configurations (reference BLAS, or mlx-lm's 4-bit quantized_matmul on CPU) run only "
            f"{args.slow_warmup} + {args.slow_steps} steps in the first {min(args.slow_repeats, args.repeats)} "
            f"round(s); the others {args.warmup} + {args.steps} in each of {args.repeats} rounds. "
            "4-bit: mlx-lm's quantize_model also quantizes the tied embedding / lm_head (as mlx_lm.convert -q "
            "does) and computes with quantized_matmul; forge keeps embeddings in full precision "
            "(quant.embeddings=false) and, on CPU, dequantizes each layer for a BLAS matmul. forge clips "
            "gradients (max_grad_norm 1.0, its default); mlx-lm does not. Both compute the loss on the "
            "assistant tokens only (mlx-lm: mask_prompt; forge: its default). forge on the CPU also uses its "
            "exp kernels (model.fast_cpu_math), runs the vocabulary head only at trained positions and "
            "keeps freed memory in glibc's heap (forge_mlx/allocator.py); (b) gets the BLAS only, "
            "`mlxlm-tuned-fp` the BLAS and the malloc settings.")
    if args.label:
        note += f"\n\n{args.label}"
    return "\n\n".join([bc.provenance(command, load_before, note), result_table(results, failed, args),
                        ratio_table(results)])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--write", metavar="MD", help="replace the '## SFT throughput' section of this markdown file")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    p.add_argument("--repeats", type=int, default=2, help="rounds of every fast configuration")
    p.add_argument("--slow-repeats", type=int, default=1, help="rounds that also run the slow configurations")
    p.add_argument("--steps", type=int, default=20, help="timed steps (fast configurations)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (fast configurations)")
    p.add_argument("--slow-steps", type=int, default=3, help="timed steps for the slow configurations")
    p.add_argument("--slow-warmup", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--scale", type=float, default=1.0, help="LoRA scale (mlx-lm's scale; forge alpha = scale*rank)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=MODEL, help="the base both trainers load (a bundled name or an HF dir)")
    p.add_argument("--label", default="", help="a note printed under the provenance (e.g. 'machine was loaded')")
    p.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"--only: unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    load_before = bc.machine()["load"]
    results, failed = run_all(names, args)
    bc.publish(report(results, failed, args, bc.command("bench_sft.py", argv), load_before), args.write,
               "SFT throughput")


if __name__ == "__main__":
    main()
