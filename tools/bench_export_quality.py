"""What each export format costs in quality: the SFT demo run exported every way forge writes, each measured on the
demo's held-out rows against the float merge.

    python tools/bench_export_quality.py [--run runs/demo-sft] [--only merged-f32,mlx-gptq-4,...] [--write docs/BENCHMARKS.md]

For each format, as the user would type it: `forge export RUN ...` (wall seconds of the whole command: the float32
merge, the quantizer, imports), the weights' size on disk, then `forge eval --config configs/demo.yaml --model OUT
--json` (the held-out loss and perplexity over the demo's 40 valid rows, valid_json / field_acc over 24 greedy
answers) and `forge generate --model OUT` on the README's prompt (its greedy answer, shown as is). GGUF files are
read back through forge's GGUF import (the gguf package's dequantization: what llama.cpp computes with, in float).
For GGUF files llama.cpp's own greedy answer is shown too (its Node binding, tools/llama_cpp; `make llama-cpp`).
The run is trained first when missing (`forge train --config configs/demo.yaml --set train.out_dir=RUN`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc
from bench_eval import BIN, PROMPT, timed

from forge_core.adapters.formats import FORGE, forge_adapter_dir, read_json

TITLE = "Export formats: size and quality"
LLAMA_CPP = bc.ROOT / "tools" / "llama_cpp"  # llama.cpp's Node binding (make llama-cpp): its answers to GGUF files
# name -> (forge export arguments, the model file inside --out, or "" for the directory)
FORMATS = {
    "merged-f32": (["--format", "merged"], ""),
    "mlx-rtn-4": (["--format", "merged", "--quantize"], ""),
    "mlx-awq-4": (["--format", "merged", "--quantize", "awq"], ""),
    "mlx-gptq-4": (["--format", "merged", "--quantize", "gptq"], ""),
    "mlx-dwq-4": (["--format", "merged", "--quantize", "dwq"], ""),
    "gguf-q8_0": (["--format", "gguf", "--outtype", "q8_0"], "model-q8_0.gguf"),
    "gguf-q5_1": (["--format", "gguf", "--outtype", "q5_1"], "model-q5_1.gguf"),
    "gguf-q4_0": (["--format", "gguf", "--outtype", "q4_0"], "model-q4_0.gguf"),
}


def size_mib(d: Path) -> float:
    return sum(f.stat().st_size for f in d.rglob("*") if f.suffix in (".gguf", ".safetensors")) / 2**20


def ensure_run(run: Path) -> None:
    if not (run / "adapter" / "forge.json").is_file():
        timed([str(BIN / "forge"), "train", "--config", "configs/demo.yaml", "--set", f"train.out_dir={run}"],
              bc.ROOT)


def measure(name: str, run: Path, tmp: Path, home: Path) -> dict:
    args, model_file = FORMATS[name]
    out = tmp / name
    env = {"FORGE_HOME": str(home)}  # GGUF imports land here, not in the user's home
    export_s, _ = timed([str(BIN / "forge"), "export", str(run), *args, "--out", str(out)], bc.ROOT, env)
    model = out / model_file if model_file else out
    _, text = timed([str(BIN / "forge"), "eval", "--config", "configs/demo.yaml", "--model", str(model), "--json"],
                    bc.ROOT, env)
    metrics = json.loads(text)
    system = read_json(forge_adapter_dir(run) / FORGE).get("system_prompt", "")  # asked as the run was taught
    _, answer = timed([str(BIN / "forge"), "generate", "--model", str(model), "--prompt", PROMPT, "--system", system,
                       "--max-tokens", "40"], bc.ROOT, env)
    result = {"name": name, "mib": size_mib(out), "export_s": export_s, "metrics": metrics, "answer": answer.strip()}
    if model.suffix == ".gguf" and (LLAMA_CPP / "node_modules" / "node-llama-cpp").is_dir():
        result["llama_cpp"] = llama_cpp_answer(model, run)
    return result


def llama_cpp_answer(gguf: Path, run: Path) -> str:
    """llama.cpp's own greedy answer (tools/llama_cpp/greedy.mjs) to the README prompt, chat-templated with the run's
    system prompt as forge generate asks it."""
    from transformers import AutoTokenizer

    from forge_core.eval.generation import chat_prompt
    from forge_core.models.sources import resolve_model

    meta = read_json(forge_adapter_dir(run) / FORGE)
    tok = AutoTokenizer.from_pretrained(str(resolve_model(meta["config"]["model"]["path"])))
    system = meta.get("system_prompt", "")
    ids = chat_prompt(tok, ([{"role": "system", "content": system}] if system else [])
                      + [{"role": "user", "content": PROMPT}])
    spec = json.dumps({"model": str(gguf), "prompts": [ids], "max_tokens": 40})
    out = subprocess.run(["node", str(LLAMA_CPP / "greedy.mjs"), spec], capture_output=True, text=True, cwd=LLAMA_CPP,
                         check=True)
    return tok.decode(json.loads(out.stdout.strip().splitlines()[-1])["tokens"][0], skip_special_tokens=True)


def row(r: dict) -> list:
    m = r["metrics"]

    def num(key, fmt):
        return format(m[key], fmt) if isinstance(m.get(key), int | float) else "-"

    return [r["name"], f"{r['mib']:.1f}", num("loss", ".4f"), num("ppl", ".3f"), num("valid_json", ".3f"),
            num("field_acc", ".3f"), f"{r['export_s']:.1f}"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(bc.ROOT / "runs" / "demo-sft"))
    ap.add_argument("--only", default="", help="comma-separated format names (default: all)")
    ap.add_argument("--write", default=None, metavar="MD")
    args = ap.parse_args(argv)
    names = [n for n in FORMATS if not args.only or n in args.only.split(",")]
    load_before = bc.machine()["load"]
    run = Path(args.run)
    ensure_run(run)
    tmp = Path(tempfile.mkdtemp(prefix="forge-bench-quality-"))
    results = []
    try:
        for name in names:
            tic = time.perf_counter()
            results.append(measure(name, run, tmp, tmp / "home"))
            print(f"{row(results[-1])}  ({time.perf_counter() - tic:.0f}s)", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    answers = "\n".join(f"- {r['name']}: {json.dumps(r['answer'])}"
                        + (f"; llama.cpp: {json.dumps(r['llama_cpp'])}" if "llama_cpp" in r else "") for r in results)
    text = "\n".join([
        bc.provenance(bc.command("bench_export_quality.py", argv), load_before), "",
        bc.table(["format", "MiB", "held-out loss", "ppl", "valid_json", "field_acc", "export s"],
                 [row(r) for r in results]), "",
        f"Greedy answers to `{PROMPT}` (40 tokens at most):", "", answers])
    bc.publish(text, args.write, TITLE)


if __name__ == "__main__":
    main()
