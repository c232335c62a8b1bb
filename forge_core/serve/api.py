"""The HTTP side of `forge serve`: OpenAI's chat and text completions (streamed as server-sent events or not),
the model list and a health check, on Starlette (an ASGI toolkit small enough to read, served by uvicorn: routing,
request parsing and streaming done by maintained code, no web framework's object model on top).

Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with its status: 400 a bad request,
401 a missing or wrong API key, 404 an unknown model, 413 a body over the limit, 500 anything else (logged, the
server stays up). Nothing from a request opens a file: the served names were fixed at start.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route as HttpRoute

from forge_core.eval.generation import chat_prompt
from forge_core.serve.catalog import AUTO, Catalog
from forge_core.serve.router import Router
from forge_core.serve.scheduler import Request, Scheduler
from forge_core.serve.settings import ServeSettings
from forge_core.serve.textstream import TextStream


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def _number(body: dict, key: str, default, lo: float, hi: float):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ApiError(400, f"'{key}' must be a number in [{lo}, {hi}], got {v!r}", param=key)
    return v


class Server:
    """The routes over one scheduler, one catalog and an optional router."""

    def __init__(self, catalog: Catalog, scheduler: Scheduler, tokenizer, settings: ServeSettings,
                 router: Router | None = None, log=print):
        self.catalog, self.scheduler, self.tok, self.settings, self.router = catalog, scheduler, tokenizer, settings, router
        self.log = log
        self.created = int(time.time())

    def app(self) -> Starlette:
        routes = [HttpRoute("/health", self.health, methods=["GET"]),
                  HttpRoute("/v1/models", self.models, methods=["GET"]),
                  HttpRoute("/v1/chat/completions", self.chat, methods=["POST"]),
                  HttpRoute("/v1/completions", self.completions, methods=["POST"])]
        return Starlette(routes=routes, exception_handlers={404: self._not_found, 405: self._not_allowed})

    # ---- plumbing
    async def _not_found(self, request, exc):
        return ApiError(404, f"no route {request.url.path}", code="not_found").response()

    async def _not_allowed(self, request, exc):
        return ApiError(405, f"{request.method} is not allowed on {request.url.path}").response()

    def _check_key(self, request: HttpRequest) -> None:
        key = self.settings.api_key
        if not key:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error",
                           code="invalid_api_key")

    async def _body(self, request: HttpRequest) -> dict:
        self._check_key(request)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.settings.max_body_bytes:
            raise ApiError(413, f"request body over {self.settings.max_body_bytes} bytes")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.settings.max_body_bytes:
                raise ApiError(413, f"request body over {self.settings.max_body_bytes} bytes")
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    async def _guarded(self, handler, request: HttpRequest):
        try:
            return await handler(request)
        except ApiError as e:
            return e.response()
        except Exception as e:  # noqa: BLE001 - one line in the log, OpenAI's shape to the client
            self.log(f"{request.url.path}: {type(e).__name__}: {e}")
            return ApiError(500, f"internal error: {type(e).__name__}", "server_error").response()

    # ---- routes
    async def health(self, request: HttpRequest):
        memory = getattr(self.scheduler.engine, "memory", None)
        return JSONResponse({"status": "ok", "models": self.catalog.names(), "rows": self.scheduler.rows(),
                             "pending": len(self.scheduler.pending), "memory_bytes": memory() if memory else None})

    async def models(self, request: HttpRequest):
        async def handler(request):
            self._check_key(request)
            names = self.catalog.names() + ([AUTO] if self.router else [])
            return JSONResponse({"object": "list", "data": [
                {"id": n, "object": "model", "created": self.created, "owned_by": "forge"} for n in names]})
        return await self._guarded(handler, request)

    async def chat(self, request: HttpRequest):
        async def handler(request):
            body = await self._body(request)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ApiError(400, "'messages' must be a non-empty list", param="messages")
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                        m.get("content"), str):
                    raise ApiError(400, f"messages[{i}] needs a string 'role' and 'content'", param="messages")
            name, route = await self._choose(body, next((m["content"] for m in reversed(messages)
                                                         if m["role"] == "user"), messages[-1]["content"]))
            system = self.catalog.served[name].system
            if system and not any(m["role"] == "system" for m in messages):
                messages = [{"role": "system", "content": system}, *messages]
            msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
            return await self._complete(body, name, route, chat_prompt(self.tok, msgs), chat=True)
        return await self._guarded(handler, request)

    async def completions(self, request: HttpRequest):
        async def handler(request):
            body = await self._body(request)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise ApiError(400, "'prompt' must be a string", param="prompt")
            name, route = await self._choose(body, prompt)
            return await self._complete(body, name, route, self.tok.encode(prompt), chat=False)
        return await self._guarded(handler, request)

    # ---- shared by both completions
    async def _choose(self, body: dict, text: str):
        name = body.get("model")
        if not isinstance(name, str):
            raise ApiError(400, "'model' must be a string (a served name or 'auto')", param="model")
        if name == AUTO and self.router is not None:
            features = None
            if self.router.mode != "keyword":
                def features(t):  # runs on the request's own thread: the decode thread computes it
                    return self.scheduler.call(self.scheduler.engine.pooled, self.tok.encode(t)).result()
            route = await asyncio.to_thread(self.router.route, text, features)
            self.log(f"router: '{text[:60]}' -> {route.expert} ({route.how}, confidence {route.confidence:.2f})")
            return route.expert, route
        if name not in self.catalog.served:
            raise ApiError(404, f"model '{name}' is not served (served: {', '.join(self.catalog.names())}"
                           + (", auto)" if self.router else ")"), code="model_not_found", param="model")
        return name, None

    def _params(self, body: dict, prompt: list[int]) -> dict:
        s = self.settings
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _number(body, key, s.default_max_tokens, 1, s.max_tokens_limit)
        if int(max_tokens) != max_tokens:
            raise ApiError(400, f"'{key}' must be an integer", param=key)
        if len(prompt) + max_tokens > s.max_context:
            raise ApiError(400, f"the prompt ({len(prompt)} tokens) plus {key} ({max_tokens}) is over this server's "
                           f"context of {s.max_context} tokens", param=key, code="context_length_exceeded")
        n = _number(body, "n", 1, 1, 8)
        if int(n) != n or (n > 1 and body.get("stream")):
            raise ApiError(400, "'n' must be an integer in [1, 8], and 1 when streaming", param="n")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop) or len(stop) > 4:
            raise ApiError(400, "'stop' must be a string or up to 4 strings", param="stop")
        return {"max_tokens": int(max_tokens), "temp": float(_number(body, "temperature", 0.0, 0, 2)),
                "top_p": float(_number(body, "top_p", 1.0, 0, 1)), "stop": stop, "n": int(n)}

    async def _complete(self, body: dict, name: str, route, prompt: list[int], chat: bool):
        p = self._params(body, prompt)
        loop = asyncio.get_running_loop()
        reqs = [Request(name, prompt, p["max_tokens"], p["temp"], p["top_p"], loop=loop) for _ in range(p["n"])]
        texts = [TextStream(self.tok, p["stop"]) for _ in reqs]
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        headers = {"x-forge-expert": name}
        if route is not None:
            headers["x-forge-confidence"] = f"{route.confidence:.3f}"
            headers["x-forge-route"] = route.how
        for req in reqs:
            self.scheduler.submit(req)
        if body.get("stream"):
            return StreamingResponse(self._stream(reqs[0], texts[0], rid, name, chat), media_type="text/event-stream",
                                     headers={**headers, "cache-control": "no-cache"})
        try:
            answers = await asyncio.gather(*(self._answer(r, t) for r, t in zip(reqs, texts)))
        except BaseException:
            for req in reqs:
                self.scheduler.cancel(req)  # the client went away while waiting, or a row failed
            raise
        n = sum(len(t.ids) for t in texts)
        usage = {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}
        choices = [{"index": i, "message": {"role": "assistant", "content": answer}, "finish_reason": finish}
                   if chat else {"index": i, "text": answer, "finish_reason": finish, "logprobs": None}
                   for i, (finish, answer) in enumerate(answers)]
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": name, "choices": choices, "usage": usage},
                            headers=headers)

    async def _answer(self, req: Request, text: TextStream) -> tuple[str, str]:
        finish, pieces = None, []
        while finish is None:
            finish, piece = await self._next(req, text)
            pieces.append(piece)
        return finish, "".join(pieces)

    async def _next(self, req: Request, text: TextStream) -> tuple[str | None, str]:
        """(finish reason or None, the new text) after the request's next token."""
        token, finish = await req.events.get()
        if token is None:
            raise RuntimeError(finish)
        if finish == "stop":  # an end token: not part of the answer
            return "stop", text.finish()
        piece = text.add(token)
        if text.stopped:
            self.scheduler.cancel(req)
            return "stop", piece
        if finish is not None:
            return finish, piece + text.finish()
        return None, piece

    async def _stream(self, req: Request, text: TextStream, rid: str, name: str, chat: bool):
        created = int(time.time())

        def event(delta: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            chunk = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                     "model": name, "choices": [choice]}
            return f"data: {json.dumps(chunk)}\n\n"

        done = False
        try:
            if chat:
                yield event(None, None, first=True)
            finish = None
            while finish is None:
                try:
                    finish, piece = await self._next(req, text)
                except RuntimeError as e:
                    self.log(f"{rid}: {e}")
                    yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
                    done = True
                    return
                if piece:
                    yield event(piece, None)
            yield event(None, finish)
            yield "data: [DONE]\n\n"
            done = True
        finally:
            if not done:  # the client disconnected mid-stream: free its row
                self.scheduler.cancel(req)
