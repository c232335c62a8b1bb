"""Fidelity of QPiSSA vs QLoRA on SmolLM2: weight reconstruction error, and held-out loss after training.

    python tools/fidelity.py [--write docs/BENCHMARKS.md] [--blocks 0,10,20,29] [--ranks 16,64] [--steps 30]
                             [--pissa-init pissa,pissa_niter_2,pissa_niter_4,pissa_niter_8]

1. Reconstruction, per target linear W (out, in) of the chosen blocks, relative Frobenius errors
       QLoRA:   ||W - Q(W)||_F / ||W||_F
       QPiSSA:  ||W - (Q(W_res) + s·B0·A0)||_F / ||W||_F,   (A0, B0, W_res) = pissa_factors(W, r, s) (full SVD)
   with Q = MLX affine quantization (mx.quantize / mx.dequantize), 4 bits, group 64, as forge_mlx uses.
   Also shown, for information: ||W - Q32(W)|| / ||W|| at group 32, with MLX's quantizer and with a plain
   min/max one. The bundled weights are the Q4_1 GGUF dequantized: every W already lies EXACTLY on a
   4-bit min/max grid with groups of 32 (the min/max column reads 0), while mx.quantize, which moves the
   grid so that an edge value is representable, does not reproduce it. Read the ratios as specific to
   this base: a model released in fp16/bf16 has no such grid.
2. Held-out loss: the demo recipe (configs/demo.yaml: 4-bit base, rank 16, alpha 16, lr, batch) trained
   with forge_core.train.train (MLX) for --steps steps on data/demo/sft_train.jsonl, once with init=lora and
   once with init=pissa (same seed, lr, steps, data order); loss on data/demo/sft_valid.jsonl at init and
   at the end. The full-precision base's loss is the reference point.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


# ---------------------------------------------------------------- 1. reconstruction (pure functions)

def qdq(w: np.ndarray, bits: int = 4, group_size: int = 64) -> np.ndarray:
    """MLX affine quantize -> dequantize round trip of an (out, in) fp32 matrix (groups along `in`)."""
    bc.preload_blas()  # before mlx.core is imported, if this is the first import
    import mlx.core as mx

    q, scales, biases = mx.quantize(mx.array(w, dtype=mx.float32), group_size=group_size, bits=bits)
    return np.array(mx.dequantize(q, scales, biases, group_size=group_size, bits=bits))


def minmax_qdq(w: np.ndarray, bits: int = 4, group_size: int = 32) -> np.ndarray:
    """Plain min/max affine round trip (llama.cpp Q4_1 style): x ~ min + d·round((x - min)/d), d = (max-min)/(2^b-1).

    Unlike mx.quantize, which moves the grid so that an edge value sits on it, this reproduces any
    matrix that is already on a min/max grid exactly - the bundled GGUF weights are (Q4_1, group 32).
    """
    g = np.asarray(w, np.float32).reshape(w.shape[0], -1, group_size)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    d = (hi - lo) / (2**bits - 1)
    q = np.round((g - lo) / np.where(d == 0, 1, d))
    return (lo + d * q).reshape(w.shape)


def rel_err(w: np.ndarray, approx: np.ndarray) -> float:
    """||w - approx||_F / ||w||_F, accumulated in float64."""
    w64 = w.astype(np.float64)
    return float(np.linalg.norm(w64 - approx.astype(np.float64)) / np.linalg.norm(w64))


def reconstruction_errors(w: np.ndarray, rank: int, bits: int = 4, group_size: int = 64,
                          scale: float = 1.0, niter: int = 0) -> dict:
    """{'qlora': ||W - Q(W)|| / ||W||, 'qpissa': ||W - (Q(W_res) + s·B0A0)|| / ||W||} for one matrix
    (niter 0: PiSSA by full SVD; else the randomized SVD with niter subspace iterations)."""
    from forge_core.pissa import pissa_factors

    w = np.asarray(w, dtype=np.float32)
    a0, b0, w_res = pissa_factors(w, rank, scale, niter=niter)
    qpissa = qdq(w_res, bits, group_size) + scale * (b0 @ a0)
    return {"qlora": rel_err(w, qdq(w, bits, group_size)), "qpissa": rel_err(w, qpissa)}


def model_weights(blocks: list[int]) -> tuple[dict, int]:
    """{(block, target): W fp32} of the bundled SmolLM2 (the HF dir forge imports), and the block count."""
    import json

    from safetensors import safe_open

    from forge_core.models.sources import resolve_model

    model_dir = resolve_model("smollm2-135m")
    n_blocks = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    blocks = blocks or list(range(n_blocks))
    out = {}
    with safe_open(str(model_dir / "model.safetensors"), "np") as f:
        for b in blocks:
            for t in TARGETS:
                out[(b, t)] = f.get_tensor(f"model.layers.{b}.{PARENT[t]}.{t}.weight").astype(np.float32)
    return out, n_blocks


def reconstruction_errs(weights: dict, ranks: list[int], bits: int, group_size: int) -> dict:
    """{target: {column: [error per block]}}: qlora, r<rank> (QPiSSA), g32 (MLX at group 32), mm32 (min/max g32)."""
    errs = {t: {} for t in TARGETS}
    for (block, t), w in weights.items():
        cols = errs[t]
        cols.setdefault("qlora", []).append(rel_err(w, qdq(w, bits, group_size)))
        cols.setdefault("g32", []).append(rel_err(w, qdq(w, bits, 32)))
        cols.setdefault("mm32", []).append(rel_err(w, minmax_qdq(w, bits, 32)))
        for r in ranks:
            cols.setdefault(f"r{r}", []).append(reconstruction_errors(w, r, bits, group_size)["qpissa"])
        print(f"  block {block} {t}: qlora {cols['qlora'][-1]:.4f}", file=sys.stderr, flush=True)
    return errs


def reconstruction_table(errs: dict, ranks: list[int], group_size: int) -> str:
    """Markdown table: per target (and over all), the mean over blocks of each error, QPiSSA / QLoRA ratio."""
    merged = {}
    for cols in errs.values():
        for c, v in cols.items():
            merged.setdefault(c, []).extend(v)
    rows = []
    for name, cols in [*errs.items(), ("**all**", merged)]:
        if not cols:
            continue
        ql = float(np.mean(cols["qlora"]))
        row = [name, f"{ql:.4f}"]
        for r in ranks:
            qp = float(np.mean(cols[f"r{r}"]))
            row.append(f"{qp:.4f} ({qp / ql:.2f}x)")
        rows.append(row + [f"{float(np.mean(cols[c])):.4f}" for c in ("g32", "mm32")])
    header = ["target", f"QLoRA g{group_size}"] + [f"QPiSSA r{r} g{group_size} (vs QLoRA)" for r in ranks]
    return bc.table(header + ["MLX g32 (info)", "min/max g32 (info)"], rows)


def randomized_table(weights: dict, inits: list[str], rank: int, bits: int, group_size: int) -> str:
    """Full SVD vs the randomized one, per init: QPiSSA's mean reconstruction error over `weights`, its ratio to
    QLoRA's, and the seconds the factorization of every matrix in `weights` took (one after the other)."""
    import time

    from forge_core.config import lora_init_kind

    rows, qlora = [], float(np.mean([rel_err(w, qdq(w, bits, group_size)) for w in weights.values()]))
    for init in inits:
        _, niter = lora_init_kind(init)
        errs, seconds = [], 0.0
        for w in weights.values():
            t0 = time.perf_counter()
            errs.append(reconstruction_errors(w, rank, bits, group_size, niter=niter)["qpissa"])
            seconds += time.perf_counter() - t0
        err = float(np.mean(errs))
        rows.append([init, f"{err:.5f}", f"{err / qlora:.3f}x", f"{seconds:.1f}"])
        print(f"  {init}: error {err:.5f} in {seconds:.1f}s", file=sys.stderr, flush=True)
    return bc.table(["init", f"QPiSSA r{rank} g{group_size} error", "vs QLoRA",
                     f"seconds for these {len(weights)} matrices (SVD + quantize round trip)"], rows)


