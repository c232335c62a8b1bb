"""The memory estimate's constants (estimate.py), each with how it was measured or derived: byte sizes that
hold in both backends, and BACKEND_CONSTANTS - what differs between MLX (Metal / CPU) and torch (CUDA / CPU)."""

from __future__ import annotations

MiB, GiB = 2**20, 2**30
LORA_BYTES = 4  # LoRA factors, their grads and AdamW states are fp32 in both backends
NF4_BLOCK, NF4_DQ_BLOCK = 64, 256  # bitsandbytes 4-bit: absmax per 64 weights; double quant: fp32 per 256 absmax
ADAM8_MIN_NUMEL = 4096  # bitsandbytes keeps 32-bit states for tensors smaller than this (min_8bit_size)
# forge_mlx/head.py runs the vocabulary head and its log-softmax over the loss positions in chunks of this many
# bytes of fp32 logits (head_chunk_rows), so the head's working set is a chunk's, not positions x V.
HEAD_CHUNK_BYTES = 4 * MiB
# ... and never fewer positions than this: each chunk reads the whole (V, D) head weight, and below ~64 rows the
# matmul is bound by that read, not by its arithmetic (tools/bench_head_chunk_rows.py, docs/BENCHMARKS.md "Chunked
# head: positions per chunk": on Llama-3.2-1B's shape, V 128256, 8 rows a chunk made forge's step 1.5x slower than
# the whole logits, 64 rows within a few percent of them).
HEAD_CHUNK_MIN_ROWS = 64
LOGITS_BACKWARD_FP32 = 2  # softmax + gradient, fp32: measured 12·N·V bytes (fp32) / 16 (bf16) peak, MLX 0.32 CPU
# (the default of BACKEND_CONSTANTS' "logits_backward_fp32": fp32 N·V copies the loss's backward holds at once)

