"""Run configuration: these dataclasses are the ONE place defaults live, each numeric key with its allowed Range
beside its default, each fixed set of values as a Literal.

Reading a config from YAML, options and --set onto them: config_parse.py. The config a run uses, resolved once
(defaults <- recipe <- options <- --set <- the method <- a resumed run): run_config.py.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Annotated, Literal

from forge_core.errors import ForgeError

# The allowed values of the fields that have a fixed set: declared once, checked by set_value and offered
# by the CLI (choices(key)).
Backend = Literal["auto", "mlx", "cuda"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
QuantBits = Literal[0, 2, 3, 4, 6, 8]
QuantMode = Literal["auto", "affine", "nf4", "fp4"]
Matmul = Literal["auto", "dequant", "fused"]
Schedule = Literal["cosine", "linear", "constant"]
Optimizer = Literal["adamw", "adamw8bit", "paged_adamw8bit"]
DpoLoss = Literal["sigmoid", "ipo", "hinge", "robust", "bco_pair", "exo_pair", "nca_pair", "sppo_hard", "apo_zero",
                  "apo_down", "aot", "aot_unpaired", "discopop", "sigmoid_norm"]
CpoLoss = Literal["sigmoid", "hinge", "ipo"]
KtoLoss = Literal["kto", "apo_zero_unpaired"]
GrpoLoss = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
GrpoScale = Literal["group", "batch", "none"]
GrpoLevel = Literal["token", "sequence"]
Metric = Literal["auto", "exact", "json_fields", "none"]



@dataclass(frozen=True)
class Range:
    """The allowed numbers of a numeric key, declared beside its default as `Annotated[int, Range(...)]` and
    checked by set_value, so a bad value stops the command with one line before anything is built."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself excluded (a rate must be > 0)
    hi_open: bool = False

    def holds(self, v) -> bool:
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return self.hi is None or (v < self.hi or (not self.hi_open and v == self.hi))

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


# The shapes most keys take. Where 0 has a meaning (never, all, derive) the key's comment says so; a learning rate
# of 0 trains nothing and is allowed (the losses at init, as a check), a negative one is not.
Count = Annotated[int, Range(0)]  # 0 or more
PosInt = Annotated[int, Range(1)]
PosFloat = Annotated[float, Range(0, lo_open=True)]
NonNeg = Annotated[float, Range(0)]
Fraction = Annotated[float, Range(0, 1)]
Smoothing = Annotated[float, Range(0, 0.5)]  # a label-smoothing ε
GroupSize = Literal[32, 64, 128]  # what mx.quantize and forge_cuda's blocks take

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    path: str = "smollm2-135m"  # HF dir, hub id, .gguf file, or a bundled name (`forge models`)
    dtype: Dtype = "auto"  # auto (fp32 on CPU, bf16 on GPU) | float32 | bfloat16 | float16
    fast_cpu_math: bool = True  # MLX on CPU: forge's exp kernels for softmax/SwiGLU/loss (forge_mlx/cpu_math.py)


@dataclass
class DataConfig:
    # a JSONL / JSON / parquet / CSV file, a directory of JSONL, a `datasets` dir, a dataset repo dir or a Hub
    # dataset id `org/name[:subset][@split]` (forge_core/data/sources.py)
    train: str = ""
    valid: str = ""  # a source as above, a split of the train dataset ("test"), or a held-out fraction ("0.05")
    subset: str = ""  # the dataset's configuration (datasets' `name`), when the spec does not say
    split: str = ""  # the train split of a dataset ("" = train), when the spec does not say
    columns: dict[str, str] = field(default_factory=dict)  # our name -> the dataset's column name
    train_on_prompt: bool = False  # False: loss on assistant tokens only
    packing: bool = False  # pack short rows into max_seq_len sequences (attention kept per row)
    skip_bad_rows: bool = False  # skip (and count) bad rows instead of stopping at the first
    system_prompt: str = ""  # prepended as a system message where a row has none
    shuffle: bool = True


