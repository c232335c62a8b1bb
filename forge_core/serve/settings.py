"""The server's defaults and limits, in one place (`forge serve` options override them)."""

from __future__ import annotations

from dataclasses import dataclass

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
API_KEY_ENV = "FORGE_API_KEY"
MIXES = ("rows", "grouped")


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"  # another address needs an API key (--api-key or $FORGE_API_KEY)
    port: int = 8080
    api_key: str = ""
    default_max_tokens: int = 256  # a request without max_tokens
    max_tokens_limit: int = 2048  # a request asking for more gets 400
    max_body_bytes: int = 1_000_000  # a larger request body gets 413
    max_batch: int = 16  # rows decoded at once, all adapters together (more requests wait for a row)
    # requests for different adapters of one base: "rows" decodes them in one batch, each row with its own factors;
    # "grouped" runs one batch per adapter (docs/BENCHMARKS.md "Serving" measures both)
    mix: str = "rows"
    max_context: int = 2048  # prompt + answer tokens a request may hold (the KV cache the plan counts per row)
    force: bool = False  # start even where the memory plan says it does not fit

    @property
    def local(self) -> bool:
        return self.host in LOCAL_HOSTS
