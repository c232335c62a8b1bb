"""`forge export`: a run or adapter dir -> a PEFT dir, an mlx-lm adapter dir, or a merged HF checkpoint.

    peft    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out) loads it as is
    mlx     mlx_lm.load(base, adapter_path=out) loads it as is
    merged  W' = W + s·(B A - B0 A0) added to the FULL-PRECISION base in float64, stored float32
            (DoRA: W' = m / ||W + ΔW||_row · (W + ΔW)); sharded safetensors + index + config + tokenizer
    gguf    that float32 merge as one GGUF (--outtype f32 | f16 | bf16 | q8_0) for llama.cpp, Ollama and LM
            Studio, with an Ollama Modelfile (forge_core/models/gguf_export.py)

PiSSA adapters always leave as the plain rank-2r LoRA (adapters.to_plain_lora), valid on the original
base, so no foreign tool needs the residual model. Every output dir appears atomically.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import click
import numpy as np

from forge_core.adapters import convert as cv
from forge_core.adapters import formats as ad
from forge_core.adapters import safetensors_io as sio
from forge_core.adapters.calibration import QUANTIZERS, calibration_tokens
from forge_core.atomic import atomic_dir, write_json, write_text
from forge_core.errors import ForgeError
from forge_core.models.experts import expert_weight, is_router

SHARD_BYTES = 5_000_000_000  # transformers' default max_shard_size ("5GB")
TOKENIZER_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|"
                             r"merges\.txt|chat_template\.(jinja|json)|generation_config\.json|.*\.tiktoken|"
                             r".*\.model)$")
DTYPES = ("float32", "base", "bfloat16", "float16")


def export(src, fmt: str, out, base: str | None = None, quantize: bool | str = False,
           push_to_hub: str | None = None, dtype: str = "float32", shard_bytes: int = SHARD_BYTES,
           outtype: str = "f16", calib: str | None = None) -> Path:
    """Export SRC (a run dir with adapter/ or an adapter dir) as `fmt` into OUT.

    base: --base, else forge.json's base_model (resolved through forge_core.models.sources.resolve_model).
    dtype (merged): float32 (default) | base (the base's own storage dtype) | bfloat16 | float16.
    """
    if fmt not in ("peft", "merged", "mlx", "gguf"):
        raise ForgeError(f"--format '{fmt}': choose peft, merged, mlx or gguf")
    if quantize and fmt != "merged":
        raise ForgeError("--quantize applies to --format merged only (adapters stay full precision)")
    method = "rtn" if quantize is True else quantize or None
    if method not in (None, *QUANTIZERS):
        raise ForgeError(f"--quantize {method}: choose one of {', '.join(QUANTIZERS)}")
    if calib and method in (None, "rtn"):
        raise ForgeError("--calib calibrates --quantize awq, gptq or dwq; rtn rounds without data")
    if dtype not in DTYPES:
        raise ForgeError(f"dtype '{dtype}': choose one of {', '.join(DTYPES)}")
    out = Path(out)
    if fmt == "gguf" and _is_model_dir(src):  # a full checkpoint (a merged export, a forge merge): as it is
        return _model_to_gguf(Path(src), out, outtype)
    adapter = cv.read_for_output(src, out)
    base_dir = _base_dir(adapter, base, required=fmt in ("merged", "gguf"))
    total = cv.check_against_base(adapter, base_dir) if base_dir else None
    plain = cv.for_foreign_tools(adapter, base)
    with atomic_dir(out) as tmp:
        if fmt in ("peft", "mlx"):
            ad.write_files(plain, tmp, fmt, total)
        elif fmt == "gguf":
            _gguf(plain, base_dir, tmp, outtype, adapter.forge.get("system_prompt", ""))
        elif method:
            _merged_quantized(plain, base_dir, tmp, shard_bytes, method, calib)
        else:
            write_merged(plain, base_dir, tmp, dtype=dtype, shard_bytes=shard_bytes)
        write_text(tmp / "README.md", model_card(adapter, plain, fmt, src, quantize))
    click.echo(f"wrote {out} ({fmt}{', quantized' if quantize else ''}; {cv.describe(adapter, plain)})")
    if push_to_hub:
        push(out, push_to_hub)
    return out


def _base_dir(adapter: ad.Adapter, base: str | None, required: bool) -> Path | None:
    """Explicit --base is resolved (it may download / import); forge.json's base too when required,
    else only when it is already on disk. Warns when forge.json's base hash does not match."""
    spec = base or adapter.base_model
    if not base and not required:
        return cv.local_base(adapter)
    if not spec:
        raise ForgeError("no base model: the adapter records none; pass --base MODEL")
    base_dir = cv.resolve_base(spec)
    want = adapter.forge.get("base_model_hash")
    if want:
        try:
            from forge_core.models.sources import model_hash
        except ImportError:
            return base_dir
        got = model_hash(base_dir)
        if got != want:
            click.echo(f"forge: warning: base {base_dir} has hash {got}, the adapter was trained on {want}",
                       err=True)
    return base_dir


# ---- merged checkpoint ---------------------------------------------------------------------------

def _out_dtype(info: sio.TensorInfo, dtype: str) -> str | None:
    """Output dtype name of a float tensor: `dtype`, or as stored for 'base'; None (kept) for others."""
    if info.dtype not in ("F32", "F16", "BF16", "F64"):
        return None
    return sio.NAMES[info.dtype] if dtype == "base" else dtype


def plan_shards(entries: list, dtype: str, shard_bytes: int) -> tuple[list[list], int]:
    """[(name, file, info)] -> shards [[(name, file, info, out dtype name or None)]], total bytes.

    A new shard starts when the next tensor would pass shard_bytes (a larger tensor gets its own)."""
    shards, size, total = [[]], 0, 0
    for name, f, info in entries:
        want = _out_dtype(info, dtype)
        tag = sio.TAGS[want] if want else info.dtype
        nbytes = int(np.prod(info.shape, dtype=np.int64)) * np.dtype(sio.STORAGE[tag]).itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, f, info, want))
        size, total = size + nbytes, total + nbytes
    return shards, total


