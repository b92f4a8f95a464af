"""The HTTP layer the server's promises rest on, below the routes: ``Guard``, ``RecordedFileResponse``, the
uvicorn protocol and :func:`server_config`.

- :class:`Guard` (pure ASGI middleware, outermost of the app's own): refuses foreign ``Host`` headers when
  asked to, adds :data:`SECURITY_HEADERS` to every response (errors, the ``Host`` refusal and 500s included),
  answers ``HEAD`` as the ``GET`` of the same URL without a body, and turns an exception that escapes a route
  into a JSON 500 (one log line with the traceback, never in the answer).
- :class:`RecordedFileResponse`: a file the policy of ``files.py`` opened, streamed from its descriptor (so
  what is sent is what was checked, even if the path is swapped meanwhile), with single-range requests
  (``206``), unsatisfiable ranges as a JSON ``416``, and no body for ``HEAD``.
- :func:`guarded_protocol`: uvicorn's HTTP protocol whose answer to a request it cannot parse ("Invalid HTTP
  request") is a JSON 400 with the same headers; :func:`server_config` is the uvicorn configuration
  ``search.py serve`` (and the tests) run the app with.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

from starlette.responses import Response

logger = logging.getLogger("clip2video.search.app")

# The page loads nothing from elsewhere; the policy makes the browser enforce it.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; media-src 'self'; "
                                 b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
CHUNK = 256 * 1024
HEAD_FLAG = "clip2video.head"  # set in the scope of a HEAD request answered as a GET


def json_body(status: int, message: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(headers, body) of a JSON error ``{"error": message}``."""
    body = json.dumps({"error": message}).encode()
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())], body


async def send_json(send, status: int, message: str, extra: list[tuple[bytes, bytes]] = ()) -> None:
    headers, body = json_body(status, message)
    await send({"type": "http.response.start", "status": status, "headers": headers + list(extra)})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _host_name(header: str) -> str:
    """The host part of a ``Host`` header (``[::1]:8000`` → ``::1``, ``localhost:8000`` → ``localhost``)."""
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """Pure ASGI middleware (file bodies stream through untouched); see the module doc."""

    def __init__(self, app, allowed_hosts: list[str] | None = None):
        self.app = app
        self.allowed = {h.strip("[]").lower() for h in allowed_hosts} if allowed_hosts else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        head = scope.get("method") == "HEAD"
        started = False

        async def guarded_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                names = {k.lower() for k, _ in message.get("headers", [])}
                message = dict(message, headers=list(message.get("headers", [])) + [
                    (k, v) for k, v in SECURITY_HEADERS if k not in names])
            elif message["type"] == "http.response.body" and head and message.get("body"):
                message = dict(message, body=b"")
            await send(message)

        if self.allowed is not None:
            host = dict(scope.get("headers", [])).get(b"host", b"").decode("latin-1")
            if _host_name(host).lower() not in self.allowed:
                return await send_json(guarded_send, 400, f"Host {host[:100]!r} not allowed (loopback server)")
        if head:
            scope = dict(scope, method="GET")
            scope[HEAD_FLAG] = True
        try:
            await self.app(scope, receive, guarded_send)
        except Exception:  # noqa: BLE001 - a bug: logged once here, answered without a traceback
            logger.error("internal error on %s %s", scope.get("method"), scope.get("path", "")[:200], exc_info=True)
            if not started:
                await send_json(guarded_send, 500, "internal error (see the server log)")


