"""``rlxf serve``: an OpenAI-compatible chat-completions server over any rlxf / transformers model.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``,
``GET /health``; ``HEAD`` is answered wherever ``GET`` is (headers only) and ``OPTIONS`` on every
known path (204 with ``Allow``). The HTTP layer is a Starlette (ASGI) app, :func:`build_app`, served by uvicorn
(:func:`make_server`, accept backlog :data:`BACKLOG`). Generation goes through
:class:`rlxf.rollout.HFEngine` (the rollout engine the recipes use) with the tokenizer's chat template
(:func:`rlxf.judges.local.chat_prompt_ids`); it is blocking torch work, so it runs in one worker
thread off the event loop, one request at a time in arrival order, while the server keeps accepting
connections, answering the other endpoints and refusing bad requests (validated before they queue).

Request validation (docs/serve.md has the full table): ``Content-Type: application/json`` (415
otherwise); a body no larger than ``max_request_bytes`` (413 otherwise), with a Content-Length or
chunked (411 with neither), arriving within :data:`BODY_TIMEOUT_S` (408); strict JSON (UTF-8, no
``NaN``/``Infinity``, every number finite, no key twice in one object, nesting at most
:data:`MAX_JSON_DEPTH`) holding an object; ``messages`` a non-empty list of
``{"role": "system"|"user"|"assistant", "content": str}`` (content may also be a list of
``{"type": "text", "text": str}`` parts); ``max_tokens`` (or ``max_completion_tokens``) an integer
in 1..``max_tokens_limit`` that, with the prompt, fits the model's context; ``temperature`` in
[0, 2] (0, or below :data:`GREEDY_BELOW_TEMPERATURE`, = greedy); ``top_p`` in (0, 1]; ``n`` in
1..``max_n``; ``stop`` a string or up to 4 strings; ``seed`` an integer in 0..2**63-1; ``logprobs``
a boolean and ``top_logprobs`` 0..20 (needs ``logprobs: true``; the 20 is ``max_top_logprobs``,
raise it to let a judge read every option of a model that ranks them low); ``stream: true`` is
refused. A bad request gets 400 with
``{"error": {"message", "type": "invalid_request_error", "param", "code"}}``; an unknown path 404,
a known path with the wrong method 405 (with ``Allow``), a ``model`` other than the served one 404
(``model_not_found``). With an API key (``api_key``; ``rlxf serve --api-key`` or ``RLXF_API_KEY``)
every path but ``/health`` needs ``Authorization: Bearer <key>`` (401 otherwise, compared in constant
time). Other OpenAI fields (penalties, tools, ...) are ignored. A hostile body gets a 4xx, never a 5xx
(tests/test_serve_fuzz.py); 500 is kept for failures while generating.

Differences from OpenAI, stated: the reported log-probs (``logprobs.content[].logprob`` and
``top_logprobs``) are those of the model's own distribution at temperature 1 — ``log_softmax`` of
the raw logits — whatever the sampling temperature (what a judge reading option probabilities
wants); ``usage.completion_tokens`` counts the EOS token when one was generated; a stop string is
cut from ``content`` (as OpenAI does) and so are the log-prob entries of the tokens that wrote it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import re
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from numbers import Integral, Real

import anyio
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from rlxf.judges.local import chat_prompt_ids
from rlxf.runtime.http import (BACKLOG, MAX_JSON_DEPTH, RequestError,  # noqa: F401 (re-exported)
                               check_content_type, decode_json,
                               error_response, is_loopback, json_response, json_type, listen, read_body, show,
                               start_uvicorn)
from rlxf.models import load_policy, load_tokenizer, logps_from_logits, top_logps_from_logits
from rlxf.rollout import HFEngine, SamplingParams

logger = logging.getLogger("rlxf.serve")

DEFAULT_MAX_TOP_LOGPROBS = 20  # OpenAI's limit; --max-top-logprobs raises it (as vLLM's --max-logprobs does)
MAX_STOP_STRINGS = 4
MAX_TEMPERATURE = 2.0
GREEDY_BELOW_TEMPERATURE = 1e-4  # logits / τ overflow as τ → 0; below this, sample greedily (as τ = 0)
MAX_SEED = 2**63 - 1           # torch generators take a 64-bit seed
BODY_TIMEOUT_S = 60.0          # seconds a client may take to send its request body (408 after)
API_KEY_ENV = "RLXF_API_KEY"   # where `rlxf serve` reads the API key when --api-key is not given
_ROLES = ("system", "user", "assistant")
_METHOD_ORDER = ("GET", "HEAD", "POST", "OPTIONS")
_API_KEY_RE = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces: it travels in a header




@dataclass(frozen=True)
class ChatRequest:
    """A validated chat-completions request."""

    messages: list[dict]
    max_tokens: int | None  # None: as many as the limit and the context allow
    temperature: float
    top_p: float
    n: int
    stop: tuple[str, ...]
    seed: int | None
    logprobs: bool
    top_logprobs: int


def parse_request(body, *, model_name: str, max_tokens_limit: int, max_n: int,
                  max_top_logprobs: int = DEFAULT_MAX_TOP_LOGPROBS) -> ChatRequest:
    """Validate a decoded JSON body; raise :class:`RequestError` (4xx) naming the offending field."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {json_type(body)}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"model must be a string (this server serves {model_name!r}), got {show(model)}",
                           param="model")
    if model is not None and model != model_name:
        raise RequestError(f"the model {show(model)} does not exist; this server serves {model_name!r}",
                           param="model", status=404, code="model_not_found")
    if body.get("stream"):
        raise RequestError("streaming is not supported by rlxf serve; send stream: false", param="stream")
    messages = _parse_messages(body.get("messages"))
    tokens_field = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
    max_tokens = _integer(body, tokens_field, None, low=1, high=max_tokens_limit)
    temperature = _number(body, "temperature", 1.0, low=0.0, high=MAX_TEMPERATURE)
    if temperature < GREEDY_BELOW_TEMPERATURE:
        temperature = 0.0
    top_p = _number(body, "top_p", 1.0, low=0.0, high=1.0, low_open=True)
    n = _integer(body, "n", 1, low=1, high=max_n)
    seed = _integer(body, "seed", None, low=0, high=MAX_SEED)
    logprobs = body.get("logprobs", False)
    if logprobs is None:
        logprobs = False
    if not isinstance(logprobs, bool):
        raise RequestError(f"logprobs must be true or false, got {show(logprobs)}", param="logprobs")
    top_logprobs = _integer(body, "top_logprobs", None, low=0, high=max_top_logprobs)
    if top_logprobs is not None and not logprobs:
        raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    return ChatRequest(messages=messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p, n=n,
                       stop=_parse_stop(body.get("stop")), seed=seed, logprobs=logprobs,
                       top_logprobs=top_logprobs or 0)




