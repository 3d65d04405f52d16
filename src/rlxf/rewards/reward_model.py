"""A trained scalar reward model as a reward function (PPO-RLHF's R_φ, InstructGPT, arXiv 2203.02155).

    R_i = r_φ(x_i, y_i) − b          (b = ``normalize_bias``, 0 when None)

The text is encoded the way rlxf trains reward models (:mod:`rlxf.data.tokenize`): prompt ids =
``tokenizer(prompt)["input_ids"]``, completion ids = ``tokenizer(completion,
add_special_tokens=False)`` + EOS (unless it already ends with EOS); the score is read at the last
real token by :func:`rlxf.models.reward_scores`. ``normalize_bias`` shifts scores, e.g. by the RM's
mean score on reference completions so that they average 0 (InstructGPT-style RM normalisation).

A *conditional* reward model (COOL-RLHF, arXiv 2403.17297; trained with ``rlxf rm --conditions``) reads a
per-domain condition before the prompt. With ``conditions`` (loaded from the RM directory's
``conditions.yaml`` when the reward is built from ``path``), each prompt is rewritten by
:func:`rlxf.data.conditions.condition_prompt` for its domain, the row field ``domain`` or else
``default_domain`` (the task's name), exactly as ``rlxf rm`` rewrote it for training.
"""

from __future__ import annotations

import torch

from rlxf.models import load_reward_model, load_tokenizer, reward_scores
from rlxf.rewards.base import RewardError
from rlxf.rewards.registry import register_reward
from rlxf.rewards.scoring import eval_mode, length_sorted_batches, model_device, pad_id_of, right_pad


class RewardModelReward:
    """Contract function scoring (prompt, completion) with a sequence-classification reward model."""

    def __init__(self, model, tokenizer, *, batch_size: int = 64, normalize_bias: float | None = None,
                 conditions: dict[str, str] | None = None, default_domain: str | None = None):
        if batch_size < 1:
            raise RewardError(f"reward_model reward: batch_size must be >= 1, got {batch_size}")
        if tokenizer.eos_token_id is None:
            raise RewardError("reward_model reward: the tokenizer has no EOS token; completions are "
                              "scored with EOS appended, as the reward model was trained")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.normalize_bias = batch_size, normalize_bias
        self.conditions, self.default_domain = conditions, default_domain
        self.reward_name = "reward_model"

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], *, domain: list | None = None,
                 **_row_fields) -> list[float | None]:
        sequences = [self.encode(p, c) for p, c in zip(self.conditioned(prompts, domain), completions, strict=True)]
        device, pad_id = model_device(self.model), pad_id_of(self.tokenizer)
        scores: list[float | None] = [None] * len(sequences)
        for rows in length_sorted_batches([len(s) for s in sequences], self.batch_size):
            input_ids, attention_mask = right_pad([sequences[i] for i in rows], pad_id)  # [B, T]
            with eval_mode(self.model):
                batch_scores = reward_scores(self.model, input_ids.to(device), attention_mask.to(device))  # [B]
            for i, score in zip(rows, batch_scores.tolist()):
                scores[i] = score - (self.normalize_bias or 0.0)
        return scores

    def conditioned(self, prompts: list[str], domain: list | None = None) -> list[str]:
        """The prompts as the reward model reads them: conditioned on each row's domain (``domain``
        entries, else ``default_domain``) when the RM has conditions, else unchanged."""
        if self.conditions is None:
            return list(prompts)
        from rlxf.data import DataError
        from rlxf.data.conditions import condition_prompt, resolve_domain

        domains = list(domain) if domain is not None else [None] * len(prompts)
        out = []
        for i, (prompt, name) in enumerate(zip(prompts, domains, strict=True)):
            try:
                name = resolve_domain(name, self.default_domain, self.conditions, where=f"row {i}")
            except DataError as exc:
                raise RewardError(f"reward_model reward (a conditional RM): {exc}") from None
            out.append(condition_prompt(prompt, self.conditions[name]))
        return out

    def encode(self, prompt: str, completion: str) -> list[int]:
        """Token ids the reward model sees: prompt (with special tokens) + completion + EOS."""
        eos = self.tokenizer.eos_token_id
        completion_ids = list(self.tokenizer(completion, add_special_tokens=False)["input_ids"])
        if not completion_ids or completion_ids[-1] != eos:
            completion_ids.append(eos)
        return list(self.tokenizer(prompt)["input_ids"]) + completion_ids


@register_reward("reward_model", factory=True)
def _reward_model_factory(reward_model=None, tokenizer=None, path: str | None = None,
                          batch_size: int = 64, normalize_bias: float | None = None, device=None,
                          conditions: dict | None = None, task=None):
    """A trained reward model's score (context: reward_model + tokenizer, or option path=DIR).

    With ``path``, the reward model and *its own* tokenizer are loaded from DIR (a ``tokenizer``
    in the context, e.g. the policy's, is ignored), and so are its conditions (``conditions.yaml``
    of a conditional RM, unless ``conditions`` is given); otherwise ``reward_model`` and
    ``tokenizer`` are used as given. ``task`` (context) names the default domain of rows without a
    ``domain`` field.
    """
    if path is not None:
        from rlxf.data.conditions import saved_conditions

        tokenizer = load_tokenizer(path)
        reward_model = load_reward_model(path, device=device, pad_token_id=tokenizer.pad_token_id)
        conditions = conditions if conditions is not None else saved_conditions(path)
    if reward_model is None or tokenizer is None:
        raise RewardError("reward 'reward_model' needs a trained reward model: pass path='DIR' (an rlxf "
                          "rm output such as runs/rm/final) or reward_model= and tokenizer= to get_reward")
    default_domain = task if isinstance(task, str) or task is None else task.name
    return RewardModelReward(reward_model, tokenizer, batch_size=batch_size, normalize_bias=normalize_bias,
                             conditions=conditions, default_domain=default_domain)
