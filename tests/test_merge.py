"""`forge merge`: SLERP t=0 / t=1 give the inputs, the formulas equal mergekit's own functions on the same
tensors (1e-6), a gradient of t follows the layers, and the merged dir loads in transformers and mlx-lm."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from forge_core import merge as fm
from forge_core.cli import cli
from forge_core.errors import ForgeError

torch = pytest.importorskip("torch")


def _pair(seed=0, shape=(48, 32)):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape).astype(np.float32)
    return a, (0.6 * a + 0.8 * rng.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_equals_mergekits(t):
    from mergekit.merge_methods.slerp import slerp

    a, b = _pair()
    want = slerp(torch.tensor([t]), torch.from_numpy(a)[None], torch.from_numpy(b)[None])[0].numpy()
    np.testing.assert_allclose(fm.slerp(t, a, b), want, atol=1e-6)


def test_slerp_of_nearly_parallel_tensors_is_linear():
    a, _ = _pair()
    b = a * 1.01
    np.testing.assert_allclose(fm.slerp(0.3, a, b), 0.7 * a + 0.3 * b, atol=1e-6)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_equals_mergekits(density):
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask
    from mergekit.sparsify import SparsificationMethod, sparsify

    rng = np.random.default_rng(1)
    base = rng.standard_normal((40, 24)).astype(np.float32)
    models = [base + rng.standard_normal(base.shape).astype(np.float32) * s for s in (0.1, 0.3, 0.2)]
    weights = [1.0, 0.5, 2.0]
    # mergekit's GeneralizedTaskArithmeticMerge.merge_group for ties (magnitude sparsification, sum consensus)
    tb = torch.from_numpy(base).double()
    deltas = torch.stack([sparsify(torch.from_numpy(m).double() - tb, density, SparsificationMethod.magnitude)
                          for m in models])
    w = torch.tensor(weights, dtype=torch.float64)[:, None, None]
    deltas = deltas * w
    mask = get_mask(deltas, method="sum")
    divisor = (w * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    want = (tb + (deltas * mask).sum(dim=0) / divisor).numpy()
    np.testing.assert_allclose(fm.ties(base, models, weights, density), want, atol=1e-6)


def test_a_gradient_of_t_follows_the_layers():
    ts = fm.parse_t(["0.5", "self_attn=0,1", "mlp=1,0.5,0"])
    n = 5
    assert fm.t_for("model.layers.0.self_attn.q_proj.weight", ts, n) == 0.0
    assert fm.t_for("model.layers.4.self_attn.q_proj.weight", ts, n) == 1.0
    assert fm.t_for("model.layers.2.self_attn.o_proj.weight", ts, n) == 0.5
    assert fm.t_for("model.layers.1.mlp.up_proj.weight", ts, n) == pytest.approx(0.75)
    assert fm.t_for("model.layers.3.input_layernorm.weight", ts, n) == 0.5
    assert fm.t_for("model.embed_tokens.weight", ts, n) == 0.5
    with pytest.raises(ForgeError, match="from 0"):
        fm.parse_t(["1.5"])


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    from tests.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("merge")
    return make_tiny_model(root / "a", seed=1), make_tiny_model(root / "b", seed=2)


def _logits(d):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.tensor([[5, 70, 71, 72, 100, 3]])).logits[0].numpy()


def test_slerp_ends_are_the_inputs_and_the_middle_loads_in_transformers_and_mlx_lm(two_models, tmp_path):
    a, b = two_models
    runner = CliRunner()
    for t in ("0", "1", "0.5"):
        out = runner.invoke(cli, ["merge", str(a), str(b), "--t", t, "--out", str(tmp_path / t)])
        assert out.exit_code == 0, out.output
    np.testing.assert_allclose(_logits(tmp_path / "0"), _logits(a), atol=1e-5)
    np.testing.assert_allclose(_logits(tmp_path / "1"), _logits(b), atol=1e-5)
    mid = _logits(tmp_path / "0.5")
    assert np.abs(mid - _logits(a)).max() > 1e-2 and np.isfinite(mid).all()
    assert json.loads((tmp_path / "0.5" / "forge_merge.json").read_text())["method"] == "slerp"
    mlx_lm = pytest.importorskip("mlx_lm")
    import mlx.core as mx

    model, _ = mlx_lm.load(str(tmp_path / "0.5"))
    np.testing.assert_allclose(np.array(model(mx.array([[5, 70, 71, 72, 100, 3]]))[0]), mid, atol=1e-4)


def test_linear_and_ties_from_the_shell(two_models, tmp_path):
    a, b = two_models
    runner = CliRunner()
    out = runner.invoke(cli, ["merge", str(a), str(b), "--method", "linear", "--weight", "3", "--weight", "1",
                              "--out", str(tmp_path / "lin")])
    assert out.exit_code == 0, out.output
    from forge_core.adapters import safetensors_io as sio

    def weights(d):
        return {k: v for f in sio.checkpoint_files(d) for k, v in sio.load(f).items()}

    wa, wb, wl = weights(a), weights(b), weights(tmp_path / "lin")
    for k in wa:  # (3A + B) / 4
        np.testing.assert_allclose(wl[k], (3 * wa[k].astype(np.float64) + wb[k]) / 4, atol=1e-6)
    out = runner.invoke(cli, ["merge", str(b), "--method", "ties", "--base", str(a), "--density", "1",
                              "--out", str(tmp_path / "ties")])
    assert out.exit_code == 0, out.output
    np.testing.assert_allclose(_logits(tmp_path / "ties"), _logits(b), atol=1e-5)  # one model, all kept: B
    out = runner.invoke(cli, ["merge", str(a), str(b), "--method", "ties", "--out", str(tmp_path / "x")])
    assert out.exit_code != 0 and "needs --base" in out.output
    out = runner.invoke(cli, ["merge", str(a), str(b), "--method", "linear", "--t", "0.3", "--out", str(tmp_path / "y")])
    assert out.exit_code != 0 and "--t is slerp's" in out.output


def test_models_of_different_shapes_are_refused_in_one_line(two_models, tmp_path):
    from tests.tiny import make_tiny_model

    a, _ = two_models
    other = make_tiny_model(tmp_path / "c", seed=3, layers=3)
    out = CliRunner().invoke(cli, ["merge", str(a), str(other), "--out", str(tmp_path / "m")])
    assert out.exit_code != 0 and "num_hidden_layers" in out.output and "Traceback" not in out.output
