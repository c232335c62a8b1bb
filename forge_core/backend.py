"""What a backend provides, and which backend runs a command (chosen lazily: `forge --help` imports no
framework).

The loop (forge_core/train.py), the objectives (forge_core/objectives/) and eval (forge_core/eval/evaluate.py)
are written once; they reach the tensor framework only through a backend's `ops` module
(forge_mlx/ops.py, forge_cuda/ops.py), which satisfies `BackendOps` below. `ops.make_stepper` returns a
`Stepper`: one optimizer step cut where the loop needs to see it (accumulate micro-batches, update,
roll back after an out-of-memory error). tests/test_backend_contract.py checks both against these
Protocols, names and parameters.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
from collections.abc import Callable
from types import ModuleType
from typing import Any, Protocol

from forge_core import torch_free
from forge_core.errors import ForgeError

Batch = dict  # {name: framework array}, from a numpy batch of forge_core.data via ops.to_batch
LossFn = Callable[[Any, Batch], tuple]  # (model, batch) -> (loss SUM, count, {metric: sum})


class Stepper(Protocol):
    """One optimizer step of a model: gradients of loss SUMS accumulate over micro-batches, update()
    divides them by the total count (the one averaging point: a data-parallel all-reduce goes there),
    clips and steps. It owns the optimizer; its state round-trips through numpy for checkpoints."""

    def begin(self) -> None:
        """Before a step: remember what rollback() puts back."""

    def accumulate(self, batch: Batch) -> tuple[Any, Any, dict]:
        """loss_fn on one micro-batch and its gradient added up: (loss sum, count, {metric: sum})."""

    def update(self, count: Any, lr: float) -> Any:
        """Gradients / count, clip to train.max_grad_norm, one optimizer step at `lr`; the gradient norm."""

    def finish(self, values: list) -> None:
        """Make the step and these values real (MLX evaluates its lazy graph; eager torch: nothing)."""

    def rollback(self) -> bool:
        """After a failed step: put back the pre-step weights and optimizer state. False when that is not
        possible (the failure came inside an in-place optimizer update)."""

    def state_arrays(self) -> tuple[dict, dict, dict]:
        """(trainable weights, optimizer tensors, optimizer scalars): numpy arrays, JSON scalars."""

    def load_state_arrays(self, weights: dict, tensors: dict, scalars: dict) -> None:
        """Inverse of state_arrays (resume)."""


class BackendOps(Protocol):
    """The framework code a backend provides; everything else is forge_core's."""

    name: str  # "mlx" | "cuda"
    xp: ModuleType  # the array module forge_core/losses' formulas run on (mlx.core, torch)

    # ---- model and adapter files
    def build_model(self, cfg, pissa_init: dict | None = None, adapter_weights: dict | None = None) -> tuple:
        """Base -> PiSSA/LoRA on targets -> quantize: (model, tokenizer, model_dir, PiSSA factors)."""

    def compute_dtype(self, cfg) -> Any:
        """The dtype the run computes in (and the weights are cast to before the PiSSA SVD)."""

    def load_base_for_inference(self, cfg) -> tuple:
        """The base model alone, ready to generate: (model, tokenizer)."""

    def load_adapter_dir(self, path) -> tuple:
        """(training config, adapter weights {trainable name: np}, PiSSA factors or None) of a forge adapter."""

    def save_adapter(self, out_dir, model, cfg, factors: dict, model_dir, extra: dict | None = None):
        """The final adapter dir in this backend's layout (mlx-lm or PEFT) + forge.json, atomically."""

    def factors_to_flat(self, factors: dict) -> dict:
        """PiSSA {path: (A0, B0)} -> the flat arrays of the run's pissa_init.safetensors."""

    def flat_to_factors(self, flat: dict) -> dict:
        """Inverse of factors_to_flat."""

    def adapter_state(self, model) -> dict:
        """A numpy copy of the trainable (adapter) weights: GRPO's reference swaps the ones at init in."""

    def set_adapter_state(self, model, state: dict) -> None:
        """Put adapter_state's weights back into the model."""

    def count_params(self, model) -> tuple[int, int]:
        """(trainable, total stored) parameter counts."""

    def describe(self, model) -> str:
        """Where the model runs, for the start line (e.g. ' on cuda:0'; '' when nothing to add)."""

    def preflight(self, console) -> None:
        """Warn about a slow setup before a run starts (MLX's reference BLAS)."""

    def enable_packing(self, model) -> None:
        """Let packed batches (segment_ids, position_ids) keep attention inside each row."""

    def checkpoint_blocks(self, model) -> None:
        """Gradient checkpointing per transformer block."""

    # ---- tensors
    def seed(self, n: int) -> None:
        """Seed the framework's random generator (LoRA init, dropout)."""

    def to_batch(self, model, batch: dict) -> Batch:
        """A numpy batch of forge_core.data as framework arrays, where the model runs."""

    def to_numpy(self, x):
        """A framework array as numpy."""

    def scalar(self, value: float, like) -> Any:
        """A float32 scalar array (on the device of `like`)."""

    def sft_loss(self, model, batch: Batch) -> tuple:
        """(sum of NLL over the loss-masked tokens, token count)."""

    def prefix_state(self, model, ids: list):
        """The KV cache of one token sequence run once, for sft_loss_after; None where unsupported."""

    def sft_loss_after(self, model, batch: Batch, prefix) -> tuple:
        """sft_loss of rows that start with prefix_state's tokens, given without them (with loss_positions)."""

    def sequence_logps(self, model, batch: Batch):
        """(2B,) summed completion log-probs of a concatenated chosen+rejected batch."""

    def per_token_logps(self, model, batch: Batch):
        """(B, T) log-probs of the targets, 0 where batch["mask"] is 0 (GRPO's per-token ratios)."""

    def stop_gradient(self, x):
        """x as a constant: no gradient flows back through it."""

    def no_grad(self, model, fn: Callable, compiled: bool = True) -> Callable:
        """`fn` run without gradients; compiled (where the framework compiles) for passes that come back."""

    # ---- training
    def make_stepper(self, cfg, model, loss_fn: LossFn) -> Stepper:
        """The optimizer (train.optimizer) and the step functions of loss_fn."""

    def peak_memory(self) -> int:
        """Peak bytes for the log line."""

    def guard_peak(self) -> int | None:
        """The peak the memory guard compares with its limit; None where no reliable peak exists."""

    def set_memory_limit(self, nbytes: int) -> None:
        """The memory plan's budget as the allocator's cap, where the framework has one."""

    # ---- data-parallel (forge_core/distributed.py)
    def init_world(self) -> tuple[int, int]:
        """Join the launcher's process group (mlx.launch, torchrun) if there is one: (rank, world size)."""

    def all_sum(self, arrays: list) -> list:
        """Each framework array summed over ranks, one buffer on the wire (identity alone)."""

    def reduce_numpy(self, values, op: str):
        """A small float32 numpy array reduced over ranks with op "sum" or "max"."""

    # ---- inference
    def for_inference(self, model) -> None:
        """On the CPU: fold each adapter into its layer and dequantize each quantized layer, once, into dense
        weights for token-by-token decoding."""

    def sampling_weights(self, model, cache: dict):
        """A context manager: on the CPU the model decodes from dense weights (adapters folded, quantized layers
        dequantized, the dequantized base kept in `cache` between calls) and gets its training layers back after."""

    def complete(self, model, tokenizer, messages: list, max_tokens: int, temp: float = 0.0, stream=None) -> str:
        """Chat-templated generation with the framework's generator; `stream(text)` gets each piece."""

    def generate_tokens(self, model, tokenizer, prompts: list, max_tokens: int, temp: float = 0.0,
                        batch_size: int = 32, top_p: float = 1.0, stop: list[int] | None = None,
                        constraints: list | None = None) -> list[list[int]]:
        """The new token ids after each prompt (token ids, no template), stop token left out, `batch_size` rows
        decoded at once; greedy ids equal complete()'s (forge_core/eval/generation.py orders and decodes). A row
        shorter than max_tokens stopped at a stop token (`stop`: these ids only; default: the tokenizer's and the
        model's end ids); sampling at temp > 0 keeps the top_p nucleus. `constraints`: per prompt, None or an
        object whose allowed(generated ids) -> ids | None limits each next token (forge_core/datagen/copy_constraint.py),
        the other logits masked before sampling."""

    def continuation_scores(self, model, batch: Batch) -> tuple:
        """Per row of an {inputs, targets, mask} batch: summed log-prob of the masked targets, and whether
        every one of them is the argmax (lm-eval's loglikelihood, is_greedy)."""

    def hf_tokenizer(self, tokenizer):
        """The transformers tokenizer behind the backend's tokenizer object."""


