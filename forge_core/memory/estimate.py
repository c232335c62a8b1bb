"""Peak-memory estimate of a fine-tuning run: bytes per component, from config.json shapes + ForgeConfig.

Pure arithmetic - no framework import, no I/O - so a CUDA run can be planned on a laptop, and a
calibration tool can hold every Component against a measured peak. Notation:

    h hidden, i intermediate, L blocks, H / KV heads, d head_dim, q = H·d, kv = KV·d, V vocab,
    r LoRA rank, B rows per micro-batch (2·batch_size for the pair methods: chosen and rejected rows go
    through ONE forward; reference log-probs are precomputed, so there is no second model), T max_seq_len
    (or, planned from the data, its widest batch), N = B·T tokens, N_head the positions the vocabulary
    head runs at (N, or on MLX B x the most trained tokens of any row), cb bytes of the compute dtype.

    training peak = base weights + LoRA params, grads, optimizer states + activations (+ attention
                    probabilities when attention is unfused) + logits (N_head·V) + backward working set
                    + dequantized weights + framework overhead
    init peak     = the model while PiSSA/quantization rewrites it + the largest SVD + overhead
    total         = max(training peak, init peak)          (components carry their phase)

Every constant that differs between backends sits in constants.py (BACKEND_CONSTANTS) with how it was
derived.
"""

from __future__ import annotations

from forge_core.config import DEFAULT_TARGETS, ForgeConfig, layer_indices, lora_init_kind
from forge_core.errors import ForgeError
from forge_core.memory.build import init_cache_disk_bytes, init_components, sampling_component  # noqa: F401
from forge_core.memory.constants import (
    ADAM8_MIN_NUMEL,
    BACKEND_CONSTANTS,
    LORA_BYTES,
    head_chunk_rows,
)
from forge_core.memory.shape import TARGET_INPUT, Component, ModelShape, Run, compute_bytes
from forge_core.memory.weights import (  # noqa: F401
    block_weight_bytes,
    dequant_bytes,
    embedding_bytes,
    linear_bytes,
    weight_components,
)
from forge_core.methods import method
from forge_core.models.architectures import architecture


def quant_mode(cfg: ForgeConfig, backend: str) -> str:
    bits, mode = cfg.quant.bits, cfg.quant.mode
    if bits == 0:
        return "none"
    mode = BACKEND_CONSTANTS[backend]["quant_mode"] if mode == "auto" else mode
    if mode in ("nf4", "fp4"):
        if bits == 8:
            return "int8"
        if bits != 4:
            raise ForgeError(f"quant.bits={bits} with quant.mode={mode}: bitsandbytes does 4 or 8 bits; "
                             "use quant.mode=affine (MLX) or quant.bits=4")
    return mode


def resolve_targets(targets: list[str], shape: ModelShape) -> tuple[str, ...]:
    """lora.targets -> block linear names; "all-linear" is every linear of the block (not lm_head)."""
    names = list(shape.linears())
    if not targets or "all-linear" in targets:
        return tuple(names)
    picked = []
    for t in targets:
        leaf = t.split(".")[-1]
        if leaf not in names:
            raise ForgeError(f"lora.targets: '{t}' is not a linear of a decoder block ({', '.join(names)}, "
                             "or all-linear)")
        if leaf not in picked:
            picked.append(leaf)
    return tuple(picked)


def make_run(cfg: ForgeConfig, shape: ModelShape, kind: str, backend: str, on_gpu: bool, data=None) -> Run:
    """data: a DataShape (memory/data_shape.py) - the widest batch and the head's positions of the real
    rows - or None for the worst case (every row max_seq_len long, every position trained)."""
    if backend not in BACKEND_CONSTANTS:
        raise ForgeError(f"backend '{backend}': the memory planner knows {', '.join(BACKEND_CONSTANTS)}")
    # the step's forward: chosen + rejected concatenated for the paired methods. KTO's extra forward for its
    # reference point (mismatched pairs, no gradient) runs before the step and is freed before it.
    rows = cfg.train.batch_size * method(kind).sequences
    const = dict(BACKEND_CONSTANTS[backend])
    if not on_gpu and cfg.model.fast_cpu_math and "cpu_kernels" in const:
        const.update(const["cpu_kernels"])
    seq = data.seq if data else cfg.train.max_seq_len
    const["head_at_loss_positions"], const["head_chunked"] = head_plan(cfg, shape, const)
    per_row = data.head_per_row if data and const["head_at_loss_positions"] else seq
    return Run(cfg=cfg, shape=shape, const=const, on_gpu=on_gpu,
               cb=compute_bytes(cfg.model.dtype, on_gpu), rows=rows, seq=seq, head_tokens=rows * per_row,
               targets=resolve_targets(cfg.lora.targets or DEFAULT_TARGETS, shape),
               lora_layers=len(layer_indices(cfg.lora.layers, shape.layers)), mode=quant_mode(cfg, backend))


