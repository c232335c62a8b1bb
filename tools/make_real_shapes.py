"""Random-weight HF model dirs at the real shapes of public checkpoints: size benchmarks without downloads.

    python tools/make_real_shapes.py --list
    python tools/make_real_shapes.py llama-3.2-1b /tmp/shapes/llama-3.2-1b [--seed 0] [--layers N]

Each dir has what the Hub checkpoint has: its config.json (the same keys and values, except bos/eos ids,
which point at the copied tokenizer's tokens), bf16 weights under the HF tensor names in
`model-0000K-of-0000N.safetensors` shards + `model.safetensors.index.json`, and a tokenizer. The tokenizer
is the bundled SmolLM2's (vocab 49152, smaller than the model's: its ids stay in range). mlx_lm and
transformers load the dir as they load the real one; the numbers it gives are memory and speed, not text.

Weights: normal / sqrt(fan_in) for matrices, std 0.02 for embeddings and biases, ones for norms. Each
tensor is generated in fixed-size chunks, each chunk from its own generator seeded by (seed, tensor name,
chunk index): the output is the same for any thread count, and a tensor does not depend on --layers
(layer 0 of a 1-layer build equals layer 0 of the full one). Written streaming, chunk by chunk: the 8B
(16 GB) never sits in memory. The dir is built under a temp name beside OUT_DIR and renamed at the end.

`--layers N` (quick tests) overrides num_hidden_layers; `--vocab N` (hidden, for tests only) overrides
vocab_size, which otherwise makes even a 1-layer Llama-3 half a gigabyte of embedding.

Importable (tools/ is not a package: sys.path.insert(0, tools_dir)): SHAPES, write_model, param_count,
tensor_specs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# ---------------------------------------------------------------- the shapes

_LLAMA3_ROPE = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}


def _llama3(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, tied: bool,
            head_dim: int | None, rope_factor: float, version: str) -> dict:
    """A Llama 3.x base checkpoint's config.json: the keys (and key order) of the Hub file."""
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": rope_factor},
        "rope_theta": 500000.0,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "transformers_version": version,
        "use_cache": True,
        "vocab_size": 128256,
    }
    if head_dim is None:  # Llama-3.1-8B's config has no head_dim key (it is hidden / heads)
        del cfg["head_dim"]
    return cfg