class ChatService:
    """The model side of the server: a validated request in, an OpenAI response dict out (no HTTP)."""

    def __init__(self, model, tokenizer, *, model_name: str, max_tokens_limit: int = 512, max_n: int = 8,
                 max_top_logprobs: int = DEFAULT_MAX_TOP_LOGPROBS):
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_tokens_limit = max_tokens_limit
        self.max_n = max_n
        self.max_top_logprobs = max_top_logprobs
        self.context_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.engine = HFEngine(model, tokenizer)
        self.created = int(time.time())
        self._lock = threading.Lock()

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "rlxf",
                "max_model_len": self.context_length}

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def complete(self, body) -> dict:
        """A decoded JSON request body in, a ``chat.completion`` dict out (:class:`RequestError` if refused)."""
        return self.respond(self.parse(body))

    def parse(self, body) -> ChatRequest:
        """Validate a decoded JSON body against this server's model and limits (no model work)."""
        return parse_request(body, model_name=self.model_name, max_tokens_limit=self.max_tokens_limit,
                             max_n=self.max_n, max_top_logprobs=self.max_top_logprobs)

    def respond(self, request: ChatRequest) -> dict:
        """Generate for a validated request: the blocking torch work, one call at a time (a lock)."""
        try:
            prompt = chat_prompt_ids(self.tokenizer, request.messages)
        except Exception as err:  # the model's chat template refuses this conversation (jinja raise_exception)
            raise RequestError(f"the model's chat template rejected the messages: {err}", param="messages") from None
        max_tokens = self._max_tokens(request, len(prompt))
        params = SamplingParams(max_new_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                                n=request.n, stop=request.stop, seed=request.seed)
        with self._lock:
            rollouts = self.engine.generate([prompt], params)
            eos_ids = set(self.engine.eos_token_ids)
            lengths = rollouts.completion_lengths().tolist()
            rows = [ids[:length] for ids, length in zip(rollouts.completion_ids.tolist(), lengths)]
            content_ids = [row[:-1] if row and row[-1] in eos_ids and reason == "stop" else row
                           for row, reason in zip(rows, rollouts.finish_reason)]
            texts = [_cut_at_stop(text, request.stop) for text in rollouts.text]
            content_ids = [self._tokens_within(ids, len(text)) if request.stop else ids
                           for ids, text in zip(content_ids, texts)]
            logprobs = (self._logprobs(prompt, content_ids, request.top_logprobs) if request.logprobs
                        else [None] * len(rows))
        choices = [{"index": j, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                    "finish_reason": reason}
                   for j, (text, lp, reason) in enumerate(zip(texts, logprobs, rollouts.finish_reason))]
        completion_tokens = sum(lengths)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                          "total_tokens": len(prompt) + completion_tokens}}

    def _max_tokens(self, request: ChatRequest, prompt_tokens: int) -> int:
        room = None if self.context_length is None else self.context_length - prompt_tokens
        if request.max_tokens is None:
            max_tokens = self.max_tokens_limit if room is None else min(self.max_tokens_limit, room)
        else:
            max_tokens = request.max_tokens
        if room is not None and (max_tokens > room or max_tokens < 1):
            raise RequestError(f"this model's context is {self.context_length} tokens; the messages take "
                               f"{prompt_tokens} and {max_tokens} more were requested; shorten the messages "
                               "or lower max_tokens", param="messages", code="context_length_exceeded")
        return max_tokens

    def _tokens_within(self, ids: list[int], chars: int) -> list[int]:
        """The leading tokens of ``ids`` that start before character ``chars`` of the decoded text."""
        kept, seen = [], 0
        for token in ids:
            if seen >= chars:
                break
            kept.append(token)
            seen += len(self.tokenizer.decode([token], skip_special_tokens=True))
        return kept

    def _logprobs(self, prompt: list[int], rows: list[list[int]], k: int) -> list[dict]:
        """OpenAI ``logprobs`` objects: each content token's log-prob and the top ``k`` alternatives
        (temperature 1), from one forward over prompt + completion."""
        out = []
        device = self.model.get_input_embeddings().weight.device
        with torch.no_grad():
            for ids in rows:
                if not ids:
                    out.append({"content": []})
                    continue
                input_ids = torch.tensor([prompt + ids], device=device)                   # [1, P + C]
                logits = self.model(input_ids=input_ids).logits[0, len(prompt) - 1:-1]   # [C, V]
                chosen = logps_from_logits(logits, torch.tensor(ids, device=device)).tolist()
                top_values, top_ids = top_logps_from_logits(logits, k) if k else (None, None)
                content = []
                for t, token in enumerate(ids):
                    entry = self._token_entry(token, chosen[t])
                    entry["top_logprobs"] = ([] if top_ids is None else
                                             [self._token_entry(i, v) for i, v in
                                              zip(top_ids[t].tolist(), top_values[t].tolist())])
                    content.append(entry)
                out.append({"content": content})
        return out

    def _token_entry(self, token: int, logprob: float) -> dict:
        text = self.tokenizer.decode([token], skip_special_tokens=False)
        return {"token": text, "logprob": logprob if math.isfinite(logprob) else -9999.0,
                "bytes": list(text.encode("utf-8", errors="replace"))}


