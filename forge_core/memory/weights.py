"""The frozen base as stored: each linear at its bits (affine scales, NF4 absmax, int8 rows), the embeddings and
head, and the dequantized copies a CPU matmul makes (formulas of estimate.py's model; constants in constants.py)."""

from __future__ import annotations

import math

from forge_core.memory.constants import NF4_BLOCK, NF4_DQ_BLOCK
from forge_core.memory.shape import Component, Run

# ------------------------------------------------------------------------------------------- weights

def linear_bytes(out: int, inp: int, run: Run) -> int:
    """One frozen base weight (out, in) as stored.

    affine (MLX): rows of ceil(in·bits/32) uint32 + per group of g: scale and bias in the compute dtype;
                  a weight whose in-dim is not a multiple of g stays dense (forge_mlx quantizable()).
    nf4 / fp4:    in·out/2 bytes + absmax per 64 weights: fp32, or with double quant 1 byte per block
                  plus an fp32 constant per 256 blocks.
    int8:         1 byte per weight + an fp32 scale per row (LLM.int8).
    """
    n, bits, g = out * inp, run.cfg.quant.bits, run.cfg.quant.group_size
    if run.mode == "none" or (run.mode == "affine" and inp % g):
        return n * run.cb
    if run.mode == "affine":
        return out * (math.ceil(inp * bits / 32) * 4 + (inp // g) * 2 * run.cb)
    if run.mode == "int8":
        return n + out * 4
    blocks = math.ceil(n / NF4_BLOCK)
    absmax = blocks + math.ceil(blocks / NF4_DQ_BLOCK) * 4 if run.cfg.quant.double_quant else blocks * 4
    return math.ceil(n / 2) + absmax


def embedding_bytes(run: Run) -> int:
    """embed_tokens (+ lm_head unless tied), each (V, h): quantized only with quant.embeddings."""
    s = run.shape
    one = linear_bytes(s.vocab, s.hidden, run) if run.cfg.quant.embeddings else s.vocab * s.hidden * run.cb
    return one * (1 if s.tied else 2)


def block_weight_bytes(run: Run) -> int:
    """All blocks' linears as stored (every expert of a mixture) + every RMSNorm weight ((2L + 1)·h, compute
    dtype)."""
    s = run.shape
    per_block = sum(s.copies(n) * linear_bytes(o, i, run) for n, (o, i) in s.linears().items() if n != "gate")
    per_block += s.stored("gate") * run.cb if s.experts else 0  # the router stays full precision
    return s.layers * per_block + (2 * s.layers + 1) * s.hidden * run.cb


def weight_components(run: Run) -> list[Component]:
    s, q = run.shape, run.cfg.quant
    label = "full precision" if run.mode == "none" else f"{q.bits}-bit {run.mode}" + (
        f" g{q.group_size}" if run.mode == "affine" else "")
    params = s.layers * s.block_params()
    blocks = block_weight_bytes(run)
    emb_note = ("tied, " if s.tied else "embed + lm_head, ") + (label if q.embeddings else "not quantized")
    return [
        Component("base weights (blocks)", blocks, f"{params / 1e9:.2f}B params, {label}, "
                  f"{blocks / max(params, 1):.3f} B/param with scales and norms"
                  + (f"; {s.moe_note()}, all stored" if s.experts else "")),
        Component("embeddings / lm_head", embedding_bytes(run), emb_note, "both"),
    ]


def dequant_bytes(run: Run) -> tuple[int, str]:
    """Dense copies of quantized weights made for the matmul (0 when the kernel reads them packed); under DoRA at
    least every adapted weight, dense for its row norms and kept by x·Wᵀ for the backward."""
    plain, why = _dequant_bytes(run)
    if run.cfg.lora.dora and (run.mode != "none" or run.on_gpu):  # full precision on the CPU: W itself, no copy
        blocks = 1 if run.cfg.train.grad_checkpoint else run.lora_layers
        dora = blocks * sum(run.shape.stored(t) for t in run.targets) * run.cb
        if dora > plain:
            return dora, "DoRA: each adapted weight dense for its row norm" + (", one block (checkpointed)"
                                                                              if blocks == 1 else "")
    return plain, why


def _dequant_bytes(run: Run) -> tuple[int, str]:
    if run.mode == "none":
        return 0, ""
    s, cb = run.shape, run.cb
    dense = {n: s.stored(n) * cb for n in s.linears()}  # an expert stack dequantizes whole
    head = s.vocab * s.hidden * cb if run.cfg.quant.embeddings else 0
    matmul = run.cfg.quant.matmul
    fused = (matmul == "auto" and run.on_gpu) or matmul == "fused"
    if fused and run.const["fused_reads_packed"]:
        return 0, ""
    if not run.const["dequant_kept"]:  # re-dequantized in the backward: one weight at a time
        return max([*dense.values(), head]), "largest weight dequantized per matmul"
    blocks = 1 if run.cfg.train.grad_checkpoint else s.layers
    why = "one block (checkpointed)" if blocks == 1 else "every block: kept for the backward"
    return blocks * sum(dense.values()) + head, f"dequant+BLAS matmul, {why}"
