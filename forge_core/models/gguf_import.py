"""GGUF (llama.cpp) file -> HF-layout model dir: config.json, model.safetensors, tokenizer + chat template.

Framework-free: the `gguf` package reads and dequantizes (numpy), `tokenizers` builds the tokenizer,
`transformers.PreTrainedTokenizerFast` saves it. No torch, no mlx: this runs on an MLX-only Mac too.

Conventions handled here:
- Tensor names: llama.cpp's `blk.N.attn_q.weight` ... become HF Llama names (`model.layers.N.self_attn.
  q_proj.weight` ...), see `BLOCK_NAMES` / `TOP_NAMES`. No `output.weight` means tied embeddings.
- Rotary order: llama.cpp's converter permutes the rows of q and k per head so that rotary pairs are
  adjacent (interleaved); HF Llama pairs row i with row i + head_dim/2 (rotate_half). `unpermute_rows`
  undoes it; its inverse is llama.cpp's `permute` (tests check both directions).
- Shapes: GGUF lists dims innermost first; numpy (and HF) use (out, in). `gguf` already hands us
  (out, in) arrays; we reshape defensively to the reversed GGUF shape.
- Quantized files: the bundled SmolLM2 GGUF is Q4_1 (token_embd Q8_0). Its dequantized weights ARE the
  reference full-precision weights - there is no other copy of that model to be faithful to - so a
  float32 import is exact, and bf16/fp16 round once more on top.
"""

from __future__ import annotations

import collections
import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from forge_core.adapters import safetensors_io as sio
from forge_core.atomic import write_json
from forge_core.errors import ForgeError

BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# safetensors dtype tag and bytes per element for each output dtype we write.
DTYPES = ("float32", "bfloat16", "float16")  # what the imported weights are stored as


def read_gguf(path: Path):
    """Open a GGUF: (metadata {key: python value}, tensors). Bad files are a ForgeError."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, struct.error) as e:
        raise ForgeError(f"{path}: not a readable GGUF file ({e})") from None
    meta = {key: field_value(field) for key, field in reader.fields.items()}
    return meta, reader.tensors


def field_value(field):
    """One GGUF metadata field as python: str, int, float, bool, or a list of those."""
    from gguf import GGUFValueType

    def one(index, vtype):
        part = field.parts[index]
        if vtype == GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        value = part.tolist()[0]
        # float32 metadata (eps, rope base): keep the shortest decimal that round-trips in float32,
        # so config.json says 1e-05 rather than 9.999999747378752e-06 (same float32 either way).
        return float(str(np.float32(value))) if vtype == GGUFValueType.FLOAT32 else value

    if field.types and field.types[0] == GGUFValueType.ARRAY:
        return [one(i, field.types[-1]) for i in field.data]
    return one(field.data[0], field.types[0])


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a q or k weight (out, in) or bias (out,).

    llama.cpp wrote W_gguf = W.reshape(n_head, 2, d, ...).swapaxes(1, 2).reshape(W.shape), d = head_dim/2.
    Here: view W_gguf as (n_head, d, 2, ...), swap axes 1 and 2, reshape back -> W in HF order.
    n_head is the number of KV heads for k.
    """
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, d, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; unknown names are an error."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in BLOCK_NAMES:
        return f"model.layers.{int(parts[1])}.{BLOCK_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in TOP_NAMES:
        return f"{TOP_NAMES[parts[0]]}.{parts[1]}"
    why = " (Llama-3.1-style rope scaling)" if gguf_name.startswith("rope_freqs") else ""
    raise ForgeError(f"GGUF tensor '{gguf_name}'{why} has no Llama equivalent here; "
                     "use the model's HF checkpoint (a hub id or dir) instead")


