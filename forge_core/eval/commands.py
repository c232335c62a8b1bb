"""`forge generate` and `forge eval` between the CLI and a backend: resolve the backend, run forge_core/eval, print
the table."""

from __future__ import annotations

import json
import sys

from rich.console import Console

from forge_core import backend as backends
from forge_core.config import ForgeConfig
from forge_core.errors import ForgeError
from forge_core.eval.evaluate import evaluate, generate, recorded_system_prompt


def run_generate(model=None, adapter=None, prompt="", system=None, max_tokens=None, temp=0.0, backend=None) -> str:
    cfg = ForgeConfig()
    name = backends.resolve(backend or "auto")
    return generate(backends.ops(name), model=model, adapter=adapter, prompt=prompt, system=system,
                        max_tokens=max_tokens or cfg.eval.max_new_tokens, temp=temp)


def run_eval(cfg: ForgeConfig, adapter: str | None = None, as_json: bool = False, system: str | None = None,
             max_seq_len: int | None = None) -> dict:
    if not (cfg.data.valid or cfg.data.train or cfg.eval.text or cfg.eval.lm_eval):
        raise ForgeError("nothing to evaluate: pass --valid FILE.jsonl (or --data), --text FILE or --lm-eval TASKS")
    name = backends.resolve(cfg.backend)
    recorded = recorded_system_prompt(adapter) if system is None and not cfg.data.system_prompt else ""
    if recorded:
        print(f"system prompt (the run's, for rows without one; --system '' for none): {recorded}", file=sys.stderr)
    result = evaluate(backends.ops(name), cfg, adapter=adapter, system=system, max_seq_len=max_seq_len)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        from rich.table import Table

        table = Table(title=f"eval: {adapter or cfg.model.path}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in result.items():
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
        Console().print(table)
    return result