def write_merged(adapter: ad.Adapter, base: Path, out: Path, dtype: str = "float32",
                 shard_bytes: int = SHARD_BYTES) -> None:
    """Base + adapter -> model-0000i-of-0000N.safetensors + index + config.json + tokenizer files in `out`.

    Tensors stream one at a time (a shard at most in memory); only adapted linears are changed.
    """
    cfg = ad.read_json(base / "config.json")
    if cfg.get("quantization") or cfg.get("quantization_config"):
        raise ForgeError(f"{base}: the base is quantized; merging needs the full-precision weights "
                         "(a quantized delta would be rounded away) - pass --base with the original model")
    entries = sorted(((name, f, info) for f in sio.checkpoint_files(base)
                      for name, info in sio.read_header(f)[0].items()), key=lambda e: e[0])
    # {weight name: (module, expert)}: a linear's own weight, or each expert's of an adapted expert stack
    modules = {f"{m}.weight": (m, None) for m in adapter.tensors}
    for name, _, _ in entries:
        hit = expert_weight(cfg.get("model_type"), name)
        if hit and hit[0] in adapter.tensors:
            modules.pop(f"{hit[0]}.weight", None)
            modules[name] = hit
    missing = set(modules) - {name for name, _, _ in entries}
    if missing:
        raise ForgeError(f"{base}: has no weight {min(missing)} for the adapter; wrong --base?")
    shards, total = plan_shards(entries, dtype, shard_bytes)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, f, info, _ in shard:
            arr = sio.read_tensor(f, info)
            if name in modules:
                module, expert = modules[name]
                arr = cv.merged_weight(adapter, module, arr, expert)
            tensors[name] = arr
            weight_map[name] = fname
        sio.save(out / fname, tensors, metadata={"format": "pt"}, as_dtype={n: w for n, _, _, w in shard})
    write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                      "weight_map": weight_map})
    floats = {want for shard in shards for *_, want in shard} - {None}
    cfg["torch_dtype"] = floats.pop() if len(floats) == 1 else "float32"
    if "dtype" in cfg:
        cfg["dtype"] = cfg["torch_dtype"]
    write_json(out / "config.json", cfg)
    copy_tokenizer(base, out)


