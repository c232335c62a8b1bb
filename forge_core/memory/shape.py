"""The planner's inputs: a model's shape from its config.json (ModelShape), one line of a plan (Component), and the
numbers every formula of estimate.py, weights.py and build.py reads, resolved once per plan (Run)."""

from __future__ import annotations

from dataclasses import dataclass

from forge_core.config import ForgeConfig
from forge_core.errors import ForgeError

# Where each LoRA target reads its input from: targets sharing an input share its saved activation.
TARGET_INPUT = {"q_proj": "xn", "k_proj": "xn", "v_proj": "xn", "o_proj": "attn",
                "gate_proj": "xn2", "up_proj": "xn2", "down_proj": "mlp", "gate": "xn2"}
EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj")  # a mixture of experts' MLP: one stack of E per block
# config.json keys of a mixture of experts, as the Hub's checkpoints spell them (Mixtral and gpt-oss:
# num_local_experts; Qwen3-MoE and OLMoE: num_experts; the expert width: moe_intermediate_size where the config
# also keeps a dense intermediate_size, as Qwen3-MoE does)
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
TOP_K_KEYS = ("num_experts_per_tok", "experts_per_token", "moe_top_k")


@dataclass(frozen=True)
class ModelShape:
    """The config.json numbers the planner needs (Llama-style decoder blocks; a mixture of experts keeps E
    experts of width `expert_intermediate` per block and sends each token through `top_k` of them)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    model_type: str = ""
    experts: int = 0  # routed experts per block; 0: a dense MLP
    top_k: int = 0
    expert_intermediate: int = 0

    @classmethod
    def from_config(cls, config: dict, source: str = "config.json") -> ModelShape:
        c = config.get("text_config", config) if "hidden_size" not in config else config
        need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [k for k in need if not isinstance(c.get(k), int)]
        if missing:
            raise ForgeError(f"{source}: no integer {', '.join(missing)}; the memory planner needs a "
                             "Llama-style config.json (hidden_size, intermediate_size, num_hidden_layers, ...)")
        heads = c["num_attention_heads"]
        experts = next((c[k] for k in EXPERT_KEYS if isinstance(c.get(k), int) and c[k] > 0), 0)
        top_k = next((c[k] for k in TOP_K_KEYS if isinstance(c.get(k), int) and c[k] > 0), 0)
        if experts and not top_k:
            raise ForgeError(f"{source}: {experts} experts but no num_experts_per_tok; the memory planner needs "
                             "how many experts each token goes through")
        return cls(hidden=c["hidden_size"], intermediate=c["intermediate_size"], layers=c["num_hidden_layers"],
                   heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads, vocab=c["vocab_size"],
                   tied=bool(c.get("tie_word_embeddings", False)),  # absent: count lm_head separately
                   model_type=str(c.get("model_type") or config.get("model_type") or ""),
                   experts=experts, top_k=min(top_k, experts),
                   expert_intermediate=(c.get("moe_intermediate_size") or c["intermediate_size"]) if experts else 0)

    def linears(self) -> dict[str, tuple[int, int]]:
        """Linear weights of one block: name -> (out, in) of ONE copy (an expert's, where the block has E: see
        copies). A mixture of experts adds its router, `gate` (E, h)."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        i = self.expert_intermediate if self.experts else self.intermediate
        mlp = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
        router = {"gate": (self.experts, h)} if self.experts else {}
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q), **mlp, **router}

    def copies(self, name: str) -> int:
        """How many of `name` one block stores: E for an expert projection, else 1."""
        return self.experts if self.experts and name in EXPERT_LINEARS else 1

    def active(self, name: str) -> int:
        """How many of `name` each token goes through: top-k for an expert projection, else 1."""
        return self.top_k if self.experts and name in EXPERT_LINEARS else 1

    def stored(self, name: str) -> int:
        """Parameters of `name` in one block, every copy."""
        out, inp = self.linears()[name]
        return self.copies(name) * out * inp

    def block_params(self) -> int:
        return sum(self.stored(n) for n in self.linears())

    @property
    def mlp_width(self) -> int:
        """The MLP's hidden width per token: the intermediate size, or top-k x an expert's."""
        return self.top_k * self.expert_intermediate if self.experts else self.intermediate

    def moe_note(self) -> str:
        return f"MoE: {self.experts} experts x top-{self.top_k}, expert width {self.expert_intermediate}" \
            if self.experts else ""


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