# ---------------------------------------------------------------- 2. held-out loss after equal steps

def demo_config(recipe: str, init: str, steps: int, out_dir: str):
    from forge_core.config_parse import build_config

    cfg = build_config(recipe)
    cfg.lora.init, cfg.train.steps, cfg.train.out_dir = init, steps, out_dir
    cfg.train.eval_every, cfg.train.save_every, cfg.train.log_every = 0, steps, max(1, steps // 5)
    return cfg


def loss_at_init(cfg, console) -> tuple[float, dict]:
    """Validation loss of the model as built (step 0), and the PiSSA factors it used."""
    import mlx.core as mx

    from forge_core import objectives
    from forge_mlx import ops

    mx.random.seed(cfg.train.seed)
    model, tokenizer, _, factors = ops.build_model(cfg)
    return objectives.build("sft", cfg, ops, model, tokenizer, None, console).evaluate()["loss"], factors


def train_and_eval(cfg, console) -> dict:
    """Init loss, then forge_core.train.train on MLX from exactly that init; final valid and train loss."""
    import mlx.core as mx

    from forge_core.adapters import safetensors_io as sio
    from forge_core.rundir import RunDir
    from forge_core.train import train
    from forge_mlx import ops
    from forge_mlx.lora import factors_to_flat

    init_loss, factors = loss_at_init(cfg, console)
    if factors:  # the run dir's documented PiSSA file: the trainer reuses these factors, no second SVD
        Path(cfg.train.out_dir).mkdir(parents=True, exist_ok=True)
        sio.save(Path(cfg.train.out_dir) / "pissa_init.safetensors", factors_to_flat(factors))
    mx.random.seed(cfg.train.seed)  # LoRA's random A: same draw as in loss_at_init
    run = RunDir(train(cfg, "sft", ops=ops, console=console))
    metrics = run.metrics()
    valid = [m for m in metrics if m["split"] == "valid"]
    train_recs = [m for m in metrics if m["split"] == "train"]
    return {"init": init_loss, "final": valid[-1]["loss"], "train": train_recs[-1]["loss"], "step": valid[-1]["step"]}


def run_name(init: str) -> str:
    return "QLoRA (init=lora)" if init == "lora" else f"QPiSSA (init={init})"


def heldout_table(args) -> str:
    from rich.console import Console

    console = Console(stderr=True, quiet=not args.verbose)
    with tempfile.TemporaryDirectory() as tmp:
        base_cfg = demo_config(args.recipe, "lora", args.steps, f"{tmp}/unused")
        base_cfg.quant.bits = 0
        base_loss, _ = loss_at_init(base_cfg, console)
        rows = [["full-precision base, no adapter (reference)", "fp32", f"{base_loss:.4f}", "-", "-"]]
        for init in ("lora", *args.pissa_init.split(",")):
            cfg = demo_config(args.recipe, init, args.steps, f"{tmp}/{init}")
            r = train_and_eval(cfg, console)
            print(f"  {init}: valid {r['init']:.4f} -> {r['final']:.4f}", file=sys.stderr, flush=True)
            rows.append([run_name(init), f"{cfg.quant.bits}-bit g{cfg.quant.group_size}", f"{r['init']:.4f}",
                         f"{r['final']:.4f} (step {r['step']})", f"{r['train']:.4f}"])
        for bits in args.init_only_bits:  # the same two inits on another base width, step 0 only
            for init in ("lora", *args.pissa_init.split(",")):
                cfg = demo_config(args.recipe, init, args.steps, f"{tmp}/unused")
                cfg.quant.bits = bits
                loss, _ = loss_at_init(cfg, console)
                rows.append([f"{run_name(init)}, init only", f"{bits}-bit g{cfg.quant.group_size}", f"{loss:.4f}",
                             "-", "-"])
    return bc.table(["run", "base", "valid loss at init", f"valid loss after {args.steps} steps",
                     "train loss (last logged)"], rows)


# ---------------------------------------------------------------- report

def report(args, command: str, load_before: str) -> str:
    blocks = [int(b) for b in args.blocks.split(",")] if args.blocks != "all" else []
    ranks = [int(r) for r in args.ranks.split(",")]
    parts = []
    if not args.skip_reconstruction:
        weights, n_blocks = model_weights(blocks)
        table = reconstruction_table(reconstruction_errs(weights, ranks, args.bits, args.group_size), ranks,
                                     args.group_size)
        used = "all" if not blocks else ", ".join(map(str, blocks))
        title = (f"**Reconstruction error** (relative Frobenius, mean over blocks {used} of {n_blocks}; "
                 f"{args.bits}-bit MLX affine; PiSSA by full SVD, scale 1):")
        parts += [title, table]
        if "," in args.pissa_init:
            title = (f"**Full vs randomized SVD** (blocks {used} of {n_blocks}, every target, rank {ranks[0]}, "
                     f"{args.bits}-bit, scale 1):")
            parts += [title, randomized_table(weights, args.pissa_init.split(","), ranks[0], args.bits,
                                              args.group_size)]
    if not args.skip_training:
        title = (f"**Held-out loss** ({args.recipe} with init=lora vs init={args.pissa_init}, same seed/lr/"
                 f"data order, {args.steps} steps, valid = data/demo/sft_valid.jsonl):")
        parts += [title, heldout_table(args)]
    note = ("Base: the bundled SmolLM2-135M-Instruct, imported from its **Q4_1 GGUF** (dequantized to fp32). "
            "Every target W therefore lies exactly on a 4-bit min/max grid with groups of 32: the min/max g32 "
            "column reproduces it (error 0), while MLX's affine quantizer (mx.quantize moves the grid so that an "
            "edge value is representable) does not, even at group 32. Errors and QPiSSA/QLoRA ratios are "
            "specific to this base; a model released in fp16/bf16 has no such grid.")
    if args.label:
        note += f"\n\n{args.label}"
    return "\n\n".join([bc.provenance(command, load_before, note)] + parts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", metavar="MD", help="replace the '## Fidelity' section of this markdown file")
    p.add_argument("--blocks", default="0,10,20,29", help="comma-separated block indices, or 'all'")
    p.add_argument("--ranks", default="16,64")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="training steps per run for the held-out loss")
    p.add_argument("--recipe", default="configs/demo.yaml")
    p.add_argument("--pissa-init", default="pissa",
                   help="pissa (full SVD) or pissa_niter_N, or several comma-separated (then also the full vs "
                        "randomized SVD table)")
    p.add_argument("--init-only-bits", default="8", type=lambda v: [int(b) for b in v.split(",") if b.strip()],
                   help="comma-separated base widths whose loss at init is also shown for both inits ('' = none)")
    p.add_argument("--skip-reconstruction", action="store_true")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--label", default="", help="a note printed under the provenance (e.g. 'machine was loaded')")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    bc.preload_blas()  # before anything imports mlx.core
    load_before = bc.machine()["load"]
    bc.publish(report(args, bc.command("fidelity.py", argv), load_before), args.write, "Fidelity")


if __name__ == "__main__":
    main()
