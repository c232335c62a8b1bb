"""Both backends' serving engines (forge_mlx/serve.py, forge_cuda/serve.py) decode what `forge generate` decodes:
two runs on one base, rows for both adapters joining at different steps (continuous batching), greedy tokens equal
to the backend's own generation with that run loaded alone; a row removed mid-answer leaves the others as they were.
Both ways of mixing adapters: per row in one batch (rows) and one batch per adapter (grouped)."""

import io
import json

import pytest

from forge_core.serve.catalog import build_catalog

MAX = 6


def _run(tiny_model, tmp, name: str, answer: str):
    from rich.console import Console

    from forge_core.config import ForgeConfig
    from forge_mlx import ops
    from tests.bound import bind

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": answer}]}
            for i in range(8)]
    (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = ForgeConfig()
    cfg.model.path, cfg.data.train, cfg.train.out_dir = str(tiny_model), str(tmp / f"{name}.jsonl"), str(tmp / name)
    cfg.lora.rank, cfg.lora.alpha, cfg.quant.group_size = 4, 4.0, 32
    cfg.train.steps, cfg.train.lr, cfg.train.batch_size = 3, 2e-2, 4
    return bind(ops)[0](cfg, console=Console(file=io.StringIO()))


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engines")
    return {"a": _run(tiny_model, tmp, "a", "blue sky"), "b": _run(tiny_model, tmp, "b", "red sun")}


PROMPTS = [[5, 70, 71, 72], [200, 41, 42, 43, 44, 45, 46], [9, 8]]


def _engine(backend, catalog, mix):
    if backend == "mlx":
        from forge_mlx.serve import MlxEngine

        return MlxEngine(catalog, 8, log=lambda m: None, mix=mix)
    from forge_cuda.serve import TorchEngine

    return TorchEngine(catalog, 8, log=lambda m: None, mix=mix)


def _alone(backend, run, prompt) -> list[int]:
    from forge_core.backend import ops
    from forge_core.eval.evaluate import _for_inference

    o = ops(backend)
    model, tok, _ = _for_inference(o, str(run), None)
    return o.generate_tokens(model, tok, [prompt], MAX)[0]


@pytest.mark.parametrize("mix", ["rows", "grouped"])
@pytest.mark.parametrize("backend", ["mlx", "cuda"])
def test_rows_joining_at_different_steps_decode_as_each_run_alone(backend, mix, runs):
    from forge_core.backend import ops

    catalog = build_catalog(ops(backend), [str(runs["a"]), str(runs["b"])], None)
    engine = _engine(backend, catalog, mix)
    lanes = sorted({engine.lane(n) for n in ("a", "b")})
    assert len(lanes) == (1 if mix == "rows" else 2)
    plan = [("a", PROMPTS[0]), ("b", PROMPTS[1]), ("a", PROMPTS[2]), ("b", PROMPTS[0]), ("a", PROMPTS[1])]
    got, owner, dropped = {}, {}, None
    for step in range(40):
        if step < len(plan):  # one new row per step: each joins rows already decoding
            name, prompt = plan[step]
            key = (engine.lane(name), engine.insert(name, prompt, MAX, 0.0, 1.0))  # row ids are per lane
            owner[key], got[key] = (name, tuple(prompt)), []
        if step == 3:  # the first row of "b" leaves mid-answer (a client gone)
            dropped = next(k for k, (n, _) in owner.items() if n == "b")
            engine.remove(dropped[0], [dropped[1]])
        for lane in lanes:
            for uid, token, finish in engine.step(lane):
                assert (lane, uid) != dropped or step < 3
                if finish != "stop":
                    got[(lane, uid)].append(token)
    for key, (name, prompt) in owner.items():
        uid = key
        if uid != dropped:
            assert got[uid] == _alone(backend, runs[name], list(prompt)), (backend, name, prompt)
    assert any(got[u] != got[v] for u in owner for v in owner if owner[u][1] == owner[v][1] and owner[u] != owner[v])
