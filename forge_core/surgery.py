"""Model surgery, written once for both backends: which linears get adapters, what their A and B start as, and
the walk that builds the model (adapt_model). A backend supplies only the framework side of a layer (Layers:
read and write a weight, quantize, wrap in its LoRA layer, swap it in); the numbers - targets, PiSSA factors and
residual, LoRA's random A - are decided here in numpy, so both backends build the same model from the same seed.

    for each target, in order (one dense weight alive at a time; progress per block on stderr):
        PiSSA:  A0, B0, W_res = top-r SVD of W (or the stored factors); the layer keeps W_res
        LoRA:   A = uniform(±1/sqrt(in)) from (seed, target index), B = 0
        quantize the layer (QPiSSA: the residual, never W), wrap it with LoRA(A, B), swap it in
    then quantize every other linear (quant.bits), and hand the model over

An expert stack (a mixture of experts' E experts in one (E, out, in) weight) is one target with a LoRA per expert:
A (E, r, in), B (E, out, r), each expert split by its own SVD (PiSSA) or drawn from its own generator (LoRA).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from forge_core.config import DEFAULT_TARGETS, ForgeConfig, layer_indices, lora_init_kind, lora_scale
from forge_core.errors import ForgeError
from forge_core.pissa import pissa_factors, residual
from forge_core.progress import building, say


def select_targets(linear_paths: list[str], cfg: ForgeConfig, num_blocks: int) -> list[str]:
    """The linears to adapt: `...layers.N....<target>` in the chosen blocks, in natural order. A target the user
    named that matches no linear of the model is an error naming it; a default one (a model without gate_proj,
    say) is listed on one line and skipped."""
    chosen = set(layer_indices(cfg.lora.layers, num_blocks))
    targets = cfg.lora.targets or DEFAULT_TARGETS
    named = list(targets) != DEFAULT_TARGETS  # the defaults, as given or left alone, may miss some names
    all_linear = "all-linear" in targets
    in_blocks = [p for p in linear_paths if "layers" in p.split(".")[:-1]]
    leaves = {p.split(".")[-1] for p in in_blocks}
    unmatched = [t for t in targets if t != "all-linear" and t.split(".")[-1] not in leaves]
    names = ", ".join(sorted(leaves)[:12])
    if unmatched and named:
        raise ForgeError(f"lora.targets: {', '.join(repr(t) for t in unmatched)} matches no linear layer of this "
                         f"model's blocks (its names: {names}); fix lora.targets or use all-linear")
    if unmatched:
        say(f"lora: default targets not in this model, skipped: {', '.join(unmatched)}")
    paths = []
    for path in in_blocks:
        parts = path.split(".")
        block = int(parts[parts.index("layers") + 1])
        if block in chosen and (all_linear or parts[-1] in targets):
            paths.append(path)
    if not paths:
        raise ForgeError(f"lora.targets {targets} matched no linear layer in the chosen blocks "
                         f"(names look like {names})")
    return sorted(paths, key=lambda p: [int(s) if s.isdigit() else s for s in p.split(".")])


def uses_pissa(cfg: ForgeConfig) -> bool:
    return lora_init_kind(cfg.lora.init)[0] == "pissa"


def build_label(cfg: ForgeConfig, pissa_init: dict | None) -> str:
    """What the build does per layer, for its progress line."""
    quant = f", quantize to {cfg.quant.bits}-bit" if cfg.quant.bits else ""
    if not uses_pissa(cfg):
        return f"LoRA init{quant}"
    if pissa_init:
        return f"PiSSA residual from stored factors{quant}"
    _, niter = lora_init_kind(cfg.lora.init)
    return f"PiSSA {'randomized SVD (niter ' + str(niter) + ')' if niter else 'full SVD'}{quant}"


def check_full_precision(path: str, quantized: bool, cfg: ForgeConfig) -> None:
    """PiSSA factorizes W itself: a target that is already quantized cannot be split."""
    if quantized and uses_pissa(cfg):
        raise ForgeError(f"{path} is already quantized: PiSSA needs full-precision weights "
                         "(load an unquantized model; forge quantizes the residual itself)")


def pissa_split(w: np.ndarray, path: str, index: int, cfg: ForgeConfig, pissa_init: dict | None,
                expert: int | None = None):
    """(A0 (r, in), B0 (out, r), W_res) for target number `index` at `path`, W (out, in) fp32 (`expert`: which
    expert of the stack at `path` W is).

    Stored factors (`pissa_init`, from a resume or a saved adapter) are reused, so the SVD never runs twice
    for a run and a reload rebuilds exactly the residual that was trained on; else the top-r SVD of W.
    """
    scale = lora_scale(cfg.lora)
    if pissa_init is not None and path in pissa_init:
        a0, b0 = pissa_init[path]
        if expert is not None:
            a0, b0 = a0[expert], b0[expert]
        return a0, b0, residual(w, a0, b0, scale)
    _, niter = lora_init_kind(cfg.lora.init)
    seed = cfg.train.seed + index if expert is None else [cfg.train.seed + index, expert]
    return pissa_factors(w, cfg.lora.rank, scale, niter=niter, seed=seed)


def pissa_split_experts(w: np.ndarray, path: str, index: int, cfg: ForgeConfig, pissa_init: dict | None):
    """pissa_split of each expert of a stack W (E, out, in): (A0 (E, r, in), B0 (E, out, r), W_res (E, out, in)),
    the residual written over W (a fp32 copy the caller owns) so the stack is held once."""
    a0, b0 = [], []
    for e in range(w.shape[0]):
        a, b, w[e] = pissa_split(w[e], path, index, cfg, pissa_init, expert=e)
        a0.append(a)
        b0.append(b)
    return np.stack(a0), np.stack(b0), w


def lora_init(out_dim: int, in_dim: int, rank: int, seed: int, index: int,
              experts: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(A (r, in), B (out, r)) of plain LoRA: A uniform(±1/sqrt(in)) - PEFT's kaiming_uniform(a=sqrt(5)) - from a
    generator of (seed, target index) alone, so a layer's init does not depend on which others are adapted, and
    both backends start from the same numbers; B = 0, so the model starts unchanged. An expert stack: one pair per
    expert, (E, r, in) and (E, out, r), from the same generator."""
    bound = 1 / np.sqrt(in_dim)
    lead = (experts,) if experts else ()
    a = np.random.default_rng([seed, index]).uniform(-bound, bound, (*lead, rank, in_dim)).astype(np.float32)
    return a, np.zeros((*lead, out_dim, rank), np.float32)