def _is_model_dir(src) -> bool:
    """An HF model dir (its config.json names a model type), not a run or adapter dir."""
    d = Path(src)
    if not (d / "config.json").is_file() or (d / ad.FORGE).is_file() or not any(d.glob("*.safetensors")):
        return False
    try:
        cfg = json.loads((d / "config.json").read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(cfg, dict) and ("model_type" in cfg or "architectures" in cfg)


def _model_to_gguf(src: Path, out: Path, outtype: str) -> Path:
    """A full HF checkpoint (float weights) as one GGUF and a Modelfile."""
    from forge_core.models.gguf_export import modelfile, write_gguf

    name = f"model-{outtype}.gguf"
    with atomic_dir(out) as tmp:
        write_gguf(src, tmp / name, outtype, name=src.resolve().name)
        write_text(tmp / "Modelfile", modelfile(name))
    click.echo(f"wrote {out} (gguf {outtype} of the checkpoint {src})")
    return out


def _gguf(adapter: ad.Adapter, base: Path, out: Path, outtype: str, system: str) -> None:
    """The float32 merge (write_merged, in a temp dir beside `out`), written as model-<outtype>.gguf."""
    from forge_core.models.gguf_export import modelfile, write_gguf

    name = f"model-{outtype}.gguf"
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".merged-f32.") as f32:
        write_merged(adapter, base, Path(f32), "float32")
        write_gguf(Path(f32), out / name, outtype, name=base.name)
    write_text(out / "Modelfile", modelfile(name, system))


def copy_tokenizer(base: Path, out: Path) -> None:
    for f in sorted(base.iterdir()):
        if f.is_file() and TOKENIZER_FILES.match(f.name):
            shutil.copyfile(f, out / f.name)


def _merged_quantized(adapter: ad.Adapter, base: Path, out: Path, shard_bytes: int, method: str = "rtn",
                      calib: str | None = None) -> None:
    """Merge in float32 first, then quantize the merged weights with mlx-lm (bits, group from forge.json): rtn by
    mlx_lm.convert's rounding, awq / gptq by mlx-lm's own quantizers calibrated on the run's rows
    (forge_mlx/posttrain_quant.py, calibration.py)."""
    try:
        import forge_mlx  # noqa: F401, I001 - first: on Linux it loads an optimized BLAS, which must precede mlx's
        from mlx_lm import convert as mlx_convert
    except ImportError:
        raise ForgeError('--quantize needs mlx-lm: pip install "forge-tune[mlx]" '
                         '(Linux: "forge-tune[mlx-linux]") or export without --quantize') from None
    q = adapter.forge.get("quantization") or {}
    bits = q.get("bits") if q.get("bits") in (2, 3, 4, 6, 8) else 4
    group = q.get("group_size") or 64
    keep_embeddings = not ((adapter.forge.get("config") or {}).get("quant", {}).get("embeddings", False))
    tokens = calibration_tokens(adapter.forge, base, calib, method=method) if method != "rtn" else None  # before any work
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".merged-f32.") as f32:
        write_merged(adapter, base, Path(f32), "float32", shard_bytes)
        staging = out / ".quantized"
        model_type = adapter.forge.get("model_type")

        def keep(path, module):  # the embeddings (unless the run quantized them) and a mixture's router stay dense
            return not (keep_embeddings and path.endswith(("embed_tokens", "lm_head"))) \
                and not is_router(model_type, path)

        if method != "rtn":
            from forge_mlx.posttrain_quant import quantize_checkpoint

            quantize_checkpoint(Path(f32), staging, method, bits, group, tokens, keep)
            for f in staging.iterdir():
                os.replace(f, out / f.name)
            staging.rmdir()
            return

        mlx_convert(str(f32), str(staging), quantize=True, q_group_size=group, q_bits=bits, quant_predicate=keep)
        for f in staging.iterdir():
            os.replace(f, out / f.name)
        staging.rmdir()


# ---- model card and upload -------------------------------------------------------------------------

