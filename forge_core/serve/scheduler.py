"""The decode thread: every model call of the server runs here, one at a time, so the framework sees one thread.

Requests come in from the HTTP side (any thread) and are inserted into the backend's continuous-batching generator
of their *lane*: the adapter's own (grouped: its factors switched in per step, not reloaded) or its base's (rows:
every row of the batch with its own adapter; forge_mlx/serve.py). Each turn of the loop runs one decode step per
lane that has rows, hands each row its token, and takes new requests and cancellations (a client gone mid-stream)
between steps, so a request never waits for another to finish, only for a step.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol


class Engine(Protocol):
    """What a backend's serving side provides (forge_mlx/serve.py). Called from the decode thread only."""

    def lane(self, name: str) -> str:
        """The generator adapter `name`'s rows decode in (its own, or one its base's adapters share)."""

    def insert(self, name: str, prompt: list[int], max_tokens: int, temp: float, top_p: float) -> int:
        """Queue a row for adapter `name`; returns its id within its lane."""

    def step(self, lane: str) -> list[tuple[int, int, str | None]]:
        """One decode step of a lane's rows: (row id, token, finish reason: None, "stop" (an end token, not part of
        the answer) or "length")."""

    def remove(self, lane: str, uids: list[int]) -> None:
        """Drop rows of a lane (their KV cache is freed)."""

    def pooled(self, ids: list[int]):
        """The base model's mean-pooled last hidden state of `ids` (the router's classifier features)."""


@dataclass(eq=False)  # a request is itself: found in the queue by identity
class Request:
    name: str  # the served adapter (or base) that answers
    prompt: list[int]
    max_tokens: int
    temp: float = 0.0
    top_p: float = 1.0
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # (token, finish) or (None, "error: ...")
    uid: int | None = None
    lane: str = ""  # the engine's generator it decodes in (set when inserted)

    def deliver(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: the client is long gone
            pass


class Scheduler:
    def __init__(self, engine: Engine, max_rows: int = 16, log=None):
        self.engine = engine
        self.max_rows = max_rows  # rows decoded at once, all adapters together; more requests wait their turn
        self.pending: collections.deque[Request] = collections.deque()
        self.inbox: queue.Queue = queue.Queue()
        self.active: dict[str, dict[int, Request]] = {}  # lane -> row id -> request
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="forge-decode", daemon=True)

    # ---- from any thread
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(("wake",))
        self._thread.join(timeout=30)

    def submit(self, req: Request) -> None:
        self.inbox.put(("submit", req))

    def cancel(self, req: Request) -> None:
        self.inbox.put(("cancel", req))

    def call(self, fn, *args) -> Future:
        """fn(*args) on the decode thread (model calls outside decoding: the router's features)."""
        fut: Future = Future()
        self.inbox.put(("call", fn, args, fut))
        return fut

    def rows(self) -> int:
        return sum(len(rows) for rows in self.active.values())

    # ---- the decode thread
    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.rows())
            while self.pending and self.rows() < self.max_rows:
                self._insert(self.pending.popleft())
            for lane in [n for n, rows in self.active.items() if rows]:
                self._step(lane)

    def _drain(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "submit":
            self.pending.append(item[1])
        elif kind == "cancel":
            req = item[1]
            if req in self.pending:
                self.pending.remove(req)
            elif self.active.get(req.lane, {}).pop(req.uid, None) is not None:
                self.engine.remove(req.lane, [req.uid])
        elif kind == "call":
            _, fn, args, fut = item
            try:
                fut.set_result(fn(*args))
            except Exception as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

    def _insert(self, req: Request) -> None:
        try:
            req.lane = self.engine.lane(req.name)
            req.uid = self.engine.insert(req.name, req.prompt, req.max_tokens, req.temp, req.top_p)
        except Exception as e:  # noqa: BLE001 - the request fails, the server stays up
            req.deliver((None, f"error: {type(e).__name__}: {e}"))
            return
        self.active.setdefault(req.lane, {})[req.uid] = req

    def _step(self, lane: str) -> None:
        rows = self.active[lane]
        try:
            out = self.engine.step(lane)
        except Exception as e:  # noqa: BLE001 - this lane's rows fail, the server stays up
            self.log(f"decode step of '{lane}' failed: {type(e).__name__}: {e}")
            self.engine.remove(lane, list(rows))
            for req in rows.values():
                req.deliver((None, f"error: {type(e).__name__}: {e}"))
            rows.clear()
            return
        for uid, token, finish in out:
            req = rows.get(uid)
            if req is None:  # cancelled while its step ran
                continue
            req.deliver((token, finish))
            if finish is not None:
                del rows[uid]
