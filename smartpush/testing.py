"""Fakes that ship with smartpush, for its own tests, the benchmarks and your tests.

:class:`FakeProviderServer` is a real HTTP server on loopback that speaks what the ``webhook`` driver
sends: it records every request and answers as scripted::

    with FakeProviderServer() as server:
        server.script([Reply(500)] * 3)          # three failures, then the default answer
        server.delay_s = 0.05                     # a provider that takes 50 ms
        ...                                       # send to server.url
        assert server.requests_per_key().most_common(1)[0][1] == 1   # nothing sent twice

It runs its own event loop in a background thread, so it serves synchronous and asynchronous callers
alike (in the same process it shares the GIL with them: measure fast clients against a separate one).

``FakeProviderServer(idempotent=True)`` behaves like a provider that honours ``Idempotency-Key``: the
first request with a key that it accepts is delivered (counted by :meth:`delivered_per_key`), and a
repeat gets the first answer again without a second delivery (counted by :meth:`replayed_per_key`).
A delivery is counted when the provider decides to accept, before it answers: an answer that is slow,
or cut off by a reset, was still delivered, as it would be by a real provider.
"""

from __future__ import annotations

import asyncio
import json as _json
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType
from typing import Any

from aiohttp import web

__all__ = ["FakeProviderServer", "RecordedRequest", "Reply"]

#: The header the webhook driver sets to the message id; counted per value.
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: How long stop() lets handlers still sleeping on a scripted delay finish.
_SHUTDOWN_S = 0.5


@dataclass(frozen=True, slots=True)
class Reply:
    """One scripted answer.

    ``json`` is the body (``None``: ``{"id": "<uuid>"}`` for 2xx, ``{"error": {"message": ...}}``
    otherwise); ``body`` sends raw bytes instead (invalid JSON, an empty 204). ``delay_s`` (``None``:
    the server's ``delay_s``) waits before answering. ``reset`` sends the headers and part of the body,
    then drops the connection.
    """

    status: int = 200
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float | None = None
    reset: bool = False
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the server received it; ``json`` is ``None`` when the body is not JSON."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes
    json: Any
    #: The client's (host, port): one port per connection, so distinct peers count connections.
    peer: tuple[str, int]
    received_at: float

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get(IDEMPOTENCY_HEADER)


Responder = Callable[[RecordedRequest], Reply | None]