def read_metrics(path: Path) -> tuple[int, dict]:
    """(rows, {key: last numeric value}) from a metrics.jsonl; unreadable lines are skipped."""
    last, rows = {}, 0
    if not path.is_file():
        return 0, {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows += 1
            last.update({k: v for k, v in row.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return rows, last


def _hub_id(spec: str | None) -> bool:
    return bool(spec) and re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is not None and not Path(spec).exists()


LIBRARY = {"peft": "peft", "mlx": "mlx", "merged": "transformers", "gguf": "gguf"}
USAGE = {
    "peft": "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
            'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "<this dir>")',
    "mlx": 'from mlx_lm import load\nmodel, tokenizer = load("{base}", adapter_path="<this dir>")',
    "merged": 'from transformers import AutoModelForCausalLM\n'
              'model = AutoModelForCausalLM.from_pretrained("<this dir>")',
    "quantized": 'from mlx_lm import load\nmodel, tokenizer = load("<this dir>")',
    "gguf": '# llama.cpp: llama-cli -m model-<outtype>.gguf -cnv\n# Ollama:    ollama create my-model -f Modelfile',
}


def model_card(adapter: ad.Adapter, plain: ad.Adapter, fmt: str, src, quantize: bool) -> str:
    """README.md: base, method, data, config and the run's final metrics."""
    base, cfg = plain.base_model, adapter.forge.get("config") or {}
    front = ["---"] + ([f"base_model: {base}"] if _hub_id(base) else [])
    front += [f"library_name: {'mlx' if quantize else LIBRARY[fmt]}",
              f"tags: [forge, {adapter.init}]", "---", ""]
    rows = [("base model", f"`{base}`"), ("method", cv.describe(adapter, plain)),
            ("scale", f"{plain.scale:g} (lora_alpha {plain.alpha:g}, rsLoRA: {plain.rslora})"),
            ("targets", ", ".join(plain.targets)), ("layers", _ranges(plain.layers))]
    if cfg:
        data, train = cfg.get("data", {}), cfg.get("train", {})
        rows += [("training data", f"`{data.get('train', '')}`"), ("learning rate", train.get("lr")),
                 ("steps / epochs", f"{train.get('steps')} / {train.get('epochs')}"),
                 ("base quantization", adapter.forge.get("quantization"))]
    text = front + [f"# {Path(str(src)).resolve().name} ({fmt} export)", "",
                    f"Exported by Forge from `{src}`.", "", "| | |", "|---|---|"]
    text += [f"| {k} | {v} |" for k, v in rows]
    run = _run_dir(src)
    n, last = read_metrics(run / "metrics.jsonl") if run else (0, {})
    if last:
        text += ["", f"## Metrics (last values over {n} logged rows)", "", "| metric | value |", "|---|---|"]
        text += [f"| {k} | {v:.6g} |" for k, v in sorted(last.items())]
    if adapter.init == "pissa":
        text += ["", "PiSSA trains W_res + s·B·A with W = W_res + s·B0·A0. This export holds the plain LoRA",
                 "A' = [A; A0], B' = [B, -B0] (rank 2r, same scale), so it applies to the ORIGINAL base."]
    usage = USAGE["quantized" if quantize else fmt].format(base=base)
    return "\n".join(text + ["", "```python", usage, "```", ""])


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "-"
    return f"{xs[0]}-{xs[-1]}" if xs == list(range(xs[0], xs[-1] + 1)) else ", ".join(map(str, xs))


def _run_dir(src) -> Path | None:
    """The run dir when SRC is one (it holds adapter/) or is a run's adapter/ dir."""
    src = Path(src)
    if ad.adapter_dir(src) != src:
        return src
    return src.parent if src.name == "adapter" else None


def push(out: Path, repo: str) -> None:
    """Upload OUT to the hub repo (created if needed); offline or unreachable -> one clear error."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ForgeError(f"--push-to-hub {repo}: HF_HUB_OFFLINE is set; unset it to upload "
                         f"(the export is saved in {out})")
    from huggingface_hub import HfApi

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
    try:
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=repo, commit_message="forge export")
    except Exception as e:  # noqa: BLE001 - the hub client's error classes change between versions
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ForgeError(f"--push-to-hub {repo}: upload failed ({first}); check the network and "
                         f"`hf auth login` - the export is saved in {out}") from None
    click.echo(f"pushed {out} to https://huggingface.co/{repo}")