@dataclass
class LoraConfig:
    rank: PosInt = 16
    alpha: PosFloat = 16.0  # scale = alpha / rank (alpha / sqrt(rank) with rslora); PiSSA authors use alpha = rank
    dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # or ["all-linear"]
    layers: str = "all"  # "all", "-8:" (last 8), "0:12" (python slice over the blocks)
    # pissa_niter_N: PiSSA by the randomized SVD with N subspace iterations (PEFT's name), the default because a full
    # SVD of every target costs minutes to hours before step 1 at 1B-8B for no measurable gain (docs/BENCHMARKS.md
    # "Fidelity"); pissa: the exact SVD; lora: plain LoRA init (A random, B = 0)
    init: str = "pissa_niter_4"
    rslora: bool = False
    dora: bool = False  # DoRA: a trained magnitude per output row over the adapted direction (QDoRA on a 4-bit base)


@dataclass
class QuantConfig:
    bits: QuantBits = 4  # 0 = full precision base; 4 or 8
    group_size: GroupSize = 64
    mode: QuantMode = "auto"  # auto (affine on MLX, nf4 on CUDA) | affine | nf4 | fp4
    double_quant: bool = True  # bitsandbytes only
    embeddings: bool = False  # quantize embeddings / lm_head too
    matmul: Matmul = "auto"  # auto (dequant+BLAS on CPU, quantized_matmul on GPU) | dequant | fused


@dataclass
class TrainConfig:
    lr: NonNeg = 2e-4  # SFT; the preference commands train at their section's lr (dpo.lr, orpo.lr, ...)
    schedule: Schedule = "cosine"  # cosine | linear | constant (all after linear warmup)
    warmup: Count = 10
    min_lr_ratio: Fraction = 0.1
    steps: Count = 0  # optimizer steps; 0 = derive from epochs
    epochs: PosFloat = 1.0
    batch_size: PosInt = 4
    grad_accum: PosInt = 1
    max_seq_len: Annotated[int, Range(2)] = 512
    grad_checkpoint: bool = False
    # MLX: the vocabulary head and its log-softmax run a few positions at a time in the forward and the backward
    # (forge_mlx/head.py chunked_nll), so the loss never holds (positions x vocab) logits; false: whole logits,
    # 8-21% faster steps on SmolLM2 on the CPU for 0.3-0.7 GiB more on the demos (docs/BENCHMARKS.md)
    chunked_loss: bool = True
    optimizer: Optimizer = "adamw"  # adamw | adamw8bit | paged_adamw8bit (the last two: CUDA backend)
    weight_decay: NonNeg = 0.0
    max_grad_norm: NonNeg = 1.0  # 0 = no clipping
    seed: Count = 0
    log_every: Count = 10  # 0 = the first and the last step only
    eval_every: Count = 50  # 0 = only at the end
    eval_batches: Count = 0  # 0 = the whole validation set
    save_every: Count = 100  # 0 = only at the end (and on a stop)
    save_every_minutes: NonNeg = 10.0  # and a checkpoint when this long has passed since the last one; 0 = off
    out_dir: str = "runs/latest"
    compile: bool = True
    report_to: list[str] = field(default_factory=list)  # tensorboard, wandb, trackio (tracking.py); rank 0 only
    project: str = "forge"  # the W&B / Trackio project


# The preference methods (`forge dpo / orpo / simpo / cpo / kto`): each has its own section, and its command
# copies the section's lr into train.lr. LoRA rates are the papers' full fine-tuning rates x 10 where a paper
# gives one (Schulman et al. 2025, "LoRA Without Regret": LoRA's best rate is ~10x full fine-tuning's).
# `adapter`: continue from this SFT adapter (for dpo and kto it is also the reference).