class Layers(Protocol):
    """The framework side of the surgery (forge_mlx/lora.py, forge_cuda/lora.py)."""

    def targets(self, model, cfg: ForgeConfig) -> list[str]:
        """select_targets over the model's linear layers."""

    def get(self, model, path: str) -> Any: ...

    def is_quantized(self, layer) -> bool: ...

    def weight(self, layer) -> np.ndarray:
        """The layer's weight (out, in) - (E, out, in) for an expert stack - as fp32 numpy, read in the compute
        dtype it was loaded in."""

    def shape(self, layer) -> tuple[int, int]:
        """(out, in) of the layer's weight (of one expert's, for an expert stack)."""

    def experts(self, layer) -> int:
        """E of an expert stack (weight (E, out, in)); 0 for a linear."""

    def set_weight(self, layer, w: np.ndarray) -> None: ...

    def quantize(self, layer, cfg: ForgeConfig, path: str) -> Any:
        """The layer at `path` quantized as cfg.quant says (itself when it stays dense: a mixture's router does),
        on the training device."""

    def wrap(self, layer, a: np.ndarray, b: np.ndarray, cfg: ForgeConfig) -> Any:
        """The backend's LoRA layer over `layer` starting from A (r, in), B (out, r) - per expert (E, r, in),
        (E, out, r) for an expert stack."""

    def swap(self, model, path: str, layer) -> None: ...

    def finish(self, model, cfg: ForgeConfig, adapted: list[str]) -> None:
        """Quantize every other linear (not under an adapted path) and put the model on its device."""


def adapt_model(model, cfg: ForgeConfig, layers: Layers, pissa_init: dict | None = None) -> dict:
    """Wrap the target linears with LoRA (PiSSA when configured) and quantize the base; returns the PiSSA factors
    used ({path: (A0 (r, in), B0 (out, r))}, {} for LoRA). `pissa_init` reuses stored factors (a resume, a saved
    adapter, the init cache), so the SVD never runs twice. Order matters for QPiSSA: the SVD of the full-precision
    W first, then the residual is quantized."""
    pissa = uses_pissa(cfg)
    factors, adapted = {}, []
    for i, path in building(layers.targets(model, cfg), build_label(cfg, pissa_init)):
        layer = layers.get(model, path)
        check_full_precision(path, layers.is_quantized(layer), cfg)
        experts = layers.experts(layer)
        if experts and cfg.lora.dora:
            raise ForgeError(f"{path} holds {experts} experts: DoRA is not defined for expert layers (PEFT and "
                             "mlx-lm have none); turn lora.dora off or leave gate_proj/up_proj/down_proj out of "
                             "lora.targets")
        if pissa:
            split = pissa_split_experts if experts else pissa_split
            a, b, w_res = split(layers.weight(layer), path, i, cfg, pissa_init)
            factors[path] = (a, b)
            layers.set_weight(layer, w_res)
            del w_res
        else:
            a, b = lora_init(*layers.shape(layer), cfg.lora.rank, cfg.train.seed, i, experts)
        # swapped in at once: the model's reference to this layer's dense W goes, so W can be freed
        layers.swap(model, path, layers.wrap(layers.quantize(layer, cfg, path), a, b, cfg))
        adapted.append(path)
    layers.finish(model, cfg, adapted)
    return factors


def under(adapted) -> Callable[[str], bool]:
    """skip(path) for quantize_rest: the adapted layers and what they hold."""
    adapted = tuple(adapted)
    return lambda p: any(p == a or p.startswith(a + ".") for a in adapted)


def fold_plan(paths_and_kinds) -> list[tuple[str, str]]:
    """What inference and GRPO's sampling fold on the CPU, from (path, "lora" | "quantized" | other) in module
    order: every LoRA layer (its adapter folded into one dense weight) and every quantized linear that is not inside
    a LoRA layer (its base, or an expert of its base: dequantized) - the rest stays as it is."""
    items = list(paths_and_kinds)
    inside = under([p for p, k in items if k == "lora"])
    return [(p, k) for p, k in items if k == "lora" or (k == "quantized" and not inside(p))]
