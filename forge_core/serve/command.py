"""`forge serve` and `forge router train`: check everything a user can get wrong before anything heavy loads (the
runs, the router, the bind address and key, the memory plan), then load once and serve."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from forge_core import backend as backends
from forge_core.errors import ForgeError
from forge_core.serve.catalog import build_catalog
from forge_core.serve.plan import check_serve_plan
from forge_core.serve.router import Classifier, load_router, training_set
from forge_core.serve.settings import API_KEY_ENV, ServeSettings


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _engine(name: str, catalog, settings: ServeSettings):
    """The backend's serving engine (forge_mlx/serve.py, forge_cuda/serve.py)."""
    module = importlib.import_module(f"forge_{name}.serve")
    engine = module.MlxEngine if name == "mlx" else module.TorchEngine
    return engine(catalog, settings.max_batch, log=_say, mix=settings.mix)


def prepare(runs: list[str], model: str | None, router_path: str | None, settings: ServeSettings,
            backend: str | None = None):
    """(the Starlette app, the scheduler) with everything loaded; ForgeError before loading on any bad input."""
    from forge_core.serve.api import Server
    from forge_core.serve.scheduler import Scheduler

    if importlib.util.find_spec("starlette") is None or importlib.util.find_spec("uvicorn") is None:
        raise ForgeError('forge serve needs starlette and uvicorn: pip install "forge-tune[serve]"')
    settings.api_key = settings.api_key or os.environ.get(API_KEY_ENV, "")
    if not settings.local and not settings.api_key:
        raise ForgeError(f"--host {settings.host} serves beyond this machine: set an API key (--api-key or "
                         f"${API_KEY_ENV}); every request must then send it as a bearer token")
    name = backends.resolve(backend or "auto")
    ops = backends.ops(name)
    catalog = build_catalog(ops, runs, model)
    router = load_router(router_path) if router_path else None
    if router is not None:
        router.check_served(catalog.names(), catalog.base_name)
    check_serve_plan(catalog, settings, name, say=_say)
    engine = _engine(name, catalog, settings)
    scheduler = Scheduler(engine, max_rows=settings.max_batch, log=_say)
    server = Server(catalog, scheduler, ops.hf_tokenizer(engine.tokenizer), settings, router, log=_say)
    return server.app(), scheduler


def run_serve(runs: list[str], model: str | None, router_path: str | None, settings: ServeSettings,
              backend: str | None = None) -> None:
    import uvicorn

    app, scheduler = prepare(runs, model, router_path, settings, backend)
    scheduler.start()
    _say(f"forge serve: http://{settings.host}:{settings.port}/v1  (Ctrl-C stops)")
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning",
                    limit_concurrency=max(64, 4 * settings.max_batch))
    finally:
        scheduler.stop()


def train_router(router_path: str, model: str | None, backend: str | None = None) -> dict:
    """Fit the classifier of router.yaml on its examples with the base model's pooled hidden states; save it beside
    the yaml. Returns {"accuracy": on the examples, "examples": n}."""
    import numpy as np

    router = load_router(router_path, need_classifier=False)
    texts, labels = training_set(router)
    name = backends.resolve(backend or "auto")
    ops = backends.ops(name)
    catalog = build_catalog(ops, [], model)
    engine = _engine(name, catalog, ServeSettings(max_batch=1))
    tok = ops.hf_tokenizer(engine.tokenizer)
    features = np.stack([engine.pooled(tok.encode(t)) for t in texts])
    clf = Classifier.fit(features, labels, list(router.experts))
    accuracy = float(np.mean([clf.experts[i] == y for i, y in zip(clf.probs(features).argmax(1), labels)]))
    clf.save(router.classifier_path, {"base": catalog.base_name, "examples": len(texts)})
    _say(f"wrote {router.classifier_path}: {len(router.experts)} experts, {len(texts)} examples, "
         f"accuracy on them {accuracy:.2f}")
    return {"accuracy": accuracy, "examples": len(texts)}
