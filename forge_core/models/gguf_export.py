"""HF-layout model dir (a merged export) -> one GGUF file for llama.cpp / Ollama / LM Studio, with the `gguf`
package's writer. The inverse of gguf_import.py, with its tables run backwards (one table, two directions):
tensor names (BLOCK_NAMES / TOP_NAMES), llama.cpp's rotary row order for q and k (permute_rows, the inverse of
unpermute_rows), the byte-level BPE tokenizer (tokens, token types, merges, llama.cpp's pre-tokenizer name) and
the chat template.

Architectures (ARCHS): Llama and Mistral (llama.cpp's "llama": q and k rows permuted), Qwen2 ("qwen2": q/k/v
biases, no permutation), Qwen3 ("qwen3": q/k norms), Phi-3 ("phi3": fused qkv and gate_up), Gemma 2 ("gemma2": four norms per block, stored
as 1 + w, the soft-capping values, head_dim written) and Gemma 3's text model ("gemma3": Gemma 2's layout plus q/k
norms); the mixtures of experts Mixtral (llama.cpp's "llama" with experts) and Qwen3-MoE ("qwen3moe"): the router
as ffn_gate_inp, each projection's per-expert weights stacked into one (E, out, in) tensor, ffn_{gate,up,down}_exps,
with the expert count, top-k and (qwen3moe) the expert width; others are refused with one line naming them.
Outtypes beyond the float ones: llama.cpp's blocks of 32 (q8_0, q5_1, q5_0, q4_1, q4_0), quantized by gguf-py;
q4_K_M and the other k-quants come from llama.cpp's own `llama-quantize` on the f16 file (README, GGUF).
Tokenizers: byte-level BPE (Llama 3, Qwen2, SmolLM, GPT-2 style) whose pre-tokenizer llama.cpp knows by name
(GPT-2, digits + GPT-2 as SmolLM/StarCoder, Llama 3's and Qwen2's regexes), as llama.cpp's "gpt2" vocabulary; and
SentencePiece-style BPE with byte fallback (Llama 2, Mistral 7B v0.1-0.3, Phi-3-mini, Gemma), as its "llama"
vocabulary (pieces in id order scored -id, the merge order; <0xNN> byte tokens; the space prefix); others are
refused. Outtypes: f32, f16, bf16 (the
weights rounded once from the float32 merge) and q8_0 (llama.cpp's 8-bit blocks of 32; 1-D tensors stay f32,
as llama.cpp's converter keeps norms). The source is the exact float32 merge: nothing already quantized is
quantized again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from forge_core.adapters import safetensors_io as sio
from forge_core.errors import ForgeError
from forge_core.models.experts import expert_weight
from forge_core.models.gguf_import import (
    BLOCK_NAMES,
    CONTROL,
    LLAMA3_SPLIT,
    QWEN2_SPLIT,
    TOP_NAMES,
    USER_DEFINED,
)

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
BLOCK_TYPES = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0")  # llama.cpp's blocks of 32 values, gguf-py's quantizers
NORMAL, UNKNOWN, BYTE = 1, 2, 6  # llama.cpp token types (CONTROL and USER_DEFINED: the import's; UNUSED below)
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# HF architecture -> (llama.cpp architecture, whether llama.cpp permutes the q/k rows for its rotary order)
ARCHS = {"LlamaForCausalLM": ("llama", True), "MistralForCausalLM": ("llama", True),
         "Qwen2ForCausalLM": ("qwen2", False), "Phi3ForCausalLM": ("phi3", False),
         "Qwen3ForCausalLM": ("qwen3", False), "Gemma2ForCausalLM": ("gemma2", False),
         "Gemma3ForCausalLM": ("gemma3", False), "MixtralForCausalLM": ("llama", True),
         "Qwen3MoeForCausalLM": ("qwen3moe", False)}
EXPERT_NAMES = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
# module names beyond the import's tables (Phi-3 keeps q/k/v and gate/up fused, as llama.cpp does)
FUSED_NAMES = {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}
# Gemma 2's four norms per block: its post_attention_layernorm normalises the attention's output, and the norm
# before the MLP is pre_feedforward_layernorm (llama.cpp's ffn_norm)
GEMMA2_NAMES = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}

_TO_GGUF = {**{hf: g for g, hf in {**BLOCK_NAMES, **TOP_NAMES}.items()}, **FUSED_NAMES}
QK_NORMS = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
ROUTERS = {"block_sparse_moe.gate": "ffn_gate_inp", "mlp.gate": "ffn_gate_inp"}  # Mixtral's, Qwen3-MoE's
_ARCH_NAMES = {"gemma2": {**_TO_GGUF, **GEMMA2_NAMES}, "gemma3": {**_TO_GGUF, **GEMMA2_NAMES, **QK_NORMS},
               "qwen3": {**_TO_GGUF, **QK_NORMS}, "llama": {**_TO_GGUF, **ROUTERS},
               "qwen3moe": {**_TO_GGUF, **QK_NORMS, **ROUTERS}}


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary order (row i pairs with i + head_dim/2) -> llama.cpp's (adjacent pairs); unpermute_rows' inverse."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str, arch: str = "llama") -> str:
    """model.layers.1.self_attn.q_proj.weight -> blk.1.attn_q.weight; model.norm.weight -> output_norm.weight."""
    names = _ARCH_NAMES.get(arch, _TO_GGUF)
    stem, suffix = hf.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, n, module = stem.split(".", 3)
        if module in names:
            return f"blk.{n}.{names[module]}.{suffix}"
    elif stem in names:
        return f"{names[stem]}.{suffix}"
    raise ForgeError(f"GGUF export: no llama.cpp name for the weight {hf}")


def _pre_name(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for an HF byte-level pre-tokenizer (tokenizer.json), or a ForgeError."""
    kinds = [p.get("type") for p in (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer or {}])]
    if kinds == ["ByteLevel"]:
        return "gpt-2"  # llama.cpp knows "gpt-2" (its own converter writes it); "gpt2" fails its load
    if kinds == ["Digits", "ByteLevel"]:
        return "smollm"  # llama.cpp's name for digits-then-GPT-2 (DIGITS_PRE in gguf_import.py)
    if kinds == ["Split", "ByteLevel"]:
        regex = pre_tokenizer["pretokenizers"][0].get("pattern", {}).get("Regex")
        if regex in (LLAMA3_SPLIT, QWEN2_SPLIT):
            return "llama-bpe" if regex == LLAMA3_SPLIT else "qwen2"
    raise ForgeError(f"GGUF export: a pre-tokenizer llama.cpp has no name for ({' + '.join(map(str, kinds))}); "
                     "byte-level BPE tokenizers of the GPT-2, SmolLM/StarCoder, Llama 3 and Qwen2 kinds are supported")


