"""The preference methods (DPO and variants, ORPO, SimPO, CPO, KTO) through the one loop on both backends:
MLX and torch agree on the first 5 losses, training moves the rewards the right way, resume is exact,
held-out eval reports each method's metrics, and the data checks name the line."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from forge_core.config import ForgeConfig
from forge_core.config_parse import set_value
from forge_core.errors import ForgeError
from forge_core.rundir import RunDir
from tests.conftest import write_jsonl

HAVE = {"mlx": importlib.util.find_spec("mlx") is not None, "cuda": importlib.util.find_spec("torch") is not None}
BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not HAVE[b], reason=f"{b} not installed")) for b in HAVE]
WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "sloe"]
METHODS = ["dpo", "orpo", "simpo", "cpo", "kto"]


def pairs(n: int = 8):
    return [{"prompt": f"spell {w}", "chosen": " ".join(w), "rejected": w[::-1]} for w in (WORDS * 4)[:n]]


def unpaired(n: int = 8):
    rows = []
    for i, w in enumerate((WORDS * 4)[:n]):
        rows.append({"prompt": f"spell {w}", "completion": " ".join(w) if i % 3 else w[::-1], "label": bool(i % 3)})
    return rows


def ops_of(backend: str):
    if backend == "mlx":
        from forge_mlx import ops
    else:
        from forge_cuda import ops
    return ops


def train(cfg, kind, backend, **kw):
    from forge_core.train import train as run

    return run(cfg, kind, ops=ops_of(backend), **kw)


def config(tiny_model, data, out, kind: str, **sets) -> ForgeConfig:
    """fp32, full-precision base, PiSSA (the same factors on both backends: the SVD runs in numpy)."""
    cfg = ForgeConfig()
    cfg.model.path, cfg.model.dtype = str(tiny_model), "float32"
    cfg.data.train = str(data)
    cfg.train.out_dir = str(out)
    base = {"quant.bits": 0, "lora.rank": 4, "lora.alpha": 4, "lora.init": "pissa", "train.steps": 5,
            "train.batch_size": 4, "train.warmup": 0, "train.lr": 5e-3, "train.log_every": 1,
            "train.eval_every": 0, "train.save_every": 100, "data.shuffle": False}
    if kind in ("dpo", "kto"):
        base[f"{kind}.beta"] = 0.5
    for key, value in {**base, **sets}.items():
        set_value(cfg, key, value)
    return cfg


def records(run, split="train"):
    return [r for r in RunDir(run).metrics() if r["split"] == split]


@pytest.fixture
def data(tmp_path):
    return {"pairs": write_jsonl(tmp_path / "pairs.jsonl", pairs()),
            "unpaired": write_jsonl(tmp_path / "unpaired.jsonl", unpaired())}


def _data_for(kind, data):
    return data["unpaired"] if kind == "kto" else data["pairs"]


@pytest.mark.slow
@pytest.mark.skipif(not (HAVE["mlx"] and HAVE["cuda"]), reason="needs both backends")
@pytest.mark.parametrize("kind,sets", [("dpo", {}), ("dpo", {"dpo.loss_type": "robust", "dpo.label_smoothing": 0.1}),
                                       ("dpo", {"dpo.loss_type": "apo_zero"}), ("orpo", {}), ("simpo", {}),
                                       ("cpo", {}), ("kto", {})])
def test_mlx_and_torch_agree_on_the_first_5_losses(tiny_model, data, tmp_path, kind, sets):
    losses = {}
    for backend in ("mlx", "cuda"):
        cfg = config(tiny_model, _data_for(kind, data), tmp_path / backend, kind, **sets)
        losses[backend] = [r["loss"] for r in records(train(cfg, kind, backend))]
    assert len(losses["mlx"]) == 5
    np.testing.assert_allclose(losses["mlx"], losses["cuda"], rtol=1e-4, atol=1e-4)
    assert abs(losses["mlx"][-1] - losses["mlx"][0]) > 1e-3  # the steps changed the policy: not 5 equal numbers


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", METHODS)
def test_training_prefers_chosen_and_resumes_exactly(tiny_model, data, tmp_path, backend, kind):
    cfg = config(tiny_model, _data_for(kind, data), tmp_path / "straight", kind, **{"train.steps": 6})
    straight = train(cfg, kind, backend)
    first, last = records(straight)[0], records(straight)[-1]
    assert last["rewards/margin"] > first["rewards/margin"]
    if kind in ("dpo", "kto"):  # against the policy at init: every reward starts at exactly 0
        assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)
    cfg.train.out_dir = str(tmp_path / "resumed")
    train(cfg, kind, backend, stop_at=3)
    resumed = train(cfg, kind, backend, resume=str(tmp_path / "resumed"))
    a, b = records(straight), records(resumed)
    assert [r["step"] for r in b] == list(range(1, 7))
    for x, y in zip(a, b):
        for key in ("loss", "rewards/margin", "grad_norm"):
            assert y[key] == pytest.approx(x[key], abs=1e-5), (key, x["step"])
    meta = json.loads((resumed / "adapter" / "forge.json").read_text())
    assert meta["kind"] == kind


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_losses_at_the_reference_are_known(tiny_model, data, tmp_path, backend):
    """lr 0: the policy stays the reference. DPO sigmoid = log 2; KTO = 1 - σ(0) = 0.5 (weights 1, z0 = 0)."""
    for kind, expected in (("dpo", math.log(2)), ("kto", 0.5)):
        cfg = config(tiny_model, _data_for(kind, data), tmp_path / kind, kind, **{"train.steps": 1, f"{kind}.lr": 0.0,
                                                                                   "train.lr": 0.0})
        rec = records(train(cfg, kind, backend))[0]
        assert rec["loss"] == pytest.approx(expected, abs=1e-5)
        if kind == "kto":  # the policy is the reference; the clamp keeps z0 >= 0 against rounding
            assert rec["kl"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_held_out_eval_reports_each_methods_metrics(tiny_model, data, tmp_path, backend):
    for kind, extra in (("orpo", {"nll_loss", "log_odds_ratio"}), ("simpo", {"nll_loss"}),
                        ("kto", {"kl", "rewards/accuracy"})):
        cfg = config(tiny_model, data["pairs"], tmp_path / kind, kind, **{"train.steps": 2})
        cfg.data.valid = str(data["pairs"])  # KTO splits the pairs and scores pairwise accuracy on them
        valid = records(train(cfg, kind, backend), "valid")
        assert valid, kind
        keys = set(valid[-1])
        assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margin"} | extra <= keys, (kind, keys)


def test_a_pair_with_identical_completions_is_named_or_skipped(tiny_model, tmp_path):
    from forge_core import data as fdata
    from forge_core.data.tokenize import load_tokenizer

    rows = pairs(4) + [{"prompt": "spell x", "chosen": "x", "rejected": "x"}]
    path = write_jsonl(tmp_path / "ties.jsonl", rows)
    tok, cfg = load_tokenizer(tiny_model), ForgeConfig()
    for load in (fdata.load_preferences, fdata.load_unpaired):
        with pytest.raises(ForgeError, match=r"ties.jsonl:5: chosen and rejected are identical"):
            load(path, tok, cfg.data, 256)
    cfg.data.skip_bad_rows = True
    kept, stats = fdata.load_preferences(path, tok, cfg.data, 256)
    assert len(kept) == 4 and stats.skipped == 1 and "ties.jsonl:5" in stats.reasons[0]
    split, _ = fdata.load_unpaired(path, tok, cfg.data, 256)
    assert [(r.label, r.pair) for r in split[:4]] == [(True, 0), (False, 0), (True, 1), (False, 1)]


def test_kto_rows_need_a_boolean_label(tiny_model, tmp_path):
    from forge_core import data as fdata
    from forge_core.data.tokenize import load_tokenizer

    rows = unpaired(3) + [{"prompt": "spell x", "completion": "x", "label": "yes"}]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    with pytest.raises(ForgeError, match=r"kto.jsonl:4: 'label' must be true or false .*a string"):
        fdata.load_unpaired(path, load_tokenizer(tiny_model), ForgeConfig().data, 256)
    path = write_jsonl(tmp_path / "kto2.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(ForgeError, match=r"kto2.jsonl:1: expected 'prompt', 'completion' and 'label'"):
        fdata.load_unpaired(path, load_tokenizer(tiny_model), ForgeConfig().data, 256)


def test_loss_type_bounds_are_checked():
    from forge_core.objectives.dpo import check_dpo_config

    cfg = ForgeConfig()
    cfg.dpo.loss_type, cfg.dpo.label_smoothing = "exo_pair", 0.0
    with pytest.raises(ForgeError, match="dpo.label_smoothing: the exo_pair loss needs 0 < ε < 1"):
        check_dpo_config(cfg.dpo)
    cfg.dpo.loss_type, cfg.dpo.label_smoothing = "robust", 0.5
    with pytest.raises(ForgeError, match="dpo.label_smoothing: the robust loss"):
        check_dpo_config(cfg.dpo)


def test_planner_sizes_each_method(tiny_model):
    """Pair methods plan two sequences per example (the concatenated forward), KTO one, like SFT."""
    from forge_core.memory.plan import plan_memory

    model_config = json.loads((tiny_model / "config.json").read_text())
    cfg = ForgeConfig()
    cfg.model.path = str(tiny_model)
    totals = {k: plan_memory(cfg, model_config, kind=k, backend="mlx").total_bytes for k in METHODS + ["sft", "grpo"]}
    assert totals["orpo"] == totals["simpo"] == totals["cpo"] == totals["dpo"] > totals["sft"] == totals["kto"]
    assert totals["grpo"] > totals["sft"]  # one sequence per completion, plus the sampling's KV cache
    with pytest.raises(ForgeError, match="unknown method 'ppo'"):
        plan_memory(cfg, model_config, kind="ppo", backend="mlx")


@pytest.mark.skipif(not HAVE["cuda"], reason="torch not installed")
def test_cli_kto_and_orpo_end_to_end(tiny_model, data, tmp_path):
    from forge_core.cli import cli

    common = ["--model", str(tiny_model), "--backend", "cuda", "--steps", "2", "--batch-size", "4", "--rank", "4",
              "--quant", "none", "--set", "train.log_every=1"]
    r = CliRunner().invoke(cli, ["kto", "--data", str(data["unpaired"]), "--out", str(tmp_path / "kto"),
                                 "--desirable-weight", "1.2", "--lr", "1e-3", *common])
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "kto" / "config.json").read_text())
    assert saved["kto"]["desirable_weight"] == 1.2 and saved["train"]["lr"] == 1e-3
    r = CliRunner().invoke(cli, ["orpo", "--data", str(data["pairs"]), "--out", str(tmp_path / "orpo"), *common])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "orpo" / "config.json").read_text())["train"]["lr"] == ForgeConfig().orpo.lr
    r = CliRunner().invoke(cli, ["kto", "--data", str(data["pairs"]), "--out", str(tmp_path / "bad"),
                                 "--set", "kto.loss_type=nope", *common])
    assert r.exit_code == 2 and "kto.loss_type" in r.output


@pytest.mark.skipif(not HAVE["cuda"], reason="torch not installed")
def test_export_and_convert_take_a_preference_adapter(tiny_model, data, tmp_path):
    """An adapter is an adapter whatever trained it: a KTO run exports to PEFT, and that converts to mlx-lm's
    layout with the factors a direct mlx export writes."""
    from safetensors.numpy import load_file

    from forge_core.adapters.convert import convert
    from forge_core.adapters.export import export

    cfg = config(tiny_model, data["unpaired"], tmp_path / "kto", "kto", **{"train.steps": 2, "lora.init": "lora"})
    run = train(cfg, "kto", "cuda")
    export(run, fmt="peft", out=tmp_path / "peft")
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    convert(tmp_path / "peft", tmp_path / "mlx", to="mlx")
    export(run, fmt="mlx", out=tmp_path / "direct")
    ours = load_file(str(tmp_path / "direct" / "adapters.safetensors"))
    back = load_file(str(tmp_path / "mlx" / "adapters.safetensors"))
    assert ours.keys() == back.keys()
    for k in ours:
        np.testing.assert_allclose(back[k], ours[k], atol=1e-6)


def test_demo_kind_comes_from_the_recipe_name():
    from forge_core.demo import demo_kind

    assert [demo_kind(f"configs/{n}.yaml") for n in ("demo", "dpo_demo", "orpo_demo", "simpo_demo", "kto_demo",
                                                     "smollm2_pissa")] == ["sft", "dpo", "orpo", "simpo", "kto", "sft"]


def test_implicit_rewards_compare_each_pair_with_the_start():
    from forge_core.eval.evaluate import implicit_rewards

    before = np.array([[-10.0, -12.0], [-8.0, -7.0], [-5.0, -5.0]])
    after = np.array([[-9.0, -13.0], [-8.5, -7.0], [-5.0, -5.0]])
    # h = (after_w - before_w) - (after_l - before_l): 1 - (-1) = 2; -0.5 - 0 = -0.5; 0
    out = implicit_rewards(before, after)
    assert out == {"implicit_accuracy": pytest.approx(1 / 3), "implicit_margin": pytest.approx(0.5)}


def _kto_rows(pairs_: list, tok, cfg):
    from forge_core import data as fdata

    path = write_jsonl(Path(cfg.data.train), pairs_)
    return fdata.load_unpaired(path, tok, cfg.data, 256)[0]


def test_kto_mismatched_partners_never_share_a_prompt(tiny_model, tmp_path):
    """Split pairs sit side by side as loaded; KTO's order must not make a row's mismatched completion its own
    prompt's other answer. Shuffled: seeded and clash-free; not shuffled: TRL's layout, chosen then rejected."""
    from forge_core.data.tokenize import load_tokenizer
    from forge_core.losses.kto import mismatched_partners
    from forge_core.objectives.kto import fixed_order

    cfg = ForgeConfig()
    cfg.data.train = str(tmp_path / "pairs.jsonl")
    rows = _kto_rows([{"prompt": f"spell {w}{i}", "chosen": w, "rejected": w[::-1]}
                      for i, w in enumerate(WORDS * 3)], load_tokenizer(tiny_model), cfg)
    assert len(rows) == 48
    for seed in (0, None):
        ordered = fixed_order(rows, 4, seed)
        assert sorted(map(id, ordered)) == sorted(map(id, rows))  # a permutation
        partner = mismatched_partners(len(ordered), 4)
        assert all(ordered[i].pair != ordered[j].pair for i, j in enumerate(partner))
    assert [r.label for r in fixed_order(rows, 4, None)] == [True] * 24 + [False] * 24
    assert fixed_order(rows, 4, 0) == fixed_order(rows, 4, 0)  # deterministic


def test_kto_needs_two_rows_per_micro_batch(tiny_model, data, tmp_path):
    cfg = config(tiny_model, data["unpaired"], tmp_path / "one", "kto", **{"train.batch_size": 1})
    with pytest.raises(ForgeError, match="kto: z0 pairs each row with another row of its micro-batch"):
        train(cfg, "kto", "cuda" if HAVE["cuda"] else "mlx")


def test_a_stale_reference_cache_is_scored_anew(tmp_path):
    """The cache is reused only for the same fingerprint (a resume), never by a new run in a crashed run's dir."""
    from forge_core.distributed import World
    from forge_core.objectives.reference import scored_once

    class Quiet:
        def print(self, *a, **k):
            pass

    run, calls = RunDir(tmp_path / "run"), []

    def score(rows):
        calls.append(len(rows))
        return np.full((len(rows), 2), float(len(calls)), np.float32)

    first = scored_once(run, World(), Quiet(), "pairs", {"train": ([1, 2, 3], score)}, key="a")
    again = scored_once(run, World(), Quiet(), "pairs", {"train": ([1, 2, 3], score)}, key="a")
    other = scored_once(run, World(), Quiet(), "pairs", {"train": ([1, 2, 3], score)}, key="b")
    assert calls == [3, 3]
    assert (again["train"] == first["train"]).all() and (other["train"] == 2.0).all()


