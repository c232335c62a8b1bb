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