class FakeProviderServer:
    """A programmable HTTP provider on ``127.0.0.1`` and a free port; see the module docstring.

    Answers come, in order: from the :meth:`script` queue, then from ``responder`` (a callable given a
    :class:`RecordedRequest`, returning a :class:`Reply` or ``None``), then the default ``Reply()``.
    Every attribute and method is safe to use from any thread while the server runs.
    """

    def __init__(
        self, *, delay_s: float = 0.0, responder: Responder | None = None, idempotent: bool = False
    ) -> None:
        #: Added before every answer whose reply has no ``delay_s`` of its own.
        self.delay_s = delay_s
        self.responder = responder
        #: Honour ``Idempotency-Key``: a repeat of a delivered key gets the first answer, no delivery.
        self.idempotent = idempotent
        self._delivered: Counter[str] = Counter()
        self._replayed: Counter[str] = Counter()
        self._first_answer: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._script: deque[Reply] = deque()
        self._requests: list[RecordedRequest] = []
        self._per_key: Counter[str] = Counter()
        self._accepted: Counter[str] = Counter()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._sock: socket.socket | None = None
        self.port = 0

    # -- lifecycle -----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash); valid once started."""
        if not self.port:
            raise RuntimeError("the server is not started; call start() or use it as a context manager")
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeProviderServer:
        if self._thread is not None:
            raise RuntimeError("the server is already running")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        self._sock, self.port = sock, sock.getsockname()[1]
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._serve, args=(ready, failure), name=f"fake-provider-{self.port}", daemon=True
        )
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        """Stop serving and close every connection; idempotent."""
        thread, loop, runner = self._thread, self._loop, self._runner
        if thread is None or loop is None:
            return
        if runner is not None:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        self._thread = self._loop = self._runner = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> FakeProviderServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _serve(self, ready: threading.Event, failure: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            app = web.Application(client_max_size=16 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_S)
            loop.run_until_complete(runner.setup())
            assert self._sock is not None  # noqa: S101 - start() binds it first
            loop.run_until_complete(web.SockSite(runner, self._sock).start())
            self._runner = runner
        except BaseException as exc:  # handed to start(), which raises it in the caller's thread
            failure.append(exc)
            ready.set()
            loop.close()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    # -- programming ---------------------------------------------------------------------------------

    def script(self, replies: Iterable[Reply]) -> None:
        """Queue answers for the next requests, in order; the default answer resumes after them."""
        with self._lock:
            self._script.extend(replies)

    def clear(self) -> None:
        """Forget recorded requests, counts and queued answers (``delay_s`` and ``responder`` stay)."""
        with self._lock:
            self._script.clear()
            self._requests.clear()
            self._per_key.clear()
            self._accepted.clear()
            self._delivered.clear()
            self._replayed.clear()
            self._first_answer.clear()

    # -- what was received ---------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    def requests_per_key(self) -> Counter[str]:
        """How many requests arrived with each ``Idempotency-Key`` (retries included)."""
        with self._lock:
            return Counter(self._per_key)

    def accepted_per_key(self) -> Counter[str]:
        """How many times each ``Idempotency-Key`` was answered 2xx in full: above 1 is a double send."""
        with self._lock:
            return Counter(self._accepted)

    def delivered_per_key(self) -> Counter[str]:
        """How many times each key was delivered: accepted (2xx decided), whether or not the answer
        reached the client. With ``idempotent``, at most 1; without, above 1 is a double send."""
        with self._lock:
            return Counter(self._delivered)

    def replayed_per_key(self) -> Counter[str]:
        """With ``idempotent``: repeats of a delivered key, answered without a second delivery. Each
        one is a message a provider that ignores the key would have sent twice."""
        with self._lock:
            return Counter(self._replayed)

    @property
    def connections(self) -> int:
        """Distinct client connections seen (by peer address and port)."""
        with self._lock:
            return len({r.peer for r in self._requests})

    # -- serving -------------------------------------------------------------------------------------

    def _next_reply(self, recorded: RecordedRequest) -> tuple[Reply, bytes]:
        """The answer to ``recorded`` and its body; records the delivery it stands for."""
        key = recorded.idempotency_key
        with self._lock:
            self._requests.append(recorded)
            if key is not None:
                self._per_key[key] += 1
                first = self._first_answer.get(key) if self.idempotent else None
                if first is not None:  # a repeat: the first answer again, nothing delivered
                    self._replayed[key] += 1
                    return Reply(delay_s=self.delay_s), first
            scripted = self._script.popleft() if self._script else None
        if scripted is None:
            responder = self.responder
            scripted = (responder(recorded) if responder is not None else None) or Reply()
        body = _body_of(scripted)
        if key is not None and 200 <= scripted.status < 300:  # noqa: PLR2004 - 2xx: delivered now
            with self._lock:
                if self.idempotent and key in self._first_answer:  # a concurrent repeat won the race
                    self._replayed[key] += 1
                    return Reply(delay_s=self.delay_s), self._first_answer[key]
                self._delivered[key] += 1
                if self.idempotent:
                    self._first_answer[key] = body
        return scripted, body

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            parsed = _json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        peer = request.transport.get_extra_info("peername") if request.transport else None
        recorded = RecordedRequest(
            method=request.method,
            path=request.path,
            query=request.query_string,
            headers=dict(request.headers),
            body=raw,
            json=parsed,
            peer=(str(peer[0]), int(peer[1])) if peer else ("", 0),
            received_at=time.monotonic(),
        )
        reply, body = self._next_reply(recorded)
        delay = self.delay_s if reply.delay_s is None else reply.delay_s
        if delay > 0:
            await asyncio.sleep(delay)
        if reply.reset:
            return await _cut_short(request, reply, body)
        response = web.Response(
            status=reply.status, body=body, headers=dict(reply.headers), content_type="application/json"
        )
        if 200 <= reply.status < 300 and recorded.idempotency_key is not None:  # noqa: PLR2004 - 2xx
            with self._lock:
                self._accepted[recorded.idempotency_key] += 1
        return response


def _body_of(reply: Reply) -> bytes:
    if reply.body is not None:
        return reply.body
    payload = reply.json
    if payload is None:
        if 200 <= reply.status < 300:  # noqa: PLR2004 - 2xx
            payload = {"id": str(uuid.uuid4())}
        else:
            try:
                phrase = HTTPStatus(reply.status).phrase
            except ValueError:
                phrase = "error"
            payload = {"error": {"message": phrase}}
    return _json.dumps(payload).encode()


async def _cut_short(request: web.Request, reply: Reply, body: bytes) -> web.StreamResponse:
    """Send the status line, the headers and half the body, then drop the connection."""
    response = web.StreamResponse(status=reply.status, headers=dict(reply.headers))
    response.content_type = "application/json"
    response.content_length = len(body) + 16
    await response.prepare(request)
    await response.write(body[: len(body) // 2])
    if request.transport is not None:
        request.transport.abort()
    # aiohttp finishes the response on a dead connection without complaint; the client sees a reset.
    return response
