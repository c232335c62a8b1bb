"""Both backends' serving engines (forge_mlx/serve.py, forge_cuda/serve.py) decode what `forge generate` decodes:
two runs on one base, rows for both adapters joining at different steps (continuous batching), greedy tokens equal
to the backend's own generation with that run loaded alone; a row removed mid-answer leaves the others as they were.
Both ways of mixing adapters: per row in one batch (rows) and one batch per adapter (grouped)."""

import io
import json

import pytest

from forge_core.serve.catalog import build_catalog

MAX = 6


def _run(tiny_model, tmp, name: str, answer: str, **lora):
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
    for k, v in lora.items():
        setattr(cfg.lora, k, v)
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


@pytest.fixture(scope="module")
def plain_runs(tiny_model, tmp_path_factory):
    """Two plain-LoRA runs with different alphas (scales 1 and 4): one base, so one group with the base itself."""
    tmp = tmp_path_factory.mktemp("plain")
    return {"c": _run(tiny_model, tmp, "c", "green leaf", init="lora", alpha=4.0),
            "d": _run(tiny_model, tmp, "d", "gold coin", init="lora", alpha=16.0)}


def _decode(engine, plan) -> dict:
    """{(name, prompt): greedy tokens} with one new row per step joining the rows already decoding."""
    got, owner = {}, {}
    for step in range(40):
        if step < len(plan):
            name, prompt = plan[step]
            key = (engine.lane(name), engine.insert(name, prompt, MAX, 0.0, 1.0))
            owner[key], got[(name, tuple(prompt))] = (name, tuple(prompt)), []
        for lane in {engine.lane(n) for n, _ in plan}:
            for uid, token, finish in engine.step(lane):
                if finish != "stop":
                    got[owner[(lane, uid)]].append(token)
    return got


@pytest.mark.parametrize("backend", ["mlx", "cuda"])
def test_per_row_adapters_with_their_own_scales_and_the_base_decode_as_grouped(backend, plain_runs):
    """Rows for two adapters of different scales and for the base itself, in ONE batch (rows), decode exactly as one
    batch per adapter (grouped, which the test above checks against each run alone)."""
    from forge_core.backend import ops

    catalog = build_catalog(ops(backend), [str(plain_runs["c"]), str(plain_runs["d"])], None)
    base = catalog.base_name
    plan = [("c", PROMPTS[0]), ("d", PROMPTS[0]), (base, PROMPTS[0]), ("c", PROMPTS[1]), ("d", PROMPTS[2]),
            (base, PROMPTS[1])]
    rows = _engine(backend, catalog, "rows")
    assert len({rows.lane(n) for n in ("c", "d", base)}) == 1
    got = _decode(rows, plan)
    assert got == _decode(_engine(backend, catalog, "grouped"), plan)
    assert len({tuple(got[(n, tuple(PROMPTS[0]))]) for n in ("c", "d", base)}) == 3  # each row its own adapter


def test_row_lora_in_bfloat16_on_the_cpu_equals_each_rows_own_lora():
    """MLX's CPU gather_mm takes float32 only: a bf16 model's rows go through the product in float32."""
    import mlx.core as mx

    from forge_mlx.serve_rows import RowLoRA, Rows, product_dtype

    mx.random.seed(0)
    linear = __import__("mlx.nn", fromlist=["Linear"]).Linear(16, 8)
    linear.set_dtype(mx.bfloat16)
    a, b = mx.random.normal((3, 16, 4)), mx.random.normal((3, 4, 8))
    scales = mx.array([0.5, 2.0, 1.0])
    rows = Rows()
    dtype = product_dtype(linear)
    layer = RowLoRA(linear, a.astype(dtype), b.astype(dtype), scales.astype(dtype), rows)
    x = mx.random.normal((4, 3, 16)).astype(mx.bfloat16)
    rows.idx = mx.array([2, 0, 1, 0], dtype=mx.uint32)
    y = layer(x)
    assert y.dtype == mx.bfloat16
    for r, i in enumerate([2, 0, 1, 0]):
        want = linear(x[r]).astype(mx.float32) + scales[i] * (x[r].astype(mx.float32) @ a[i]) @ b[i]
        assert mx.allclose(y[r].astype(mx.float32), want, atol=0.1, rtol=0.02).item()


def test_a_llama3_rope_model_decodes_on_the_schedulers_thread(tiny_model, tmp_path):
    """mlx-lm's Llama 3 rope keeps lazy frequencies outside the parameters; MLX ties a lazy array to the thread that
    made it, and the engine is built on one thread and decodes on another (the scheduler's): it must still decode."""
    import shutil
    import threading

    from forge_core.backend import ops
    from forge_mlx.serve import MlxEngine

    model = tmp_path / "llama3"
    shutil.copytree(tiny_model, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["rope_scaling"] = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                           "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    (model / "config.json").write_text(json.dumps(cfg))
    catalog = build_catalog(ops("mlx"), [], str(model))
    engine = MlxEngine(catalog, 4, log=lambda m: None)
    name, out = catalog.base_name, {}

    def decode():
        try:
            lane = engine.lane(name)
            engine.insert(name, PROMPTS[0], MAX, 0.0, 1.0)
            out["tokens"] = [t for _ in range(MAX + 1) for _, t, _ in engine.step(lane)]
        except Exception as e:  # noqa: BLE001 - reported below
            out["error"] = repr(e)

    thread = threading.Thread(target=decode)
    thread.start()
    thread.join()
    assert "error" not in out, out
    assert 1 <= len(out["tokens"]) <= MAX


@pytest.mark.parametrize("backend", ["mlx", "cuda"])
def test_the_base_served_alone_holds_no_second_copy_and_decodes_as_the_base(backend, tiny_model):
    from forge_core.backend import ops
    from forge_core.config import ForgeConfig

    o = ops(backend)
    engine = _engine(backend, build_catalog(o, [], str(tiny_model)), "rows")
    name = engine.base_name
    assert engine.adapters[name][0] == {}  # nothing to switch in: no copy of the parameters (torch had cloned them)
    got = _decode(engine, [(name, PROMPTS[0]), (name, PROMPTS[1])])
    cfg = ForgeConfig()
    cfg.model.path = str(tiny_model)
    model, tok = o.load_base_for_inference(cfg)
    for prompt in PROMPTS[:2]:
        assert got[(name, tuple(prompt))] == o.generate_tokens(model, tok, [prompt], MAX)[0]
