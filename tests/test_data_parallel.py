"""Data-parallel training under the engines' own launchers, 2 local processes: mlx.launch (ring backend)
and torchrun (gloo). Two ranks at batch_size B give the single-process run at the same global batch (B rows
x 2 micro-batches: the same rows, grouped as the ranks group them), step for step; a killed
rank stops the other within a minute, a resume with another global batch is refused in one line and a
resume under the launcher ends bit-identical; a bad row stops both ranks with one message. `forge ... --nproc 2`
exits as its ranks did (a rank failing mid-run: its line, non-zero), and SIGTERM to it stops every rank after
one step, saved, from which --resume ends bit-identical."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from forge_core.relaunch import free_ports, launcher_command
from tests.test_preference_methods import BACKENDS

pytestmark = pytest.mark.slow
WEIGHTS = {"mlx": "adapters.safetensors", "cuda": "adapter_model.safetensors"}
WORDS = ["red", "blue", "green", "gold", "pink", "grey"]


@pytest.fixture(autouse=True)
def _one_blas_thread(monkeypatch):
    """Every process (the single one and each rank) runs its BLAS on one thread: the same GEMM partitioning,
    so the comparison sees only what data-parallel changes (torchrun sets OMP_NUM_THREADS=1 itself)."""
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")


def _sft_rows(n=24):
    return [{"messages": [{"role": "user", "content": f"color {i}"},
                          {"role": "assistant", "content": f"{WORDS[i % 6]} {WORDS[(i * 5) % 6]}"}]} for i in range(n)]


def _kto_rows(n=16):
    return [{"prompt": f"spell {w}{i}", "completion": " ".join(w) if i % 3 else w[::-1], "label": bool(i % 3)}
            for i, w in enumerate(WORDS * 3)][:n]


def _dpo_rows(n=16):
    return [{"prompt": f"spell {w}{i}", "chosen": " ".join(w), "rejected": w[::-1]} for i, w in enumerate(WORDS * 3)][:n]


def _args(backend, model, data, out, batch, steps=10, kind="sft", extra=()):
    return [{"sft": "train"}.get(kind, kind), "--backend", backend, "--model", str(model), "--data", str(data), "--steps", str(steps),
            "--rank", "4", "--quant", "none", "--init", "pissa", "--out", str(out),
            "--set", f"train.batch_size={batch}", "--set", "train.log_every=1", "--set", "train.eval_every=0",
            "--lr", "5e-3", "--set", "train.warmup=2", "--set", "model.dtype=float32", *extra]


def _run(cmd, timeout=400, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), **kw)


def _env():
    env = dict(os.environ)
    env.pop("MLX_RANK", None)
    env.pop("RANK", None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # torch: gloo on the CPU, as on a machine without GPUs
    return env


def _single(args):
    return _run([sys.executable, "-m", "forge_core.cli", *args])


def _launched(backend, args, **kw):
    return _run(launcher_command(2, backend, args, port=free_ports(2)), **kw)


def _losses(run):
    recs = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["split"] == "train"]


def _weights(run, backend):
    return load_file(str(Path(run) / "adapter" / WEIGHTS[backend]))


def _assert_weights(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kto_two_ranks_equal_one_process(backend, tiny_model, jsonl, tmp_path):
    """KTO's reference point z0 averages the mismatched pairs of every rank's rows: 2 ranks of 2 rows give the
    single process at 4 rows per micro-batch, step for step (the reference scoring is shared out too)."""
    data = jsonl("data.jsonl", _kto_rows())
    one = _single(_args(backend, tiny_model, data, tmp_path / "one", batch=4, kind="kto", steps=6))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launched(backend, _args(backend, tiny_model, data, tmp_path / "two", batch=2, kind="kto", steps=6))
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    a, b = ([r for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "train"] for run in ("one", "two"))
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        for key in ("loss", "kl", "rewards/chosen", "rewards/margin"):  # a batch of one label has no margin
            assert (key in x) == (key in y) and y.get(key) == pytest.approx(x.get(key), abs=1e-5), (key, x["step"])
    assert max(r["kl"] for r in a) > 0  # z0 was not the clamped 0 throughout: the exchange was exercised


# each backend once and each objective once (suite time): the exchange is forge_core's, and KTO's test below runs
# both backends against one process too
@pytest.mark.parametrize("backend,kind", [pytest.param("mlx", "dpo", marks=BACKENDS[0].marks),
                                          pytest.param("cuda", "sft", marks=BACKENDS[1].marks)])
def test_two_ranks_equal_one_process_at_the_same_global_batch(backend, kind, tiny_model, jsonl, tmp_path):
    data = jsonl("data.jsonl", _sft_rows() if kind == "sft" else _dpo_rows())
    one = _single(_args(backend, tiny_model, data, tmp_path / "one", batch=2, kind=kind,
                        extra=("--set", "train.grad_accum=2")))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launched(backend, _args(backend, tiny_model, data, tmp_path / "two", batch=2, kind=kind))
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert "global batch = 2 rows per rank x 2 ranks x 1 accumulation = 4 rows" in two.stderr + two.stdout
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 10
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    assert a[-1] != a[0]  # it trained
    _assert_weights(_weights(tmp_path / "two", backend), _weights(tmp_path / "one", backend), atol=1e-5)
    # rank 0 alone wrote the run dir: one record per step, one checkpoint pointer, one adapter
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in (tmp_path / "one").iterdir() if not p.name.startswith("."))


def _rank_pid(out: Path, rank: int) -> int | None:
    """The pid of the rank-`rank` process of the run writing to `out` (from /proc: its environment)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().split(b"\0")
            env = dict(e.split(b"=", 1) for e in (d / "environ").read_bytes().split(b"\0") if b"=" in e)
        except OSError:
            continue
        if str(out).encode() in cmdline and b"forge_core.cli" in cmdline and \
                (env.get(b"MLX_RANK") == str(rank).encode() or env.get(b"RANK") == str(rank).encode()):
            return int(d.name)
    return None


