"""`forge serve` and `forge router train` on the command line; every default is ServeSettings' (settings.py)."""

from __future__ import annotations

import dataclasses

import click

from forge_core.config_parse import choices
from forge_core.friendly import friendly
from forge_core.serve.settings import API_KEY_ENV, MIXES, ServeSettings


@click.command()
@click.argument("runs", nargs=-1, type=click.Path())
@click.option("--model", default=None, help="The base (default: the runs'; alone: serve this model).")
@click.option("--router", "router_path", type=click.Path(dir_okay=False), default=None,
              help="router.yaml: `model: auto` picks the expert (keyword / classifier / hybrid).")
@click.option("--host", default=None, help="Bind address (default 127.0.0.1; any other needs an API key).")
@click.option("--port", type=click.IntRange(1, 65535), default=None)
@click.option("--api-key", default=None, help=f"Bearer token every request must send (or ${API_KEY_ENV}).")
@click.option("--max-batch", type=click.IntRange(1), default=None, help="Rows decoded at once, all adapters.")
@click.option("--mix", type=click.Choice(MIXES), default=None,
              help="Requests for different adapters: one batch, each row its adapter (rows) or a batch per adapter.")
@click.option("--max-context", type=click.IntRange(16), default=None, help="Prompt + answer tokens per request.")
@click.option("--max-tokens-limit", type=click.IntRange(1), default=None, help="Largest max_tokens a request gets.")
@click.option("--force", is_flag=True, default=None, help="Start even where the memory plan says it does not fit.")
@click.option("--backend", type=click.Choice(choices("backend")), default=None)
@friendly
def serve(runs, model, router_path, backend, **kw):
    """Serve runs (and their base) behind an OpenAI-compatible API: many adapters on one base."""
    from forge_core.serve.command import run_serve

    given = {k: v for k, v in kw.items() if v is not None}
    run_serve(list(runs), model, router_path, dataclasses.replace(ServeSettings(), **given), backend)


@click.group()
def router():
    """The router between served experts (router.yaml)."""


@router.command("train")
@click.argument("router_path", type=click.Path(dir_okay=False))
@click.option("--model", default=None, help="The base whose hidden states the classifier reads (default: bundled).")
@click.option("--backend", type=click.Choice(choices("backend")), default=None)
@friendly
def router_train(router_path, model, backend):
    """Fit router.yaml's classifier on its examples; saved beside it."""
    from forge_core.serve.command import train_router

    train_router(router_path, model, backend)