BACKENDS = ("mlx", "cuda")
_PACKAGES = {"mlx": "forge_mlx", "cuda": "forge_cuda"}
_FRAMEWORK = {"mlx": "mlx", "cuda": "torch"}
_INSTALL = {"mlx": 'pip install "forge-tune[mlx]"  (Linux: "forge-tune[mlx-linux]")', "cuda": 'pip install "forge-tune[cuda]"'}


def installed(name: str) -> bool:
    return importlib.util.find_spec(_FRAMEWORK[name]) is not None


def is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def _torch_sees_gpu() -> bool:
    if not installed("cuda") or (platform.system() == "Linux" and not torch_free.gpu_device_nodes()):
        return False
    import torch

    return bool(torch.cuda.is_available())


def resolve(name: str = "auto") -> str:
    """auto: MLX on Apple Silicon or when only mlx is installed; CUDA when torch sees a GPU; else MLX on CPU."""
    if name in BACKENDS:
        if not installed(name):
            raise ForgeError(f"backend '{name}' needs {_FRAMEWORK[name]}: {_INSTALL[name]}")
        return name
    if name != "auto":
        raise ForgeError(f"--backend '{name}': choose auto, mlx or cuda")
    has_mlx, has_torch = installed("mlx"), installed("cuda")
    if is_apple_silicon() and has_mlx:
        return "mlx"
    if has_mlx and not has_torch:
        return "mlx"
    if has_torch and _torch_sees_gpu():
        return "cuda"
    if has_mlx:
        return "mlx"
    if has_torch:
        return "cuda"
    raise ForgeError(f"no backend installed: {_INSTALL['mlx']} or {_INSTALL['cuda']}")


def ops(name: str) -> BackendOps:
    """The backend's ops module (forge_mlx.ops, forge_cuda.ops); `name` as resolve() returns it."""
    if name == "mlx":
        torch_free.keep_torch_out()
    return importlib.import_module(f"{_PACKAGES[name]}.ops")
