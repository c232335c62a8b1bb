"""Parity between forge_mlx and forge_cuda: the same weights in, the same numbers out.

    python tools/parity.py [--model HF_DIR]     a tiny random Llama when no model is given;
                                                prints each difference, exits 1 above tolerance

Everything runs in fp32 on a full-precision base (quant.bits 0), both backends in one process:
    logits    the same base + the same LoRA factors (random, B != 0)              <= 1e-4 absolute
    sft       sft_loss on one batch (token sum / count)                           <= 1e-4 relative
    dpo       dpo_loss on one concatenated chosen+rejected batch                   <= 1e-4 relative
    pissa     A0, B0 of the full SVD (the same numpy code on the same weights)    == 0
    schedule  learning rate of every update (warmup + cosine)                     <= 1e-6 relative
    adapter   an adapter saved by forge_mlx (mlx-lm layout), loaded by forge_cuda  <= 1e-4 on logits
forge_mlx is imported first: it preloads an optimized BLAS for MLX's CPU backend.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

# isort: off
import forge_mlx  # noqa: F401  (before mlx.core and torch: the BLAS preload)
import mlx.core as mx
# isort: on
import numpy as np
import torch

from forge_core.config import ForgeConfig

TOLERANCE = {"logits": 1e-4, "sft": 1e-4, "dpo": 1e-4, "pissa": 0.0, "schedule": 1e-6, "adapter": 1e-4}


def config(model_dir, init: str = "lora", rank: int = 4) -> ForgeConfig:
    cfg = ForgeConfig()
    cfg.model.path, cfg.model.dtype = str(model_dir), "float32"
    cfg.quant.bits, cfg.lora.init, cfg.lora.rank, cfg.lora.alpha = 0, init, rank, 2.0 * rank
    return cfg


def build_both(cfg: ForgeConfig, tensors: dict | None = None):
    """(mlx model, torch model, mlx factors, torch factors); `tensors` {module: (A (r,in), B (out,r))} go into both."""
    from forge_cuda.lora import load_trainable as cuda_load
    from forge_cuda.lora import tensors_to_flat
    from forge_cuda.model import build_model as cuda_build
    from forge_mlx.lora import load_trainable as mlx_load
    from forge_mlx.model import build_model as mlx_build

    mlx_model, _, _, mlx_factors = mlx_build(cfg)
    cuda_model, _, _, cuda_factors = cuda_build(cfg)
    if tensors is not None:
        # contiguous copies: an mx.array made from a transposed view keeps its strides, and
        # safetensors.numpy.save_file would later write such an array's raw memory (transposed values)
        mlx_load(mlx_model, {k: mx.array(np.ascontiguousarray(v)) for m, (a, b) in tensors.items()
                             for k, v in ((f"{m}.lora_a", a.T), (f"{m}.lora_b", b.T))})
        cuda_load(cuda_model, tensors_to_flat(tensors))
    mlx_model.eval()
    cuda_model.eval()
    return mlx_model, cuda_model, mlx_factors, cuda_factors


def random_adapter(cuda_model, seed: int = 0, std: float = 0.05) -> dict:
    """Random A and B (both non-zero) for every LoRA module of the model, canonical layout."""
    from forge_cuda.lora import flat_to_tensors, trainable_params

    rng = np.random.default_rng(seed)
    flat = {k: (std * rng.standard_normal(tuple(p.shape))).astype(np.float32)
            for k, p in trainable_params(cuda_model).items()}
    return flat_to_tensors(flat)[0]


def tokens(vocab: int, rows: int = 3, length: int = 24, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (rows, length)).astype(np.int32)


def logits_diff(mlx_model, cuda_model, ids: np.ndarray) -> float:
    a = np.array(mlx_model(mx.array(ids)).astype(mx.float32))
    with torch.no_grad():
        b = cuda_model(input_ids=torch.from_numpy(ids).long()).logits.float().numpy()
    return float(np.abs(a - b).max())


def batches(vocab: int, seed: int = 2) -> tuple[dict, dict]:
    """An SFT batch (3 rows) and a DPO batch (2 pairs: rows 0-1 chosen, 2-3 rejected) as numpy dicts."""
    rng = np.random.default_rng(seed)
    seq = tokens(vocab, 3, 25, seed)
    sft = {"inputs": seq[:, :-1], "targets": seq[:, 1:], "mask": (rng.random((3, 24)) < 0.6).astype(np.float32)}
    pairs = tokens(vocab, 4, 25, seed + 1)
    mask = np.zeros((4, 24), np.float32)
    mask[:, 10:] = 1.0  # completion tokens after a 10-token prompt
    dpo = {"inputs": pairs[:, :-1], "targets": pairs[:, 1:], "mask": mask,
           "ref_logps": (-40 + rng.standard_normal(4)).astype(np.float32)}
    return sft, dpo


def loss_diffs(mlx_model, cuda_model, vocab: int, beta: float = 0.1) -> dict:
    """Relative differences of sft_loss (sum/count) and dpo_loss (sum/pairs) on the same batches."""
    from forge_core.objectives.dpo import dpo_loss
    from forge_cuda import ops as cuda_ops
    from forge_mlx import ops as mlx_ops

    sft, dpo = batches(vocab)
    def to_mx(b):
        return {k: mx.array(v) for k, v in b.items()}

    def to_pt(b):
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()}

    ms, mc = mlx_ops.sft_loss(mlx_model, to_mx(sft))
    with torch.no_grad():
        cs, cc = cuda_ops.sft_loss(cuda_model, to_pt(sft))
        cd, cn, _ = dpo_loss(cuda_ops, cuda_model, to_pt(dpo), beta)
    md, mn, _ = dpo_loss(mlx_ops, mlx_model, to_mx(dpo), beta)
    a, b = ms.item() / mc.item(), cs.item() / cc.item()
    c, d = md.item() / mn.item(), cd.item() / cn.item()
    return {"sft": abs(a - b) / abs(a), "dpo": abs(c - d) / abs(c), "sft_loss": a, "dpo_loss": c}


def pissa_diff(mlx_factors: dict, cuda_factors: dict) -> float:
    if set(mlx_factors) != set(cuda_factors) or not mlx_factors:
        return float("inf")
    return max(float(np.abs(np.asarray(mlx_factors[p][i]) - cuda_factors[p][i]).max())
               for p in mlx_factors for i in (0, 1))


def schedule_diff(cfg: ForgeConfig, steps: int = 40) -> float:
    """forge_core.schedule (which both backends' optimizers receive) against mlx.optimizers' own schedules."""
    import mlx.optimizers as optim

    from forge_core.schedule import lr_schedule

    t = cfg.train
    warmup = min(t.warmup, steps - 1)
    decay = optim.cosine_decay(t.lr, steps - warmup, t.lr * t.min_lr_ratio)
    mlx_schedule = optim.join_schedules([optim.linear_schedule(t.lr / warmup, t.lr, warmup), decay], [warmup]) \
        if warmup > 0 else decay
    ours = lr_schedule(t, steps)
    return max(abs(mlx_schedule(mx.array(i)).item() - ours(i)) / t.lr for i in range(steps + 2))


def adapter_diff(cfg: ForgeConfig, mlx_model, out_dir) -> float:
    """forge_mlx.save_adapter (mlx-lm layout) -> forge_cuda.load_adapted: the same model on the torch side."""
    from forge_core.eval.evaluate import load_adapted
    from forge_core.models.sources import resolve_model
    from forge_cuda import ops as cuda_ops
    from forge_mlx.model import save_adapter

    save_adapter(out_dir, mlx_model, cfg, {}, resolve_model(cfg.model.path))
    cuda_model, _, _ = load_adapted(cuda_ops, str(out_dir))
    cuda_model.eval()
    return logits_diff(mlx_model, cuda_model, tokens(cuda_model.config.vocab_size, seed=5))


def run_all(model_dir) -> dict:
    """Every check of the module docstring -> {name: difference} (plus the loss values for context)."""
    cfg = config(model_dir)
    _, cuda_probe, _, _ = build_both(cfg)
    tensors = random_adapter(cuda_probe)
    mlx_model, cuda_model, _, _ = build_both(cfg, tensors)
    vocab = cuda_model.config.vocab_size
    out = {"logits": logits_diff(mlx_model, cuda_model, tokens(vocab))}
    out.update(loss_diffs(mlx_model, cuda_model, vocab))
    _, _, mlx_factors, cuda_factors = build_both(config(model_dir, init="pissa"))
    out["pissa"] = pissa_diff(mlx_factors, cuda_factors)
    warm = config(model_dir)
    warm.train.warmup, warm.train.lr = 5, 1e-3
    out["schedule"] = schedule_diff(warm)
    with tempfile.TemporaryDirectory() as tmp:
        out["adapter"] = adapter_diff(cfg, mlx_model, Path(tmp) / "adapter")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF model dir (default: a tiny random Llama built in a temp dir)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from tests.tiny import make_tiny_model

            model_dir = make_tiny_model(Path(tmp) / "tiny")
        diffs = run_all(model_dir)
    bad = [k for k, tol in TOLERANCE.items() if not diffs[k] <= tol]
    for k, tol in TOLERANCE.items():
        print(f"{k:9s} {diffs[k]:.3e}  (tolerance {tol:g}){'  FAIL' if k in bad else ''}")
    print(f"sft loss {diffs['sft_loss']:.6f}   dpo loss {diffs['dpo_loss']:.6f}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
