"""safetensors files in numpy, bfloat16 included, without a framework.

numpy has no bfloat16, so `safetensors.numpy` refuses BF16 tensors - yet most HF checkpoints and
many PEFT adapters are stored in BF16. The format is simple enough to read and write directly:

    [8 bytes: header length N, little-endian u64] [N bytes: JSON header] [tensor bytes]
    header = {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {str: str}}

BF16 is the top half of an F32: reading shifts it up 16 bits (exact); writing rounds to nearest even.
Reads are memory-mapped, so a header or one tensor of a large shard costs no full read.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forge_core.atomic import atomic_path
from forge_core.errors import ForgeError

# safetensors dtype tag -> numpy storage dtype (BF16 is stored as raw uint16 bits)
STORAGE = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
           "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
# names used in configs ("float32", "bfloat16") <-> tags
TAGS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
NAMES = {tag: name for name, tag in TAGS.items()}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors tag: F32, BF16, ...
    shape: tuple
    begin: int  # absolute byte offset in the file
    end: int


def read_header(path) -> tuple[dict[str, TensorInfo], dict]:
    """{name: TensorInfo}, metadata - reads only the header bytes."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            (n,) = struct.unpack("<Q", raw) if len(raw) == 8 else (None,)
            if n is None or n > 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
    except (OSError, ValueError) as e:
        raise ForgeError(f"{path}: not a readable safetensors file ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    start = 8 + n
    infos = {}
    for name, h in header.items():
        if h.get("dtype") not in STORAGE:
            raise ForgeError(f"{path}: tensor '{name}' has dtype {h.get('dtype')}, which forge cannot read")
        b, e = h["data_offsets"]
        infos[name] = TensorInfo(h["dtype"], tuple(h["shape"]), start + b, start + e)
    return infos, meta


def header_damage(path) -> str | None:
    """Why `path` is not a whole safetensors file (an unreadable header, or fewer bytes than the header's
    tensors need), or None."""
    try:
        infos, _ = read_header(path)
    except ForgeError as e:
        return str(e).split(": ", 1)[-1]
    need = max((i.end for i in infos.values()), default=0)
    size = Path(path).stat().st_size
    return f"cut short ({size} of {need} bytes)" if size < need else None


def checkpoint_files(d) -> list[Path]:
    """The weight files of an HF checkpoint dir: those its index lists, else every *.safetensors."""
    d = Path(d)
    index = d / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise ForgeError(f"{index}: not a valid index (needs a 'weight_map' object)") from None
        return sorted({d / f for f in weight_map.values()})
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ForgeError(f"{d}: no *.safetensors weights (forge reads safetensors checkpoints only)")
    return files


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even fp32 -> bf16 bits (uint16); NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def load(path, names=None, upcast_bf16: bool = True) -> dict[str, np.ndarray]:
    """Tensors of one file as numpy arrays (copies). BF16 -> float32, or uint16 bits if not upcast_bf16."""
    infos, _ = read_header(path)
    if names is not None:
        missing = [n for n in names if n not in infos]
        if missing:
            raise ForgeError(f"{path}: no tensor named {missing[0]}")
        infos = {n: infos[n] for n in names}
    return {name: read_tensor(path, info, upcast_bf16) for name, info in infos.items()}


def read_tensor(path, info: TensorInfo, upcast_bf16: bool = True) -> np.ndarray:
    """One tensor (a copy) given its header entry: only its bytes are paged in."""
    if info.end == info.begin:  # an empty tensor: mmap cannot map zero bytes
        empty = np.zeros(info.shape, STORAGE[info.dtype])
        return bf16_to_f32(empty) if info.dtype == "BF16" and upcast_bf16 else empty
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=info.begin, shape=(info.end - info.begin,))
    arr = np.frombuffer(mm, dtype=STORAGE[info.dtype]).reshape(info.shape).copy()
    del mm
    return bf16_to_f32(arr) if info.dtype == "BF16" and upcast_bf16 else arr


def dtype_tag(arr: np.ndarray) -> str:
    for tag, st in STORAGE.items():
        if tag != "BF16" and arr.dtype == np.dtype(st):
            return tag
    raise ForgeError(f"cannot store numpy dtype {arr.dtype} in safetensors")


def save(path, tensors: dict[str, np.ndarray], metadata: dict | None = None,
         as_dtype: str | dict | None = None) -> None:
    """Write tensors atomically, streaming one at a time.

    as_dtype: None keeps each array's dtype; "bfloat16"/"float16"/"float32" converts floating arrays
    (uint16 arrays count as BF16 bits for "bfloat16"); a dict gives it per tensor name.
    """
    per = as_dtype if isinstance(as_dtype, dict) else dict.fromkeys(tensors, as_dtype)
    tags = {name: _tag(arr, per.get(name)) for name, arr in tensors.items()}
    # widest dtype first, then by name (as the reference writer does): every tensor starts aligned
    order = sorted(tensors, key=lambda n: (-np.dtype(STORAGE[tags[n]]).itemsize, n))
    save_streaming(path, {n: (tuple(tensors[n].shape), tags[n]) for n in order}, tensors.__getitem__, metadata)


def save_streaming(path, specs: dict[str, tuple[tuple, str]], produce, metadata: dict | None = None) -> None:
    """The one safetensors writer: the header from `specs` {name: (shape, dtype tag)} in that order, then
    each `produce(name)` encoded to its tag, one tensor at a time (peak memory: one tensor, not the file).
    Atomic: the file appears whole or not at all."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write_header(f, specs, metadata)
        for name, (shape, tag) in specs.items():
            arr = produce(name)
            if tuple(arr.shape) != tuple(shape):
                raise ValueError(f"{path}: tensor {name} has shape {tuple(arr.shape)}, the header says {shape}")
            f.write(_encode(arr, tag).tobytes())


def write_header(f, specs: dict[str, tuple[tuple, str]], metadata: dict | None = None) -> int:
    """The file's head: u64 LE header length, then the JSON header for `specs` {name: (shape, dtype tag)} in that
    order, padded to 8 bytes as the spec asks. The tensors' bytes must follow in the same order. Returns their
    total size."""
    header, offset = {}, 0
    for name, (shape, tag) in specs.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(STORAGE[tag]).itemsize
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    f.write(struct.pack("<Q", len(blob)) + blob)
    return offset


def _tag(arr: np.ndarray, as_dtype: str | None) -> str:
    if as_dtype is None:
        return dtype_tag(arr)
    if as_dtype not in TAGS:
        raise ForgeError(f"unknown dtype '{as_dtype}' (use one of {', '.join(TAGS)})")
    raw_bf16 = as_dtype == "bfloat16" and arr.dtype == np.uint16  # bits from load(upcast_bf16=False)
    return TAGS[as_dtype] if raw_bf16 or np.issubdtype(arr.dtype, np.floating) else dtype_tag(arr)


def _encode(arr: np.ndarray, tag: str) -> np.ndarray:
    if tag == "BF16":
        return f32_to_bf16(arr) if arr.dtype != np.uint16 else arr
    return np.ascontiguousarray(arr, dtype=np.dtype(STORAGE[tag]).newbyteorder("<"))
