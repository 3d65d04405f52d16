"""The judge interface: a :class:`ChatBackend` answers, a :class:`Judge` turns answers into labels.

A backend does two things: ``chat`` (generate a reply: CAI critiques and revisions, Text2Reward
code) and ``option_logprobs`` (log P(option | conversation, start of the assistant reply) for a few
option strings). The :class:`Judge` builds the multiple-choice prompts (:mod:`rlxf.judges.prompts`),
asks the backend for the options' log-probs and normalises them over the options:

- :meth:`Judge.prefer` — P(a ≻ b) = softmax(log P("A"), log P("B"))[0] (CAI / RLAIF soft label,
  Bai et al., arXiv 2212.08073; Lee et al., arXiv 2309.00267). With ``both_orders`` the pair is
  asked again as (b, a) and
  ``P(a ≻ b) = ½ [P_(a,b)("A") + P_(b,a)("B")]`` (RLAIF position-bias control, Lee et al.);
- :meth:`Judge.score` — d-RLAIF rating on 1–10, ``Σ_d (d+1)·P(d)`` over the digit options 0–9
  (see :mod:`rlxf.judges.prompts` for why digits 0–9 and not "1".."10");
- :meth:`Judge.shift` — LMGT reward shift ∈ {+1, 0, −1} = argmax over the options
  approve / neutral / disapprove (LMGT, arXiv 2409.04744; docs/methods/lmgt.md).

A failed judgement (network error, prompt too long for the judge, no option in the reply's top
log-probs) is ``None`` and counted in :attr:`Judge.stats`; nothing is ever made up.

Backends may also offer ``chat_batch(list_of_messages, ...)`` and
``option_logprobs_batch(list_of_messages, options)`` (both built-in backends do: one batched
forward locally, a bounded thread pool over HTTP); the judge uses them when present.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from rlxf.judges.cache import JsonCache, cache_key
from rlxf.judges.prompts import JudgePrompts, get_prompts

logger = logging.getLogger("rlxf.judges")


class JudgeError(ValueError):
    """A judge was configured or called wrongly (bad spec, mismatched list lengths): not a failed judgement."""


@runtime_checkable
class ChatBackend(Protocol):
    """Something that can chat and score option strings (a local model, an OpenAI-compatible server)."""

    name: str
    """Identifies the model behind the backend (part of every judge cache key)."""

    def chat(self, messages: list[dict], *, max_tokens: int = 256, temperature: float = 0.0) -> str | None:
        """The assistant's reply to ``messages`` ({"role", "content"} dicts), or None on failure."""

    def option_logprobs(self, messages: list[dict], options: list[str]) -> list[float] | None:
        """``log P(option | messages, start of the assistant reply)`` for each option (whole string),
        ``-inf`` for an option the backend saw no probability for, or None on failure."""