@dataclass
class DpoConfig:
    lr: NonNeg = 2e-5  # DPO learning rate (typical 5e-6..5e-5)
    beta: PosFloat = 0.1
    loss_type: DpoLoss = "sigmoid"  # the formulas: forge_core/losses/dpo.py
    label_smoothing: Smoothing = 0.0  # ε: cDPO for sigmoid; robust (0 <= ε < 0.5), exo_pair (> 0, paper: 1e-3), aot
    sft_weight: NonNeg = 0.0  # RPO-style NLL term on chosen
    discopop_tau: PosFloat = 0.05  # discopop's temperature (paper default)
    adapter: str = ""


@dataclass
class OrpoConfig:
    lr: NonNeg = 8e-5  # ORPO paper: 8e-6 full fine-tuning (Mistral-ORPO), x 10 for LoRA
    beta: PosFloat = 0.1  # λ, the odds-ratio term's weight (paper and TRL: 0.1)
    adapter: str = ""


@dataclass
class SimpoConfig:
    lr: NonNeg = 1e-5  # SimPO paper: 3e-7..1e-6 full fine-tuning, x 10 for LoRA
    beta: PosFloat = 2.0  # SimPO paper's default reward scale
    gamma: NonNeg = 1.0  # target reward margin γ (paper: γ/β = 0.5)
    label_smoothing: Smoothing = 0.0
    sft_weight: NonNeg = 0.0  # TRL's cpo_alpha: > 0 is CPO-SimPO
    adapter: str = ""


@dataclass
class CpoConfig:
    lr: NonNeg = 1e-5  # TRL's CPO rate 1e-6 (full fine-tuning), x 10 for LoRA
    beta: PosFloat = 0.1
    loss_type: CpoLoss = "sigmoid"  # sigmoid (CPO paper) | hinge | ipo
    label_smoothing: Smoothing = 0.0
    sft_weight: NonNeg = 1.0  # TRL's cpo_alpha: the NLL term on chosen (CPO paper: 1)
    adapter: str = ""


@dataclass
class KtoConfig:
    lr: NonNeg = 5e-6  # KTO paper: 5e-7 full fine-tuning (beta 0.1), x 10 for LoRA
    beta: PosFloat = 0.1
    loss_type: KtoLoss = "kto"  # kto | apo_zero_unpaired
    desirable_weight: PosFloat = 1.0  # paper: keep weight x count of desirable : undesirable in [1, 4/3]
    undesirable_weight: PosFloat = 1.0
    adapter: str = ""


@dataclass
class GrpoConfig:
    """GRPO (`forge grpo`), with TRL 1.16's defaults where they suit LoRA on one machine. train.batch_size counts
    COMPLETIONS per micro-batch (TRL's per_device_train_batch_size); a step's batch_size x grad_accum completions
    must be whole groups of num_generations."""

    lr: NonNeg = 1e-5  # TRL: 1e-6 (full fine-tuning), x 10 for LoRA
    rewards: list[str] = field(default_factory=list)  # FILE.py:FUNCTION or builtin:NAME[:ARG] (forge_core/datagen/rewards.py)
    reward_weights: list[float] = field(default_factory=list)  # one per reward; empty = all 1
    num_generations: Annotated[int, Range(2)] = 4  # G completions per prompt (TRL: 8); GRPO compares them
    max_new_tokens: PosInt = 64  # TRL's max_completion_length (TRL: 512)
    temperature: PosFloat = 1.0
    top_p: Annotated[float, Range(0, 1, lo_open=True)] = 1.0
    beta: NonNeg = 0.0  # KL to the policy at init (TRL 1.x: 0, no reference pass)
    loss_type: GrpoLoss = "dapo"  # grpo | bnpo | dr_grpo | dapo (TRL 1.x default)
    scale_rewards: GrpoScale = "group"  # group (the paper) | batch | none (Dr. GRPO)
    epsilon: NonNeg = 0.2  # clip range, below
    epsilon_high: NonNeg = 0.0  # clip range above (DAPO: 0.28); 0 = epsilon
    delta: NonNeg = 0.0  # > 0: cap the ratio from above (two-sided clipping); 0 = off
    importance_sampling_level: GrpoLevel = "token"  # token | sequence (GSPO)
    num_iterations: PosInt = 1  # optimizer steps per generation (μ); > 1 keeps the generation's log-probs as π_old
    mask_truncated_completions: bool = False  # completions cut at max_new_tokens carry no loss (DAPO)
    sample_batch_size: Count = 0  # completions decoded at once; 0 = all of a step's
    adapter: str = ""


