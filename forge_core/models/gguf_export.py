"""HF-layout model dir (a merged export) -> one GGUF file for llama.cpp / Ollama / LM Studio, with the `gguf`
package's writer. The inverse of gguf_import.py, with its tables run backwards (one table, two directions):
tensor names (BLOCK_NAMES / TOP_NAMES), llama.cpp's rotary row order for q and k (permute_rows, the inverse of
unpermute_rows), the byte-level BPE tokenizer (tokens, token types, merges, llama.cpp's pre-tokenizer name) and
the chat template.

Architectures (ARCHS): Llama and Mistral (llama.cpp's "llama": q and k rows permuted), Qwen2 ("qwen2": q/k/v
biases, no permutation) and Phi-3 ("phi3": fused qkv and gate_up); others are refused with one line naming them. Tokenizers: byte-level BPE whose
pre-tokenizer llama.cpp knows by name (GPT-2, digits + GPT-2 as SmolLM/StarCoder, Llama 3's and Qwen2's
regexes); others are refused. Outtypes: f32, f16, bf16 (the
weights rounded once from the float32 merge) and q8_0 (llama.cpp's 8-bit blocks of 32; 1-D tensors stay f32,
as llama.cpp's converter keeps norms). The source is the exact float32 merge: nothing already quantized is
quantized again.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from forge_core.adapters import safetensors_io as sio
from forge_core.errors import ForgeError
from forge_core.models.gguf_import import BLOCK_NAMES, CONTROL, LLAMA3_SPLIT, TOP_NAMES, USER_DEFINED

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# HF architecture -> (llama.cpp architecture, whether llama.cpp permutes the q/k rows for its rotary order)
ARCHS = {"LlamaForCausalLM": ("llama", True), "MistralForCausalLM": ("llama", True),
         "Qwen2ForCausalLM": ("qwen2", False), "Phi3ForCausalLM": ("phi3", False)}
# module names beyond the import's tables (Phi-3 keeps q/k/v and gate/up fused, as llama.cpp does)
FUSED_NAMES = {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2's regex: single digits
_TO_GGUF = {**{hf: g for g, hf in {**BLOCK_NAMES, **TOP_NAMES}.items()}, **FUSED_NAMES}


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary order (row i pairs with i + head_dim/2) -> llama.cpp's (adjacent pairs); unpermute_rows' inverse."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    """model.layers.1.self_attn.q_proj.weight -> blk.1.attn_q.weight; model.norm.weight -> output_norm.weight."""
    stem, suffix = hf.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, n, module = stem.split(".", 3)
        if module in _TO_GGUF:
            return f"blk.{n}.{_TO_GGUF[module]}.{suffix}"
    elif stem in _TO_GGUF:
        return f"{_TO_GGUF[stem]}.{suffix}"
    raise ForgeError(f"GGUF export: no llama.cpp name for the weight {hf} (llama layout only)")


def _pre_name(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for an HF byte-level pre-tokenizer (tokenizer.json), or a ForgeError."""
    kinds = [p.get("type") for p in (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer or {}])]
    if kinds == ["ByteLevel"]:
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"]:
        return "smollm"  # llama.cpp's name for digits-then-GPT-2 (DIGITS_PRE in gguf_import.py)
    if kinds == ["Split", "ByteLevel"]:
        regex = pre_tokenizer["pretokenizers"][0].get("pattern", {}).get("Regex")
        if regex in (LLAMA3_SPLIT, QWEN2_SPLIT):
            return "llama-bpe" if regex == LLAMA3_SPLIT else "qwen2"
    raise ForgeError(f"GGUF export: a pre-tokenizer llama.cpp has no name for ({' + '.join(map(str, kinds))}); "
                     "byte-level BPE tokenizers of the GPT-2, SmolLM/StarCoder and Llama 3 kinds are supported")