@pytest.mark.parametrize("backend", BACKENDS)
def test_killed_rank_stops_the_other_and_resume_under_the_launcher_is_exact(backend, tiny_model, jsonl, tmp_path):
    data = jsonl("data.jsonl", _sft_rows(48))
    extra = ("--set", "train.save_every=5", "--set", "lora.dropout=0.1")
    straight = _launched(backend, _args(backend, tiny_model, data, tmp_path / "straight", 2, steps=60, extra=extra))
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(launcher_command(2, backend, _args(backend, tiny_model, data, out, 2, steps=60, extra=extra),
                                             port=free_ports(2)), stdout=log, stderr=subprocess.STDOUT, env=_env())
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for a checkpoint at step >= 10, then kill -9 rank 1
        latest = out / "latest.json"
        if latest.is_file() and json.loads(latest.read_text())["step"] >= 10:
            break
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.02)
    pid = _rank_pid(out, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    proc.wait(timeout=120)
    assert time.time() - killed_at < 60
    text = (tmp_path / "killed.log").read_text()
    assert proc.returncode != 0 or backend == "mlx"  # mlx.launch itself exits 0 and warns per failed node
    assert "forge: error: rank 0 of 2" in text, text[-3000:]  # the survivor says what happened, in one line
    assert 'forge_core/' not in text and 'forge_mlx/' not in text, text[-3000:]  # no traceback through forge
    step = json.loads((out / "latest.json").read_text())["step"]
    assert 10 <= step < 60

    # another world size would change the global micro-batch (2 rows x 1 rank): refused, in one line
    alone = _single(["train", "--resume", str(out)])
    assert alone.returncode == 2 and "Traceback" not in alone.stderr
    assert "global micro-batch was 4 rows, now it would be 2 per rank x 1 rank(s) = 2" in alone.stderr
    resumed = _launched(backend, ["train", "--resume", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(out) == _losses(tmp_path / "straight")
    _assert_weights(_weights(out, backend), _weights(tmp_path / "straight", backend), atol=0)


def _forge_nproc(args, **kw):
    """`forge <args> --nproc 2`: forge's own process launching the ranks (relaunch.py), as a user runs it."""
    return [sys.executable, "-m", "forge_core.cli", *args, "--nproc", "2"]


@pytest.mark.parametrize("backend", [BACKENDS[0]])  # mlx: its launcher exits 0 whatever the ranks did
def test_sigterm_to_forge_nproc_stops_every_rank_at_one_step_and_resume_is_exact(backend, tiny_model, jsonl, tmp_path):
    data = jsonl("data.jsonl", _sft_rows(48))
    extra = ("--set", "lora.dropout=0.1")  # save_every 100: only the stop saves
    straight = _launched(backend, _args(backend, tiny_model, data, tmp_path / "straight", 2, steps=40, extra=extra))
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "stopped"
    log = open(tmp_path / "stopped.log", "w")
    proc = subprocess.Popen(_forge_nproc(_args(backend, tiny_model, data, out, 2, steps=40, extra=extra)),
                            stdout=log, stderr=subprocess.STDOUT, env=_env())
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # step 5 logged: SIGTERM forge (not the ranks)
        if (out / "metrics.jsonl").is_file() and len(_losses(out)) >= 5:
            os.kill(proc.pid, signal.SIGTERM)
            break
        time.sleep(0.01)
    proc.wait(timeout=120)
    text = (tmp_path / "stopped.log").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, text[-3000:]
    step = json.loads((out / "latest.json").read_text())["step"]
    assert 5 <= step < 40 and len(_losses(out)) == step, text[-3000:]  # the step it stopped at is the one saved
    assert f"stopped by SIGTERM after step {step}/40" in text and "Traceback" not in text, text[-3000:]
    resumed = _run(_forge_nproc(["train", "--resume", str(out)]))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(out) == _losses(tmp_path / "straight")
    _assert_weights(_weights(out, backend), _weights(tmp_path / "straight", backend), atol=0)
    # a run dir that holds a run: refused before anything is launched, in one line
    again = _run(_forge_nproc(_args(backend, tiny_model, data, out, 2, steps=40)))
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"forge: error: {out} already holds a run; pass --resume {out} or choose another --out"], again.stderr


FAIL_ON_RANK_1 = """
import os
if os.environ.get("MLX_RANK") == "1" or os.environ.get("RANK") == "1":
    from forge_core.errors import ForgeError
    from forge_core.objectives import sft

    _next, _calls = sft.SFTObjective.next_batch, [0]

    def next_batch(self):
        _calls[0] += 1
        if _calls[0] == 4:
            raise ForgeError("rank 1 could not read its 4th batch (injected by the test)")
        return _next(self)

    sft.SFTObjective.next_batch = next_batch
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rank_failing_mid_run_fails_forge_nproc_with_its_line(backend, tiny_model, jsonl, tmp_path):
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(FAIL_ON_RANK_1)  # every rank imports it at start
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(tmp_path / "hook"), os.environ.get("PYTHONPATH", "")])}
    data = jsonl("data.jsonl", _sft_rows())
    res = subprocess.run(_forge_nproc(_args(backend, tiny_model, data, tmp_path / "run", 2)), capture_output=True,
                         text=True, timeout=400, env=env, check=False)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("forge: error:")]
    assert lines[-1] == "forge: error: rank 1 of 2 failed: rank 1 could not read its 4th batch (injected by the " \
                        "test)", res.stderr[-3000:]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_row_stops_both_ranks_with_one_message(backend, tiny_model, tmp_path):
    rows = [json.dumps(r) for r in _sft_rows(12)]
    rows[9] = '{"messages": [{"role": "user", "content": "hi"}'  # line 10: broken JSON
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(rows) + "\n")
    res = _launched(backend, _args(backend, tiny_model, data, tmp_path / "run", batch=2))
    assert res.returncode != 0 or backend == "mlx"  # mlx.launch itself exits 0 and warns per failed node
    assert "exited with code 2" in res.stderr or backend != "mlx"
    errors = [line for line in (res.stdout + res.stderr).splitlines() if "forge: error:" in line]
    assert len(errors) == 1, res.stdout + res.stderr
    assert f"{data}:10" in errors[0]
    assert "forge_core/" not in res.stdout + res.stderr  # no traceback through forge


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_two_ranks_run_and_resume_inside_a_generation_exactly(backend, tiny_model, jsonl, tmp_path):
    """GRPO under the launcher: each rank samples its prompts' groups, the advantages are scaled over the global
    batch (scale_rewards batch: one exchange), and a generation that serves μ = 2 steps is gathered into rank 0's
    checkpoint; a resume between those two steps reads every rank's share back and ends bit-identical."""
    import shutil

    data = jsonl("prompts.jsonl", [{"prompt": f"spell {w}{i}", "reference": w} for i, w in enumerate(WORDS * 2)])
    extra = ("--reward", "builtin:regex:[aeiou]", "--reward", "builtin:length:4", "--num-generations", "2",
             "--max-new-tokens", "5", "--num-iterations", "2", "--scale-rewards", "batch", "--temperature", "1.5",
             "--set", "train.save_every=1", "--set", "grpo.beta=0.05")
    straight = tmp_path / "straight"
    res = _launched(backend, _args(backend, tiny_model, data, straight, batch=2, kind="grpo", steps=4, extra=extra))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    # the checkpoint after step 3 is inside the second generation: it holds every rank's completions
    assert (straight / "checkpoints" / "step_000003" / "objective.safetensors").is_file()
    assert (straight / "adapter").is_dir()
    # the run as a kill after step 3 (inside the second generation) leaves it: checkpoint 3, no adapter
    cut = tmp_path / "cut"
    shutil.copytree(straight, cut)
    shutil.rmtree(cut / "adapter")
    shutil.rmtree(cut / "checkpoints" / "step_000004")
    (cut / "latest.json").write_text(json.dumps({"step": 3, "dir": "checkpoints/step_000003"}))
    res = _launched(backend, ["grpo", "--resume", str(cut)])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert _losses(cut) == _losses(straight) and len(_losses(cut)) == 4
    a, b = _weights(straight, backend), _weights(cut, backend)
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("backend", BACKENDS[:1])
def test_grpo_reward_failing_on_one_rank_stops_both_with_one_message(backend, tiny_model, jsonl, tmp_path):
    """The reward raises on rank 0's rows only: the exchange carries the failure, so rank 1 does not wait in a
    collective; the run ends (no hang) with rank 0's own one-line message naming the function and the row.
    Under mlx.launch only (suite time): the failure flag rides forge_core's one exchange, whose all-reduce both
    backends run in the GRPO and KTO tests above, and torchrun's handling of a failing rank is the bad-row test's."""
    data = jsonl("prompts.jsonl", [{"prompt": f"spell {w}{i}", "reference": "bad" if i == 0 else w}
                                   for i, w in enumerate(WORDS * 2)])
    bad = tmp_path / "bad.py"
    bad.write_text("def score(prompts, completions, reference, **kw):\n"
                   "    return [1 / (r != 'bad') for r in reference]\n")
    extra = ("--reward", f"{bad}:score", "--num-generations", "2", "--max-new-tokens", "4",
             "--set", "data.shuffle=false")
    res = _launched(backend, _args(backend, tiny_model, data, tmp_path / "run", batch=2, kind="grpo", steps=2,
                                   extra=extra), timeout=300)
    assert res.returncode != 0 or backend == "mlx"  # mlx.launch itself exits 0 and warns per failed node
    assert "exited with code 2" in res.stderr or backend != "mlx"
    errors = [line for line in (res.stdout + res.stderr).splitlines() if "forge: error:" in line]
    assert len(errors) == 1, res.stdout + res.stderr
    assert "bad.py:score raised ZeroDivisionError" in errors[0] and "prompts.jsonl:1" in errors[0]
