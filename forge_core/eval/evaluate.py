"""`forge generate` and `forge eval`, once for both backends: load the model as trained, then held-out
loss / perplexity, the task metric by greedy generation, preference accuracy on held-out pairs.

The backend supplies the tensor pieces (ops: build_model, for_inference, sft_loss, prefix_state /
sft_loss_after, sequence_logps, complete, generate_tokens, continuation_scores); batching, averaging and
scoring are here (batched answers: generation.py; --text: perplexity.py; --lm-eval: lm_eval_bridge.py).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from functools import partial

import numpy as np

from forge_core import data as fdata
from forge_core.adapters.formats import FORGE, forge_adapter_dir, read_json
from forge_core.config import ForgeConfig
from forge_core.data.eval_rows import prompt_only, prompts_and_references
from forge_core.eval import generation
from forge_core.eval.metrics import score_rows
from forge_core.eval.perplexity import text_perplexity


def load_adapted(ops, adapter: str | None, model_spec: str | None = None, quantized: bool = True):
    """(model, tokenizer, config) for inference: the base alone, or base + forge adapter as trained.

    quantized=False keeps the full-precision residual (W_res + s·BA) instead of Q(W_res).
    """
    if adapter is None:
        cfg = ForgeConfig()
        if model_spec:
            cfg.model.path = model_spec
        model, tokenizer = ops.load_base_for_inference(cfg)
        return model, tokenizer, cfg
    cfg, weights, factors = ops.load_adapter_dir(adapter)
    if model_spec:
        cfg.model.path = model_spec
    if not quantized:
        cfg.quant.bits = 0
    model, tokenizer, _, _ = ops.build_model(cfg, pissa_init=factors, adapter_weights=weights)
    return model, tokenizer, cfg


def recorded_system_prompt(adapter: str | None) -> str:
    """The system prompt every training row of the run shared (forge.json), "" without one."""
    if adapter is None:
        return ""
    return read_json(forge_adapter_dir(adapter) / FORGE).get("system_prompt", "")


def _for_inference(ops, adapter, model_spec):
    model, tokenizer, cfg = load_adapted(ops, adapter, model_spec)
    ops.for_inference(model)  # CPU decoding: each layer one dense matrix, dequantized and fused once
    model.eval()
    return model, tokenizer, cfg


def generate(ops, model=None, adapter=None, prompt="", system=None, max_tokens=96, temp=0.0) -> str:
    """Stream the answer to `prompt` (chat template, optional system message) to stdout; return it.

    system=None: the run's recorded system prompt (said on stderr), so a model is asked as it was taught."""
    if system is None:
        system = recorded_system_prompt(adapter)
        if system:
            print(f"system prompt (the run's; --system '' for none): {system}", file=sys.stderr)
    net, tokenizer, _ = _for_inference(ops, adapter, model)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = ops.complete(net, tokenizer, messages, max_tokens, temp,
                        stream=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    sys.stdout.write("\n")
    return text


def heldout_loss(ops, model, tokenizer, cfg: ForgeConfig, path: str) -> dict:
    """Token-mean NLL of the loss-masked tokens of the SFT rows in `path`, perplexity, token count.

    Rows go in length order (a batch pads to its longest, to a multiple of 8), and the vocabulary head runs
    at the scored tokens only where the backend keeps it apart (MLX). The tokens every row starts with (a
    shared system prompt) run once, where the backend keeps a KV cache (prefix_state; MLX): each batch then
    runs only the rest of its rows. The sum is the same; the padding, the head on prompt tokens and the
    repeated prefix are not paid for."""
    hf = ops.hf_tokenizer(tokenizer)
    rows, _ = fdata.load_sft(path, hf, cfg.data, cfg.train.max_seq_len)
    rows = sorted(rows, key=lambda r: len(r.tokens))
    n = fdata.shared_prefix([r.tokens[:first_scored(r)] for r in rows])  # never past a row's first target
    prefix = ops.prefix_state(model, rows[0].tokens[:n]) if n else None
    if prefix is not None:
        rows = [dataclasses.replace(r, tokens=r.tokens[n:], mask=r.mask[n:]) for r in rows]
        loss_of = partial(ops.sft_loss_after, model, prefix=prefix)
    else:
        loss_of = ops.no_grad(model, partial(ops.sft_loss, model), compiled=False)
    pad, size, cap = fdata.pad_token_id(hf), cfg.train.batch_size, fdata.loss_row_cap(rows)
    total = count = 0.0
    for s in range(0, len(rows), size):
        b = fdata.collate_sft(rows[s:s + size], pad, pad_multiple=8, max_len=cfg.train.max_seq_len)
        loss_sum, n_tok = loss_of(ops.to_batch(model, fdata.add_loss_positions(b, cap)))
        total, count = total + loss_sum.item(), count + n_tok.item()
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "tokens": int(count)}


def first_scored(row) -> int:
    """Index of a row's first scored token (the prefix a cache may hold must end before its predictor)."""
    scored = np.flatnonzero(row.mask[1:])
    return int(scored[0]) if len(scored) else len(row.tokens) - 1


def task_metrics(cfg: ForgeConfig, path, answer) -> dict:
    """Greedy answers to the held-out prompts, scored against the references (forge_core.eval.metrics).

    `answer(conversations) -> [str]` is the batched generator (_answers).
    """
    if cfg.eval.metric == "none":
        return {}
    pairs = prompts_and_references(path, cfg.data)
    if cfg.eval.limit:
        pairs = pairs[: cfg.eval.limit]
    preds = answer([msgs for msgs, _ in pairs])
    return {**score_rows(preds, [ref for _, ref in pairs], metric=cfg.eval.metric), "examples": len(pairs)}