class Judge:
    """Labels (prompt, completion) data with a :class:`ChatBackend`; see the module docstring.

    ``both_orders``: ask every pair in both orders and average (position-bias control).
    ``cache_dir``: store every successful option log-prob query on disk (keyed by the backend's
    name, the messages and the options), so the same question is never asked twice.
    ``prompts``: ``"standard"``, ``"compact"`` (short-context judges such as the tiny model) or a
    :class:`~rlxf.judges.prompts.JudgePrompts`.
    """

    def __init__(self, backend: ChatBackend, *, both_orders: bool = True, cache_dir: str | None = None,
                 prompts: str | JudgePrompts = "standard"):
        self.backend = backend
        self.both_orders = bool(both_orders)
        self.prompts = get_prompts(prompts)
        self.cache = JsonCache(cache_dir) if cache_dir else None
        self._lock = threading.Lock()
        self._counts = {"calls": 0, "failures": 0, "cache_hits": 0, "prefer_pairs": 0}
        self._sums = {"p_first_before": 0.0, "p_first_after": 0.0, "p_first_position": 0.0,
                      "first_position_asks": 0}

    # -- judgements ---------------------------------------------------------------------------

    def prefer(self, prompts: list[str], a: list[str], b: list[str], *,
               principle: str | None = None) -> list[float | None]:
        """P(a[i] ≻ b[i] | prompts[i]) per pair, None where the backend failed (either order)."""
        _check_lengths(prompts=prompts, a=a, b=b)
        render = self.prompts.render_pairwise
        queries = [render(p, x, y, principle) for p, x, y in zip(prompts, a, b)]
        if self.both_orders:
            queries += [render(p, y, x, principle) for p, x, y in zip(prompts, a, b)]
        logps = self._option_logprobs(queries, list(self.prompts.pairwise_options))
        n = len(prompts)
        out: list[float | None] = []
        first_position = []  # P(the answer shown as option A wins), every successful ask
        for i in range(n):
            forward = logps[i]
            backward = logps[n + i] if self.both_orders else None
            p_forward = _softmax(forward)[0] if forward is not None else None
            p_backward = _softmax(backward)[1] if backward is not None else None
            first_position += [p for p in (p_forward, None if p_backward is None else 1.0 - p_backward)
                               if p is not None]
            if p_forward is None or (self.both_orders and p_backward is None):
                out.append(None)
                continue
            p = 0.5 * (p_forward + p_backward) if self.both_orders else p_forward
            out.append(p)
            with self._lock:
                self._counts["prefer_pairs"] += 1
                self._sums["p_first_before"] += p_forward
                self._sums["p_first_after"] += p
        with self._lock:
            self._sums["p_first_position"] += sum(first_position)
            self._sums["first_position_asks"] += len(first_position)
        return out

    def score(self, prompts: list[str], completions: list[str], *,
              rubric: str | None = None) -> list[float | None]:
        """d-RLAIF rating in [1, 10]: ``Σ_d (d+1)·P(option d)``; None where the backend failed."""
        _check_lengths(prompts=prompts, completions=completions)
        queries = [self.prompts.render_rating(p, c, rubric) for p, c in zip(prompts, completions)]
        logps = self._option_logprobs(queries, list(self.prompts.rating_options))
        return [None if lp is None else sum((d + 1) * p for d, p in enumerate(_softmax(lp))) for lp in logps]

    def shift(self, prompts: list[str], completions: list[str], *,
              knowledge: str | None = None) -> list[int | None]:
        """LMGT shift: +1 approve, 0 neutral, −1 disapprove (argmax; a tie counts as neutral)."""
        _check_lengths(prompts=prompts, completions=completions)
        queries = [self.prompts.render_shift(p, c, knowledge) for p, c in zip(prompts, completions)]
        logps = self._option_logprobs(queries, list(self.prompts.shift_options))
        out: list[int | None] = []
        for lp in logps:
            if lp is None:
                out.append(None)
                continue
            best = max(lp)
            winners = [value for value, x in zip((1, 0, -1), lp) if x == best]
            out.append(winners[0] if len(winners) == 1 else 0)
        return out

    # -- bookkeeping --------------------------------------------------------------------------

    @property
    def stats(self) -> dict:
        """Counts and position-bias means (a fresh dict).

        ``calls``: option log-prob questions the judge asked (cached ones included);
        ``failures``: those that came back None; ``cache_hits``: those answered from a cache (the
        judge's or the backend's own); ``prefer_pairs``: pairs :meth:`prefer` labelled;
        ``p_first_before``: mean P(a ≻ b) from the (a, b) order alone — a is shown first there;
        ``p_first_after``: mean P(a ≻ b) as returned (after both-orders averaging when on);
        ``p_first_position``: mean probability the judge gives the answer shown as (A), over
        every ask (0.5 = no position bias when a and b are exchangeable).
        """
        with self._lock:
            stats = dict(self._counts)
            sums = dict(self._sums)
        stats["cache_hits"] += int(getattr(self.backend, "stats", {}).get("cache_hits", 0))
        pairs, asks = stats["prefer_pairs"], sums["first_position_asks"]
        stats["p_first_before"] = sums["p_first_before"] / pairs if pairs else None
        stats["p_first_after"] = sums["p_first_after"] / pairs if pairs else None
        stats["p_first_position"] = sums["p_first_position"] / asks if asks else None
        return stats

    def _option_logprobs(self, queries: list[list[dict]], options: list[str]) -> list[list[float] | None]:
        """Ask every query (cache first); None for a failed or unusable answer."""
        results: list[list[float] | None] = [None] * len(queries)
        keys = [cache_key({"backend": self.backend.name, "messages": q, "options": options}) for q in queries]
        todo = []
        for i, key in enumerate(keys):
            cached = self.cache.get(key) if self.cache is not None else None
            if cached is not None:
                results[i] = [float(x) for x in cached]
            else:
                todo.append(i)
        if todo:
            batch = getattr(self.backend, "option_logprobs_batch", None)
            asked = [queries[i] for i in todo]
            answers = (batch(asked, options) if callable(batch)
                       else [self.backend.option_logprobs(q, options) for q in asked])
            for i, answer in zip(todo, answers):
                answer = _valid(answer, len(options))
                results[i] = answer
                if answer is not None and self.cache is not None:
                    self.cache.put(keys[i], answer)
        with self._lock:
            self._counts["calls"] += len(queries)
            self._counts["cache_hits"] += len(queries) - len(todo)
            self._counts["failures"] += sum(r is None for r in results)
        return results


