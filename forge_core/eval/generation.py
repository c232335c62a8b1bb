"""Batched generation written once over a backend's `ops.generate_tokens` (forge_mlx / forge_cuda generate.py):
the chat prompt, the length order that keeps a batch's padding small, and the text of each answer.

Callers (forge eval's answers, lm-eval's generate_until) hand prompts in any order and get answers back in
that order; greedy answers equal the backends' one-row `complete`.
"""

from __future__ import annotations


def chat_prompt(hf, messages: list[dict]) -> list[int]:
    """Token ids of `messages` with the generation prompt (a plain join where the tokenizer has no template)."""
    if getattr(hf, "chat_template", None):
        out = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    return hf.encode("\n".join(m["content"] for m in messages))


def generate(ops, model, tokenizer, prompts: list[list[int]], max_tokens: int, temp: float = 0.0,
             batch_size: int = 32, top_p: float = 1.0, stop: list[int] | None = None,
             constraints: list | None = None) -> list[list[int]]:
    """The new token ids after each prompt, generated in length order (a batch pads to its longest prompt)
    and returned in the caller's order; `constraints` (per prompt, forge_core/datagen/copy_constraint.py) go with theirs."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = ops.generate_tokens(model, tokenizer, [list(prompts[i]) for i in order], max_tokens, temp,
                              max(1, batch_size), top_p=top_p, stop=stop,
                              constraints=[constraints[i] for i in order] if constraints else None)
    ids = [[] for _ in prompts]
    for i, toks in zip(order, out):
        ids[i] = list(toks)
    return ids


def answers(ops, model, tokenizer, conversations: list[list[dict]], max_tokens: int, temp: float = 0.0,
            batch_size: int = 32, begin: str = "", constraints: list | None = None) -> list[str]:
    """One answer per conversation, as text. `begin`: text the answers start with (put after the generation
    prompt, the model goes on from it; it begins each returned answer)."""
    hf = ops.hf_tokenizer(tokenizer)
    lead = hf.encode(begin, add_special_tokens=False) if begin else []
    ids = generate(ops, model, tokenizer, [chat_prompt(hf, m) + lead for m in conversations], max_tokens, temp,
                   batch_size, constraints=constraints)
    return [begin + hf.decode(t, skip_special_tokens=True) for t in ids]