# -- HTTP layer (Starlette) ----------------------------------------------------------------------

def build_app(service: ChatService, *, max_request_bytes: int = 1_000_000, api_key: str | None = None) -> Starlette:
    """The ASGI app of ``rlxf serve`` over ``service``: serve it with uvicorn (:func:`make_server`
    does), or call it in-process with ``starlette.testclient.TestClient``.

    ``api_key``: when given, every path but ``/health`` needs ``Authorization: Bearer <api_key>``.
    """
    _check_limits(max_request_bytes=max_request_bytes)
    _check_api_key(api_key)
    api = _Api(service, max_request_bytes)
    routes = [Route("/v1/models", api.models, methods=["GET"]),
              Route("/v1/models/{model_id:path}", api.model, methods=["GET"]),
              Route("/v1/chat/completions", api.chat, methods=["POST"]),
              Route("/health", api.health, methods=["GET"])]
    app = Starlette(routes=routes, middleware=[Middleware(_Front, api_key=api_key)],
                    exception_handlers={RequestError: _request_error, HTTPException: _http_error,
                                        Exception: _internal_error})
    app.state.service, app.state.generator = service, api.generator
    return app


class _Api:
    """The endpoints; generation runs in one worker thread, so requests generate one at a time."""

    def __init__(self, service: ChatService, max_request_bytes: int):
        self.service = service
        self.max_request_bytes = max_request_bytes
        self.generator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlxf-serve-generate")

    async def models(self, request: Request) -> Response:
        return json_response(200, self.service.models())

    async def model(self, request: Request) -> Response:
        model_id = request.path_params["model_id"]
        if model_id != self.service.model_name:
            raise RequestError(f"the model {model_id!r} does not exist; this server serves "
                               f"{self.service.model_name!r}", param="model", status=404, code="model_not_found")
        return json_response(200, self.service.model_card())

    async def health(self, request: Request) -> Response:
        return json_response(200, {"status": "ok"})

    async def chat(self, request: Request) -> Response:
        check_content_type(request.headers.get("content-type"))
        raw = await read_body(request, self.max_request_bytes, timeout_s=BODY_TIMEOUT_S)
        body = await anyio.to_thread.run_sync(decode_json, raw)  # off the loop: a pathological 1 MB takes ~0.5 s
        chat_request = self.service.parse(body)  # refusals answer at once, without waiting for the model
        loop = asyncio.get_running_loop()
        try:
            response = await loop.run_in_executor(self.generator, self.service.respond, chat_request)
        except RequestError:
            raise
        except Exception as err:  # a bug or a device error: answer 500, keep serving
            logger.exception("rlxf serve: request failed")
            raise RequestError(f"internal error: {type(err).__name__}: {err}", status=500,
                               type_="server_error") from None
        return json_response(200, response)


