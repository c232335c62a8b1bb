"""The plan's parts outside a training step: the model build (PiSSA SVDs on the dense weights, quantization of the
residual and the rest), the init cache entry it writes (disk, not memory), and GRPO's sampling."""

from __future__ import annotations

from forge_core.config import lora_init_kind
from forge_core.memory.constants import LORA_BYTES
from forge_core.memory.shape import Component, Run
from forge_core.memory.weights import block_weight_bytes, linear_bytes

# ------------------------------------------------------------------------------------------- init

def svd_bytes(out: int, inp: int, run: Run) -> int:
    """forge_core.pissa on one (out, in) weight, fp32 numpy: W, the residual and the B0·A0 product,
    the MLX copy of W_res (4·out·in floats), plus U, Vt: k = min(out, in) columns for the full SVD,
    3·(2r + 8) for the randomized one (basis, its projection, U)."""
    _, niter = lora_init_kind(run.cfg.lora.init)
    k = min(out, inp) if niter == 0 else 3 * min(2 * run.cfg.lora.rank + 8, min(out, inp))
    return 4 * (4 * out * inp + k * (out + inp))


def target_svd_bytes(name: str, run: Run) -> int:
    """PiSSA on one target: its SVD, and for an expert stack (one SVD per expert) the stack W and its residual
    in fp32 as well, both whole while the experts are split one by one."""
    s = run.shape
    one = svd_bytes(*s.linears()[name], run)
    return one + 2 * 4 * s.stored(name) if s.copies(name) > 1 else one


def init_components(run: Run) -> list[Component]:
    """The model build: PiSSA SVDs on the dense weights, then quantization of the residual and the rest."""
    s, cb = run.shape, run.cb
    kind, _ = lora_init_kind(run.cfg.lora.init)
    shapes = s.linears()
    out = []
    # forge_cuda loads the whole dense model into host memory (transformers' from_pretrained) before the surgery
    # moves it to the device layer by layer: on a GPU the device never holds it, on the CPU host and device are one
    if run.const["init_holds_dense_model"] or (not run.on_gpu and run.const["host_loads_dense_model"]):
        dense = s.layers * s.block_params() * cb + (2 * s.layers + 1) * s.hidden * cb
        if run.cfg.quant.embeddings and run.mode != "none":  # dense until quantize_rest swaps them
            dense += s.vocab * s.hidden * cb * (1 if s.tied else 2)
        out.append(Component("dense model at load", dense, "all weights in the compute dtype, as loaded", "init"))
        if run.mode != "none":
            # adapt_model swaps the quantized targets in at its end, quantize_rest the others at its end:
            # dense all + quantized targets, then dense non-targets + everything quantized.
            q_t = run.lora_layers * sum(s.copies(t) * linear_bytes(*shapes[t], run) for t in run.targets)
            d_t = run.lora_layers * sum(s.stored(t) * cb for t in run.targets)
            q_all = s.layers * sum(s.copies(n) * linear_bytes(o, i, run) for n, (o, i) in shapes.items())
            out.append(Component("quantized copies (surgery)", max(q_t, q_all - d_t),
                                 "coexist with the dense weights until swapped in", "init"))
    else:
        big = max(s.stored(n) for n in shapes) * cb  # an expert stack converts whole
        out.append(Component("weights (streamed build)", block_weight_bytes(run) + big,
                             "final weights + one dense weight being converted", "init"))
    if kind == "pissa":
        name = max(run.targets, key=lambda t: target_svd_bytes(t, run))
        each = f" per expert of {s.copies(name)}" if s.copies(name) > 1 else ""
        out.append(Component("PiSSA SVD (largest target)", target_svd_bytes(name, run),
                             f"{name} {shapes[name][0]}x{shapes[name][1]}{each}, fp32", "init"))
    return out


def init_cache_disk_bytes(run: Run) -> int:
    """Disk, not memory: the init cache entry a PiSSA run writes (forge_core/init_cache.py), fp32 A0 (r, in) and
    B0 (out, r) for every target."""
    if lora_init_kind(run.cfg.lora.init)[0] != "pissa":
        return 0
    s = run.shape
    return run.lora_layers * sum(LORA_BYTES * run.cfg.lora.rank * s.copies(t) * sum(s.linears()[t])
                                 for t in run.targets)


def sampling_component(run: Run) -> Component:
    """GRPO's generation: the KV cache of the completions decoded at once (keys and values of every block,
    rows x (prompt + max_new_tokens) rounded up to mlx-lm's 256-token cache steps) and their fp32 logits. It is
    freed before the step's forward, so counting it beside the activations is an upper bound."""
    g, s = run.cfg.grpo, run.shape
    rows = g.sample_batch_size or run.cfg.train.batch_size * run.cfg.train.grad_accum
    width = -(-run.seq // 256) * 256
    kv = 2 * s.layers * s.kv_heads * s.head_dim * rows * width * run.cb
    note = f"{rows} completions x {width} positions, keys + values of {s.layers} blocks"
    if not run.on_gpu:  # ops.sampling_weights: every block linear dense fp32 (the dequantized base kept for the run)
        dense = 4 * s.layers * s.block_params()
        dense += 4 * s.vocab * s.hidden * (1 if s.tied else 2) if run.cfg.quant.embeddings else 0
        kv += dense
        note += f"; + {dense / 2**20:.0f} MiB of dense fp32 weights the CPU samples from"
    return Component("sampling KV cache", kv + rows * s.vocab * 4, note)