UNUSED = 5  # llama.cpp's token type of the padding entries


def _space_prefix(tok: dict) -> bool:
    """Whether a SentencePiece-style tokenizer puts "▁" before a text (a Prepend normalizer, or a Metaspace
    pre-tokenizer that prepends)."""
    def walk(node, key):
        node = node or {}
        return [node, *[n for child in node.get(key, []) for n in walk(child, key)]]

    if any(n.get("type") == "Prepend" for n in walk(tok.get("normalizer"), "normalizers")):
        return True
    return any(n.get("type") == "Metaspace" and n.get("prepend_scheme", "always") != "never"
               for n in walk(tok.get("pre_tokenizer"), "pretokenizers"))


def _bos_added(tok: dict, tcfg: dict) -> bool:
    """Whether the tokenizer puts BOS before a text: tokenizer_config's add_bos_token when it says, else whether
    the post-processor's single-sequence template (nested in a Sequence or not) starts with a special token."""
    if isinstance(tcfg.get("add_bos_token"), bool):
        return tcfg["add_bos_token"]
    procs = [tok.get("post_processor") or {}]
    while procs and procs[0].get("type") == "Sequence":
        procs = procs[0].get("processors", [])
    for p in procs:
        if p.get("type") == "TemplateProcessing":
            single = p.get("single") or []
            return bool(single) and "SpecialToken" in single[0]
    return False


