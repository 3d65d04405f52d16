"""Multi-turn rollouts with an environment: tool use on the same engines (docs/methods/tools.md).

An episode, in the chat format of the tokenizer's template:

    messages = env.reset(row)                       (the opening: [system], user)
    context  = chat_template(messages, add_generation_prompt=True)
    repeat up to ``max_turns`` times:
        turn   = engine.generate(context)            (the model's tokens, up to EOS; in the loss)
        observation, reward, done = env.step(turn_text)
        if done: stop                                (the last turn is the final answer)
        context += tokens of the observation message and the next generation prompt   (NOT in the loss)

The result is one :class:`~rlxf.rollout.types.Rollouts` row per episode: the opening is the
prompt; the completion is every token after it, turns and observations interleaved;
``context_mask`` covers all of them (the model attends to the tool's output) and
``completion_mask`` only the model's own tokens, so observations are excluded from the policy loss,
the KL term and the token counts of every loss aggregation. ``logps`` holds the sampling log-prob of
each model token (0 on observations). ``text`` is the final model turn (what ``--reward`` and the
verifier score: a tool's output in the context can never be mistaken for the model's answer), and
the episode's step rewards are summed into ``Episodes.env_rewards``.

Budgets: ``max_turns`` model turns, and ``max_episode_tokens`` tokens after the opening (turns and
observations together). A turn is also capped by ``SamplingParams.max_new_tokens``. An episode that
runs out of either budget before the environment says ``done``, or whose turn hits its token cap,
ends with ``finish_reason = "length"`` (``--mask-truncated`` drops such episodes from the loss).

Observation tokens come from the chat template itself (with the tokenizer's special-token strings
removed from the observation text first, so a tool cannot forge an end of turn or a role header): the text the template renders for the
conversation with the observation message and a generation prompt, minus the text it renders for
the conversation up to the end of the model's turn (the end-of-turn token). The model's own tokens
are kept as sampled, never re-tokenised. Every engine serves this: each turn is one
``engine.generate`` call on the episodes still running (their contexts as prompts), so ``HFEngine``
and ``StaticEngine`` both work unchanged; the latter re-encodes the context at each turn (no KV
cache carried across turns) and hands a turn to ``HFEngine`` where it always does: an architecture it
does not cover, or a sliding window shorter than that turn's context plus its token cap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

import torch

from rlxf.rollout.types import Rollouts, SamplingParams


@runtime_checkable
class Environment(Protocol):
    """One episode of an environment (a fresh instance per episode).

    ``reset(row)``: the opening messages (a list of ``{"role", "content"}`` dicts, or one string for
    a single user message), given the dataset row (all its fields).
    ``step(turn)``: the model's turn as text → ``(observation, reward, done)``: the observation text
    the model sees next (ignored when ``done``), a finite step reward (the episode's rewards are
    summed), and whether the episode is over.
    Optional ``demonstration(row)``: a worked conversation (messages, assistant turns included) for
    the SFT warm-up, or None when it has none for that row.
    """

    def reset(self, row: dict) -> list[dict] | str: ...

    def step(self, turn: str) -> tuple[str | None, float, bool]: ...


class EnvInterfaceError(RuntimeError):
    """An environment broke the interface (what it returned, and what was expected)."""


@dataclass
class Episodes:
    """Multi-turn rollouts of one call: ``N = rows × n`` episodes, row by row."""

    rollouts: Rollouts
    env_rewards: list[float]          # [N] sum of the episode's step rewards
    turns: list[int]                  # [N] model turns taken
    tool_calls: list[int]             # [N] observations returned to the model (turns that did not end it)
    transcripts: list[str] = field(default_factory=list)   # [N] the whole episode after the opening, decoded


@dataclass
class _Episode:
    env: object
    messages: list[dict]
    prompt: list[int]
    ids: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    in_loss: list[int] = field(default_factory=list)
    reward: float = 0.0
    turns: int = 0
    tool_calls: int = 0
    text: str = ""
    finish: str | None = None

    def add(self, ids: list[int], logps: list[float], in_loss: int) -> None:
        self.ids += ids
        self.logps += logps
        self.in_loss += [in_loss] * len(ids)


class EnvRollout:
    """Samples multi-turn episodes with ``engine`` (any :class:`~rlxf.rollout.RolloutEngine`).

    ``env_factory()`` makes one environment per episode. ``max_turns``: most model turns per
    episode; ``max_episode_tokens``: most tokens after the opening (turns and observations);
    ``observation_role``: the chat role of observations (``tool``; ``user`` for templates without
    a tool role).
    """

    def __init__(self, engine, tokenizer, env_factory, *, max_turns: int = 4, max_episode_tokens: int = 256,
                 observation_role: str = "tool"):
        if not isinstance(max_turns, int) or max_turns < 1:
            raise ValueError(f"max_turns must be an integer >= 1, got {max_turns!r}")
        if not isinstance(max_episode_tokens, int) or max_episode_tokens < 1:
            raise ValueError(f"max_episode_tokens must be an integer >= 1, got {max_episode_tokens!r}")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("multi-turn rollouts render conversations with the tokenizer's chat template, and "
                             "this tokenizer has none; use a chat model (or set tokenizer.chat_template)")
        self.engine, self.tokenizer, self.env_factory = engine, tokenizer, env_factory
        self.max_turns, self.max_episode_tokens, self.observation_role = max_turns, max_episode_tokens, observation_role
        pad = getattr(engine, "pad_token_id", None)
        self.pad_token_id = int(pad if pad is not None else tokenizer.pad_token_id)

    def generate(self, prompt_ids, params):
        raise TypeError("EnvRollout needs the dataset rows (the environment resets with them): call "
                        "generate_episodes(rows, params)")

    def generate_episodes(self, rows: list[dict], params: SamplingParams) -> Episodes:
        """``params.n`` episodes per row, each with a fresh environment; see the module docstring."""
        episodes = []
        for row in rows:
            for _ in range(params.n):
                env = self.env_factory()
                messages = _opening(env.reset(row))
                episodes.append(_Episode(env=env, messages=messages, prompt=chat_prompt_ids(self.tokenizer, messages)))
        for turn in range(self.max_turns):
            active = [e for e in episodes if e.finish is None]
            if not active:
                break
            room = max(self.max_episode_tokens - len(e.ids) for e in active)
            turn_params = replace(params, n=1, max_new_tokens=min(params.max_new_tokens, room),
                                  seed=None if params.seed is None else params.seed + 7919 * turn)
            out = self.engine.generate([e.prompt + e.ids for e in active], turn_params)
            for i, episode in enumerate(active):
                self._advance(episode, out, i)
        return self._assemble(episodes, params.n)

    def _advance(self, episode: _Episode, out: Rollouts, i: int) -> None:
        """Add the model's turn ``i`` of ``out`` to the episode and answer it with the environment."""
        mask = out.completion_mask[i].bool()
        ids, logps = out.completion_ids[i][mask].tolist(), out.logps[i][mask].tolist()
        room = self.max_episode_tokens - len(episode.ids)
        truncated = out.finish_reason[i] == "length" or len(ids) > room
        text = out.text[i] if len(ids) <= room else self.tokenizer.decode(ids[:room], skip_special_tokens=True)
        episode.add(ids[:room], logps[:room], 1)
        episode.turns += 1
        episode.text = text
        if truncated:
            episode.finish = "length"
            return
        observation, reward, done = _checked_step(episode.env.step(text), episode.env)
        episode.reward += reward
        if done:
            episode.finish = "stop"
            return
        if episode.turns >= self.max_turns:
            episode.finish = "length"   # the turn budget ran out before a final answer
            return
        episode.messages.append({"role": "assistant", "content": text})
        message = {"role": self.observation_role, "content": without_special_tokens(observation, self.tokenizer)}
        obs_ids = observation_ids(self.tokenizer, episode.messages, message)
        episode.messages.append(message)
        episode.tool_calls += 1
        if len(episode.ids) + len(obs_ids) >= self.max_episode_tokens:
            episode.finish = "length"   # no room for the observation and another turn
            return
        episode.add(obs_ids, [0.0] * len(obs_ids), 0)

    def _assemble(self, episodes: list[_Episode], n: int) -> Episodes:
        N = len(episodes)
        P = max(len(e.prompt) for e in episodes)
        C = max(1, max(len(e.ids) for e in episodes))
        prompt_ids = torch.full((N, P), self.pad_token_id, dtype=torch.long)
        prompt_mask = torch.zeros((N, P), dtype=torch.long)
        completion_ids = torch.full((N, C), self.pad_token_id, dtype=torch.long)
        completion_mask = torch.zeros((N, C), dtype=torch.long)
        context_mask = torch.zeros((N, C), dtype=torch.long)
        logps = torch.zeros((N, C), dtype=torch.float32)
        for r, e in enumerate(episodes):
            L = len(e.ids)
            prompt_ids[r, P - len(e.prompt):] = torch.tensor(e.prompt)
            prompt_mask[r, P - len(e.prompt):] = 1
            completion_ids[r, :L] = torch.tensor(e.ids, dtype=torch.long)
            completion_mask[r, :L] = torch.tensor(e.in_loss, dtype=torch.long)
            context_mask[r, :L] = 1
            logps[r, :L] = torch.tensor(e.logps, dtype=torch.float32)
        rollouts = Rollouts(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                            completion_mask=completion_mask, logps=logps,
                            finish_reason=[e.finish or "length" for e in episodes], text=[e.text for e in episodes],
                            prompt_index=torch.arange(N) // n, group_size=n, context_mask=context_mask)
        return Episodes(rollouts=rollouts, env_rewards=[e.reward for e in episodes], turns=[e.turns for e in episodes],
                        tool_calls=[e.tool_calls for e in episodes],
                        transcripts=[self.tokenizer.decode(e.ids, skip_special_tokens=False) for e in episodes])


# -- chat-template token ids ---------------------------------------------------------------------

def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of ``messages`` rendered by the chat template with the generation prompt."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def observation_ids(tokenizer, messages: list[dict], observation: dict) -> list[int]:
    """Token ids that follow the model's last turn (``messages[-1]``, an assistant message) when
    ``observation`` is added: the template's rendering with it and a generation prompt, minus the
    rendering up to the end of the model's turn (its end-of-turn token, EOS)."""
    before = tokenizer.apply_chat_template(messages, tokenize=False)
    after = tokenizer.apply_chat_template(messages + [observation], tokenize=False, add_generation_prompt=True)
    eos = tokenizer.eos_token or ""
    cut = before.rfind(eos) + len(eos) if eos and eos in before else len(before)
    if not after.startswith(before[:cut]):
        raise ValueError("the chat template renders the conversation differently once an observation is added "
                         "(it is not a prefix), so observations cannot be appended token by token; use "
                         f"observation_role='user' or a template that appends messages (role {observation['role']!r})")
    return list(tokenizer(after[cut:], add_special_tokens=False)["input_ids"])


def conversation_ids(tokenizer, messages: list[dict]) -> tuple[list[int], list[int], int]:
    """``(ids, in_loss, prompt_len)`` of a whole conversation exactly as an episode would hold it:
    the opening (messages before the first assistant turn) with the generation prompt, then each
    assistant turn as its content's tokens plus EOS (``in_loss`` 1) and each other message as
    :func:`observation_ids` (``in_loss`` 0). Used by the SFT warm-up on demonstrations."""
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
    if first is None or first == 0:
        raise ValueError("a demonstration needs opening messages followed by at least one assistant turn")
    ids = chat_prompt_ids(tokenizer, messages[:first])
    prompt_len, in_loss = len(ids), [0] * len(ids)
    for k in range(first, len(messages)):
        message = messages[k]
        if message["role"] == "assistant":
            turn = list(tokenizer(message["content"], add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
            ids, in_loss = ids + turn, in_loss + [1] * len(turn)
        else:
            extra = observation_ids(tokenizer, messages[:k], message)
            ids, in_loss = ids + extra, in_loss + [0] * len(extra)
    return ids, in_loss, prompt_len


def without_special_tokens(text: str, tokenizer) -> str:
    """``text`` with every special-token string of the tokenizer removed (repeatedly, so removing one
    cannot splice another together): a tool's output (a program's print, say) must not forge the
    chat markup — an end-of-turn, a role header — that the template writes around it."""
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    previous = None
    while previous != text:
        previous = text
        for token in specials:
            text = text.replace(token, "")
    return text


# -- checking what an environment returns -----------------------------------------------------------

def _opening(value) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if (isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                  and isinstance(m.get("content"), str) for m in value)):
        return [dict(m) for m in value]
    raise EnvInterfaceError(f"env.reset(row) must return a non-empty list of {{'role': str, 'content': str}} "
                            f"messages or one string, got {str(value)[:120]!r}")


def _checked_step(value, env) -> tuple[str, float, bool]:
    name = type(env).__name__
    if not (isinstance(value, tuple) and len(value) == 3):
        raise EnvInterfaceError(f"{name}.step(turn) must return (observation, reward, done), got {str(value)[:120]!r}")
    observation, reward, done = value
    if not isinstance(done, bool):
        raise EnvInterfaceError(f"{name}.step: done must be a bool, got {done!r}")
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        raise EnvInterfaceError(f"{name}.step: reward must be a finite number, got {reward!r}")
    if not done and not isinstance(observation, str):
        raise EnvInterfaceError(f"{name}.step: the observation must be a string when done is False, "
                                f"got {type(observation).__name__}")
    return observation if isinstance(observation, str) else "", float(reward), done