class RecordedFileResponse(Response):
    """An ASGI response streaming an open file descriptor (closed when done), honouring one byte range.

    ``stat`` is the descriptor's ``fstat`` taken when the policy checked it; the length sent is that size.
    Several ranges in one request are answered with the whole file (RFC 9110 lets a server ignore ``Range``).
    A ``Response`` subclass only so that the framework passes it through as it is.
    """

    def __init__(self, fd: int, stat: os.stat_result, media_type: str, range_header: str | None = None):
        self.background = None
        self.status_code = 200
        self.raw_headers = []
        self.fd = fd
        self.size = stat.st_size
        self.media_type = media_type
        self.range_header = range_header

    def _range(self) -> tuple[int, int] | str | None:
        """(start, end inclusive), None for the whole file, or "unsatisfiable"."""
        from clip2video.search.limits import strict_int

        raw = (self.range_header or "").strip()
        if not raw.lower().startswith("bytes=") or "," in raw:
            return None
        first, dash, last = raw[6:].strip().partition("-")
        if not dash:
            return None
        a, b = strict_int(first.strip(), 18), strict_int(last.strip(), 18)
        if first.strip() == "":  # suffix: the last b bytes
            if b is None:
                return None
            if b == 0 or self.size == 0:
                return "unsatisfiable"
            return max(self.size - b, 0), self.size - 1
        if a is None or (last.strip() and b is None) or (b is not None and b < a):
            return None
        if a >= self.size:
            return "unsatisfiable"
        return a, min(b if b is not None else self.size - 1, self.size - 1)

    async def __call__(self, scope, receive, send):
        try:
            span = self._range()
            if span == "unsatisfiable":
                return await send_json(send, 416, f"range {self.range_header[:100]!r} not satisfiable (the file "
                                                  f"has {self.size} bytes)",
                                       [(b"content-range", f"bytes */{self.size}".encode())])
            start, end = span if span is not None else (0, self.size - 1)
            length = max(end - start + 1, 0)
            headers = [(b"content-type", self.media_type.encode("latin-1")),
                       (b"content-length", str(length).encode()), (b"accept-ranges", b"bytes")]
            if span is not None:
                headers.append((b"content-range", f"bytes {start}-{end}/{self.size}".encode()))
            await send({"type": "http.response.start", "status": 206 if span is not None else 200,
                        "headers": headers})
            if scope.get(HEAD_FLAG) or scope.get("method") == "HEAD" or length == 0:
                return await send({"type": "http.response.body", "body": b"", "more_body": False})
            pos, left = start, length
            while left > 0:
                data = await asyncio.to_thread(os.pread, self.fd, min(CHUNK, left), pos)
                if not data:  # the file shrank while being sent: the client sees a short body
                    logger.warning("file of fd %d shrank while being sent; answer cut short", self.fd)
                    return
                pos += len(data)
                left -= len(data)
                await send({"type": "http.response.body", "body": data, "more_body": left > 0})
        finally:
            os.close(self.fd)


# ----------------------------------------------------------------------------------------------- uvicorn
INVALID_REQUEST = "invalid HTTP request"


def guarded_protocol() -> type:
    """uvicorn's HTTP protocol class (httptools when installed, else h11) answering an unparsable request with a
    JSON 400 carrying :data:`SECURITY_HEADERS` instead of uvicorn's plain-text one."""
    try:
        import httptools  # noqa: F401
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class GuardedProtocol(Base):
        def send_400_response(self, msg: str) -> None:  # noqa: ARG002 - uvicorn's text is replaced
            headers, body = json_body(400, INVALID_REQUEST)
            lines = [b"HTTP/1.1 400 Bad Request\r\n"]
            defaults = list(getattr(self.server_state, "default_headers", []))
            for name, value in defaults + headers + SECURITY_HEADERS + [(b"connection", b"close")]:
                lines += [name, b": ", value, b"\r\n"]
            self.transport.write(b"".join([*lines, b"\r\n", body]))
            self.transport.close()

    GuardedProtocol.__name__ = GuardedProtocol.__qualname__ = f"Guarded{Base.__name__}"
    return GuardedProtocol


def server_config(app, **kwargs: Any):
    """The uvicorn configuration the app is served with (the guarded protocol, no WebSocket upgrades)."""
    import uvicorn

    kwargs.setdefault("http", guarded_protocol())
    kwargs.setdefault("ws", "none")
    return uvicorn.Config(app, **kwargs)


__all__ = ["SECURITY_HEADERS", "Guard", "RecordedFileResponse", "guarded_protocol", "send_json", "server_config"]