class _Front:
    """Pure ASGI middleware in front of the routes: drops trailing slashes from the path (``/v1/models/``
    is ``/v1/models``) and, with an API key, answers 401 to a request on any path but ``/health``
    that lacks ``Authorization: Bearer <key>``."""

    def __init__(self, app, api_key: str | None = None):
        self.app = app
        self.api_key = None if api_key is None else api_key.encode("ascii")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope = {**scope, "path": scope["path"].rstrip("/") or "/"}
        if self.api_key is not None and scope["path"] != "/health" and not self._authorised(scope):
            err = RequestError("this server needs an API key: send the header 'Authorization: Bearer <key>' "
                               f"with the key it was started with (rlxf serve --api-key, or {API_KEY_ENV})",
                               status=401, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            return await error_response(err)(scope, receive, send)
        await self.app(scope, receive, send)

    def _authorised(self, scope) -> bool:
        value = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = value.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)








async def _request_error(request: Request, err: RequestError) -> Response:
    return error_response(err)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's routing errors (404, 405) as OpenAI errors; ``OPTIONS`` on a known path is a 204."""
    path = request.url.path.rstrip("/") or "/"
    if exc.status_code == 405:
        methods = {m.strip() for m in (exc.headers or {}).get("Allow", "").split(",")} | {"OPTIONS"}
        allow = ", ".join(m for m in _METHOD_ORDER if m in methods)
        if request.method == "OPTIONS":
            return Response(status_code=204, headers={"Allow": allow})
        use = " or ".join(m for m in _METHOD_ORDER if m in methods and m not in ("HEAD", "OPTIONS"))
        return error_response(RequestError(f"{request.method} is not allowed on {path}; use {use}",
                                            status=405, code="method_not_allowed", headers={"Allow": allow}))
    if exc.status_code == 404:
        return error_response(RequestError(f"unknown path {path!r}; rlxf serve has GET /v1/models, "
                                            "GET /v1/models/{id}, POST /v1/chat/completions and GET /health",
                                            status=404, code="not_found"))
    return error_response(RequestError(str(exc.detail), status=exc.status_code))


async def _internal_error(request: Request, exc: Exception) -> Response:
    return error_response(RequestError(f"internal error: {type(exc).__name__}: {exc}", status=500,
                                        type_="server_error"))






# -- running it ----------------------------------------------------------------------------------