def head_plan(cfg: ForgeConfig, shape: ModelShape, const: dict) -> tuple[bool, bool]:
    """(the head runs at the loss positions only, chunked) as the backend's head decides it: the architecture's
    head must split (forge_core/models/architectures.py), and be a dense matrix to be chunked."""
    split = architecture(shape.model_type).split_head
    quantized = cfg.quant.embeddings and (const["quantized_tied_head"] or not shape.tied)
    chunked = split and cfg.train.chunked_loss and not quantized
    return (chunked if const["head_positions_need_chunking"] else split), chunked


# ------------------------------------------------------------------------------------------- LoRA

def lora_tensor_sizes(run: Run) -> list[int]:
    """Element counts of every LoRA factor: A (r, in) and B (out, r) per target per adapted block (one pair per
    expert of an expert stack, as one (E, r, in) and one (E, out, r) tensor)."""
    s, r = run.shape, run.cfg.lora.rank
    shapes = s.linears()
    one_block = [s.copies(t) * n for t in run.targets for n in (r * shapes[t][1], shapes[t][0] * r)]
    if run.cfg.lora.dora:  # DoRA's magnitude: one value per output row
        one_block += [shapes[t][0] for t in run.targets]
    return one_block * run.lora_layers


def experts_note(run: Run) -> str:
    """", one pair per expert (E x top-k)" when the targets include a mixture's expert projections."""
    s = run.shape
    return f", one pair per expert ({s.experts} x top-{s.top_k})" if any(s.copies(t) > 1 for t in run.targets) \
        else ""


def optimizer_bytes(sizes: list[int], optimizer: str) -> int:
    """adamw: two fp32 states (8 B/param). adamw8bit / paged: 2 B/param, but bitsandbytes keeps fp32
    states for tensors under 4096 elements (block scales, < 2%, ignored)."""
    if optimizer == "adamw":
        return 8 * sum(sizes)
    return sum(2 * n if n >= ADAM8_MIN_NUMEL else 8 * n for n in sizes)


def lora_components(run: Run) -> list[Component]:
    sizes = lora_tensor_sizes(run)
    params = sum(sizes)
    t = run.cfg.train
    accum = t.grad_accum > 1  # the accumulated sum and the new micro-batch's grads coexist
    init, _ = lora_init_kind(run.cfg.lora.init)
    disk = "; PiSSA A0,B0 live on disk only" if init == "pissa" else ""
    return [
        Component("LoRA params", params * LORA_BYTES,
                  f"{params / 1e6:.2f}M fp32, r={run.cfg.lora.rank} x {len(run.targets)} targets x "
                  f"{run.lora_layers} blocks{experts_note(run)}{disk}", "both"),
        Component("LoRA grads", params * LORA_BYTES * (2 if accum else 1),
                  "fp32" + (", accumulated + current" if accum else "")),
        Component("optimizer states", optimizer_bytes(sizes, t.optimizer), t.optimizer),
    ]


# ------------------------------------------------------------------------------------------- activations