class _TwoRanks:
    """Rank `rank` of a 2-rank world whose other rank sends `theirs` to every sum."""

    def __init__(self, rank: int, theirs: list[float]):
        self.rank, self.size, self.theirs, self.calls = rank, 2, theirs, 0

    def sum(self, values):
        self.calls += 1
        return np.asarray(values, np.float64) + np.asarray(self.theirs, np.float64)


def test_kto_exchange_keeps_every_rank_in_step_and_names_the_failure():
    """KTO's z0 exchange: one collective whatever happened; the healthy rank then raises what the loop expects -
    MemoryError (stop alike, with a checkpoint) for an out-of-memory rank, a ForgeError naming it otherwise."""
    from functools import partial

    from forge_core.objectives.base import exchange

    exchange = partial(exchange, what="scoring KTO's mismatched pairs")

    ok = _TwoRanks(0, [1.0, 2.0, 0.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(exchange(ok, [3.0, 2.0], None), [4.0, 4.0])
    oom_elsewhere = _TwoRanks(0, [0.0, 0.0, 0.0, 0.0, 1.0, 0.0])  # rank 1 flagged out of memory
    with pytest.raises(MemoryError, match="out of memory on rank 1"):
        exchange(oom_elsewhere, [3.0, 2.0], None)
    err_elsewhere = _TwoRanks(0, [0.0, 0.0, 0.0, 0.0, 0.0, 1.0])  # rank 1 flagged another error
    with pytest.raises(ForgeError, match="rank 1 stopped with an error"):
        exchange(err_elsewhere, [3.0, 2.0], None)
    mine = _TwoRanks(1, [1.0, 2.0, 0.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="boom"):  # the failing rank re-raises its own error, after the exchange
        exchange(mine, [0.0, 0.0], ValueError("boom"))
    assert mine.calls == 1 and oom_elsewhere.calls == 1