def _tokenizer(writer, src: Path, cfg: dict) -> None:
    if not (src / "tokenizer.json").is_file():
        raise ForgeError(f"{src}: no tokenizer.json; GGUF export writes the tokenizer into the file and needs it")
    tok = json.loads((src / "tokenizer.json").read_text())
    model = tok.get("model", {})
    spm = model.get("type") == "BPE" and bool(model.get("byte_fallback"))  # SentencePiece-style BPE
    if model.get("type") != "BPE" or not (spm or (tok.get("decoder") or {}).get("type") == "ByteLevel"):
        raise ForgeError(f"{src}: GGUF export writes BPE tokenizers, byte-level (GPT-2 style: Llama 3, Qwen2, SmolLM) "
                         f"or SentencePiece-style with byte fallback (Llama 2, Mistral, Gemma); this one is "
                         f"{model.get('type')} with a {(tok.get('decoder') or {}).get('type')} decoder")
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in tok.get("added_tokens", [])}
    for content, t in added.items():
        vocab.setdefault(content, t["id"])
    size = max(int(cfg["vocab_size"]), max(vocab.values()) + 1)
    if size > int(cfg["vocab_size"]):
        raise ForgeError(f"{src}: the tokenizer has ids up to {size - 1}, the model's vocab_size is "
                         f"{cfg['vocab_size']}; they must agree")
    tcfg = json.loads((src / "tokenizer_config.json").read_text()) if (src / "tokenizer_config.json").is_file() else {}
    unk = model.get("unk_token") or tcfg.get("unk_token")
    unk = unk.get("content") if isinstance(unk, dict) else unk
    # the embedding's rows beyond the tokenizer's ids are padding entries, as llama.cpp's converter writes them
    tokens = [f"[PAD{i}]" for i in range(size)]
    types, scores = [UNUSED] * size, [0.0] * size
    for t, i in vocab.items():
        tokens[i] = t
        if spm and t == unk:
            types[i] = UNKNOWN
        elif t in added:
            types[i] = CONTROL if added[t].get("special") else USER_DEFINED
        elif spm and BYTE_TOKEN.fullmatch(t):
            types[i] = BYTE
        else:
            types[i], scores[i] = NORMAL, -float(i)  # SentencePiece BPE: pieces in merge order, score = -rank
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    def token_id(key):
        name = tcfg.get(key)
        name = name.get("content") if isinstance(name, dict) else name
        return vocab.get(name) if name else None

    if spm:  # llama.cpp's "llama" vocabulary: scores give the merge order, byte tokens the fallback
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(_space_prefix(tok))
        if unk in vocab:
            writer.add_unk_token_id(int(vocab[unk]))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_name(tok.get("pre_tokenizer")))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    elif not spm:  # a byte-only vocabulary: GGUF cannot hold an empty list, and transformers then rebuilds merges
        writer.add_token_scores([0.0] * len(tokens))  # from the vocabulary and its scores (none to rebuild)
    eos = token_id("eos_token")  # the tokenizer's own end token first, as llama.cpp's converter reads it
    if eos is None:
        eos = cfg.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
    bos = token_id("bos_token") if token_id("bos_token") is not None else cfg.get("bos_token_id")
    pad = token_id("pad_token") if token_id("pad_token") is not None else cfg.get("pad_token_id")
    for add, value in ((writer.add_bos_token_id, bos), (writer.add_eos_token_id, eos), (writer.add_pad_token_id, pad)):
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(_bos_added(tok, tcfg))
    template = tcfg.get("chat_template")
    if not template and (src / "chat_template.jinja").is_file():
        template = (src / "chat_template.jinja").read_text()
    if template:
        writer.add_chat_template(template)