def _tokenizer(writer, src: Path, cfg: dict) -> None:
    tok = json.loads((src / "tokenizer.json").read_text())
    model = tok.get("model", {})
    if model.get("type") != "BPE" or (tok.get("decoder") or {}).get("type") != "ByteLevel":
        raise ForgeError(f"{src}: GGUF export supports byte-level BPE tokenizers; this one is "
                         f"{model.get('type')} with a {(tok.get('decoder') or {}).get('type')} decoder")
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in tok.get("added_tokens", [])}
    for content, t in added.items():
        vocab.setdefault(content, t["id"])
    tokens = [""] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    types = [CONTROL if t in added and added[t].get("special") else USER_DEFINED if t in added else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    tcfg = json.loads((src / "tokenizer_config.json").read_text()) if (src / "tokenizer_config.json").is_file() else {}

    def token_id(key):
        name = tcfg.get(key)
        name = name.get("content") if isinstance(name, dict) else name
        return vocab.get(name) if name else None

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_name(tok.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    else:  # a byte-only vocabulary: GGUF cannot hold an empty list, and transformers then rebuilds merges
        writer.add_token_scores([0.0] * len(tokens))  # from the vocabulary and its scores (none to rebuild)
    eos = cfg.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    eos = token_id("eos_token") if eos is None else eos
    for add, value in ((writer.add_bos_token_id, token_id("bos_token") if cfg.get("bos_token_id") is None
                        else cfg["bos_token_id"]),
                       (writer.add_eos_token_id, eos),
                       (writer.add_pad_token_id, token_id("pad_token") if cfg.get("pad_token_id") is None
                        else cfg["pad_token_id"])):
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(bool((tok.get("post_processor") or {}).get("type") == "TemplateProcessing"))
    template = tcfg.get("chat_template")
    if not template and (src / "chat_template.jinja").is_file():
        template = (src / "chat_template.jinja").read_text()
    if template:
        writer.add_chat_template(template)


def _hyperparameters(writer, cfg: dict) -> None:
    heads = cfg["num_attention_heads"]
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg.get("max_position_embeddings", 2048))
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.get("num_key_value_heads", heads))
    writer.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) in ("default", None) and not any(
            k in scaling for k in ("factor", "short_factor")):
        scaling = {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling:
        raise ForgeError(f"GGUF export: rope_scaling {scaling} is not written yet (linear only)")


def _encoded(a: np.ndarray, outtype: str):
    """(data, raw dtype or None) for the writer: float arrays as numpy, q8_0 blocks as raw bytes."""
    import gguf

    if outtype == "f32" or a.ndim == 1:
        return a.astype(np.float32), None
    if outtype == "f16":
        return a.astype(np.float16), None
    kind = gguf.GGMLQuantizationType.BF16 if outtype == "bf16" else gguf.GGMLQuantizationType.Q8_0
    if outtype == "q8_0" and a.shape[-1] % 32:
        return a.astype(np.float16), None  # a row not in whole blocks of 32: f16, as llama.cpp falls back
    return gguf.quants.quantize(a.astype(np.float32), kind), kind


def write_gguf(src: Path, out: Path, outtype: str = "f16", name: str | None = None) -> Path:
    """The HF dir `src` (float weights, llama layout) as the GGUF file `out`."""
    import gguf

    if outtype not in OUTTYPES:
        raise ForgeError(f"--outtype '{outtype}': choose one of {', '.join(OUTTYPES)}")
    cfg = json.loads((src / "config.json").read_text())
    archs = cfg.get("architectures") or ["unknown"]
    if archs[0] not in ARCHS:
        raise ForgeError(f"GGUF export: the {archs[0]} architecture is not supported yet "
                         f"(supported: {', '.join(ARCHS)})")
    arch, permuted = ARCHS[archs[0]]
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(name or src.name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    _hyperparameters(writer, cfg)
    _tokenizer(writer, src, cfg)
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg.get("num_key_value_heads", cfg["num_attention_heads"])}
    heads = heads if permuted else {}
    for f in sio.checkpoint_files(src):
        header, _ = sio.read_header(f)
        for hf in sorted(header):
            a = sio.read_tensor(f, header[hf]).astype(np.float32)
            n = next((h for k, h in heads.items() if f".{k}." in hf), 0)
            data, raw = _encoded(permute_rows(a, n) if n else a, outtype)
            writer.add_tensor(gguf_name(hf), data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def modelfile(gguf_file: str, system: str = "") -> str:
    """An Ollama Modelfile beside the GGUF: `ollama create NAME -f Modelfile` (Ollama takes the chat template
    from the GGUF's metadata); the run's system prompt, when it had one."""
    lines = [f"FROM ./{gguf_file}"]
    if system:
        lines.append('SYSTEM """' + system.replace('"""', '\\"\\"\\"') + '"""')
    return "\n".join(lines) + "\n"