def llama_config(meta: dict, tensor_names: set[str], dtype: str, eos_ids: list[int]) -> dict:
    """config.json for LlamaForCausalLM from llama.cpp metadata (`llama.*` and `tokenizer.ggml.*`)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ForgeError(f"GGUF architecture '{arch}' is not supported (only llama); "
                         "use the model's HF checkpoint instead")

    def need(key):
        if f"llama.{key}" not in meta:
            raise ForgeError(f"GGUF metadata lacks 'llama.{key}'; cannot build config.json")
        return meta[f"llama.{key}"]

    hidden, heads = need("embedding_length"), need("attention.head_count")
    kv_heads = meta.get("llama.attention.head_count_kv", heads)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": meta.get("llama.attention.key_length", hidden // heads),
        "vocab_size": meta.get("llama.vocab_size", len(meta.get("tokenizer.ggml.tokens", []))),
        "max_position_embeddings": meta.get("llama.context_length", 2048),
        "rms_norm_eps": meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": meta.get("llama.rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": dtype,
    }
    scaling = meta.get("llama.rope.scaling.type")
    if scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": meta["llama.rope.scaling.factor"]}
    elif scaling not in (None, "none"):
        raise ForgeError(f"GGUF rope scaling '{scaling}' is not supported; use the HF checkpoint instead")
    return cfg


def tensor_plan(tensors, n_head: int, n_kv_head: int):
    """{hf name: (gguf tensor, rows to unpermute by n heads or 0)} sorted by HF name."""
    plan = {}
    for t in tensors:
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        heads = {"attn_q": n_head, "attn_k": n_kv_head}.get(kind, 0)
        plan[hf_name(t.name)] = (t, heads)
    return dict(sorted(plan.items()))


def dequantized(t, heads: int) -> np.ndarray:
    """One GGUF tensor as float32 in HF (out, in) layout and HF rotary order."""
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(t.shape))
    w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
    return unpermute_rows(w, heads) if heads else w


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_to_hf(src: Path, out: Path, dtype: str = "float32", source: str | None = None) -> Path:
    """Write the HF dir for GGUF `src` into `out` (which the caller makes atomic). Returns `out`."""
    if dtype not in DTYPES:
        raise ForgeError(f"dtype '{dtype}': choose one of {', '.join(DTYPES)}")
    meta, tensors = read_gguf(src)
    names = {t.name for t in tensors}
    eos_ids = end_of_turn_ids(meta)
    cfg = llama_config(meta, names, dtype, eos_ids)
    plan = tensor_plan(tensors, cfg["num_attention_heads"], cfg["num_key_value_heads"])
    shapes = {name: tuple(int(d) for d in reversed(t.shape)) for name, (t, _) in plan.items()}
    # one dequantized tensor at a time: the import never holds the float model in memory
    sio.save_streaming(out / "model.safetensors", {n: (tuple(shape), sio.TAGS[dtype]) for n, shape in shapes.items()},
                       lambda n: dequantized(*plan[n]), {"format": "pt"})
    write_json(out / "config.json", cfg)
    save_tokenizer(meta, src, out)
    types = collections.Counter(t.tensor_type.name for t in tensors)
    quant = [k for k, _ in types.most_common() if k not in ("F32", "F16", "BF16")]
    write_json(out / "forge_source.json", {
        "source": source or str(src),
        "file": src.name,
        "size": src.stat().st_size,
        "gguf_sha256": file_sha256(src),
        "quantization": f"{quant[0]} dequantized" if quant else "none (float tensors)",
        "tensor_types": dict(types.most_common()),
        "dtype": dtype,
    })
    return out


# ---- tokenizer ---------------------------------------------------------------------------------
# llama.cpp's pre-tokenizer ("tokenizer.ggml.pre") -> the HF pre-tokenizer that splits text the same way.
# smollm/starcoder/...: llama.cpp runs "\p{N}" (single digits) and then the GPT-2 regex.
GPT2_PRE = {"default", "gpt2", "gpt-2", "mpt", "olmo", "jais"}
DIGITS_PRE = {"smollm", "starcoder", "refact", "codeshell"}
LLAMA3_PRE = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"}
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PRE = {"qwen2", "stablelm2"}
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2's regex: single digits
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def end_of_turn_ids(meta: dict) -> list[int]:
    """Token ids that end generation: the end-of-turn token first, then eos if different.

    llama.cpp's `eot_token_id` when present; else ChatML's <|im_end|> when the chat template uses it
    (SmolLM2: eos_token_id is already <|im_end|>); else eos.
    """
    tokens = meta.get("tokenizer.ggml.tokens", [])
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is None and "<|im_end|>" in meta.get("tokenizer.chat_template", "") and "<|im_end|>" in tokens:
        eot = tokens.index("<|im_end|>")
    ids = [i for i in (eot, eos) if i is not None]
    return list(dict.fromkeys(ids))


def byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet byte-level BPE vocabularies are spelled in)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def byte_level_tokenizer(meta: dict):
    """A `tokenizers.Tokenizer` for a byte-level BPE GGUF ("gpt2" model), or None if its pre-tokenizer
    is not one we know (the caller then falls back to transformers' converter)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, processors
    from tokenizers import pre_tokenizers as pt

    pre = meta.get("tokenizer.ggml.pre", "default")
    if meta.get("tokenizer.ggml.model") != "gpt2" or pre not in GPT2_PRE | DIGITS_PRE | LLAMA3_PRE | QWEN2_PRE:
        return None
    spell = byte_chars()
    alphabet = set(spell.values())
    tokens = meta["tokenizer.ggml.tokens"]
    # A token spelled outside the byte alphabet (a raw space, say) is respelled byte by byte.
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode()): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=pre not in LLAMA3_PRE | QWEN2_PRE)
    if pre in DIGITS_PRE:
        tok.pre_tokenizer = pt.Sequence([pt.Digits(individual_digits=True), byte_level])
    elif pre in LLAMA3_PRE | QWEN2_PRE:
        split = LLAMA3_SPLIT if pre in LLAMA3_PRE else QWEN2_SPLIT
        tok.pre_tokenizer = pt.Sequence([pt.Split(Regex(split), behavior="isolated"), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, k in zip(tokens, types) if k == CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, k in zip(tokens, types) if k == USER_DEFINED and set(t) <= alphabet])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        b = tokens[bos]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{b}:0 $A:0", pair=f"{b}:0 $A:0 {b}:1 $B:1", special_tokens=[(b, bos)])
    return tok


