"""Serving speed: `forge serve` against `mlx_lm.server` on the same merged model, and the cost of mixing adapters.

    python tools/bench_serve.py [--run runs/demo-sft] [--clients 1,4,16] [--max-tokens 32] [--backend mlx|cuda]
                                [--write docs/BENCHMARKS.md]

The SFT demo run is exported merged (forge export --format merged), then served three ways, one server at a time on
one port, each asked the same thing by C concurrent clients (C in --clients, each sending 2 streamed chat requests
with distinct prompts, greedy, --max-tokens):
- mlx_lm.server --model MERGED (mlx-lm's own OpenAI server),
- forge serve --model MERGED (the merged model as a base, no adapter),
- forge serve RUN RUN-COPY: the run as trained (its 4-bit residual, dequantized once for CPU decoding, the adapter
  apart), all requests to one adapter, and then half to each of two adapters, both ways forge mixes them: per row in
  one batch (--mix rows, the default) and one batch per adapter (--mix grouped). The copy is the same run under
  another name: what is measured is how the adapters are applied, not different weights.
With --backend cuda only the run's three forge serve rows are measured, served by the torch engine (its own section).
Per server and C: tokens/s over all clients (answer tokens, counted by the model's tokenizer, over the wall time from
the first request sent to the last answer done) and time to first token (median over requests, from sending to the
first content chunk).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc
from bench_eval import BIN, timed

TITLE = "Serving: forge serve vs mlx_lm.server"
TITLE_TORCH = "Serving on torch: adapters per row vs grouped"
ONE = "forge serve, run as trained (1 adapter)"
PER_ROW = "forge serve, run as trained (2 adapters mixed, per row)"
GROUPED = "forge serve, run as trained (2 adapters mixed, grouped)"
QUESTIONS = ["Name a colour.", "What is 2 + 3?", "Say hello in French.", "Name a fruit.", "What is the capital of Italy?",
             "Give me a word that rhymes with cat.", "Name an animal.", "What day comes after Monday?"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=5).read()
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError("server did not come up")


def _ask(url: str, model: str, question: str, max_tokens: int) -> tuple[float, str]:
    """(seconds to the first content chunk, the answer) of one streamed chat request."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
                       "temperature": 0.0, "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    tic, first, text = time.perf_counter(), None, ""
    with urllib.request.urlopen(req, timeout=600) as resp:
        for line in resp:
            line = line.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            piece = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content") or ""
            if piece and first is None:
                first = time.perf_counter() - tic
            text += piece
    return (first if first is not None else time.perf_counter() - tic), text


def load(url: str, models: list[str], clients: int, max_tokens: int, tokenizer) -> dict:
    ttft, texts, errors = [], [], []

    def client(i: int) -> None:
        try:
            for j in range(2):
                t, text = _ask(url, models[(i + j) % len(models)], QUESTIONS[(i * 2 + j) % len(QUESTIONS)], max_tokens)
                ttft.append(t)
                texts.append(text)
        except Exception as e:  # noqa: BLE001 - reported
            errors.append(repr(e))

    _ask(url, models[0], "Warm up.", 4)
    tic = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - tic
    if errors:
        raise RuntimeError(errors[0])
    tokens = sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts)
    return {"tok_s": tokens / wall, "ttft": statistics.median(ttft), "tokens": tokens}


def serve(cmd: list[str], port: int, log: Path):
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=bc.ROOT)
    _wait(f"http://127.0.0.1:{port}", proc)
    return proc


def main(argv=None) -> None:
    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(bc.ROOT / "runs" / "demo-sft"))
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--backend", choices=["mlx", "cuda"], default="mlx")
    ap.add_argument("--write", default=None, metavar="MD")
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    load_before = bc.machine()["load"]
    run = Path(args.run)
    tmp = Path(tempfile.mkdtemp(prefix="forge-bench-serve-"))
    try:
        merged = tmp / "merged"
        timed([str(BIN / "forge"), "export", str(run), "--format", "merged", "--out", str(merged)], bc.ROOT)
        copy = tmp / "copy"
        shutil.copytree(run / "adapter", copy / "adapter")
        tokenizer = AutoTokenizer.from_pretrained(str(merged))
        port = _port()
        py = str(BIN / "python")
        forge = [str(BIN / "forge"), "serve", "--port", str(port), "--backend", args.backend]
        setups = [
            ("mlx_lm.server, merged", [py, "-m", "mlx_lm.server", "--model", str(merged), "--port", str(port)],
             [str(merged)]),
            ("forge serve, merged", [*forge, "--model", str(merged)], ["merged"]),
            (ONE, [*forge, str(run), str(copy)], [run.name]),
            (PER_ROW, [*forge, str(run), str(copy)], [run.name, "copy"]),
            (GROUPED, [*forge, str(run), str(copy), "--mix", "grouped"], [run.name, "copy"]),
        ]
        if args.backend == "cuda":  # the torch engine: how it mixes adapters (mlx_lm.server is MLX's)
            setups = setups[2:]
        rows = []
        for label, cmd, models in setups:
            proc = serve(cmd, port, tmp / "server.log")
            try:
                for c in counts:
                    r = load(f"http://127.0.0.1:{port}", models, c, args.max_tokens, tokenizer)
                    rows.append([label, c, f"{r['tok_s']:.1f}", f"{r['ttft']:.2f}", r["tokens"]])
                    print(rows[-1], file=sys.stderr)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = "\n".join([
        bc.provenance(bc.command("bench_serve.py", argv), load_before), "",
        bc.table(["server", "clients", "tokens/s", "TTFT s (median)", "answer tokens"], rows), "",
        (f"Each client sends 2 streamed greedy chat requests of at most {args.max_tokens} tokens; one warm-up request "
         "first." + (" The merged model is the run's exact merge in float32." if args.backend == "mlx" else "")),
        "", reading(rows, max(counts))])
    bc.publish(text, args.write, TITLE if args.backend == "mlx" else TITLE_TORCH)


def reading(rows: list, c: int) -> str:
    """The ratios this table is for, at the most clients, computed from its rows."""
    tok = {(r[0], r[1]): float(r[2]) for r in rows}
    lines = [f"Read at {c} clients (this run):"]
    if ("mlx_lm.server, merged", c) in tok:
        lines.append(f"- the same merged model: forge serve {tok[('forge serve, merged', c)]:.1f} vs mlx_lm.server "
                     f"{tok[('mlx_lm.server, merged', c)]:.1f} tokens/s "
                     f"({tok[('forge serve, merged', c)] / tok[('mlx_lm.server, merged', c)]:.2f}x);")
    rows_, grouped, one = tok[(PER_ROW, c)], tok[(GROUPED, c)], tok[(ONE, c)]
    lines.append(f"- two adapters mixed, applied per row in one batch vs one batch per adapter: {rows_:.1f} vs "
                 f"{grouped:.1f} tokens/s ({rows_ / grouped:.2f}x; forge's default is per row, --mix rows);")
    lines.append(f"- against all requests on one adapter ({one:.1f}): per row {100 * (rows_ / one - 1):+.0f}%, grouped "
                 f"{100 * (grouped / one - 1):+.0f}% (grouping runs two half-width batches per step, each with the "
                 "base's matmuls; per row runs one).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
