"""Each backend satisfies the Protocols forge_core declares (forge_core/backend.py): its ops module has
every BackendOps member with the same parameters, and its stepper every Stepper method. The loop, the
objectives and eval are forge_core's, so this is the whole contract between them and a backend."""

import importlib.util
import inspect

import pytest

if importlib.util.find_spec("mlx") is not None:
    import forge_mlx  # noqa: F401  (first: its BLAS preload must precede mlx.core)

from forge_core.backend import BackendOps, Stepper

FRAMEWORK = {"mlx": "mlx", "cuda": "torch"}


def _ops(backend: str):
    if importlib.util.find_spec(FRAMEWORK[backend]) is None:
        pytest.skip(f"{FRAMEWORK[backend]} is not installed")
    from forge_core.backend import ops

    return ops(backend)


def protocol_members(proto) -> dict:
    """{name: parameter names without self} of a Protocol's methods, {name: None} for its attributes."""
    members = {name: None for name in getattr(proto, "__annotations__", {})}
    for name, fn in vars(proto).items():
        if inspect.isfunction(fn) and not name.startswith("_"):
            members[name] = [p for p in inspect.signature(fn).parameters if p != "self"]
    return members


def params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


def test_the_protocols_declare_the_loops_needs():
    ops_members, step_members = protocol_members(BackendOps), protocol_members(Stepper)
    assert {"name", "xp", "build_model", "to_batch", "sft_loss", "sequence_logps", "make_stepper", "seed",
            "save_adapter", "complete", "guard_peak"} <= set(ops_members)
    assert set(step_members) == {"begin", "accumulate", "update", "finish", "rollback", "state_arrays",
                                 "load_state_arrays"}


@pytest.mark.parametrize("backend", sorted(FRAMEWORK))
def test_ops_module_satisfies_backend_ops(backend):
    ops = _ops(backend)
    assert ops.name == backend
    for name, expected in protocol_members(BackendOps).items():
        assert hasattr(ops, name), f"{ops.__name__} lacks {name}"
        if expected is not None:
            assert params(getattr(ops, name)) == expected, f"{ops.__name__}.{name}"


@pytest.mark.parametrize("backend", sorted(FRAMEWORK))
def test_stepper_satisfies_stepper(backend):
    ops = _ops(backend)
    step = importlib.import_module(f"{ops.__package__}.step")
    for name, expected in protocol_members(Stepper).items():
        assert params(getattr(step.Stepper, name)) == expected, f"{step.__name__}.Stepper.{name}"
    assert params(ops.make_stepper) == ["cfg", "model", "loss_fn"]


@pytest.mark.parametrize("backend", sorted(FRAMEWORK))
def test_backends_hold_no_loop_objective_or_eval(backend):
    """Written once in forge_core: a backend package has no trainer, objectives, checkpoint or eval module."""
    package = _ops(backend).__package__
    for part in ("trainer", "objectives", "checkpoint", "evaluate"):
        assert importlib.util.find_spec(f"{package}.{part}") is None, f"{package}.{part}"


def test_both_backends_write_one_forge_json(tiny_model, tmp_path):
    """The adapter dir goes through forge_core/adapters on both backends: the same forge.json fields (values that
    name the backend, its layout or its quantizer aside), the same config, DoRA recorded alike."""
    import json

    from forge_core.config import ForgeConfig
    from forge_core.train import train

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "ok"}]}
            for i in range(4)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metas = {}
    for backend in ("mlx", "cuda"):
        cfg = ForgeConfig()
        cfg.model.path, cfg.data.train, cfg.train.out_dir = str(tiny_model), str(data), str(tmp_path / backend)
        cfg.lora.rank, cfg.lora.dora, cfg.quant.group_size, cfg.train.steps = 4, True, 32, 1
        run = train(cfg, ops=_ops(backend))
        metas[backend] = json.loads((run / "adapter" / "forge.json").read_text())
    mlx, cuda = metas["mlx"], metas["cuda"]
    assert mlx.keys() == cuda.keys() and mlx["dora"] is cuda["dora"] is True
    differ = {k for k in mlx if mlx[k] != cuda[k]}
    assert differ <= {"backend", "quantization", "config", "base_model_dir"}, differ
    for meta in (mlx, cuda):
        meta["config"]["train"].pop("out_dir")  # the two runs' own dirs
    assert mlx["config"] == cuda["config"]
