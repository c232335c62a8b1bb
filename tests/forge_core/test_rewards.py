"""GRPO rewards: built-ins score as documented, a user's file is loaded and summed with its weight, and a reward
that raises or returns the wrong thing stops with one line naming the function and the row."""

import numpy as np
import pytest

from forge_core.datagen.rewards import Rewards, load
from forge_core.errors import ForgeError

REF = '{"name": "Ada", "age": 36}'
COMPLETIONS = ['{"name": "Ada", "age": 36}', '{"name": "Ada", "age": 35}', "not json", '```json\n{"name": "Bo"}\n```']
WHERE = [f"train.jsonl:{i + 1}" for i in range(4)]


def test_builtins_score_as_documented():
    cols = {"reference": [REF] * 4}
    p = ["q"] * 4
    assert load("builtin:valid_json")(p, COMPLETIONS) == [1.0, 1.0, 0.0, 1.0]
    assert load("builtin:json_fields")(p, COMPLETIONS, **cols) == [1.0, 0.5, 0.0, 0.0]
    # the first JSON object anywhere in the completion, as forge eval's field_acc finds it; 36.0 == 36
    assert load("builtin:json_fields")(p, ['Sure: {"age": 36.0, "name": "Ada"} ok'], reference=[REF]) == [1.0]
    assert load("builtin:exact")(p, COMPLETIONS, **cols) == [1.0, 0.0, 0.0, 0.0]
    assert load("builtin:regex:^\\{")(p, COMPLETIONS) == [1.0, 1.0, 0.0, 0.0]
    assert load("builtin:length:10")(p, ["a" * 5, "a" * 15, "a" * 20, ""]) == [0.0, -0.5, -1.0, 0.0]
    assert load("builtin:json_fields:gold")(p, COMPLETIONS[:1], gold=[{"name": "Ada"}]) == [1.0]


def test_a_users_file_is_summed_with_its_weight(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text("def short(prompts, completions, **kw):\n    return [1.0 if len(c) < 12 else None for c in completions]\n")
    r = Rewards.from_specs(["builtin:valid_json", f"{f}:short"], [1.0, 0.5])
    per_fn, total = r.score(["q"] * 4, COMPLETIONS, {}, WHERE)
    assert per_fn[:, 0].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert np.isnan(per_fn[0, 1]) and per_fn[2, 1] == 1.0  # None: not scored by that function
    assert total.tolist() == [1.0, 1.0, 0.5, 1.0]


def test_a_users_file_runs_once_a_process(tmp_path):
    """The launch checks the rewards before building the model and GRPO loads them again: the file's top level (an
    import, a model load) runs once."""
    f, log = tmp_path / "counted.py", tmp_path / "runs.txt"
    f.write_text(f"open({str(log)!r}, 'a').write('ran\\n')\n"
                 "def one(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    first, again = (Rewards.from_specs([f"{f}:one"]) for _ in range(2))
    assert log.read_text() == "ran\n" and first.fns[0] is again.fns[0]


def test_a_completion_no_function_scores_is_nan(tmp_path):
    f = tmp_path / "r.py"
    f.write_text("def none(prompts, completions, **kw):\n    return [None] * len(completions)\n")
    _, total = Rewards.from_specs([f"{f}:none"]).score(["q"], ["x"], {}, WHERE[:1])
    assert np.isnan(total[0])


@pytest.mark.parametrize("body,match", [
    ("def f(prompts, completions, **kw):\n    return [1 / (c != 'not json') for c in completions]\n",
     r"reward .*:f raised ZeroDivisionError: .* on train.jsonl:3"),
    ("def f(prompts, completions, **kw):\n    return [1.0]\n", r"returned 1 values for 4 completions"),
    ("def f(prompts, completions, **kw):\n    return ['good'] * len(completions)\n",
     r"returned 'good' for train.jsonl:1"),
    ("def f(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n", r"finite float"),
])
def test_a_bad_reward_names_the_function_and_the_row(tmp_path, body, match):
    f = tmp_path / "bad.py"
    f.write_text(body)
    with pytest.raises(ForgeError, match=match):
        Rewards.from_specs([f"{f}:f"]).score(["q"] * 4, COMPLETIONS, {}, WHERE)


@pytest.mark.parametrize("spec,match", [
    ("builtin:nope", "no built-in 'nope'"), ("missing.py:f", "is not a file"), ("builtin:regex", "needs an argument"),
    ("builtin:regex:(", "not a valid regular expression"), ("builtin:length:-3", "positive number"),
])
def test_bad_specs_say_what_to_write(spec, match):
    with pytest.raises(ForgeError, match=match):
        load(spec)


def test_a_builtin_needing_a_missing_column_names_it():
    with pytest.raises(ForgeError, match="column 'reference'"):
        Rewards.from_specs(["builtin:exact"]).score(["q"], ["x"], {"answer": ["x"]}, WHERE[:1])
