"""Which runs share a base in `forge serve`, and the server's memory plan: runs cut from one base the same way (the
init cache gives them the same residual) are one group with one base; another rank is another base; the base model
is served on the first group; a name used twice is one line; a plan over the budget is refused with what to change."""

import io
import json

import pytest

from forge_core.errors import ForgeError
from forge_core.serve import plan
from forge_core.serve.catalog import build_catalog
from forge_core.serve.settings import ServeSettings


def _run(tiny_model, tmp, name: str, rank: int):
    from rich.console import Console

    from forge_core.config import ForgeConfig
    from forge_mlx import ops
    from tests.bound import bind

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "blue"}]}
            for i in range(4)]
    (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = ForgeConfig()
    cfg.model.path, cfg.data.train, cfg.train.out_dir = str(tiny_model), str(tmp / f"{name}.jsonl"), str(tmp / name)
    cfg.lora.rank, cfg.lora.alpha, cfg.quant.group_size, cfg.train.steps, cfg.train.batch_size = rank, rank, 32, 1, 2
    return bind(ops)[0](cfg, console=Console(file=io.StringIO()))


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("catalog")
    return {"a": _run(tiny_model, tmp, "a", 4), "b": _run(tiny_model, tmp, "b", 4), "c": _run(tiny_model, tmp, "c", 8)}


def test_runs_cut_alike_share_one_base_and_another_rank_gets_its_own(runs, tiny_model):
    from forge_mlx import ops

    cat = build_catalog(ops, [str(runs["a"]), str(runs["b"] / "adapter"), str(runs["c"])], None)
    assert cat.names() == ["model", "a", "b", "c"]  # the base by its dir name; an adapter dir by its run's name
    groups = cat.groups()
    assert sorted(sorted(m.name for m in g) for g in groups.values()) == [["a", "b", "model"], ["c"]]
    assert cat.served["model"].weights is None and cat.served["model"].factors is not None  # PiSSA: the init factors


def test_a_name_served_twice_is_one_line(runs):
    from forge_mlx import ops

    with pytest.raises(ForgeError, match="a served run is already named 'a'"):
        build_catalog(ops, [str(runs["a"]), str(runs["a"] / "adapter")], None)
    with pytest.raises(ForgeError, match="no-such: no such run"):
        build_catalog(ops, ["no-such"], None)


def test_the_plan_counts_each_base_once_and_each_adapter_and_refuses_over_the_budget(runs, monkeypatch):
    from forge_mlx import ops

    cat = build_catalog(ops, [str(runs["a"]), str(runs["b"]), str(runs["c"])], None)
    lines, _ = plan.serve_plan(cat, ServeSettings(max_batch=2, max_context=64), "mlx")
    names = [w for w, _, _ in lines]
    assert sum(w.startswith("base ") for w in names) == 2 and [w for w in names if w.startswith("adapter")] == [
        "adapter a", "adapter b", "adapter c"]
    sizes = {w: b for w, b, _ in lines}
    assert sizes["adapter c"] == 2 * sizes["adapter a"]  # rank 8 vs rank 4: factors twice the size
    monkeypatch.setattr(plan, "device_budget", lambda backend, cfg: (10 * 2**20, "test"))
    said = []
    with pytest.raises(ForgeError, match=r"needs about .* 10\.00 MiB is available: serve fewer runs"):
        plan.check_serve_plan(cat, ServeSettings(), "mlx", say=said.append)
    assert said[0] == "memory plan (forge serve):" and any("KV cache" in s for s in said)
    plan.check_serve_plan(cat, ServeSettings(force=True), "mlx", say=said.append)  # --force starts anyway