def build_judge(spec: str, *, model: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                timeout: float = 30.0, max_retries: int = 3, concurrency: int = 4,
                cache_dir: str | None = None, both_orders: bool = True, device: str = "auto",
                prompts: str | JudgePrompts = "standard", top_logprobs: int = 20) -> Judge:
    """A :class:`Judge` from a spec string.

    ``local:PATH`` / ``local:tiny``: a transformers model loaded in-process (:class:`LocalBackend`,
    on ``device``); its judge cache is ``cache_dir``. ``http://host:port/v1`` or ``https://…``: an
    OpenAI-compatible chat-completions server (:class:`HTTPBackend`; ``model`` defaults to the
    first id of ``GET /models``; key from the ``api_key_env`` variable; ``cache_dir`` caches the
    requests; ``top_logprobs`` first-token alternatives are read, see :mod:`rlxf.judges.http`).
    ``prompts``: ``"standard"``, or ``"compact"`` for short-context judges (the tiny model).
    """
    if not isinstance(spec, str) or not spec:
        raise JudgeError(f"judge spec must be 'local:PATH' or an http(s):// URL, got {spec!r}")
    if spec.startswith("local:"):
        from rlxf.judges.local import LocalBackend

        path = spec[len("local:"):]
        if not path:
            raise JudgeError("judge spec 'local:' needs a model: 'local:tiny' or 'local:/path/to/model'")
        return Judge(LocalBackend.from_pretrained(path, device=device), both_orders=both_orders,
                     cache_dir=cache_dir, prompts=prompts)
    if spec.startswith(("http://", "https://")):
        from rlxf.judges.http import HTTPBackend

        backend = HTTPBackend(spec, model, api_key_env=api_key_env, timeout=timeout, max_retries=max_retries,
                              concurrency=concurrency, cache_dir=cache_dir, top_logprobs=top_logprobs)
        return Judge(backend, both_orders=both_orders, prompts=prompts)
    raise JudgeError(f"judge spec {spec!r} is neither 'local:PATH' nor an http(s):// URL "
                     "(e.g. 'local:tiny' or 'http://127.0.0.1:8000/v1')")


def _softmax(logps: Sequence[float]) -> list[float]:
    top = max(logps)
    weights = [math.exp(x - top) for x in logps]
    total = sum(weights)
    return [w / total for w in weights]


def _valid(answer, n: int) -> list[float] | None:
    """The answer as n floats, or None if it is missing, malformed, NaN, +inf or all −inf."""
    if answer is None or len(answer) != n:
        return None
    try:
        values = [float(x) for x in answer]
    except (TypeError, ValueError):
        return None
    if any(math.isnan(x) or x == math.inf for x in values) or all(x == -math.inf for x in values):
        return None
    return values


def _check_lengths(**lists) -> None:
    lengths = {name: len(values) for name, values in lists.items()}
    if len(set(lengths.values())) > 1:
        raise JudgeError(f"judge inputs must have one entry per example; got lengths {lengths}")