SHAPES: dict[str, dict] = {
    # meta-llama/Llama-3.2-1B
    "llama-3.2-1b": _llama3(2048, 16, 32, 8, 8192, tied=True, head_dim=64, rope_factor=32.0,
                            version="4.45.0.dev0"),
    # Qwen/Qwen2.5-1.5B (the base model; -Instruct differs in max_position_embeddings / sliding_window)
    "qwen2.5-1.5b": {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": 1536,
        "initializer_range": 0.02,
        "intermediate_size": 8960,
        "max_position_embeddings": 131072,
        "max_window_layers": 28,
        "model_type": "qwen2",
        "num_attention_heads": 12,
        "num_hidden_layers": 28,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1",
        "use_cache": True,
        "use_mrope": False,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    # meta-llama/Llama-3.2-3B
    "llama-3.2-3b": _llama3(3072, 28, 24, 8, 8192, tied=True, head_dim=128, rope_factor=32.0,
                            version="4.45.0.dev0"),
    # meta-llama/Llama-3.1-8B
    "llama-3.1-8b": _llama3(4096, 32, 32, 8, 14336, tied=False, head_dim=None, rope_factor=8.0,
                            version="4.43.0.dev0"),
}

MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB"), the size the Hub shards have
CHUNK = 1 << 20  # elements per generated chunk: 4 MiB of float32 stays in cache for the bf16 rounding
BF16_ONE = 0x3F80
EMBED_STD = 0.02
BIAS_STD = 0.02


def has_qkv_bias(cfg: dict) -> bool:
    """Qwen2 always has q/k/v biases (no config key says so); Llama has them when attention_bias is set."""
    return cfg["model_type"] == "qwen2" or bool(cfg.get("attention_bias"))


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...], float | None]]:
    """(HF name, shape, std) for every tensor, in model order; std None means a norm weight (ones)."""
    h, v, inter = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads
    bias = has_qkv_bias(cfg)
    specs = [("model.embed_tokens.weight", (v, h), EMBED_STD)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs.append((p + "input_layernorm.weight", (h,), None))
        for proj, rows in (("q_proj", heads * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
            specs.append((f"{p}self_attn.{proj}.weight", (rows, h), h**-0.5))
            if bias:
                specs.append((f"{p}self_attn.{proj}.bias", (rows,), BIAS_STD))
        specs.append((p + "self_attn.o_proj.weight", (h, heads * hd), (heads * hd) ** -0.5))
        specs.append((p + "post_attention_layernorm.weight", (h,), None))
        specs.append((p + "mlp.gate_proj.weight", (inter, h), h**-0.5))
        specs.append((p + "mlp.up_proj.weight", (inter, h), h**-0.5))
        specs.append((p + "mlp.down_proj.weight", (h, inter), inter**-0.5))
    specs.append(("model.norm.weight", (h,), None))
    if not cfg["tie_word_embeddings"]:
        specs.append(("lm_head.weight", (v, h), h**-0.5))
    return specs


def param_count(cfg: dict) -> int:
    return sum(int(np.prod(shape)) for _, shape, _ in tensor_specs(cfg))


def model_config(shape: str, layers: int | None = None, vocab: int | None = None) -> dict:
    """SHAPES[shape] with the test overrides applied (same keys)."""
    if shape not in SHAPES:
        raise SystemExit(f"unknown shape '{shape}'; one of: {', '.join(SHAPES)}")
    cfg = copy.deepcopy(SHAPES[shape])
    if layers is not None:
        cfg["num_hidden_layers"] = int(layers)
    if vocab is not None:
        cfg["vocab_size"] = int(vocab)
    return cfg


# ---------------------------------------------------------------- random bf16, streamed

def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), rounded to nearest even. In place on x; no NaN/inf handling
    (random normals have none)."""
    u = x.view(np.uint32)
    lsb = np.right_shift(u, 16)
    lsb &= 1
    u += lsb
    u += 0x7FFF
    return u.view(np.uint16)[1::2].copy()  # little-endian: the upper half of each word


def _chunk(seed: int, key: int, index: int, n: int, std: float | None) -> bytes:
    if std is None:
        return np.full(n, BF16_ONE, dtype=np.uint16).tobytes()
    x = np.random.default_rng([seed, key, index]).standard_normal(n, dtype=np.float32)
    x *= np.float32(std)
    return to_bf16(x).tobytes()


def _chunk_jobs(specs, seed: int):
    """(args of _chunk) for every chunk of every tensor, in file order."""
    for name, shape, std in specs:
        numel, key = int(np.prod(shape)), zlib.crc32(name.encode())
        for index, start in enumerate(range(0, numel, CHUNK)):
            yield seed, key, index, min(CHUNK, numel - start), std


def _generated(jobs, workers: int):
    """Run the jobs on a thread pool (numpy's generator and ufuncs release the GIL), yielding the results in
    order; at most 2 * workers chunks in flight, so memory stays a few MiB whatever the model size."""
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.submit(_chunk, *job))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def plan_shards(specs, max_bytes: int = MAX_SHARD_BYTES) -> list[list]:
    """Greedy, in order, as transformers' save_pretrained splits: a new shard when the next tensor would
    push the current one past max_bytes."""
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = 2 * int(np.prod(spec[1]))
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def write_shard(path: Path, specs, seed: int, workers: int) -> int:
    """One safetensors file (forge's header writer), then each tensor's bytes in header order, chunk by chunk.
    Returns the tensor bytes written."""
    from forge_core.adapters import safetensors_io as sio

    with open(path, "wb") as f:
        size = sio.write_header(f, {name: (shape, "BF16") for name, shape, _ in specs}, {"format": "pt"})
        f.writelines(_generated(_chunk_jobs(specs, seed), workers))
    return size


# ---------------------------------------------------------------- tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def copy_tokenizer(dst: Path) -> dict:
    """The bundled SmolLM2's tokenizer files into dst; returns {"bos_token_id": .., "eos_token_id": ..}
    for the tokens its tokenizer_config names (those it does not name are left out)."""
    from forge_core.models.sources import resolve_model

    src = resolve_model("smollm2-135m")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    vocab = json.loads((src / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in vocab.get("added_tokens", [])}
    ids.update(vocab.get("model", {}).get("vocab", {}))
    out = {}
    for key in ("bos", "eos"):
        token = tok_cfg.get(f"{key}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token in ids:
            out[f"{key}_token_id"] = ids[token]
    return out


# ---------------------------------------------------------------- the model dir

def write_model(shape: str, out: Path, seed: int = 0, layers: int | None = None, vocab: int | None = None,
                workers: int | None = None) -> Path:
    """Write SHAPES[shape] (with --layers / --vocab overrides) as an HF dir at out; returns out."""
    from forge_core.atomic import atomic_dir

    cfg = model_config(shape, layers, vocab)
    specs = tensor_specs(cfg)
    shards = plan_shards(specs)
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    out = Path(out)
    with atomic_dir(out) as tmp:
        # the real checkpoint's keys; bos/eos point at the tokenizer we ship, so generation stops right
        cfg.update(copy_tokenizer(tmp))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        weight_map, total = {}, 0
        for k, shard in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            tic = time.perf_counter()
            nbytes = write_shard(tmp / fname, shard, seed, workers)
            total += nbytes
            weight_map.update({name: fname for name, _, _ in shard})
            print(f"{fname}: {nbytes / 1e9:.2f} GB in {time.perf_counter() - tic:.1f}s", file=sys.stderr)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def list_shapes() -> str:
    rows = [f"{'shape':<14} {'params':>15} {'bf16 GB':>8}  layers  hidden  vocab   tied"]
    for name, cfg in SHAPES.items():
        n = param_count(cfg)
        rows.append(f"{name:<14} {n:>15,} {2 * n / 1e9:>8.2f}  {cfg['num_hidden_layers']:>6}  "
                    f"{cfg['hidden_size']:>6}  {cfg['vocab_size']:<6}  {cfg['tie_word_embeddings']}")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", nargs="?", choices=list(SHAPES))
    ap.add_argument("out", nargs="?", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (quick tests)")
    ap.add_argument("--vocab", type=int, default=None, help=argparse.SUPPRESS)  # tests only: see docstring
    ap.add_argument("--list", action="store_true", help="print the shapes with their parameter counts")
    args = ap.parse_args(argv)
    if args.list:
        print(list_shapes())
        return
    if args.shape is None or args.out is None:
        ap.error("give SHAPE OUT_DIR (or --list)")
    tic = time.perf_counter()
    out = write_model(args.shape, args.out, seed=args.seed, layers=args.layers, vocab=args.vocab)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out}: {size / 1e9:.2f} GB in {time.perf_counter() - tic:.1f}s")


if __name__ == "__main__":
    main()