def transformers_tokenizer(src: Path):
    """Fallback for tokenizers we do not build ourselves (sentencepiece, newer regexes): transformers'
    GGUF converter. It needs torch installed."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    except ImportError as e:
        raise ForgeError(f"{src}: converting this GGUF's tokenizer needs transformers' GGUF support, which "
                         f"needs torch ({e}); install torch, or use the model's HF checkpoint") from None


def save_tokenizer(meta: dict, src: Path, out: Path) -> None:
    """Save a fast tokenizer with the GGUF's chat template and the end-of-turn token as eos."""
    from transformers import PreTrainedTokenizerFast

    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ForgeError(f"{src}: the GGUF has no tokenizer (tokenizer.ggml.tokens); cannot import it")

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    eos = tokens[end_of_turn_ids(meta)[0]] if end_of_turn_ids(meta) else None
    special = {"bos_token": token("bos_token_id"), "eos_token": eos,
               "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id") or eos}
    backend = byte_level_tokenizer(meta)
    if backend is not None:
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    else:
        tokenizer = transformers_tokenizer(src)
        tokenizer.add_special_tokens({k: v for k, v in special.items() if v is not None})
    template = meta.get("tokenizer.chat_template")
    if template:
        tokenizer.chat_template = template
    context = meta.get(f"{meta.get('general.architecture')}.context_length")
    if context:
        tokenizer.model_max_length = context
    tokenizer.save_pretrained(str(out))
    portable_tokenizer_config(out / "tokenizer_config.json", template)


def portable_tokenizer_config(path: Path, template: str | None) -> None:
    """Name the class every transformers version knows, and keep the chat template in the config too
    (transformers 5 writes chat_template.jinja; older readers look in tokenizer_config.json)."""
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if template:
        cfg["chat_template"] = template
    write_json(path, cfg)
