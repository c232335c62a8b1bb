"""`forge serve`: what was trained, behind the OpenAI API.

settings.py   the server's defaults and limits (one dataclass)
catalog.py    which runs are served, under which names, grouped by the base they share
plan.py       the memory plan of a server: each base once, a line per adapter, the KV cache; refused beyond the budget
router.py     router.yaml: keyword / classifier / hybrid choice of an expert for `model: auto`
textstream.py token ids -> text pieces as they arrive (never half a character), stop strings
scheduler.py  the decode thread: requests in, tokens out, continuous batching per adapter over a backend engine
api.py        the HTTP routes (Starlette): OpenAI-shaped requests, responses, SSE streams and errors
command.py    `forge serve` and `forge router train` between the CLI and the pieces above

The backend side (forge_mlx/serve.py) holds the model: one base in memory, every adapter's factors resident, and
the framework's continuous-batching generator per adapter (Engine, in scheduler.py, is what it provides).
"""
