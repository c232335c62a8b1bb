"""Every registered method's objective satisfies the Objective Protocol (forge_core/objectives/protocol.py), and a
new method is one registry entry + one objective class: a toy method defined in this file alone trains 2 steps on
a tiny model on both backends."""

import inspect
import json

import numpy as np
import pytest

from forge_core import methods
from forge_core.config import ForgeConfig
from forge_core.objectives.protocol import Objective
from forge_core.objectives.sft import SFTObjective
from tests.test_preference_methods import BACKENDS


def _members() -> dict:
    out = {name: None for name in Objective.__annotations__}
    for name, fn in vars(Objective).items():
        if inspect.isfunction(fn) and not name.startswith("_"):
            out[name] = [p for p in inspect.signature(fn).parameters if p != "self"]
    return out


@pytest.mark.parametrize("kind", methods.KINDS)
def test_every_methods_objective_has_what_the_loop_uses(kind):
    cls = methods.method(kind).objective_class()
    init = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    assert init == ["kind", "cfg", "ops", "model", "tokenizer", "run", "console", "world"]
    for name, params in _members().items():
        if params is None:  # an attribute: set in __init__ or a class attribute / property
            src = inspect.getsource(cls) + "".join(inspect.getsource(b) for b in cls.__mro__[1:-1])
            assert hasattr(cls, name) or f"self.{name} =" in src or f"self.{name}," in src, f"{kind}: {name}"
        else:
            fn = getattr(cls, name, None)
            assert callable(fn), f"{kind}: {name}"
            got = [p for p in inspect.signature(fn).parameters if p != "self"]
            assert got[:len(params)] == params, f"{kind}.{name}{got} != {params}"


# ---------------------------------------------------------------- a toy method, defined here alone

class HalfLossObjective(SFTObjective):
    """Half the SFT loss: a method of its own, for the registry test (the loss through the backend's ops)."""

    def __init__(self, kind, cfg, ops, model, tokenizer, run, console, world):
        super().__init__(kind, cfg, ops, model, tokenizer, run, console, world)
        self.kind = kind
        self.loss_fn = lambda m, b: self._half(*ops.sft_loss(m, b))

    @staticmethod
    def _half(loss, count):
        return loss * 0.5, count, {}


@pytest.fixture
def toy_method():
    m = methods.register(methods.Method("halfsft", "", "sft", "Half the SFT loss (a test).", HalfLossObjective))
    yield m
    del methods.METHODS[m.kind]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_method_is_one_entry_and_one_objective(backend, toy_method, tiny_model, jsonl, tmp_path):
    import importlib

    train = importlib.import_module(f"tests.forge_{backend}.run").train
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "red red"}]}
            for i in range(8)]
    runs = {}
    for kind in ("sft", "halfsft"):
        cfg = ForgeConfig()
        cfg.model.path, cfg.data.train, cfg.train.out_dir = str(tiny_model), str(jsonl("t.jsonl", rows)), str(tmp_path / kind)
        cfg.lora.rank, cfg.quant.group_size, cfg.train.steps, cfg.train.log_every = 4, 32, 2, 1
        runs[kind] = train(cfg, kind)
    losses = {k: [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                  if r["split"] == "train"] for k, run in runs.items()}
    assert len(losses["halfsft"]) == 2
    np.testing.assert_allclose(losses["halfsft"][0], losses["sft"][0] / 2, rtol=1e-5)  # the same model at step 1
    assert json.loads((runs["halfsft"] / "adapter" / "forge.json").read_text())["kind"] == "halfsft"
