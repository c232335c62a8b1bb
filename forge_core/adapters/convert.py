"""Adapter math and `forge convert`: PiSSA -> plain LoRA, the weight deltas an adapter means, merging into a
base, and converting a dir between the mlx-lm and PEFT layouts (formats.py reads and writes them)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from forge_core.adapters import safetensors_io as sio
from forge_core.adapters.formats import (
    Adapter,
    adapter_dir,
    read_adapter,
    read_json,
    write_mlx_adapter,
    write_peft_adapter,
)
from forge_core.dora import dora_weight
from forge_core.errors import ForgeError
from forge_core.models.experts import stack_shapes

# ---- math ---------------------------------------------------------------------------------------

def to_plain_lora(adapter: Adapter) -> Adapter:
    """PiSSA -> a plain LoRA valid on the ORIGINAL base (identity for a plain LoRA).

        s·(B A - B0 A0) = s · [B, -B0] · [A; A0],   so  A' = [A; A0] (2r, in),  B' = [B, -B0] (out, 2r).
    The scale stays s: with PEFT's alpha, r' = 2r needs alpha' = 2·alpha (rsLoRA: alpha' = sqrt(2)·alpha).
    """
    if adapter.init != "pissa":
        return adapter
    tensors = {}
    for m, (a, b) in adapter.tensors.items():
        a0, b0 = adapter.pissa_init[m]
        tensors[m] = (np.concatenate([a, a0], axis=-2), np.concatenate([b, -b0], axis=-1))
    alpha = adapter.alpha * (math.sqrt(2.0) if adapter.rslora else 2.0)
    forge = {**adapter.forge, "pissa_to_lora": {"rank": adapter.rank, "alpha": adapter.alpha}}
    return dataclasses.replace(adapter, tensors=tensors, rank=2 * adapter.rank, alpha=alpha, init="lora",
                               pissa_init=None, forge=forge)


def _delta64(adapter: Adapter, module: str, expert: int | None = None) -> np.ndarray:
    """s·(B A - B0 A0) of one module in float64 (no B0 A0 term for a plain LoRA); `expert`: of that expert of an
    expert stack only."""
    def pick(a, b):
        return (a, b) if expert is None else (a[expert], b[expert])

    a, b = pick(*adapter.tensors[module])
    delta = b.astype(np.float64) @ a.astype(np.float64)
    if adapter.init == "pissa":
        a0, b0 = pick(*adapter.pissa_init[module])
        delta -= b0.astype(np.float64) @ a0.astype(np.float64)
    return adapter.scale * delta


def delta_weights(adapter: Adapter) -> dict[str, np.ndarray]:
    """{module: ΔW (out, in) float32} with ΔW = s·(B A - B0 A0) (B0 A0 = 0 for plain LoRA).

    Products in float64, one rounding to float32 at the end. DoRA has no additive delta: see merged_weight.
    """
    if adapter.magnitudes is not None:
        raise ForgeError("a DoRA adapter has no additive ΔW; merge it with merged_weight(adapter, module, W)")
    return {m: _delta64(adapter, m).astype(np.float32) for m in adapter.tensors}


def merged_weight(adapter: Adapter, module: str, w: np.ndarray, expert: int | None = None) -> np.ndarray:
    """W (out, in) -> W + ΔW (LoRA / PiSSA), or m / ||W + ΔW||_row · (W + ΔW) (DoRA); `expert`: W is that expert's
    weight of the expert stack `module`.

    Summed in float64 and rounded once to float32, so the merge adds no error beyond that rounding.
    """
    mags = adapter.magnitudes
    m = mags[module].astype(np.float64) if mags is not None else None
    return dora_weight(np, w.astype(np.float64) + _delta64(adapter, module, expert), m).astype(np.float32)


# ---- the base model and `forge convert` ----------------------------------------------------------

def resolve_base(spec: str) -> Path:
    """A local HF dir for `spec` via forge_core.models.sources.resolve_model (a plain local dir until it exists)."""
    try:
        from forge_core.models.sources import resolve_model
    except ImportError:
        if Path(spec).is_dir():
            return Path(spec)
        raise ForgeError(f"base model '{spec}': not a local directory (pass --base DIR)") from None
    return Path(resolve_model(spec))


def local_base(adapter: Adapter) -> Path | None:
    """The recorded base when it is already on disk (forge.json's base_model, or the dir a backend
    resolved it to, base_model_dir) - found without downloading or importing anything."""
    for spec in (adapter.base_model, adapter.forge.get("base_model_dir")):
        if spec and Path(spec).is_dir():
            return Path(spec)
    return None


def base_linear_shapes(base: Path) -> tuple[dict[str, tuple], int | None]:
    """{module: (out, in)} of every 2-D '<module>.weight' (packed quantized weights unpacked), {stack: (E, out, in)}
    of a mixture's experts (forge_core/models/experts.py), and the number of blocks - read from config.json and
    safetensors headers only."""
    cfg = read_json(base / "config.json")
    headers = {n: i.shape for f in sio.checkpoint_files(base) for n, i in sio.read_header(f)[0].items()}
    q = cfg.get("quantization") or cfg.get("quantization_config") or {}
    bits = q.get("bits") if isinstance(q, dict) else None
    shapes = {}
    for name, shape in headers.items():
        if name.endswith(".weight") and len(shape) in (2, 3):  # 3-D: an expert stack (E, out, in), mlx-lm's layout
            module = name[: -len(".weight")]
            packed = bits and f"{module}.scales" in headers
            shapes[module] = (*shape[:-1], shape[-1] * 32 // bits if packed else shape[-1])
    shapes.update(stack_shapes(cfg.get("model_type"), headers))
    total = cfg.get("num_hidden_layers", (cfg.get("text_config") or {}).get("num_hidden_layers"))
    return shapes, total


def check_against_base(adapter: Adapter, base: Path) -> int | None:
    """Refuse modules the base lacks or whose shapes differ; returns the base's number of blocks."""
    shapes, total = base_linear_shapes(base)
    for m, (a, b) in sorted(adapter.tensors.items()):
        if m not in shapes:
            raise ForgeError(f"adapter module '{m}' is not a linear layer of the base {base}; wrong --base?")
        if (*b.shape[:-1], a.shape[-1]) != shapes[m]:
            raise ForgeError(f"'{m}': adapter A {a.shape} / B {b.shape} needs a weight of shape "
                             f"{(*b.shape[:-1], a.shape[-1])}, the base {base} has {shapes[m]}; wrong --base?")
    return total


