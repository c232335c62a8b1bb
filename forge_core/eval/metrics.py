"""Task metrics for generated answers: pure functions on strings, no framework imports.

Two metrics, picked per data set by `score_rows(..., metric="auto")`:

- json_fields: the reference is one JSON object (the demo task: extract fixed keys from a sentence).
  The prediction is searched for its FIRST parseable JSON object `{...}` (so a markdown fence or a
  sentence around the object does not hide it); per row:
      valid_json = 1 if such an object exists, else 0
      field_acc  = |{k in ref : k in pred and pred[k] == ref[k]}| / |ref|
      exact      = 1 if pred has exactly ref's keys, in ref's order, with equal values
      strict     = exact, and the prediction (whitespace-stripped) is that object and nothing else
  Values compare as JSON values: 34 == 34.0, but "34" != 34 and true != 1.
- exact: whitespace-normalised string equality (runs of whitespace -> one space, ends stripped).

Nothing here raises on a prediction, whatever the model wrote; a malformed reference is a data error.
"""

from __future__ import annotations

import json

from forge_core.errors import ForgeError

METRICS = ("auto", "json_fields", "exact", "none")
JSON_FIELDS_KEYS = ("valid_json", "exact", "field_acc", "strict")

# Only this many leading characters of a prediction are searched for a JSON object. Each failed
# parse costs O(position) (json's error message counts lines), so the search is quadratic in the
# worst case ('{' * n); generated answers (eval.max_new_tokens) are far shorter than this.
MAX_SEARCH_CHARS = 20_000

_DECODER = json.JSONDecoder()


def first_json_object(text: str) -> tuple[dict, int, int] | None:
    """The first `{...}` in `text` that parses as a JSON object: (object, start, end) or None.

    Tries each '{' left to right, so leading garbage like '{{' or 'x {' is skipped over. Looks at
    text[:MAX_SEARCH_CHARS] only.
    """
    text = text[:MAX_SEARCH_CHARS]
    start = text.find("{")
    while start != -1:
        try:
            obj, end = _DECODER.raw_decode(text, start)
        except (ValueError, RecursionError):  # RecursionError: pathologically deep nesting
            obj = None
        if isinstance(obj, dict):
            return obj, start, end
        start = text.find("{", start + 1)
    return None


def _same(a, b) -> bool:
    """JSON value equality: bool is not a number, int and float compare by value, dicts by mapping."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def parse_reference(reference: str) -> dict | None:
    """The reference as a JSON object, or None when the whole string is not one."""
    try:
        obj = json.loads(reference)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def json_fields_score(prediction: str, reference: str) -> dict:
    """{"valid_json", "exact", "strict": 0/1, "field_acc": float in [0, 1]} for one row (see module doc).

    An empty reference object has no fields: field_acc is then 1.0 when any object was found.
    """
    ref = parse_reference(reference)
    if ref is None:
        raise ForgeError(f"json_fields metric: the reference is not a JSON object: {reference[:80]!r}")
    found = first_json_object(prediction)
    if found is None:
        return {"valid_json": 0, "exact": 0, "field_acc": 0.0, "strict": 0}
    pred, start, end = found
    right = sum(1 for k, v in ref.items() if k in pred and _same(pred[k], v))
    field_acc = right / len(ref) if ref else 1.0
    exact = int(list(pred) == list(ref) and right == len(ref))
    alone = prediction.strip() == prediction[start:end]
    return {"valid_json": 1, "exact": exact, "field_acc": field_acc, "strict": int(exact and alone)}


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the two strings are equal after collapsing whitespace runs and stripping, else 0.0."""
    return float(" ".join(prediction.split()) == " ".join(reference.split()))


def pick_metric(references: list[str]) -> str:
    """'json_fields' when every reference is a JSON object (and there is at least one), else 'exact'."""
    if references and all(parse_reference(r) is not None for r in references):
        return "json_fields"
    return "exact"


def score_rows(predictions: list[str], references: list[str], metric: str = "auto") -> dict:
    """Average a metric over rows: {"metric", "n", <means>...}.

    json_fields -> means of valid_json, exact, field_acc, strict; exact -> {"exact": mean}.
    "auto" picks with `pick_metric`; "none" returns only {"metric": "none", "n"}. With no rows the
    means are 0.0 and n is 0.
    """
    if metric not in METRICS:
        raise ForgeError(f"eval.metric: '{metric}' is not one of {', '.join(METRICS)}")
    if len(predictions) != len(references):
        raise ForgeError(f"metric: {len(predictions)} predictions for {len(references)} references")
    if metric == "auto":
        metric = pick_metric(list(references))
    n = len(references)
    out: dict = {"metric": metric, "n": n}
    if metric == "none":
        return out
    if metric == "exact":
        out["exact"] = sum(exact_match(p, r) for p, r in zip(predictions, references)) / max(n, 1)
        return out
    sums = dict.fromkeys(JSON_FIELDS_KEYS, 0.0)
    for i, (p, r) in enumerate(zip(predictions, references)):
        if parse_reference(r) is None:
            raise ForgeError(f"json_fields metric: reference {i} is not a JSON object: {r[:80]!r}")
        for k, v in json_fields_score(p, r).items():
            sums[k] += v
    out.update({k: s / max(n, 1) for k, s in sums.items()})
    return out
