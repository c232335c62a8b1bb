"""GGUF export of the demo adapter on the bundled SmolLM2-135M: file size and export time per outtype.

    python tools/bench_gguf.py [--write docs/BENCHMARKS.md]

Each `forge export runs/demo-sft/adapter --format gguf --outtype T` runs as the user would type it (wall seconds of
the whole command: the float32 merge, the GGUF write, imports); the merged float32 export is the reference size.
The demo adapter is trained first when missing (`forge train --config configs/demo.yaml`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc
from bench_eval import ADAPTER, BIN, ensure_adapter, timed

OUTTYPES = ["f32", "f16", "bf16", "q8_0"]


def size_of(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file() and f.suffix in (".gguf", ".safetensors"))


def run_all() -> list[list]:
    ensure_adapter()
    tmp = Path(tempfile.mkdtemp(prefix="forge-bench-gguf-"))
    rows = []
    try:
        for fmt, extra in [("merged", [])] + [("gguf", ["--outtype", t]) for t in OUTTYPES]:
            out = tmp / (extra[-1] if extra else fmt)
            tic = time.perf_counter()
            timed([str(BIN / "forge"), "export", str(ADAPTER), "--format", fmt, "--out", str(out), *extra], bc.ROOT)
            wall = time.perf_counter() - tic
            rows.append([f"{fmt} {extra[-1] if extra else 'float32 safetensors'}", f"{size_of(out) / 2**20:.1f}",
                         f"{wall:.1f}"])
            print(f"{rows[-1]}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", default=None, metavar="MD")
    args = ap.parse_args(argv)
    load_before = bc.machine()["load"]
    rows = run_all()
    text = "\n".join([bc.provenance(bc.command("bench_gguf.py", argv), load_before), "",
                      bc.table(["export", "MiB", "seconds"], rows), "",
                      ("One run each. f32/f16/bf16/q8_0 hold the same merge; q8_0 keeps 1-D tensors (norms) in f32 as "
                       "llama.cpp does. Logit agreement with the merged export: tests/test_gguf_export.py.")])
    bc.publish(text, args.write, "GGUF export")


if __name__ == "__main__":
    main()