def block_token_bytes(run: Run) -> int:
    """Bytes one block keeps per token for the backward (frozen base, LoRA on run.targets).

    Always: the two RMSNorm inputs (h each), attention q, k, v after RoPE and its output (2q + 2kv;
    k, v at q size where repeat_kv copies them), SwiGLU gate, silu(gate), up (3i; a mixture of experts: 3 x top-k
    x the expert width, plus its router's logits and probabilities (2E, fp32) and each chosen expert's input and
    output (2 x top-k x h): the sort that groups tokens by expert copies them). LoRA targets add
    their input (shared by targets that read the same tensor; attention's output is kept anyway) or,
    where adapters are fp32 and compute is not, an fp32 copy per target; plus x·A (r) per target and,
    with dropout, the dropped input and its mask.
    """
    s, cb, c = run.shape, run.cb, run.const
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    k_v = 2 * (q if c["gqa_repeat"] else kv)
    total = (8 if c["norm_fp32"] else 2 * cb) * s.hidden + cb * (2 * q + k_v + 3 * s.mlp_width)
    if s.experts:
        total += 8 * s.experts + cb * 2 * s.top_k * s.hidden
    if c["attention"] == "sdpa":
        total += 4 * s.heads  # fp32 logsumexp per head
    sizes = {"xn": s.hidden, "attn": 0, "xn2": s.hidden, "mlp": s.mlp_width}
    inputs = {t: s.active(t) * s.linears()[t][1] for t in run.targets}
    lora_b = LORA_BYTES if c["lora_fp32_inputs"] else cb
    if c["lora_fp32_inputs"] and cb < 4:
        total += sum(4 * n for n in inputs.values())
    else:
        total += cb * sum(sizes[g] for g in {TARGET_INPUT[t] for t in run.targets})
    total += sum(s.active(t) for t in run.targets) * run.cfg.lora.rank * lora_b
    if run.cfg.lora.dropout > 0:
        total += sum(n * (lora_b + 1) for n in inputs.values())
    return total


def causal_fraction(seq: int, chunk: int) -> float:
    """The share of the T x T scores computed when queries go in blocks of `chunk` (0: all of them)."""
    if not chunk or seq <= chunk:
        return 1.0
    return sum(min(end, seq) * (min(end, seq) - start) for start, end in
               ((s, s + chunk) for s in range(0, seq, chunk))) / seq ** 2


def attention_scores_bytes(run: Run, copies: float) -> int:
    """Unfused attention: `copies` x (B, H, T, T) in the compute dtype, for one block (the computed part)."""
    frac = causal_fraction(run.seq, run.const["causal_chunk"])
    return int(copies * frac * run.rows * run.shape.heads * run.seq ** 2 * run.cb)


def activation_components(run: Run) -> list[Component]:
    s, n, cb = run.shape, run.tokens, run.cb
    per_tok = block_token_bytes(run)
    ckpt = run.cfg.train.grad_checkpoint
    final = n * s.hidden * (4 if run.const["norm_fp32"] else cb)  # the final norm's input
    kh, ki = run.const["ckpt_kept"]
    if ckpt and run.const["ckpt_needs_compile"] and not run.cfg.train.compile:
        acts = s.layers * n * per_tok + final
        note = f"{per_tok / 1024:.1f} KiB/token/block x {s.layers}: checkpointing saves nothing without compile"
    elif ckpt:
        kept = cb * (kh * s.hidden + ki * s.mlp_width)
        copies = run.const["ckpt_block_copies"]
        acts = s.layers * n * kept + int(copies * n * per_tok) + final
        note = (f"{kept / 1024:.1f} KiB/token x {s.layers} checkpointed blocks + {copies:g} recomputed "
                f"({per_tok / 1024:.1f} KiB/token)")
    else:
        acts = s.layers * n * per_tok + final
        note = f"{per_tok / 1024:.1f} KiB/token/block x {s.layers} blocks x {n} tokens"
    out = [Component("activations", acts, note)]
    if run.cfg.lora.dora:  # m/n · (Wx + s·BAx): the magnitude's gradient keeps that (N, out) product per target
        blocks = 1 if ckpt else run.lora_layers
        outs = sum(s.active(t) * s.linears()[t][0] for t in run.targets)
        out.append(Component("DoRA products", blocks * n * outs * cb,
                             f"N x {outs} outputs of the adapted linears x {blocks} block(s), for the magnitudes"))
    kept = run.const["scores_kept_per_block"]
    if kept:
        blocks = 1 if ckpt else s.layers
        out.append(Component("attention probabilities", attention_scores_bytes(run, kept) * blocks,
                             f"unfused attention: B·H·T² x {kept:g} x {blocks} block(s)"))
    block_grad = n * per_tok + attention_scores_bytes(run, run.const["scores_backward"])
    if ckpt:
        block_grad = int(block_grad * run.const["ckpt_backward_share"])
    if run.const["head_chunked"] and run.const["head_at_loss_positions"]:
        # the chunked head (forge_mlx/head.py): one chunk's working set, never the whole logits
        grows = run.const["head_chunk_grows"]  # torch's chunks grow with the positions (head_chunk_rows)
        rows = min(head_chunk_rows(s.vocab, *((run.head_tokens, s.hidden) if grows else ())), run.head_tokens)
        head_grad = int(run.const["head_chunk_copies"] * rows * s.vocab * 4)
        head_what = f"the loss head, {rows} positions at a time"
    else:
        v_bytes = run.head_tokens * s.vocab
        logits = v_bytes * (cb + 4 if cb < 4 else 4)
        where = "B·T·V" if run.head_tokens == n else f"{run.head_tokens} loss positions x V"
        out.append(Component("logits + loss", logits, f"{where} = {v_bytes / 1e6:.1f}M: compute dtype + fp32 copy"
                             if cb < 4 else f"{where} = {v_bytes / 1e6:.1f}M fp32"))
        head_grad = v_bytes * (4 * run.const["logits_backward_fp32"] + (cb if cb < 4 else 0))
        head_what = "logits gradient (softmax + grad, fp32)"
    which = head_what if head_grad >= block_grad else "one block's gradients"
    out.append(Component("backward working set", max(head_grad, block_grad), which))
    return out