def _hyperparameters(writer, cfg: dict, src: Path) -> None:
    missing = [k for k in ("num_attention_heads", "num_hidden_layers", "hidden_size", "intermediate_size",
                           "vocab_size") if k not in cfg]
    if missing:
        raise ForgeError(f"{src}/config.json: no '{missing[0]}'; GGUF export needs the model's shape")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise ForgeError(f"{src}: partial_rotary_factor {cfg['partial_rotary_factor']} is not written yet")
    heads = cfg["num_attention_heads"]
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg.get("max_position_embeddings", 2048))
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.get("num_key_value_heads", heads))
    theta, scaling = rope_settings(cfg, src)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    writer.add_vocab_size(cfg["vocab_size"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    writer.add_rope_dimension_count(head_dim)
    gemma = cfg.get("model_type", "").startswith("gemma")
    if head_dim != cfg["hidden_size"] // heads or gemma:  # llama.cpp assumes hidden / heads unless told (Qwen3's 128)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if gemma:
        if cfg.get("query_pre_attn_scalar", head_dim) != head_dim:  # llama.cpp scales q by 1/sqrt(head_dim)
            raise ForgeError(f"{src}: query_pre_attn_scalar {cfg['query_pre_attn_scalar']} != head_dim {head_dim}, "
                             "which llama.cpp's gemma2 does not read from a GGUF")
        for key, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                         ("final_logit_softcapping", writer.add_final_logit_softcapping)):
            if cfg.get(key) is not None:
                add(float(cfg[key]))
    experts = next((cfg[k] for k in ("num_local_experts", "num_experts") if cfg.get(k)), 0)
    if experts:
        writer.add_expert_count(int(experts))
        writer.add_expert_used_count(int(cfg["num_experts_per_tok"]))
        if cfg.get("moe_intermediate_size"):
            writer.add_expert_feed_forward_length(int(cfg["moe_intermediate_size"]))
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", True):
        writer.add_sliding_window(int(cfg["sliding_window"]))
    if scaling.get("rope_type", scaling.get("type")) in ("default", None) and not any(
            k in scaling for k in ("factor", "short_factor")):
        scaling = {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling:
        raise ForgeError(f"GGUF export: rope_scaling {scaling} is not written yet (linear only)")


def rope_settings(cfg: dict, src: Path) -> tuple[float, dict]:
    """(rope base, scaling) from either config style: transformers 4's top-level rope_theta / rope_scaling, or
    transformers 5's rope_parameters - one block, or one per layer type (Gemma 3: full_attention's base is the one
    llama.cpp's file carries; its sliding layers use 10000, which llama.cpp assumes)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        local = (params.get("sliding_attention") or {}).get("rope_theta", 10000.0)
        if float(local) != 10000.0:
            raise ForgeError(f"{src}: the sliding layers' rope base is {local}; llama.cpp's file holds one base "
                             "(the global layers') and uses 10000 for the sliding ones")
        params = params["full_attention"]
    if isinstance(params, dict) and params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0))), scaling
    return float(cfg.get("rope_theta", 10000.0)), dict(cfg.get("rope_scaling") or {})


def _encoded(a: np.ndarray, outtype: str, name: str = ""):
    """(data, raw dtype or None) for the writer: float arrays as numpy, bf16 and the block types as raw bytes. 1-D
    tensors (norms, biases) stay f32, as llama.cpp's converter keeps them."""
    import gguf

    if outtype == "f32" or a.ndim == 1:
        return a.astype(np.float32), None
    if outtype == "f16":
        return a.astype(np.float16), None
    kind = gguf.GGMLQuantizationType.BF16 if outtype == "bf16" else getattr(gguf.GGMLQuantizationType, outtype.upper())
    if outtype == "q8_0" and a.shape[-1] % 32:
        return a.astype(np.float16), None  # a row not in whole blocks of 32: f16, as llama.cpp falls back
    if outtype in BLOCK_TYPES and a.shape[-1] % 32:
        raise ForgeError(f"GGUF export: {name} has rows of {a.shape[-1]} values, not whole blocks of 32 as "
                         f"{outtype} needs; export --outtype q8_0 (it keeps such rows f16) or f16")
    return gguf.quants.quantize(a.astype(np.float32), kind), kind


def write_gguf(src: Path, out: Path, outtype: str = "f16", name: str | None = None) -> Path:
    """The HF dir `src` (float weights, an architecture of ARCHS) as the GGUF file `out`."""
    import gguf

    if outtype not in OUTTYPES:
        raise ForgeError(f"--outtype '{outtype}': choose one of {', '.join(OUTTYPES)}")
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("quantization") or cfg.get("quantization_config"):
        raise ForgeError(f"{src}: the checkpoint is quantized; GGUF export writes from float weights (export the "
                         "merge without --quantize)")
    archs = cfg.get("architectures") or ["unknown"]
    if archs[0] not in ARCHS:
        raise ForgeError(f"GGUF export: the {archs[0]} architecture is not supported yet "
                         f"(supported: {', '.join(ARCHS)})")
    arch, permuted = ARCHS[archs[0]]
    plus_one = arch in ("gemma2", "gemma3")  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp's files hold 1 + w
    writer = gguf.GGUFWriter(str(out), arch, use_temp_file=True)  # tensors go to disk as they come, not to RAM
    writer.add_name(name or src.name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                          **{t: getattr(gguf.LlamaFileType, f"MOSTLY_{t.upper()}") for t in BLOCK_TYPES}}[outtype])
    _hyperparameters(writer, cfg, src)
    _tokenizer(writer, src, cfg)
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg.get("num_key_value_heads", cfg["num_attention_heads"])}
    heads = heads if permuted else {}
    experts = next((cfg[k] for k in ("num_local_experts", "num_experts") if cfg.get(k)), 0)
    pending: dict[str, dict[int, np.ndarray]] = {}  # an expert stack's weights until all E are read
    for f in sio.checkpoint_files(src):
        header, _ = sio.read_header(f)
        for hf in sorted(header):
            a = sio.read_tensor(f, header[hf]).astype(np.float32)
            hit = expert_weight(cfg.get("model_type"), hf)
            if hit:
                stack = pending.setdefault(hit[0], {})
                stack[hit[1]] = a
                if len(stack) == experts:  # one (E, out, in) tensor, written as soon as it is whole
                    block, proj = hit[0].split(".")[2], hit[0].rsplit(".", 1)[1]
                    data, raw = _encoded(np.stack([stack[e] for e in range(experts)]), outtype, hit[0])
                    writer.add_tensor(f"blk.{block}.{EXPERT_NAMES[proj]}.weight", data, raw_dtype=raw)
                    del pending[hit[0]]
                continue
            n = next((h for k, h in heads.items() if f".{k}." in hf), 0)
            if plus_one and hf.endswith("norm.weight"):
                a = a + 1.0
            data, raw = _encoded(permute_rows(a, n) if n else a, outtype, hf)
            writer.add_tensor(gguf_name(hf, arch), data, raw_dtype=raw)
    if pending:
        stack = min(pending)
        raise ForgeError(f"{src}: {stack} has {len(pending[stack])} of its {experts} experts' weights; the "
                         "checkpoint is incomplete")
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
