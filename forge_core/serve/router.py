"""router.yaml: which served expert answers a request whose `model` is `auto`.

    mode: hybrid          # keyword | classifier | hybrid
    default: general      # the expert below the threshold, or when nothing matched
    threshold: 0.6        # the classifier's least confidence to be followed
    experts:
      code:
        description: Python and shell questions
        keywords: [python, function, bash]      # whole words, any case
        patterns: ['\\bdef \\w+\\(']            # regular expressions
        examples: ["write a function that ...", ...]   # what `forge router train` fits the classifier on

keyword: the expert with the most keyword / pattern hits in the last user message (confidence: its share of all
hits); no hit -> the default. classifier: a softmax head on the base model's mean-pooled last hidden states, fitted
by `forge router train router.yaml` on the examples and saved beside the yaml (router.classifier.safetensors);
below the threshold -> the default. hybrid: keywords first, then the classifier, then the default.
Expert names are served names (runs or the base); the server checks them at start.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from forge_core.errors import ForgeError

MODES = ("keyword", "classifier", "hybrid")


@dataclass
class Expert:
    name: str
    description: str = ""
    keywords: list[str] = field(default_factory=list)
    patterns: list[re.Pattern] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)

    def hits(self, text: str) -> int:
        low = text.lower()
        n = sum(len(re.findall(rf"(?<!\w){re.escape(k.lower())}(?!\w)", low)) for k in self.keywords)
        return n + sum(len(p.findall(text)) for p in self.patterns)


@dataclass
class Route:
    expert: str
    confidence: float
    how: str  # keyword | classifier | default


@dataclass
class Classifier:
    """Softmax regression on standardized pooled hidden states."""

    experts: list[str]
    mean: np.ndarray
    std: np.ndarray
    weight: np.ndarray  # (E, h)
    bias: np.ndarray  # (E,)

    def probs(self, features: np.ndarray) -> np.ndarray:
        z = ((features - self.mean) / self.std) @ self.weight.T + self.bias
        z = np.exp(z - z.max(axis=-1, keepdims=True))
        return z / z.sum(axis=-1, keepdims=True)

    @classmethod
    def fit(cls, features: np.ndarray, labels: list[str], experts: list[str], steps: int = 500,
            lr: float = 0.5, l2: float = 1e-3) -> Classifier:
        x = np.asarray(features, np.float64)
        mean, std = x.mean(0), x.std(0) + 1e-6
        x = (x - mean) / std
        y = np.eye(len(experts))[[experts.index(name) for name in labels]]
        w, b = np.zeros((len(experts), x.shape[1])), np.zeros(len(experts))
        for _ in range(steps):  # full-batch gradient descent on the mean cross-entropy (convex: no seed matters)
            z = x @ w.T + b
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            g = (p - y) / len(x)
            w -= lr * (g.T @ x + l2 * w)
            b -= lr * g.sum(0)
        return cls(list(experts), mean, std, w, b)

    def save(self, path: Path, meta: dict) -> None:
        from safetensors.numpy import save_file

        from forge_core.atomic import atomic_path

        tensors = {"mean": self.mean, "std": self.std, "weight": self.weight, "bias": self.bias}
        with atomic_path(path) as tmp:
            save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, str(tmp),
                      metadata={"experts": json.dumps(self.experts), **{k: str(v) for k, v in meta.items()}})

    @classmethod
    def load(cls, path: Path) -> tuple[Classifier, dict]:
        from safetensors import safe_open

        with safe_open(str(path), "numpy") as f:
            meta = dict(f.metadata() or {})
            t = {k: f.get_tensor(k).astype(np.float64) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        return cls(json.loads(meta.pop("experts")), t["mean"], t["std"], t["weight"], t["bias"]), meta


@dataclass
class Router:
    path: Path
    mode: str
    default: str
    threshold: float
    experts: dict[str, Expert]
    classifier: Classifier | None = None
    classifier_meta: dict = field(default_factory=dict)  # what it was fitted on ("base": the served base's name)

    @property
    def classifier_path(self) -> Path:
        return self.path.with_name(self.path.stem + ".classifier.safetensors")

    def keyword_route(self, text: str) -> Route | None:
        hits = {name: e.hits(text) for name, e in self.experts.items()}
        total = sum(hits.values())
        if not total:
            return None
        best = max(hits, key=hits.get)  # the first listed wins a tie
        return Route(best, hits[best] / total, "keyword")

    def route(self, text: str, features=None) -> Route:
        """features(text) -> the pooled hidden state (1-D); called only when the classifier is asked."""
        if self.mode in ("keyword", "hybrid") and (hit := self.keyword_route(text)):
            return hit
        if self.mode in ("classifier", "hybrid"):
            p = self.classifier.probs(np.asarray(features(text), np.float64)[None])[0]
            i = int(p.argmax())
            if p[i] >= self.threshold:
                return Route(self.classifier.experts[i], float(p[i]), "classifier")
            return Route(self.default, float(p[i]), "default")
        return Route(self.default, 0.0, "default")

    def check_served(self, names: list[str], base: str) -> None:
        fitted = self.classifier_meta.get("base")
        if self.classifier is not None and fitted and fitted != base:
            raise ForgeError(f"{self.classifier_path}: fitted on the hidden states of {fitted}, this server's base is "
                             f"{base}; run `forge router train {self.path} --model {base}`")
        for name in [*self.experts, self.default]:
            if name not in names:
                raise ForgeError(f"{self.path}: expert '{name}' is not served (served: {', '.join(names)}); "
                                 "name the run dirs on the command line, or fix the router")


def _list(v, where: str) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise ForgeError(f"{where}: expected a list of strings")
    return v


def load_router(path, need_classifier: bool = True) -> Router:
    """router.yaml -> Router, every mistake one line naming the file and key."""
    from forge_core.config_parse import load_yaml

    path = Path(path)
    doc = load_yaml(path)  # a missing file or bad YAML: one line with the file (and line)
    if not isinstance(doc, dict) or not isinstance(doc.get("experts"), dict) or not doc["experts"]:
        raise ForgeError(f"{path}: needs 'experts:' (a mapping of served names to keywords / examples)")
    unknown = set(doc) - {"mode", "default", "threshold", "experts"}
    if unknown:
        raise ForgeError(f"{path}: unknown key '{min(unknown)}' (mode, default, threshold, experts)")
    mode = doc.get("mode", "hybrid")
    if mode not in MODES:
        raise ForgeError(f"{path}: mode '{mode}' is not one of {', '.join(MODES)}")
    threshold = doc.get("threshold", 0.5)
    if not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise ForgeError(f"{path}: threshold must be a number in [0, 1], got {threshold!r}")
    experts = {}
    for name, spec in doc["experts"].items():
        spec = spec or {}
        where = f"{path}: experts.{name}"
        if not isinstance(spec, dict):
            raise ForgeError(f"{where}: expected a mapping (description, keywords, patterns, examples)")
        bad = set(spec) - {"description", "keywords", "patterns", "examples"}
        if bad:
            raise ForgeError(f"{where}: unknown key '{min(bad)}' (description, keywords, patterns, examples)")
        patterns = []
        for p in _list(spec.get("patterns"), f"{where}.patterns"):
            try:
                patterns.append(re.compile(p, re.IGNORECASE))
            except re.error as e:
                raise ForgeError(f"{where}.patterns: '{p}' is not a regular expression ({e})") from None
        experts[str(name)] = Expert(str(name), str(spec.get("description", "")),
                                    _list(spec.get("keywords"), f"{where}.keywords"), patterns,
                                    _list(spec.get("examples"), f"{where}.examples"))
    default = str(doc.get("default", next(iter(experts))))
    router = Router(path, mode, default, float(threshold), experts)
    if mode != "keyword" and need_classifier:
        if not router.classifier_path.is_file():
            raise ForgeError(f"{path}: mode {mode} needs the classifier; run `forge router train {path}` first")
        router.classifier, router.classifier_meta = Classifier.load(router.classifier_path)
        if set(router.classifier.experts) != set(experts):
            raise ForgeError(f"{router.classifier_path}: fitted for experts {router.classifier.experts}, the router "
                             f"lists {list(experts)}; run `forge router train {path}` again")
    return router


def training_set(router: Router) -> tuple[list[str], list[str]]:
    """(texts, expert names) of the router's examples; every expert needs at least one."""
    texts, labels = [], []
    for name, e in router.experts.items():
        if not e.examples:
            raise ForgeError(f"{router.path}: experts.{name} has no examples to fit the classifier on")
        texts += e.examples
        labels += [name] * len(e.examples)
    return texts, labels