# ------------------------------------------------------------------------------------------- all

def estimate(cfg: ForgeConfig, shape: ModelShape, kind: str = "sft", backend: str = "mlx",
             on_gpu: bool = True, nproc: int = 1, data=None, process_bytes: int = 0) -> list[Component]:
    """Every component of ONE process's plan, in display order (see the module docstring for the model).
    nproc > 1 (data-parallel): each rank holds the whole model and its batch_size rows, plus the flat fp32
    buffer its LoRA gradients are summed over ranks in (the concatenation and the result).
    process_bytes: the launching process's resident memory when it plans (its imports, tokenizer and rows,
    measured), which replaces the overhead constant on the CPU."""
    run = make_run(cfg, shape, kind, backend, on_gpu, data)
    parts = weight_components(run) + lora_components(run) + activation_components(run)
    if nproc > 1:
        parts.append(Component("gradient all-reduce buffer", 2 * LORA_BYTES * sum(lora_tensor_sizes(run)),
                               f"LoRA gradients as one fp32 buffer, summed over {nproc} ranks"))
    deq, why = dequant_bytes(run)
    if deq:
        parts.append(Component("dequantized weights", deq, why))
    parts += retention_components(run, parts)
    if method(kind).samples:
        parts.append(sampling_component(run))
    parts += init_components(run)
    parts.append(overhead_component(run, backend, process_bytes))
    return parts


STEP_CHURN = ("activations", "attention probabilities", "logits + loss", "DoRA products", "backward working set",
              "dequantized weights")  # what a training step allocates and frees again


def retention_components(run: Run, parts: list[Component]) -> list[Component]:
    """What the host's allocator keeps of the memory a step frees (torch on the CPU: glibc's heap), as a share of
    the step's working set; none where the framework has its own allocator or the device is a GPU."""
    share = 0.0 if run.on_gpu else run.const["cpu_heap_retention"]
    churn = sum(c.bytes for c in parts if c.name in STEP_CHURN)
    if not share or not churn:
        return []
    return [Component("allocator retention", int(share * churn),
                      f"the C heap keeps freed step memory: {share:g} x the step's working set")]


def overhead_component(run: Run, backend: str, process_bytes: int) -> Component:
    """What the process holds besides its arrays. On the CPU a launch measures it (process_bytes: the RSS of the
    interpreter, the framework, the tokenizer and the rows at the plan) and adds what a run grows by after it;
    elsewhere (a GPU's context and allocator, or `forge memory` planning from the outside) the backend's
    constant."""
    side = "gpu" if run.on_gpu else "cpu"
    if process_bytes and not run.on_gpu:
        growth = run.const["overhead_growth"]
        return Component("framework overhead", process_bytes + growth, f"measured: this process at the plan "
                         f"{process_bytes / 2**20:.0f} MiB + {growth / 2**20:.0f} MiB a run grows by", "both")
    return Component("framework overhead", run.const["overhead"][side], f"{backend} ({side}) constant", "both")


def phase_total(components: list[Component], phase: str) -> int:
    return sum(c.bytes for c in components if c.phase in (phase, "both"))


def peak_bytes(components: list[Component]) -> int:
    """The planned peak: training and the model build never overlap."""
    return max(phase_total(components, "train"), phase_total(components, "init"))
