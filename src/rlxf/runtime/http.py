"""HTTP plumbing shared by the servers of rlxf (``rlxf serve``, docs/serve.md, and ``rlxf label
serve``, docs/labeling.md): a request error with a JSON body, strict JSON decoding, a bounded body
reader, the listening socket and a uvicorn server in a background thread. No torch here.

Strict JSON (RFC 8259): UTF-8 only, no ``NaN``/``Infinity``, every number finite, no key twice in
one object, arrays/objects nested at most :data:`MAX_JSON_DEPTH` deep. Bodies: a Content-Length or
chunked (411 with neither), at most a limit (413), arriving in time (408).
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import math
import re
import socket
import threading
import time

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

MAX_JSON_DEPTH = 64            # nesting of arrays/objects in a request body (a chat request needs 4)
BACKLOG = 2048                 # connections the kernel queues while the server is busy accepting
DRAIN_LIMIT = 64 * 1024 * 1024  # an oversized body is read (and dropped) up to this size before the 413
_JSON_STRING_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET_RE = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}.__getitem__


class RequestError(Exception):
    """A request a server refuses: becomes an HTTP error with an OpenAI-shaped JSON body
    (``{"error": {"message", "type", "param", "code"}}``)."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 code: str | None = None, type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type_
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def decode_json(raw: bytes):
    """Decode a request body as strict JSON (RFC 8259); raise :class:`RequestError` (400) naming the problem.

    UTF-8 only; no ``NaN``/``Infinity``; every number finite (``1e309`` is refused, not read as
    infinity); no key twice in one object (parsers disagree on which one wins); arrays/objects
    nested at most :data:`MAX_JSON_DEPTH` deep.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(f"the request body is not valid UTF-8 (byte {err.start}: {err.reason}); "
                           "send JSON encoded as UTF-8") from None
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise RequestError(f"the request body nests arrays/objects {depth} deep; this server accepts at most "
                           f"{MAX_JSON_DEPTH}")
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float,
                          object_pairs_hook=_unique_keys)
    except RecursionError:
        raise RequestError(f"the request body nests too deep to decode; keep it under {MAX_JSON_DEPTH} levels") from None
    except RequestError:
        raise
    except ValueError as err:  # json.JSONDecodeError, or an integer beyond Python's digit limit
        raise RequestError(f"the request body is not valid JSON: {err}") from None


async def read_body(request: Request, limit: int, *, timeout_s: float = 60.0,
                    limit_hint: str = "rlxf serve --max-request-bytes") -> bytes:
    """The request body, at most ``limit`` bytes, within ``timeout_s`` seconds.

    411 without a Content-Length or chunked encoding; 413 beyond ``limit`` (the rest of the body is
    read and dropped, up to 64 MiB, so the client sees the 413 and not a reset); 408 when it does not
    arrive in time.
    """
    length = request.headers.get("content-length")
    chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
    if length is None and not chunked:
        raise RequestError("a request body is required: send it with a Content-Length header (or chunked)",
                           status=411)
    if length is not None and not (length.strip().isascii() and length.strip().isdigit()):
        raise RequestError(f"bad Content-Length {length!r}; send the body's size in bytes")
    declared = int(length) if length is not None else 0
    too_large = declared > limit
    if too_large and (declared > DRAIN_LIMIT or "100-continue" in request.headers.get("expect", "").lower()):
        raise _too_large(declared, limit, limit_hint, close=True)  # not worth reading, or not yet sent: close instead
    chunks, received = [], 0
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in request.stream():
                received += len(chunk)
                too_large = too_large or received > limit
                if too_large and received > DRAIN_LIMIT:
                    raise _too_large(received, limit, limit_hint, close=True)
                if not too_large:
                    chunks.append(chunk)
    except TimeoutError:
        raise RequestError(f"the request body did not arrive within {timeout_s:g} s ({received} bytes "
                           "came); send the whole body at once", status=408,
                           headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise RequestError("the client closed the connection before the whole body arrived") from None
    if too_large:
        raise _too_large(max(declared, received), limit, limit_hint, close=False)
    return b"".join(chunks)


def _too_large(size: int, limit: int, hint: str, *, close: bool) -> RequestError:
    return RequestError(f"the request body is {size} bytes; this server accepts at most {limit} "
                        f"({hint})", status=413,
                        headers={"Connection": "close"} if close else None)


def check_content_type(value: str | None) -> None:
    media_type, *params = (value or "").split(";")
    charsets = [p.split("=", 1)[1].strip().strip('"').lower() for p in params
                if p.split("=", 1)[0].strip().lower() == "charset" and "=" in p]
    if media_type.strip().lower() != "application/json" or any(c not in ("utf-8", "utf8") for c in charsets):
        raise RequestError(f"the request body must be JSON sent with 'Content-Type: application/json' (UTF-8), "
                           f"got {'no Content-Type' if value is None else repr(value)}; with curl, add "
                           "-H 'Content-Type: application/json'", status=415,
                           code="unsupported_media_type")


def error_response(err: RequestError) -> Response:
    return json_response(err.status, err.body(), err.headers)


def json_response(status: int, payload: dict, headers: dict | None = None) -> Response:
    return Response(json.dumps(payload, allow_nan=False), status_code=status, headers=headers,
                    media_type="application/json")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name: loopback when every address it resolves to is
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except OSError:
            return False
        return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def listen(host: str, port: int, *, what: str = "rlxf serve") -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening with :data:`BACKLOG` (port 0: a free port)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]") or None, port,
                                                             type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except OSError as err:
        raise OSError(f"{what}: cannot resolve --host {host!r}: {err}; give an IP address or a known "
                      "name (127.0.0.1 = this machine only)") from err
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as err:
        sock.close()
        raise OSError(f"{what}: cannot listen on {host}:{port}: {err.strerror or err}; choose another "
                      "--port (0 picks a free one) or --host") from err
    return sock


def show(value, limit: int = 60) -> str:
    """A short ``repr`` of a request value for an error message."""
    try:
        text = repr(value)
    except ValueError:  # an integer too long for str(): Python's digit limit
        return f"an integer of {value.bit_length()} bits"
    except RecursionError:
        return f"a {json_type(value)} nested too deep to print"
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
             int: "an integer", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _json_depth(text: str) -> int:
    """How deep arrays/objects nest in ``text`` (exact for valid JSON): the brackets outside strings,
    each opening one +1 and each closing one -1, at their highest running sum."""
    brackets = text.count("[") + text.count("{")
    if brackets <= MAX_JSON_DEPTH:
        return brackets  # cannot nest deeper than it has brackets
    outside_strings = _NOT_BRACKET_RE.sub("", _JSON_STRING_RE.sub("", text))
    return max(itertools.accumulate(map(_BRACKET_STEP, outside_strings)), default=0)


def _refuse_constant(name: str):
    raise RequestError(f"{name} is not valid JSON (JSON has no NaN or Infinity); send a finite number or null")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        shown = text if len(text) <= 40 else f"{text[:37]}..."
        raise RequestError(f"the number {shown} is beyond the range of a double (about 1.8e308); "
                           "send a finite number")
    return value


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise RequestError(f"the key {show(duplicate)} appears twice in one JSON object; send each field once")
    return obj



def start_uvicorn(app, sock: socket.socket, *, name: str, threaded: bool = True):
    """Serve the ASGI ``app`` on the listening ``sock`` with uvicorn; returns ``(server, thread)`` once
    it accepts connections (``thread`` None with ``threaded`` False: the caller runs ``server.run``).
    Stop with ``server.should_exit = True`` and join the thread."""
    import uvicorn

    config = uvicorn.Config(app, log_config=None, log_level="error", access_log=False, lifespan="off",
                            ws="none", proxy_headers=False, server_header=False, backlog=BACKLOG,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    if not threaded:
        return server, None
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"{name}: the HTTP server did not start (its error is logged above)")
        time.sleep(0.01)
    return server, thread
