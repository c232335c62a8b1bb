"""The planner's inputs: a model's shape from its config.json (ModelShape), one line of a plan (Component), and the
numbers every formula of estimate.py, weights.py and build.py reads, resolved once per plan (Run)."""

from __future__ import annotations

from dataclasses import dataclass

from forge_core.config import ForgeConfig
from forge_core.errors import ForgeError

# Where each LoRA target reads its input from: targets sharing an input share its saved activation.
TARGET_INPUT = {"q_proj": "xn", "k_proj": "xn", "v_proj": "xn", "o_proj": "attn",
                "gate_proj": "xn2", "up_proj": "xn2", "down_proj": "mlp"}


@dataclass(frozen=True)
class ModelShape:
    """The config.json numbers the planner needs (Llama-style decoder blocks)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    model_type: str = ""

    @classmethod
    def from_config(cls, config: dict, source: str = "config.json") -> ModelShape:
        c = config.get("text_config", config) if "hidden_size" not in config else config
        need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [k for k in need if not isinstance(c.get(k), int)]
        if missing:
            raise ForgeError(f"{source}: no integer {', '.join(missing)}; the memory planner needs a "
                             "Llama-style config.json (hidden_size, intermediate_size, num_hidden_layers, ...)")
        heads = c["num_attention_heads"]
        return cls(hidden=c["hidden_size"], intermediate=c["intermediate_size"], layers=c["num_hidden_layers"],
                   heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads, vocab=c["vocab_size"],
                   tied=bool(c.get("tie_word_embeddings", False)),  # absent: count lm_head separately
                   model_type=str(c.get("model_type") or config.get("model_type") or ""))

    def linears(self) -> dict[str, tuple[int, int]]:
        """Linear weights of one block: name -> (out, in)."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


@dataclass
class Component:
    """One line of the plan. phase: "train" (training step), "init" (model build), "both"."""

    name: str
    bytes: int
    note: str = ""
    phase: str = "train"


@dataclass(frozen=True)
class Run:
    """The numbers every formula needs, resolved once from (cfg, shape, kind, backend, device)."""

    cfg: ForgeConfig
    shape: ModelShape
    const: dict
    on_gpu: bool
    cb: int  # compute dtype bytes
    rows: int  # B (doubled for the pair methods)
    seq: int  # T: max_seq_len, or the widest batch of the data
    head_tokens: int  # positions the vocabulary head runs at per micro-batch (B·T, or B x the data's loss cap)
    targets: tuple[str, ...]
    lora_layers: int
    mode: str  # affine | nf4 | fp4 | int8 | none

    @property
    def tokens(self) -> int:
        return self.rows * self.seq


def compute_bytes(dtype: str, on_gpu: bool) -> int:
    """model.dtype -> bytes: auto is fp32 on a CPU, bf16 on Metal/CUDA."""
    if dtype == "auto":
        return 2 if on_gpu else 4
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