def _answers(ops, net, tokenizer, cfg: ForgeConfig):
    """The batched greedy generator task_metrics calls, bound to a model and the eval settings."""
    return partial(generation.answers, ops, net, tokenizer, max_tokens=cfg.eval.max_new_tokens,
                   batch_size=cfg.eval.batch_size)


def with_system_prompt(cfg: ForgeConfig, adapter: str | None, system: str | None = None) -> ForgeConfig:
    """cfg whose data.system_prompt (put before rows that have none) is `system`; None: the config's own, else
    the run's recorded one."""
    if system is None:
        system = cfg.data.system_prompt or recorded_system_prompt(adapter)
    if system == cfg.data.system_prompt:
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.data.system_prompt = system
    return cfg


def evaluate(ops, cfg: ForgeConfig, adapter: str | None = None, model_spec: str | None = None,
             system: str | None = None, max_seq_len: int | None = None) -> dict:
    """What cfg asks for, of one model built once: held-out loss/perplexity and the task metric by greedy
    generation when the config names data; eval.text: the sliding-window perplexity of a text file
    (perplexity.py); eval.lm_eval: lm-evaluation-harness tasks ("task/metric" keys; lm_eval_bridge.py). Rows
    without a system message get `system`, by default the run's recorded one (with_system_prompt). Rows and
    text windows are `max_seq_len` tokens; None: the run's own train.max_seq_len (an adapter's), else cfg's."""
    cfg = with_system_prompt(cfg, adapter, system)
    e = cfg.eval
    if e.lm_eval:
        from forge_core.eval import lm_eval_bridge

        lm_eval_bridge.check_installed()  # before the model is built
    net, tokenizer, trained = _for_inference(ops, adapter, model_spec or (cfg.model.path if not adapter else None))
    cfg = copy.deepcopy(cfg)
    cfg.train.max_seq_len = max_seq_len or (trained.train.max_seq_len if adapter else cfg.train.max_seq_len)
    result = {}
    path = cfg.data.valid or cfg.data.train
    if path:
        if not prompt_only(path, cfg.data):  # GRPO's prompt rows have no answers to score a loss on
            result.update(heldout_loss(ops, net, tokenizer, cfg, path))
        result.update(task_metrics(cfg, path, _answers(ops, net, tokenizer, cfg)))
    if e.text:
        result.update(text_perplexity(ops, net, tokenizer, e.text, cfg.train.max_seq_len, e.stride,
                                      cfg.train.batch_size))
    if e.lm_eval:
        lm = lm_eval_bridge.forge_model(ops, net, tokenizer, e.lm_eval_max_length, cfg.train.batch_size)
        scores = lm_eval_bridge.run_tasks(lm, e.lm_eval, e.lm_eval_include or None, e.lm_eval_limit or None,
                                          None if e.lm_eval_fewshot < 0 else e.lm_eval_fewshot)
        result.update({f"{task}/{k}": v for task, metrics in scores.items() for k, v in metrics.items()})
    return result


def pair_logps(ops, net, tokenizer, cfg: ForgeConfig) -> np.ndarray:
    """(N, 2) completion log-probs (chosen, rejected) of the held-out pairs (data.valid, else data.train)."""
    hf = ops.hf_tokenizer(tokenizer)
    rows, _ = fdata.load_preferences(cfg.data.valid or cfg.data.train, hf, cfg.data, cfg.train.max_seq_len)
    pad, cap, size = fdata.pad_token_id(hf), fdata.loss_row_cap(rows), cfg.train.batch_size
    logps_of = ops.no_grad(net, partial(ops.sequence_logps, net), compiled=False)
    out = []
    for s in range(0, len(rows), size):
        chunk = rows[s:s + size]
        b = fdata.add_loss_positions(fdata.collate_dpo(chunk, pad), cap)
        lp = ops.to_numpy(logps_of(ops.to_batch(net, b))).astype(np.float64)
        out.append(np.stack([lp[:len(chunk)], lp[len(chunk):]], axis=1))
    return np.concatenate(out)


def preference_summary(lp: np.ndarray) -> dict:
    m = lp[:, 0] - lp[:, 1]
    return {"pref_accuracy": float((m > 0).mean()), "logp_margin": float(m.mean()), "pairs": len(m)}


def evaluate_preferences(ops, cfg: ForgeConfig, adapter: str | None = None, with_task: bool = False,
                         system: str | None = None) -> dict:
    """On the held-out pairs: how often the model itself prefers chosen (log π(y_w) > log π(y_l)); with_task
    adds the task metric of greedy answers to their prompts, scored against chosen. "logps" holds the
    (N, 2) per-pair log-probs, for comparing two models pair by pair (implicit_rewards)."""
    cfg = with_system_prompt(cfg, adapter, system)
    net, tokenizer, _ = _for_inference(ops, adapter, None if adapter else cfg.model.path)
    lp = pair_logps(ops, net, tokenizer, cfg)
    out = {**preference_summary(lp), "logps": lp}
    if with_task:
        out.update(task_metrics(cfg, cfg.data.valid or cfg.data.train, _answers(ops, net, tokenizer, cfg)))
    return out


def implicit_rewards(before: np.ndarray, after: np.ndarray) -> dict:
    """DPO's implicit reward of the trained policy against the one it started from, per pair
    h = [log π(y_w) − log π_0(y_w)] − [log π(y_l) − log π_0(y_l)] (β = 1): the same yardstick for every
    method, reference-based or not. Accuracy = share of pairs with h > 0; margin = mean h."""
    h = (after[:, 0] - before[:, 0]) - (after[:, 1] - before[:, 1])
    return {"implicit_accuracy": float((h > 0).mean()), "implicit_margin": float(h.mean())}