def read_for_output(src, dst) -> Adapter:
    """read_adapter(src), refusing a destination that is the source itself (it would be replaced)."""
    adapter = read_adapter(src)
    if Path(dst).resolve() in (Path(src).resolve(), adapter_dir(src).resolve()):
        raise ForgeError(f"{dst}: the output must not be the source adapter dir")
    return adapter


def for_foreign_tools(adapter: Adapter, base: str | None) -> Adapter:
    """What conversions and exports write: the plain LoRA (PiSSA -> rank 2r), named after an explicit
    --base when one was given."""
    plain = to_plain_lora(adapter)
    return dataclasses.replace(plain, base_model=base) if base else plain


def describe(adapter: Adapter, plain: Adapter) -> str:
    if adapter.init == "pissa":
        return f"PiSSA rank {adapter.rank} as plain LoRA rank {plain.rank}"
    return f"{'DoRA' if adapter.magnitudes else 'LoRA'} rank {plain.rank}"


def convert(src, dst, to: str, base: str | None = None) -> Path:
    """`forge convert SRC DST --to peft|mlx`: a plain LoRA (PiSSA -> rank 2r) in the other layout.

    Shapes are checked against --base (resolved) or else the recorded base when it is on disk.
    An explicit --base also becomes the output's base model name.
    """
    import click

    adapter = read_for_output(src, dst)
    base_dir = resolve_base(base) if base else local_base(adapter)
    total = check_against_base(adapter, base_dir) if base_dir else None
    plain = for_foreign_tools(adapter, base)
    (write_peft_adapter if to == "peft" else write_mlx_adapter)(plain, dst, total)
    unchecked = "" if base_dir else " (shapes not checked: no local base; pass --base)"
    click.echo(f"wrote {dst}: {to} adapter, {len(plain.tensors)} modules, {describe(adapter, plain)}, "
               f"scale {plain.scale:g}{unchecked}")
    return Path(dst)