class RunningServer:
    """``rlxf serve`` running in a background thread: what :func:`make_server` returns.

    ``base_url`` (``http://host:port/v1``), ``model_name``, ``server_address`` (``(host, port)`` as
    bound), ``service`` (:class:`ChatService`) and ``app`` (the Starlette app). Stop with
    ``shutdown()`` then ``server_close()``.
    """

    def __init__(self, app: Starlette, sock: socket.socket, server: uvicorn.Server, thread: threading.Thread):
        self.app, self.service = app, app.state.service
        self.model_name = self.service.model_name
        self.server_address = sock.getsockname()[:2]
        host, port = self.server_address
        self.base_url = f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"
        self._socket, self._server, self._thread = sock, server, thread

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting, let requests in progress finish (up to ``timeout`` seconds), stop the thread."""
        self._server.should_exit = True
        self._thread.join(timeout)
        self.app.state.generator.shutdown(wait=False, cancel_futures=True)

    def server_close(self) -> None:
        """Close the listening socket (after :meth:`shutdown`; closing twice is harmless)."""
        self._socket.close()


def make_server(model_path: str = "tiny", host: str = "127.0.0.1", port: int = 8000, *,
                max_request_bytes: int = 1_000_000, max_tokens_limit: int = 512, max_n: int = 8,
                max_top_logprobs: int = DEFAULT_MAX_TOP_LOGPROBS, device: str = "auto",
                model_name: str | None = None, model=None, tokenizer=None,
                api_key: str | None = None) -> tuple[RunningServer, threading.Thread]:
    """Load the model (or use ``model``/``tokenizer`` as given) and serve it with uvicorn in a daemon thread.

    Returns ``(server, thread)`` once the server accepts connections; ``server.base_url`` is
    ``http://host:port/v1`` (port 0 picks a free port) and ``server.model_name`` the served id. Stop
    with ``server.shutdown(); server.server_close()``. ``model_name`` (default ``model_path``) is the
    id ``/v1/models`` lists and requests must name (or omit). ``api_key``: see :func:`build_app`;
    listening on a non-loopback address without one logs a warning.
    """
    _check_limits(max_request_bytes=max_request_bytes, max_tokens_limit=max_tokens_limit, max_n=max_n,
                  max_top_logprobs=max_top_logprobs)
    _check_api_key(api_key)
    if tokenizer is None:
        tokenizer = load_tokenizer(model_path)
    if model is None:
        model = load_policy(model_path, device=device, resize_to=len(tokenizer))
    service = ChatService(model, tokenizer, model_name=model_name or model_path,
                          max_tokens_limit=max_tokens_limit, max_n=max_n, max_top_logprobs=max_top_logprobs)
    app = build_app(service, max_request_bytes=max_request_bytes, api_key=api_key)
    sock = listen(host, port)
    warning = exposure_warning(host, api_key)
    if warning:
        logger.warning(warning)
    server, thread = start_uvicorn(app, sock, name="rlxf-serve")
    return RunningServer(app, sock, server, thread), thread


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning for listening beyond this machine without an API key (None when loopback or keyed)."""
    if api_key or is_loopback(host):
        return None
    return (f"rlxf serve: listening on {host or 'every interface'} with no API key: anyone who can reach this "
            f"address can use the model. Set {API_KEY_ENV}=<key> (or --api-key <key>) so that requests must "
            "send 'Authorization: Bearer <key>', or listen on 127.0.0.1 (--host 127.0.0.1)")






# -- validation helpers ------------------------------------------------------------------------

def _check_limits(**limits) -> None:
    for name, value in limits.items():
        if not _is_int(value) or value < 1:
            raise ValueError(f"rlxf serve: {name} must be an integer >= 1, got {value!r}")


def _check_api_key(api_key) -> None:
    if api_key is not None and not (isinstance(api_key, str) and _API_KEY_RE.fullmatch(api_key)):
        raise ValueError(f"rlxf serve: the API key (--api-key or {API_KEY_ENV}) must be a non-empty string of "
                         "printable ASCII without spaces, as it travels in 'Authorization: Bearer <key>'; "
                         f"got {'an empty string' if api_key == '' else 'another value'}")


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _integer(body: dict, name: str, default: int | None, *, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or not low <= value <= high:
        raise RequestError(f"{name} must be an integer in {low}..{high}, got {show(value)}", param=name)
    return int(value)


def _number(body: dict, name: str, default: float, *, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, Real) and not isinstance(value, bool)
    # exact comparisons first (a huge integer does not fit a float); NaN fails them
    ok = ok and (value > low if low_open else value >= low) and value <= high and math.isfinite(value)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise RequestError(f"{name} must be a number in {interval}, got {show(value)}", param=name)
    return float(value)


def _parse_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {\"role\", \"content\"} objects",
                           param="messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with role and content", param=where)
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise RequestError(f"{where}.role must be one of {list(_ROLES)}, got {show(role)}",
                               param=f"{where}.role")
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts: only text parts are accepted
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(f"{where}.content parts must all be {{\"type\": \"text\", \"text\": str}}",
                                   param=f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"{where}.content must be a string, got {json_type(content)}",
                               param=f"{where}.content")
        _check_text(content, f"{where}.content")
        out.append({"role": role, "content": content})
    return out


def _parse_stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if (not isinstance(items, list) or len(items) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in items)):
        raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} "
                           f"non-empty strings, got {show(stop)}", param="stop")
    for item in items:
        _check_text(item, "stop")
    return tuple(items)


def _check_text(text: str, param: str) -> None:
    """Refuse a string that is not Unicode text (a lone surrogate such as ``"\\ud800"``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(f"{param} holds a lone surrogate ({text[err.start]!r} at character {err.start}), "
                           "which is not Unicode text; send the character as a valid surrogate pair or "
                           "drop it", param=param) from None


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[:min(cuts)] if cuts else text












