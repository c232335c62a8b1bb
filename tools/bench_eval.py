"""forge eval and forge generate on the bundled model, against an earlier forge and against mlx-lm.

    python tools/bench_eval.py [--write docs/BENCHMARKS.md] [--baseline REV] [--rounds 2]

What it runs, each as the user would type it (wall-clock seconds of the whole command, imports included),
the contenders alternating round by round so that the machine's drift hits them alike:
  eval      `forge eval --config configs/demo.yaml --adapter runs/demo-sft/adapter --json` (40 held-out rows
            for the loss, 24 answers of up to 40 tokens for the task metric) with this tree and with forge at
            REV (a git worktree of it, run with the same virtualenv); their metrics must agree.
  generate  `forge generate --adapter runs/demo-sft/adapter --prompt P --max-tokens 40` against
            `mlx_lm generate` of the same model merged (`forge export --format merged`, fp32), once as
            installed (the wheel's reference BLAS) and once with forge's BLAS preload, same system prompt.
The demo adapter is trained first when runs/demo-sft/adapter is missing (`forge train --config configs/demo.yaml`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc

ROOT = bc.ROOT
ADAPTER = ROOT / "runs" / "demo-sft" / "adapter"
PROMPT = "Ada Lovelace, 36, mathematician in London."
BIN = Path(sys.executable).parent


def timed(cmd: list[str], cwd: Path, env: dict | None = None) -> tuple[float, str]:
    """(wall seconds, stdout) of one command; a failure stops the benchmark with its stderr."""
    tic = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          check=False)
    wall = time.perf_counter() - tic
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def baseline_tree(rev: str) -> Path:
    """A worktree of `rev`, run with PYTHONPATH pointing at it (the console script puts no cwd on sys.path,
    so it wins over the editable install of this tree)."""
    path = Path(tempfile.gettempdir()) / f"forge-bench-{rev}"
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=ROOT, check=True,
                       capture_output=True)
    return path


def ensure_adapter() -> None:
    if not (ADAPTER / "forge.json").is_file():
        timed([str(BIN / "forge"), "train", "--config", "configs/demo.yaml"], ROOT)


def adapter_for(base: Path) -> Path:
    """A copy of the demo adapter whose saved config holds only the keys forge at `base` knows (an older
    forge refuses a config key it does not know)."""
    sys.path.insert(0, str(base))
    try:
        import importlib

        old = importlib.import_module("forge_core.config")
        known = old.ForgeConfig().to_dict()
    finally:
        sys.path.remove(str(base))
        for mod in [m for m in sys.modules if m == "forge_core" or m.startswith("forge_core.")]:
            del sys.modules[mod]
    out = Path(tempfile.mkdtemp(prefix="forge-bench-adapter-")) / "adapter"
    shutil.copytree(ADAPTER, out)
    meta = json.loads((out / "forge.json").read_text())
    meta["config"] = {sec: {k: v for k, v in vals.items() if k in known.get(sec, {})} if isinstance(vals, dict)
                      else vals for sec, vals in meta["config"].items() if sec in known}
    (out / "forge.json").write_text(json.dumps(meta, indent=1))
    return out


def eval_json(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])


def run_all(args) -> dict:
    ensure_adapter()
    base = baseline_tree(args.baseline)
    system = json.loads((ADAPTER / "forge.json").read_text()).get("system_prompt", "")
    merged = Path(tempfile.mkdtemp()) / "merged"
    timed([str(BIN / "forge"), "export", str(ADAPTER), "--format", "merged", "--out", str(merged)], ROOT)
    evals = {"now": [], "before": []}
    gens = {"forge": [], "mlx_lm": [], "mlx_lm_blas": []}
    metrics, texts = {}, {}
    eval_cmd = [str(BIN / "forge"), "eval", "--config", "configs/demo.yaml", "--adapter", str(ADAPTER), "--json"]
    old_adapter = adapter_for(base)
    old_eval_cmd = eval_cmd[:5] + [str(old_adapter), "--json"]
    gen_cmd = [str(BIN / "forge"), "generate", "--adapter", str(ADAPTER), "--prompt", PROMPT, "--max-tokens", "40"]
    mlx_args = ["--model", str(merged), "--system-prompt", system, "--prompt", PROMPT, "--max-tokens", "40"]
    blas_main = "import forge_mlx.blas, sys; from mlx_lm.generate import main; sys.argv[0] = 'mlx_lm'; main()"
    for r in range(args.rounds):
        for who in (("now", "before") if r % 2 == 0 else ("before", "now")):
            if who == "now":
                wall, out = timed(eval_cmd, ROOT)
            else:
                wall, out = timed(old_eval_cmd, base, {"PYTHONPATH": str(base)})
            evals[who].append(wall)
            metrics[who] = eval_json(out)
            print(f"eval {who}: {wall:.1f}s", file=sys.stderr)
        for who, cmd in (("forge", gen_cmd),
                         ("mlx_lm", [sys.executable, "-m", "mlx_lm", "generate", *mlx_args]),
                         ("mlx_lm_blas", [sys.executable, "-c", blas_main, *mlx_args])):
            wall, out = timed(cmd, ROOT)
            gens[who].append(wall)
            texts[who] = out.split("==========")[1].strip() if "==========" in out else out.strip()
            print(f"generate {who}: {wall:.1f}s", file=sys.stderr)
    for tmp in (merged.parent, old_adapter.parent):
        shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False, capture_output=True)
    return {"evals": evals, "gens": gens, "metrics": metrics, "texts": texts, "rounds": args.rounds}


def report(res: dict, args, command: str, load_before: str) -> str:
    med = {k: statistics.median(v) for k, v in {**res["evals"], **res["gens"]}.items()}
    m_now, m_before = res["metrics"]["now"], res["metrics"]["before"]
    task = [k for k in m_now if k not in ("loss", "ppl")]
    same_task = all(m_now[k] == m_before.get(k) for k in task)
    loss_gap = abs(m_now["loss"] - m_before["loss"])
    rows = [
        ["forge eval (this tree)", f"{med['now']:.1f}", f"{med['before'] / med['now']:.2f}x faster than before"],
        [f"forge eval at {args.baseline}", f"{med['before']:.1f}", "1.00x"],
        ["forge generate (one answer)", f"{med['forge']:.1f}", f"{med['mlx_lm'] / med['forge']:.2f}x mlx_lm's speed"],
        ["mlx_lm generate, merged, as installed", f"{med['mlx_lm']:.1f}", "1.00x"],
        ["mlx_lm generate, merged, forge's BLAS", f"{med['mlx_lm_blas']:.1f}",
         f"{med['mlx_lm'] / med['mlx_lm_blas']:.2f}x"],
    ]
    note = (f"Median wall seconds of {res['rounds']} rounds, whole commands (imports, model build, fold-in included). "
            f"Task metrics now {'==' if same_task else '!='} before "
            f"({', '.join(f'{k} {m_now[k]}' for k in task if isinstance(m_now[k], float))}); held-out loss "
            f"{m_now['loss']:.6f} vs {m_before['loss']:.6f} (|gap| {loss_gap:.1e}: the fused weights round "
            f"differently). Answers: forge `{res['texts']['forge']}`, mlx_lm `{res['texts']['mlx_lm']}`.")
    return "\n".join([bc.provenance(command, load_before), "", bc.table(["command", "seconds", "ratio"], rows), "",
                      note])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="d742ee3", help="the forge revision to compare with (before batched eval)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--write", default=None, metavar="MD")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    load_before = bc.machine()["load"]
    text = report(run_all(args), args, bc.command("bench_eval.py", argv), load_before)
    bc.publish(text, args.write, "Eval and generate")


if __name__ == "__main__":
    main()