BACKEND_CONSTANTS = {
    "mlx": {
        "quant_mode": "affine",  # packed uint32 + a scale and a bias per group, in the compute dtype
        "logits_backward_fp32": 3,  # mx cross_entropy: 4 copies of N·V at its peak, measured as below
        # forge_mlx/head.py runs the vocabulary head at the batch's loss positions only, for the architectures whose
        # head splits (forge_core/models/architectures.py), chunked unless the head is quantized (quant.embeddings:
        # a QuantizedEmbedding or QuantizedLinear is not a dense head) or train.chunked_loss is off
        "head_positions_need_chunking": False,
        "quantized_tied_head": True,
        # mx.fast.scaled_dot_product_attention runs its unfused fallback whenever gradients are traced
        # (use_fallback() returns true for training in MLX's Metal and CPU backends), so each block keeps
        # (B, H, T, T) probabilities. Measured (MLX 0.32.4, CPU, fp32 and bf16): n chained sdpa calls under
        # mx.grad peak at ~1.3·n + 9.5 copies of B·H·T²·cb for n = 8..32, 3.9 copies for n = 1.
        "attention": "eager",
        "scores_kept_per_block": 1.5,  # 1.3 measured, rounded up
        "scores_backward": 4.0,  # one block's attention backward (n = 1 measurement)
        "gqa_repeat": False,  # the fallback reshapes q to (B, KV, H/KV, T, d); k, v are not repeated
        "norm_fp32": False,  # mx.fast.rms_norm keeps its input in the compute dtype
        "lora_fp32_inputs": False,  # forge_mlx/lora.py casts lora_a, lora_b to x.dtype: no fp32 input copies
        # forge_mlx/quant.py "dequant" matmul (auto on CPU) is a custom function whose backward dequantizes
        # again (after its cotangent exists): 16 chained 1024² 4-bit layers, grad wrt x, peak 89 -> 27.5 MiB
        # against plain autodiff, which kept every dense W for the backward.
        "dequant_kept": False,
        "fused_reads_packed": True,  # mx.quantized_matmul (Metal/CUDA) reads the packed weights
        # Gradient checkpointing (forge_mlx/model.py checkpoint_blocks, mx.checkpoint per block), measured on
        # the tiny Llama (h=128, T=512, B=4, fp32 CPU) as the peak's growth per extra block, 8 -> 16 blocks:
        # compiled step: 8.3 MiB (i=512) and 5.0 MiB (i=256) per block = ~1.7·h + 1.65·i values per token, so
        # kept per token per block = 2·h + 2·i in the compute dtype (theory: h, the block input). Uncompiled
        # (train.compile=false): 23.4 MiB per block, a whole block's activations: no saving except attention.
        "ckpt_kept": (2, 2),
        "ckpt_needs_compile": True,
        # forge_mlx/model.py loads lazily; adapt_model / quantize_rest materialise, factorize, quantize and
        # swap in one linear at a time, so only one dense weight is alive during surgery.
        "init_holds_dense_model": False,
        "host_loads_dense_model": False,  # the lazy load above holds no dense model on the host either
        # MLX allocates from its own buffer cache, not the C heap: its plans meet the measured max RSS without a
        # retention term (docs/BENCHMARKS.md "At real sizes"); torch's below needs one
        "cpu_heap_retention": 0.0,
        # `forge memory` (nothing measured): Python + mlx + mlx_lm + transformers without torch (forge_core/
        # torch_free.py) 88 MiB RSS, a whole run's non-array memory 158 MiB (tiny model) to 293 MiB (SmolLM2-135M),
        # measured Linux x86 MLX CPU; Metal adds its kernel library and command buffers (+100 MiB, to calibrate).
        "overhead": {"gpu": 384 * MiB, "cpu": 320 * MiB},
        # a launch on the CPU measures its own RSS at the plan instead and adds what a run grows by after it
        # (the compiled step, the allocator's cache, metrics, checkpoint buffers): measured below
        "overhead_growth": 128 * MiB,
        "ckpt_block_copies": 1.0,  # the recomputed block's activations, counted once (Metal: to calibrate)
        "ckpt_backward_share": 1.0,  # the backward working set comes on top of them in full
        "causal_chunk": 0,  # 0: attention computes the whole T x T square
        # On the CPU forge_mlx/cpu_math.py replaces attention, SwiGLU and the loss's log-softmax (model.fast_cpu_math).
        # Fitted on random Llamas (h256 i1024, B4, T 256/512, L 4 vs 8, fp32, MLX 0.32.4 CPU; tools/bench_memory.py
        # and docs/BENCHMARKS.md): per block it keeps ONE copy of the probabilities of the causal query blocks
        # (0.53 copies of B·H·T² at T512, where 56% of the square is computed) and the backward needs ~2 more;
        # activations per token match block_token_bytes; checkpointing keeps 4.8 KiB/token/block at h256 i1024
        # = (h + i) values, and its backward holds ~2.6 recomputed blocks at once (2.75 with margin).
        # The loss's log-sum-exp (cpu_math.nll) holds 12 fp32 copies of the N·V logits at its peak where MLX's
        # cross_entropy holds 4 (SmolLM2-135M, V = 49152, the head at 160 vs 496 loss positions, B4 T128: +2.25
        # MiB per position with the kernels, +0.75 MiB without; tools/bench_memory.py smol rows): the logits
        # themselves plus 11 copies in the backward. Invisible on the random models (vocabulary 259).
        # With train.chunked_loss (the default) the head runs head_chunk_rows(V) positions at a time
        # (forge_mlx/head.py): its working set is ~18 copies of one chunk's fp32 logits whatever the number of
        # positions (SmolLM2-135M, 4 MiB chunks: 57 MiB in the forward, 39 in the backward, the same at 160 and
        # 1000 positions; the bundled-model rows' peaks sit 52 MiB over their activations).
        "head_chunk_copies": 18,
        "head_chunk_grows": False,  # HEAD_CHUNK_BYTES a chunk, whatever the positions
        # Checkpointing on SmolLM2's block shape (random weights, L 8 -> 16, B4 T128, fp32) keeps 10.6 KiB per
        # token per block = 2h + i values: the block input and what the compiled recomputation shares with it.
        "cpu_kernels": {"scores_kept_per_block": 1.0, "scores_backward": 2.0, "causal_chunk": 64,
                        "ckpt_kept": (2, 1), "ckpt_block_copies": 2.75, "logits_backward_fp32": 11},
    },
    "cuda": {
        "quant_mode": "nf4",  # bitsandbytes; quant.bits=8 -> LLM.int8 (int8 + fp32 row scales)
        "logits_backward_fp32": LOGITS_BACKWARD_FP32,  # F.cross_entropy: to calibrate with a real vocabulary
        # forge_cuda/head.py (train.chunked_loss, llama-style models): the head at the loss positions only, in
        # chunks of head_chunk_rows(V, positions, D); a chunk's working set measured on the CPU (torch 2.13, V
        # 49152, 256 and 512 rows, fp32 and bf16): 2.1-2.7 chunks of fp32 logits in the forward, 2.1-4.2 in the
        # backward (the CPU's bf16 matmul converts; a GPU's does not). To calibrate on CUDA.
        # the head at the loss positions only through the chunked head: train.chunked_loss, an architecture whose head
        # splits, a plain head (an untied lm_head quantized by quant.embeddings is not); else every position's logits
        "head_positions_need_chunking": True,
        "quantized_tied_head": False,
        "head_chunk_copies": 4,
        "head_chunk_grows": True,  # at least positions / ceil(V / D) rows a chunk (head_chunk_rows)
        "attention": "sdpa",  # transformers' default: flash / mem-efficient kernels keep only the logsumexp
        "scores_kept_per_block": 0.0,
        "scores_backward": 0.0,
        "gqa_repeat": True,  # transformers' sdpa path repeat_kv()s k and v to H heads when a mask is passed
        "norm_fp32": True,  # LlamaRMSNorm upcasts: its backward keeps the fp32 copy of the input
        "lora_fp32_inputs": True,  # PEFT autocast_adapter_dtype: fp32 adapters, input cast to fp32 per module
        "dequant_kept": False,  # bitsandbytes dequantizes one weight per matmul, forward and backward
        "fused_reads_packed": False,  # even its "fused" 4-bit matmul makes a dense copy per call
        "ckpt_kept": (1, 0),  # torch.utils.checkpoint keeps the block input (theory, to calibrate)
        "ckpt_needs_compile": False,
        # forge_cuda/lora.py: the dense model stays in HOST memory; each target is factorized there, quantized
        # and moved to the device one at a time, so the device never holds the dense model - unless the device is
        # the host (the CPU): then the dense model at load is planned (Llama-3.2-1B shape: max RSS 7.5 GiB against
        # a plan of 3.9 GiB without it; docs/BENCHMARKS.md "At real sizes").
        "init_holds_dense_model": False,
        "host_loads_dense_model": True,
        # GPU: CUDA context (0.3-0.5 GiB), cuBLAS workspaces, caching-allocator slack: an estimate to calibrate.
        # CPU: torch + transformers + peft imported: 437 MiB RSS, a tiny run's non-array 480-500 MiB (Linux x86).
        "overhead": {"gpu": 1 * GiB, "cpu": 512 * MiB},
        "overhead_growth": 128 * MiB,  # as MLX's: after the plan, see above
        # On the CPU torch allocates each tensor from the C heap (glibc malloc) and frees it there; glibc keeps
        # what a step freed as fragmented heap rather than giving it back, so a step's RSS grows by more than its
        # live tensors. The demo configs (SmolLM2-135M, B4, 4-bit, torch 2.13, Linux x86, 4 steps): the step
        # grew RSS by 1.17 GiB where a fixed mmap threshold (MALLOC_MMAP_THRESHOLD_=1 MiB: freed tensors go back
        # to the OS, each step 1.8x slower) shows 0.68 GiB live, the activations the plan counts; the max RSS
        # the runs report sits 0.74 (SFT) and 0.71 (DPO) x the working set over the plan without this.
        "cpu_heap_retention": 0.75,
        "ckpt_block_copies": 1.0,
        # With checkpointing torch frees the recomputed block's activations while it goes back through it, so
        # only part of the backward working set adds to them: h256 i1024 NF4, T 256/512, L 4 vs 8 (CPU RSS)
        # fit 0.3-0.4 of it; 0.5 keeps a margin.
        "ckpt_backward_share": 0.5,
        "causal_chunk": 0,
    },
}


def head_chunk_rows(vocab: int, positions: int = 0, hidden: int = 0) -> int:
    """Positions per chunk of the chunked head (forge_mlx/head.py, forge_cuda/head.py): HEAD_CHUNK_BYTES of fp32
    logits, a multiple of 8, HEAD_CHUNK_MIN_ROWS at least. With `positions` and `hidden` (torch) at least
    positions / ceil(V / D) rows (Liger's rule: a chunk's logits about the size of the hidden states), so a GPU's
    matmuls stay large: each chunk reads the whole (V, D) head weight, 1 GiB for Llama-3-8B's in bf16."""
    rows = max(HEAD_CHUNK_MIN_ROWS, HEAD_CHUNK_BYTES // (4 * vocab) // 8 * 8)
    if positions and hidden:
        liger = -(-positions // -(-vocab // hidden))
        rows = max(rows, -(-liger // 8) * 8)
    return rows