@dataclass
class EvalConfig:
    max_new_tokens: PosInt = 96
    metric: Metric = "auto"  # auto | exact | json_fields | none
    limit: Count = 0  # 0 = all rows
    batch_size: PosInt = 32  # answers generated at once (the held-out loss batches by train.batch_size)
    text: str = ""  # forge eval --text: a text file's sliding-window perplexity (windows of train.max_seq_len)
    stride: Count = 0  # tokens between window starts; 0 = half a window
    lm_eval: str = ""  # forge eval --lm-eval: comma-separated lm-evaluation-harness tasks (forge ships forge_mc)
    lm_eval_include: str = ""  # a directory of your own lm-eval task YAMLs
    lm_eval_limit: NonNeg = 0  # rows per task (a fraction when < 1); 0 = all
    lm_eval_fewshot: Annotated[int, Range(-1)] = -1  # few-shot examples; -1 = the task's default
    lm_eval_max_length: PosInt = 2048  # context lm-eval's requests are cut to (HFLM's fallback length)


@dataclass
class MemoryConfig:
    threshold: Annotated[float, Range(0, 1, lo_open=True)] = 0.80  # refuse to launch above this fraction of the budget
    device_memory: str = ""  # e.g. "24GB": plan for a device other than this one
    # e.g. 6GB: stop cleanly (with a checkpoint) when the measured peak passes this; default: the plan's
    # budget; "off": no peak check (out-of-memory errors still stop cleanly). A resume takes it anew.
    limit: str = ""


@dataclass
class ForgeConfig:
    backend: Backend = "auto"  # auto | mlx | cuda
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    orpo: OrpoConfig = field(default_factory=OrpoConfig)
    simpo: SimpoConfig = field(default_factory=SimpoConfig)
    cpo: CpoConfig = field(default_factory=CpoConfig)
    kto: KtoConfig = field(default_factory=KtoConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {name: cls for name, cls in typing.get_type_hints(ForgeConfig).items() if name != "backend"}

def lora_init_kind(init: str) -> tuple[str, int]:
    """'lora' -> ('lora', 0); 'pissa' -> ('pissa', 0); 'pissa_niter_4' -> ('pissa', 4)."""
    if init in ("lora", "pissa"):
        return init, 0
    if init.startswith("pissa_niter_") and init[len("pissa_niter_"):].isdigit():
        return "pissa", int(init[len("pissa_niter_"):])
    raise ForgeError(f"lora.init: '{init}' is not one of lora, pissa, pissa_niter_N (e.g. pissa_niter_4)")


def lora_scale(lora: LoraConfig) -> float:
    """alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return lora.alpha / (lora.rank ** 0.5 if lora.rslora else lora.rank)


def layer_indices(spec: str, num_layers: int) -> list[int]:
    """'all' | '-8:' | '0:12' | '3' -> sorted block indices; errors name lora.layers."""
    spec = str(spec).strip()
    if spec in ("all", ""):
        return list(range(num_layers))
    try:
        if ":" in spec:
            parts = [int(p) if p.strip() else None for p in spec.split(":")]
            if len(parts) > 3:
                raise ValueError
            idx = list(range(num_layers))[slice(*parts)]
        else:
            n = int(spec)  # a count of LAST layers, like mlx-lm's num_layers
            idx = list(range(num_layers))[-n:] if n > 0 else []
    except ValueError:
        raise ForgeError(f"lora.layers: '{spec}' is not 'all', a count, or a slice like '-8:'") from None
    if not idx:
        raise ForgeError(f"lora.layers: '{spec}' selects no layer of the model's {num_layers}")
    return idx
