"""HTTPBackend: any OpenAI-compatible chat-completions server as a judge (vLLM, llama.cpp server,
Ollama, a hosted API, or ``rlxf serve``). Standard library only (``urllib``, threads).

Requests: ``POST {base_url}/chat/completions`` with ``{"model", "messages", "max_tokens",
"temperature"}``; ``option_logprobs`` adds ``"logprobs": true, "top_logprobs": 20`` and asks for one
token at temperature 0.

**Single-token options.** A chat-completions server scores no text we hand it; it only reports the
log-probs of the most likely first tokens of its reply. So an option's log-prob is read from the
first generated token's ``top_logprobs``: the entries whose token text equals the option, as is
or stripped of whitespace (``"A"`` and ``" A"`` are summed in probability). An option absent from the top
list gets ``-inf``; if every option is absent the call fails (None). When only some options are
absent the judgement is extreme (probability 0 for those), an approximation: ask for more
``top_logprobs`` where the server allows it. Options must therefore be one
token in the server's tokenizer — the built-in prompts use capital letters and digits 0–9 for this
reason (:mod:`rlxf.judges.prompts`). The local backend has no such limit.

Reliability (docs/judges.md): every request has a ``timeout``; connection errors, timeouts, HTTP 429 and
5xx are retried up to ``max_retries`` times with exponential backoff (``backoff · 2^k`` seconds,
at most ``max_backoff``, or the server's numeric ``Retry-After`` if it is shorter than that cap);
any other 4xx is not retried (the request itself is wrong). A call that still fails returns None
and is counted in :attr:`stats`. ``*_batch`` methods run at most ``concurrency`` requests at once.
With ``cache_dir``, every successful deterministic (temperature 0) response is stored on disk keyed
by the SHA-256 of the URL and request body (:mod:`rlxf.judges.cache`), so a judge call already made
is never repeated; sampled requests (temperature > 0) are not cached, since repeating them is how
a caller draws several samples. The API key is read from the ``api_key_env`` variable (absent is
fine for local servers) and is never part of a cache key or a log line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException

from rlxf.judges.base import JudgeError
from rlxf.judges.cache import JsonCache, cache_key

logger = logging.getLogger("rlxf.judges")
_LOUD_FAILURES = 3  # failures logged as warnings; later ones at debug level


class HTTPBackend:
    """A :class:`~rlxf.judges.ChatBackend` over an OpenAI-compatible ``/chat/completions`` endpoint.

    ``base_url``: up to and including the API version, e.g. ``http://127.0.0.1:8000/v1``.
    ``model``: the model id sent with each request; None = the first id of ``GET {base_url}/models``.
    ``top_logprobs``: how many first-token alternatives to ask for (OpenAI allows at most 20; vLLM
    up to its ``--max-logprobs``; ``rlxf serve`` up to its ``--max-top-logprobs``).
    """

    def __init__(self, base_url: str, model: str | None = None, *, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 30.0, max_retries: int = 3, backoff: float = 0.5, max_backoff: float = 8.0,
                 concurrency: int = 4, cache_dir: str | None = None, top_logprobs: int = 20):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise JudgeError(f"judge base_url must start with http:// or https://, got {base_url!r}")
        if not timeout > 0 or not isinstance(max_retries, int) or max_retries < 0 or backoff < 0:
            raise JudgeError(f"judge HTTP settings: need timeout > 0, max_retries >= 0, backoff >= 0; got "
                             f"timeout={timeout!r}, max_retries={max_retries!r}, backoff={backoff!r}")
        if not isinstance(concurrency, int) or concurrency < 1:
            raise JudgeError(f"judge concurrency must be an integer >= 1, got {concurrency!r}")
        if not isinstance(top_logprobs, int) or top_logprobs < 1:
            raise JudgeError(f"top_logprobs must be an integer >= 1 (OpenAI allows up to 20), got {top_logprobs!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.concurrency = concurrency
        self.top_logprobs = top_logprobs
        self.cache = JsonCache(cache_dir) if cache_dir else None
        self._api_key = os.environ.get(api_key_env) or None
        self._lock = threading.Lock()        # counters
        self._model_lock = threading.Lock()  # resolving the model id once
        self.stats = {"calls": 0, "requests": 0, "retries": 0, "failures": 0, "cache_hits": 0}

    @property
    def name(self) -> str:
        return f"http:{self.base_url}|{self._model_id()}"

    # -- the backend protocol -------------------------------------------------------------------

    def chat(self, messages: list[dict], *, max_tokens: int = 256, temperature: float = 0.0) -> str | None:
        body = {"model": self._model_id(), "messages": messages, "max_tokens": max_tokens,
                "temperature": temperature}
        response = self._call(body)
        try:
            return None if response is None else str(response["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            return self._fail("chat: response has no choices[0].message.content")

    def option_logprobs(self, messages: list[dict], options: list[str]) -> list[float] | None:
        body = {"model": self._model_id(), "messages": messages, "max_tokens": 1, "temperature": 0,
                "logprobs": True, "top_logprobs": self.top_logprobs}
        response = self._call(body)
        if response is None:
            return None
        try:
            first = response["choices"][0]["logprobs"]["content"][0]
            candidates = [first, *(first.get("top_logprobs") or [])]
            by_token = {c["token"]: float(c["logprob"]) for c in candidates}
        except (KeyError, IndexError, TypeError, ValueError):
            return self._fail("option_logprobs: response has no choices[0].logprobs.content[0] "
                              "(does the server support logprobs?)")
        values = []
        for option in options:
            matches = [lp for token, lp in by_token.items() if token == option or token.strip() == option]
            values.append(_logsumexp(matches))
        if all(v == -math.inf for v in values):
            return self._fail(f"option_logprobs: none of {options} among the top {self.top_logprobs} first "
                              f"tokens {sorted(by_token)[:8]}...")
        return values

    def chat_batch(self, messages_list: list[list[dict]], *, max_tokens: int = 256,
                   temperature: float = 0.0) -> list[str | None]:
        return self._map(lambda m: self.chat(m, max_tokens=max_tokens, temperature=temperature), messages_list)

    def option_logprobs_batch(self, messages_list: list[list[dict]],
                              options: list[str]) -> list[list[float] | None]:
        return self._map(lambda m: self.option_logprobs(m, options), messages_list)

    # -- requests -------------------------------------------------------------------------------

    def _map(self, fn, items: list) -> list:
        self._model_id()  # resolve once, before the threads start
        if self.concurrency == 1 or len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            return list(pool.map(fn, items))

    def _call(self, body: dict) -> dict | None:
        """POST to /chat/completions through the cache; None (counted) on failure."""
        self._add("calls")
        url = f"{self.base_url}/chat/completions"
        key = cache_key({"url": url, "body": body})
        cacheable = self.cache is not None and body.get("temperature", 1) == 0
        if cacheable:
            cached = self.cache.get(key)
            if cached is not None:
                self._add("cache_hits")
                return cached
        response = self._request("POST", url, body)
        if response is None:
            self._add("failures")
        elif cacheable:
            self.cache.put(key, response)
        return response

    def _request(self, method: str, url: str, body: dict | None) -> dict | None:
        """One request with retries; the parsed JSON response, or None (logged) when it failed."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        error = "no attempt"
        for attempt in range(self.max_retries + 1):
            delay = None
            self._add("requests")
            try:
                request = urllib.request.Request(url, data=data, headers=headers, method=method)
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                error = f"HTTP {err.code}: {_error_message(err)}"
                if err.code != 429 and err.code < 500:
                    self._log(f"{method} {url}: {error} (not retried)")
                    return None
                delay = _retry_after(err)
            except (OSError, HTTPException) as err:  # URLError, timeouts, refused/reset connections
                error = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            except ValueError as err:  # a 200 whose body is not JSON: retrying will not fix it
                self._log(f"{method} {url}: response is not JSON ({err})")
                return None
            if attempt < self.max_retries:
                wait = min(self.max_backoff, self.backoff * 2 ** attempt)
                if delay is not None:
                    wait = min(delay, self.max_backoff)
                self._add("retries")
                time.sleep(wait)
        self._log(f"{method} {url}: {error} after {self.max_retries + 1} attempts")
        return None

    def _model_id(self) -> str:
        if self.model is None:
            with self._model_lock:
                if self.model is None:
                    listing = self._request("GET", f"{self.base_url}/models", None)
                    try:
                        self.model = str(listing["data"][0]["id"])
                    except (KeyError, IndexError, TypeError):
                        raise JudgeError(f"could not find a model id at {self.base_url}/models; "
                                         "pass the judge model name explicitly (model=...)") from None
        return self.model

    def _add(self, counter: str) -> None:
        with self._lock:
            self.stats[counter] += 1

    def _fail(self, message: str) -> None:
        self._add("failures")
        self._log(message)
        return None

    def _log(self, message: str) -> None:
        loud = self.stats["failures"] <= _LOUD_FAILURES
        logger.log(logging.WARNING if loud else logging.DEBUG, "judge %s: %s", self.base_url, message)


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        payload = json.loads(err.read() or b"{}")
        return str(payload.get("error", {}).get("message") or err.reason)
    except (ValueError, AttributeError, OSError):
        return str(err.reason)


def _retry_after(err: urllib.error.HTTPError) -> float | None:
    value = err.headers.get("Retry-After") if err.headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _logsumexp(values: list[float]) -> float:
    if not values:
        return -math.inf
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))
