"""``rlxf serve``: an OpenAI-compatible chat-completions server over any rlxf / transformers model.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``,
``GET /health``. Generation goes through :class:`rlxf.rollout.HFEngine` (the rollout engine the
recipes use) with the tokenizer's chat template (:func:`rlxf.judges.local.chat_prompt_ids`); one
request generates at a time (a lock), other connections wait. Standard library HTTP server only.

Request validation (docs/serve.md has the full table): the body must be a JSON object no larger
than ``max_request_bytes`` (413 otherwise; 411 without a Content-Length); ``messages`` a non-empty
list of ``{"role": "system"|"user"|"assistant", "content": str}`` (content may also be a list of
``{"type": "text", "text": str}`` parts); ``max_tokens`` (or ``max_completion_tokens``) an integer
in 1..``max_tokens_limit`` that, with the prompt, fits the model's context; ``temperature`` in
[0, 2] (0 = greedy); ``top_p`` in (0, 1]; ``n`` in 1..``max_n``; ``stop`` a string or up to 4
strings; ``seed`` an integer >= 0; ``logprobs`` a boolean and ``top_logprobs`` 0..20 (needs
``logprobs: true``; the 20 is ``max_top_logprobs``, raise it to let a judge read every option of a
model that ranks them low); ``stream: true`` is refused. A bad request gets 400 with
``{"error": {"message", "type": "invalid_request_error", "param", "code"}}``; an unknown path 404,
a known path with the wrong method 405, a ``model`` other than the served one 404
(``model_not_found``). Other OpenAI fields (penalties, tools, ...) are ignored.

Differences from OpenAI, stated: the reported log-probs (``logprobs.content[].logprob`` and
``top_logprobs``) are those of the model's own distribution at temperature 1 — ``log_softmax`` of
the raw logits — whatever the sampling temperature (what a judge reading option probabilities
wants); ``usage.completion_tokens`` counts the EOS token when one was generated; a stop string is
cut from ``content`` (as OpenAI does) and so are the log-prob entries of the tokens that wrote it.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from numbers import Integral, Real

import torch

from rlxf.judges.local import chat_prompt_ids
from rlxf.models import load_policy, load_tokenizer, logps_from_logits, top_logps_from_logits
from rlxf.rollout import HFEngine, SamplingParams

logger = logging.getLogger("rlxf.serve")

DEFAULT_MAX_TOP_LOGPROBS = 20  # OpenAI's limit; --max-top-logprobs raises it (as vLLM's --max-logprobs does)
MAX_STOP_STRINGS = 4
MAX_TEMPERATURE = 2.0
_DRAIN_LIMIT = 64 * 1024 * 1024  # an oversized body is read (and dropped) up to this size before the 413
_ROLES = ("system", "user", "assistant")


class RequestError(Exception):
    """A request rlxf serve refuses: becomes an HTTP error with an OpenAI-shaped JSON body."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400,
                 code: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


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
    """Validate a decoded JSON body; raise :class:`RequestError` naming the offending field."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and model != model_name:
        raise RequestError(f"the model {model!r} does not exist; this server serves {model_name!r}",
                           param="model", status=404, code="model_not_found")
    if body.get("stream"):
        raise RequestError("streaming is not supported by rlxf serve; send stream: false", param="stream")
    messages = _parse_messages(body.get("messages"))
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None and (not _is_int(max_tokens) or not 1 <= max_tokens <= max_tokens_limit):
        raise RequestError(f"max_tokens must be an integer in 1..{max_tokens_limit}, got {max_tokens!r}",
                           param="max_tokens")
    temperature = _number(body, "temperature", 1.0, low=0.0, high=MAX_TEMPERATURE)
    top_p = _number(body, "top_p", 1.0, low=0.0, high=1.0, low_open=True)
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not _is_int(n) or not 1 <= n <= max_n:
        raise RequestError(f"n must be an integer in 1..{max_n}, got {n!r}", param="n")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise RequestError(f"seed must be an integer >= 0, got {seed!r}", param="seed")
    logprobs = body.get("logprobs", False)
    if logprobs is None:
        logprobs = False
    if not isinstance(logprobs, bool):
        raise RequestError(f"logprobs must be true or false, got {logprobs!r}", param="logprobs")
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None:
        if not _is_int(top_logprobs) or not 0 <= top_logprobs <= max_top_logprobs:
            raise RequestError(f"top_logprobs must be an integer in 0..{max_top_logprobs}, got {top_logprobs!r}",
                               param="top_logprobs")
        if not logprobs:
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
        request = parse_request(body, model_name=self.model_name, max_tokens_limit=self.max_tokens_limit,
                                max_n=self.max_n, max_top_logprobs=self.max_top_logprobs)
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
                "bytes": list(text.encode("utf-8"))}


class _Handler(BaseHTTPRequestHandler):
    service: ChatService
    max_request_bytes: int
    timeout = 60  # seconds a client may take to send its request
    server_version = "rlxf-serve"

    def do_GET(self):
        path = self._path()
        if path == "/v1/models":
            return self._send(200, self.service.models())
        if path == f"/v1/models/{self.service.model_name}":
            return self._send(200, self.service.model_card())
        if path.startswith("/v1/models/"):
            return self._error(RequestError(f"the model {path[len('/v1/models/'):]!r} does not exist; this "
                                            f"server serves {self.service.model_name!r}", param="model",
                                            status=404, code="model_not_found"))
        if path == "/health":
            return self._send(200, {"status": "ok"})
        self._not_allowed_or_found(path)

    def do_POST(self):
        path = self._path()
        if path != "/v1/chat/completions":
            return self._not_allowed_or_found(path)
        try:
            body = self._read_json()
            response = self.service.complete(body)
        except RequestError as err:
            return self._error(err)
        except Exception as err:  # a bug or a device error: answer 500, keep serving
            logger.exception("rlxf serve: request failed")
            return self._error(RequestError(f"internal error: {type(err).__name__}: {err}", status=500,
                                            type_="server_error"))
        self._send(200, response)

    def do_PUT(self):
        self._not_allowed_or_found(self._path())

    do_DELETE = do_PATCH = do_PUT

    # -- helpers --------------------------------------------------------------------------------

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/") or "/"

    def _read_json(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or self.headers.get("Content-Length") is None:
            raise RequestError("a Content-Length header is required (chunked bodies are not accepted)", status=411)
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            raise RequestError(f"bad Content-Length {self.headers['Content-Length']!r}") from None
        if length < 0:
            raise RequestError(f"bad Content-Length {length}")
        if length > self.max_request_bytes:
            self._drain(length)
            raise RequestError(f"the request body is {length} bytes; this server accepts at most "
                               f"{self.max_request_bytes} (rlxf serve --max-request-bytes)", status=413)
        raw = self.rfile.read(length)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise RequestError(f"the request body is not valid JSON: {err}") from None

    def _drain(self, length: int) -> None:
        """Read and drop an oversized body (up to a cap) so the client sees the 413, not a reset."""
        left = min(length, _DRAIN_LIMIT)
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)
        self.close_connection = True

    def _not_allowed_or_found(self, path: str) -> None:
        allowed = {"/v1/models": "GET", "/health": "GET", "/v1/chat/completions": "POST"}.get(path)
        if allowed is None and path.startswith("/v1/models/"):
            allowed = "GET"
        if allowed is None:
            return self._error(RequestError(f"unknown path {path!r}; rlxf serve has GET /v1/models and "
                                            "POST /v1/chat/completions", status=404, code="not_found"))
        self._error(RequestError(f"{self.command} is not allowed on {path}; use {allowed}", status=405,
                                 code="method_not_allowed"), headers={"Allow": allowed})

    def _error(self, err: RequestError, headers: dict | None = None) -> None:
        self._send(err.status, err.body(), headers)

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's signature)
        logger.info("%s %s", self.address_string(), format % args)


def make_server(model_path: str = "tiny", host: str = "127.0.0.1", port: int = 8000, *,
                max_request_bytes: int = 1_000_000, max_tokens_limit: int = 512, max_n: int = 8,
                max_top_logprobs: int = DEFAULT_MAX_TOP_LOGPROBS, device: str = "auto",
                model_name: str | None = None, model=None, tokenizer=None) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Load the model (or use ``model``/``tokenizer`` as given) and start serving in a daemon thread.

    Returns ``(server, thread)``; ``server.base_url`` is ``http://host:port/v1`` (port 0 picks a free
    port) and ``server.model_name`` the served id. Stop with ``server.shutdown(); server.server_close()``. ``model_name`` (default
    ``model_path``) is the id ``/v1/models`` lists and requests must name (or omit).
    """
    for name, value in (("max_request_bytes", max_request_bytes), ("max_tokens_limit", max_tokens_limit),
                        ("max_n", max_n), ("max_top_logprobs", max_top_logprobs)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"rlxf serve: {name} must be an integer >= 1, got {value!r}")
    if tokenizer is None:
        tokenizer = load_tokenizer(model_path)
    if model is None:
        model = load_policy(model_path, device=device, resize_to=len(tokenizer))
    service = ChatService(model, tokenizer, model_name=model_name or model_path,
                          max_tokens_limit=max_tokens_limit, max_n=max_n, max_top_logprobs=max_top_logprobs)
    handler = type("RlxfServeHandler", (_Handler,), {"service": service, "max_request_bytes": max_request_bytes})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    bound_host, bound_port = server.server_address[:2]
    server.base_url = f"http://{bound_host}:{bound_port}/v1"
    server.model_name = service.model_name
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="rlxf-serve",
                              daemon=True)
    thread.start()
    return server, thread


# -- validation helpers ------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _number(body: dict, name: str, default: float, *, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise RequestError(f"{name} must be a number in {interval}, got {value!r}", param=name)
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
        if role not in _ROLES:
            raise RequestError(f"{where}.role must be one of {list(_ROLES)}, got {role!r}", param=f"{where}.role")
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts: only text parts are accepted
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(f"{where}.content parts must all be {{\"type\": \"text\", \"text\": str}}",
                                   param=f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"{where}.content must be a string, got {type(content).__name__}",
                               param=f"{where}.content")
        out.append({"role": role, "content": content})
    return out


def _parse_stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if (not isinstance(items, list) or len(items) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in items)):
        raise RequestError(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} "
                           f"non-empty strings, got {stop!r}", param="stop")
    return tuple(items)


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[:min(cuts)] if cuts else text
