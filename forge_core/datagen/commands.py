"""`forge data raft` and `forge data distill`: the command side of forge_core/datagen (the work is in raft.py and
distill.py; a local teacher goes through a backend's ops, a URL teacher through its OpenAI-compatible API)."""

from __future__ import annotations

from pathlib import Path

import click

from forge_core.config_parse import choices
from forge_core.errors import ForgeError
from forge_core.friendly import friendly


@click.group()
def data():
    """Make training data: RAFT rows from a codebase, a teacher's answers distilled."""


@data.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="RAFT SFT rows (JSONL); resumable.")
@click.option("--teacher", default=None, help="A model forge loads (default: the bundled one).")
@click.option("--adapter", type=click.Path(), default=None, help="The teacher's adapter or run dir.")
@click.option("--teacher-url", default=None, help="An OpenAI-compatible server (e.g. http://127.0.0.1:8080/v1).")
@click.option("--teacher-model", default="", help="--teacher-url: the model name to ask for.")
@click.option("--kind", "kinds", multiple=True, type=click.Choice(["explain", "usage", "debugging"]),
              help="Question kinds (default: all three).")
@click.option("--p-oracle", type=float, default=0.8, help="Share of rows that show the chunk among the documents.")
@click.option("--distractors", type=int, default=3, help="Other chunks shown with each question.")
@click.option("--layout", type=click.Path(dir_okay=False), default=None,
              help="Also write RAFT's fields (instruction, context, oracle/distractor context, output).")
@click.option("--limit", type=int, default=0, help="The first N chunks only (0: all).")
@click.option("--max-tokens", type=int, default=256)
@click.option("--seed", type=int, default=0)
@click.option("--free-quotes", is_flag=True,
              help="A local teacher writes its quotes freely (default: it can only copy them from the chunk).")
@click.option("--backend", type=click.Choice(choices("backend")), default=None)
@friendly
def raft(src, out, teacher, adapter, teacher_url, teacher_model, kinds, p_oracle, distractors, layout, limit,
         max_tokens, seed, free_quotes, backend):
    """RAFT rows from a codebase: a teacher's questions about each chunk and answers that quote it."""
    from forge_core.datagen import raft as fr

    who = _teacher(teacher, adapter, teacher_url, teacher_model, backend)
    counts = fr.raft(src, out, who, list(kinds) or None, p_oracle, distractors, seed, max_tokens, layout, limit,
                     copy_quotes=not free_quotes)
    click.echo(f"wrote {out}: {counts['kept']} rows kept, {counts['dropped']} dropped (why: "
               f"{fr.dropped_path(Path(out))}), {counts['chunks']} chunks")


def _teacher(teacher, adapter, teacher_url, teacher_model, backend):
    from forge_core import backend as backends
    from forge_core.datagen import distill as fd

    if teacher_url and (teacher or adapter):
        raise ForgeError("give --teacher-url, or --teacher / --adapter: one teacher")
    if teacher_url:
        return fd.URLTeacher(teacher_url, teacher_model)
    ops = backends.ops(backends.resolve(backend or "auto"))
    return fd.LocalTeacher(ops, teacher or (None if adapter else "smollm2-135m"), adapter)


@data.command()
@click.argument("prompts", type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="SFT rows (JSONL), appended on a resume.")
@click.option("--teacher", default=None, help="A model forge loads (default: the bundled one).")
@click.option("--adapter", type=click.Path(), default=None, help="The teacher's adapter or run dir.")
@click.option("--teacher-url", default=None, help="An OpenAI-compatible server (e.g. http://127.0.0.1:8080/v1).")
@click.option("--teacher-model", default="", help="--teacher-url: the model name to ask for.")
@click.option("--samples", type=int, default=1, help="Answers per prompt; the best by --reward is kept.")
@click.option("--reward", "rewards", multiple=True, metavar="SPEC", help="FILE.py:fn or builtin:NAME (GRPO's).")
@click.option("--reward-weight", "reward_weights", type=float, multiple=True)
@click.option("--pairs", type=click.Path(dir_okay=False), default=None, help="DPO pairs: best vs worst answer.")
@click.option("--max-tokens", type=int, default=256)
@click.option("--temp", type=float, default=None, help="Sampling temperature (default: 0.7 with --samples, else 0).")
@click.option("--seed", type=int, default=0)
@click.option("--backend", type=click.Choice(choices("backend")), default=None)
@friendly
def distill(prompts, out, teacher, adapter, teacher_url, teacher_model, samples, rewards, reward_weights, pairs,
            max_tokens, temp, seed, backend):
    """A teacher's answers to prompt rows as SFT rows (best-of-N with rewards; DPO pairs with --pairs)."""
    from forge_core.datagen import distill as fd
    from forge_core.datagen.rewards import Rewards

    scorer = Rewards.from_specs(list(rewards), list(reward_weights)) if rewards else None
    who = _teacher(teacher, adapter, teacher_url, teacher_model, backend)
    temp = temp if temp is not None else (0.7 if samples > 1 else 0.0)
    counts = fd.distill(prompts, out, who, samples, scorer, pairs, max_tokens, temp, seed)
    click.echo(f"wrote {out}: {counts['kept']} rows for {counts['prompts']} prompts ({counts['asked']} asked now)"
               + (f", {counts['pairs']} new pairs in {pairs}" if pairs else ""))
