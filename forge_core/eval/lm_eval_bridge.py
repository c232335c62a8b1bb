"""`forge eval --lm-eval TASKS`: EleutherAI's lm-evaluation-harness on a forge model (base, or base + adapter as
trained), on either backend. Imported only when asked for: lm-eval is an optional extra (`forge-tune[eval]`).

ForgeLM is lm-eval's TemplateLM, so the harness does the request bookkeeping and tokenizes context and
continuation as it does for its own Hugging Face model (HFLM); forge scores the tokens through the backend:
  loglikelihood          continuation log-prob and is-greedy, batches of (context + continuation)[-(L+1):-1]
  loglikelihood_rolling  lm-eval's disjoint rolling windows of L tokens, scored the same way
  generate_until         the backend's batched generator on the raw prompt (no chat template), cut at the
                         first stop string
with L = eval.lm_eval_max_length (2048, HFLM's fallback). Tasks come from lm-eval's registry (its task YAMLs name hub datasets: they need
the network or a local copy), from --lm-eval-include DIR, or the one forge ships (forge_mc, below).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from forge_core.errors import ForgeError
from forge_core.eval.perplexity import scored_batch

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"


def _harness():
    try:
        import lm_eval
        from lm_eval.api.model import TemplateLM
    except ImportError:
        raise ForgeError('--lm-eval needs lm-evaluation-harness: pip install "forge-tune[eval]"') from None
    return lm_eval, TemplateLM


def check_installed() -> None:
    """Stop before a model is built when lm-eval is not there."""
    _harness()


def forge_model(ops, model, tokenizer, max_length: int, batch_size: int):
    """A lm-eval LM scoring with `model` through the backend `ops`."""
    _, TemplateLM = _harness()
    from lm_eval import utils as lm_utils
    hf = ops.hf_tokenizer(tokenizer)

    class ForgeLM(TemplateLM):
        backend = "causal"

        def __init__(self):
            super().__init__()
            self.tokenizer = hf

        @property
        def eot_token_id(self) -> int:
            return hf.eos_token_id

        @property
        def prefix_token_id(self) -> int:  # as HFLM: BOS where the tokenizer has one, else EOS
            return hf.bos_token_id if hf.bos_token_id is not None else hf.eos_token_id

        @property
        def max_length(self) -> int:
            return max_length

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            bos = hf.bos_token
            if add_special_tokens is None and bos and string.startswith(bos):
                kw["add_special_tokens"] = False  # the string already carries its BOS
            return hf.encode(string, **kw)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            # as HFLM: the last L + 1 tokens of context + continuation; the continuation's are scored (all of
            # them, or its last L when it is longer than the window)
            rows = [(ctx + cont)[-(max_length + 1):] for _, ctx, cont in requests]
            firsts = [max(len(r) - len(cont), 1) for r, (_, _, cont) in zip(rows, requests)]
            out = []
            for s in range(0, len(rows), batch_size):
                batch = scored_batch(rows[s:s + batch_size], firsts[s:s + batch_size], hf.eos_token_id or 0)
                logps, greedy = ops.continuation_scores(model, ops.to_batch(model, batch))
                out += [(float(lp), bool(g)) for lp, g in zip(ops.to_numpy(logps), ops.to_numpy(greedy))]
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            windows, owner = [], []
            for i, (string,) in enumerate(req.args for req in requests):
                for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                        token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                        max_seq_len=max_length, context_len=1)):
                    windows.append((None, ctx, cont))
                    owner.append(i)
            totals = [0.0] * len(requests)
            for i, (lp, _) in zip(owner, self._loglikelihood_tokens(windows)):
                totals[i] += lp
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            jobs = {}  # requests with the same length and temperature are generated in one batched call
            for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
                new = int(gen_kwargs.get("max_gen_toks", 256))
                temp = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample") else 0.0
                prompt = self.tok_encode(context)[-max(1, max_length - new):]  # room for the answer, as HFLM
                jobs.setdefault((new, temp), []).append((i, prompt, gen_kwargs.get("until")))
            out = [""] * len(requests)
            for (new, temp), job in jobs.items():
                answers = ops.generate_tokens(model, tokenizer, [p for _, p, _ in job], new, temp, batch_size)
                for (i, _, until), ids in zip(job, answers):
                    text = hf.decode(ids, skip_special_tokens=True)
                    for stop in [until] if isinstance(until, str) else (until or []):
                        if stop:
                            text = text.split(stop)[0]
                    out[i] = text
            return out

    return ForgeLM()


def shipped_tasks() -> list[dict]:
    """forge's own task configs (lm_eval_tasks/*.yaml) with their data files made absolute, as lm-eval takes
    a task given as a dict."""
    configs = []
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        files = cfg.get("dataset_kwargs", {}).get("data_files", {})
        cfg["dataset_kwargs"]["data_files"] = {split: str(TASKS_DIR / f) for split, f in files.items()}
        configs.append(cfg)
    return configs


def run_tasks(lm, tasks: str, include: str | None = None, limit: float | None = None,
              num_fewshot: int | None = None) -> dict:
    """{task: {metric: value}} of lm-eval's simple_evaluate over comma-separated `tasks`."""
    lm_eval, _ = _harness()
    from lm_eval.tasks import TaskManager

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    ours = {c["task"]: c for c in shipped_tasks()}
    # lm-eval's own registry is thousands of YAMLs to index (seconds): only when a task may come from it
    manager = TaskManager(include_path=include or None, include_defaults=bool(include) or any(n not in ours for n in names))
    missing = [n for n in names if n not in ours and not manager.match_tasks([n])]
    if missing:
        raise ForgeError(f"--lm-eval: unknown task {', '.join(missing)} (forge ships: {', '.join(ours)}; "
                         "your own: --lm-eval-include DIR with task YAMLs)")
    results = lm_eval.simple_evaluate(model=lm, tasks=[ours.get(n, n) for n in names], task_manager=manager,
                                      limit=limit, num_fewshot=num_fewshot, log_samples=False)
    return {task: {_metric_name(k): v for k, v in metrics.items() if isinstance(v, (int, float))
                   and not k.startswith("alias")}
            for task, metrics in results["results"].items()}


def _metric_name(key: str) -> str:
    """lm-eval's "metric,filter" as "metric" for its default filter ("none"), else "metric,filter" (gsm8k has
    exact_match,strict-match and exact_match,flexible-extract)."""
    name, _, flt = key.partition(",")
    return name if flt in ("", "none") else key
