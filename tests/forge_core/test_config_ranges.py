"""Every numeric key has a range beside its default: a bad value stops the command in one line, before a model
is built; zero where it means "never" works."""

import dataclasses
import typing

import pytest
from click.testing import CliRunner

from forge_core.cli import cli
from forge_core.config import SECTIONS, Range
from forge_core.config_parse import _field_types, build_config
from forge_core.errors import ForgeError

# one value outside each range (the CLI test runs each through `forge train`)
BAD = {
    "lora.rank": 0, "lora.alpha": 0, "lora.dropout": 1.0, "quant.group_size": 0,
    "train.lr": -1, "train.warmup": -1, "train.save_every_minutes": -1, "train.min_lr_ratio": 1.5, "train.steps": -5, "train.epochs": 0,
    "train.batch_size": 0, "train.grad_accum": 0, "train.max_seq_len": 1, "train.weight_decay": -0.1,
    "train.max_grad_norm": -1, "train.seed": -1, "train.log_every": -1, "train.eval_every": -2,
    "train.eval_batches": -1, "train.save_every": -1,
    "dpo.lr": -1, "dpo.beta": 0, "dpo.label_smoothing": 0.7, "dpo.sft_weight": -1, "dpo.discopop_tau": 0,
    "orpo.lr": -1, "orpo.beta": 0, "simpo.lr": -1, "simpo.beta": -2, "simpo.gamma": -1, "simpo.label_smoothing": -0.1,
    "simpo.sft_weight": -1, "cpo.lr": -1, "cpo.beta": 0, "cpo.label_smoothing": 0.6, "cpo.sft_weight": -1,
    "kto.lr": -1, "kto.beta": 0, "kto.desirable_weight": 0, "kto.undesirable_weight": -1,
    "grpo.lr": -1, "grpo.num_generations": 1, "grpo.max_new_tokens": 0, "grpo.temperature": 0, "grpo.top_p": 0,
    "grpo.beta": -1, "grpo.epsilon": -0.1, "grpo.epsilon_high": -1, "grpo.delta": -1, "grpo.num_iterations": 0,
    "grpo.sample_batch_size": -1,
    "eval.max_new_tokens": 0, "eval.limit": -1, "eval.batch_size": 0, "eval.stride": -1, "eval.lm_eval_limit": -1,
    "eval.lm_eval_fewshot": -2, "eval.lm_eval_max_length": 0, "memory.threshold": 0,
}


def _numeric_keys():
    keys = []
    for section, cls in SECTIONS.items():
        for name, typ in _field_types(cls).items():
            base = typing.get_args(typ)[0] if typing.get_origin(typ) is typing.Annotated else typ
            lit = typing.get_origin(base) is typing.Literal and isinstance(typing.get_args(base)[0], int)
            if base in (int, float) or (lit and name == "group_size"):
                keys.append(f"{section}.{name}")
    return keys


def test_every_numeric_key_declares_a_range():
    for key in _numeric_keys():
        section, name = key.split(".")
        typ = _field_types(SECTIONS[section])[name]
        has_range = typing.get_origin(typ) is typing.Annotated and isinstance(typing.get_args(typ)[1], Range)
        assert has_range or typing.get_origin(typ) is typing.Literal, f"{key} has no range"
        assert key in BAD, f"{key}: add a bad value to this test"


def test_defaults_lie_inside_their_ranges():
    cfg = build_config(None, [f"{k}={v}" for k, v in {
        k: getattr(getattr(build_config(), k.split(".")[0]), k.split(".")[1]) for k in BAD}.items()])
    assert dataclasses.asdict(cfg) == build_config().to_dict()


@pytest.mark.parametrize("key,value", sorted(BAD.items()))
def test_an_out_of_range_value_names_its_key(key, value):
    with pytest.raises(ForgeError, match=f"config key '{key}'"):
        build_config(None, [f"{key}={value}"])


@pytest.mark.parametrize("key,value", [("train.save_every", -1), ("train.lr", -1), ("train.grad_accum", 0),
                                       ("lora.rank", 0), ("train.steps", -5), ("train.log_every", -1)])
def test_forge_train_refuses_in_one_line_before_building(key, value, tiny_model, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", "--model", str(tiny_model), "--data", str(tmp_path / "none.jsonl"),
                                   "--out", str(out), "--set", f"{key}={value}"])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"forge: error: config key '{key}'")
    assert "out of range (allowed:" in lines[0] and "Traceback" not in res.output
    assert not out.exists()  # nothing built, nothing written
