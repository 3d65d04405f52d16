"""COOPER's co-trained verifier reward model (arXiv 2508.05613; docs/methods/cooper.md).

**VerifyRM.** A sequence-classification model (one logit ``s``) that reads the question, the
reference answer and a completion, in the template of the official code::

    <question>{q}</question>\\n<reference_answer>{a*}</reference_answer>\\n<completion>{o}</completion>

encoded as ``tokenizer(prefix)`` (with special tokens) + ``tokenizer(o)`` + ``tokenizer(suffix)`` +
EOS, the score read at the EOS. The reward in RL is ``σ(s)`` ∈ (0, 1). The embedded tiny model's
character tokenizer has every character of the template (``<``, ``>``, ``/``, ``_``, letters), so
the paper's template is used unchanged. When the encoding is longer than the model's context, the
completion is cut from the left (its final answer, at the end, is kept).

**Pretraining** (:func:`pretrain_verify_rm`, when no trained VerifyRM is given): BCE on
(question, reference, completion, label) rows built from the task's *train* split — for each
problem one correct solution (label 1) and one wrong one (label 0, ``task.solve(wrong=True)``),
each concise or verbose. The paper's 58.7K rows are hybrid-labelled by Math-Verify and an LLM
judge; rlxf's tasks label exactly, so the rows come from the task's own solutions.

**Co-training** (:class:`CooperReward`). While scoring a rollout batch the reward keeps, per
prompt group, the *first* completion the task's verifier accepts (the paper: "first rollout whose
rule-based score == 1"); groups without one give no pair. After the policy step,
:meth:`CooperReward.after_step` builds one negative per positive and takes one AdamW step on

    L = − mean_pairs log σ( s(q, a*, o⁺) − s(q, a*, o⁻) )                 (COOPER, arXiv 2508.05613)

Deviation, stated (Appendix C): the paper's negative is written by an assistant LLM asked for "a
completely incorrect and misleading response"; rlxf has no such model here and corrupts the
positive's *final answer* instead (:func:`corrupt_final_answer`: the first integer after the
final-answer ``#`` shifted by a nonzero slip in ±1..±10, drawn from a generator seeded by (seed,
step); a corruption the verifier still accepts is redrawn, and a positive with no number after
``#`` gives no pair). Such negatives share the positive's reasoning, so they teach the RM to
compare the final answer with the reference — the check a hacked RM forgets. They never show the
RM a completion without a final answer, though. In one 200-step run on the tiny model, the policy
learnt to stop after the first number (`` 55``); the co-trained RM scored that 0.48, while it scored
wrong full answers below 0.1. ``negatives="mixed"`` (``--cooper-negatives mixed``) therefore cuts
half of the positives before their final answer instead (:func:`truncate_before_answer`). This rlxf
option is not in the paper. Other deviations:
no RM learning-rate warm-up (the paper's ratio 0.01 is under one step at rlxf's step counts), no
dropout in the RM (every RM forward runs in eval mode, as rlxf trains its policies).
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from rlxf.configs.choices import COOPER_NEGATIVES as NEGATIVES
from rlxf.models import load_reward_model, reward_scores, save_pretrained
from rlxf.reporting.progress import PhaseProgress
from rlxf.rewards.base import RewardError
from rlxf.rewards.registry import register_reward
from rlxf.rewards.scoring import eval_mode, length_sorted_batches, model_device, pad_id_of, right_pad

log = logging.getLogger("rlxf.cooper")

TEMPLATE_PREFIX = "<question>{question}</question>\n<reference_answer>{answer}</reference_answer>\n<completion>"
TEMPLATE_SUFFIX = "</completion>"
SLIPS = tuple(range(1, 11))          # |Δ| of a corrupted final answer
VERBOSE_FRACTION = 0.15              # share of verbose solutions in the pretraining/eval rows (the tiny model's mix)
PRETRAIN_WARMUP = 0.2                # share of pretraining steps spent warming the learning rate up
_INTEGER = re.compile(r"-?\d+")


# -- inputs ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VerifyExample:
    """One VerifyRM row: is ``completion`` a correct solution of ``question`` with answer ``answer``?"""

    question: str
    answer: str
    completion: str
    label: int   # 1 correct, 0 wrong


def encode_verify_input(tokenizer, question: str, answer: str, completion: str, *,
                        max_length: int | None = None) -> list[int]:
    """Token ids of the VerifyRM input (module docstring); the completion is cut from the left to fit."""
    prefix = list(tokenizer(TEMPLATE_PREFIX.format(question=question, answer=answer))["input_ids"])
    body = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    suffix = list(tokenizer(TEMPLATE_SUFFIX, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    if max_length is not None and len(prefix) + len(body) + len(suffix) > max_length:
        keep = max_length - len(prefix) - len(suffix)
        if keep < 1:
            raise RewardError(f"VerifyRM input: the question and reference answer alone take {len(prefix)} "
                              f"tokens, more than the reward model's context of {max_length}")
        body = body[-keep:]
    return prefix + body + suffix


def verify_logits(model, tokenizer, examples: Sequence[VerifyExample] | Sequence[tuple[str, str, str]], *,
                  batch_size: int | None = None) -> Tensor:
    """VerifyRM logits ``s`` [N] (float32, on the model's device) for (question, answer, completion).

    ``batch_size=None`` scores everything in one forward that keeps the autograd graph (training);
    with a batch size, rows are scored in length-sorted batches (use it under ``torch.no_grad()``).
    """
    rows = [(e.question, e.answer, e.completion) if isinstance(e, VerifyExample) else tuple(e) for e in examples]
    max_length = getattr(model.config, "max_position_embeddings", None)
    sequences = [encode_verify_input(tokenizer, q, a, o, max_length=max_length) for q, a, o in rows]
    device, pad_id = model_device(model), pad_id_of(tokenizer)
    if batch_size is None:
        input_ids, attention_mask = right_pad(sequences, pad_id)                       # [N, T]
        with eval_mode(model):
            return reward_scores(model, input_ids.to(device), attention_mask.to(device))  # [N]
    logits = torch.empty(len(sequences), device=device)
    for batch in length_sorted_batches([len(s) for s in sequences], batch_size):
        input_ids, attention_mask = right_pad([sequences[i] for i in batch], pad_id)     # [B, T]
        with eval_mode(model):
            logits[batch] = reward_scores(model, input_ids.to(device), attention_mask.to(device))
    return logits


def verification_examples(task, split: str, n: int, *, seed: int,
                          verbose_fraction: float = VERBOSE_FRACTION) -> list[VerifyExample]:
    """``n`` labelled rows from ``n // 2`` problems of ``split``: per problem one correct solution
    and one wrong one (``task.solve(wrong=True)``), each verbose with probability ``verbose_fraction``;
    the pair is adjacent (correct first). Deterministic in (task, split, n, seed)."""
    rng = random.Random(f"cooper:verify:{task.name}:{split}:{seed}")
    rows = []
    for p in task.problems(split, n // 2, seed):
        for label in (1, 0):
            completion = task.solve(p, verbose=rng.random() < verbose_fraction, rng=rng, wrong=not label)
            rows.append(VerifyExample(p.prompt, p.answer, completion, label))
    return rows


# -- pretraining and held-out verification ----------------------------------------------------------

def pretrain_verify_rm(model, tokenizer, task, *, steps: int, lr: float, batch_size: int, seed: int,
                       verbose_fraction: float = VERBOSE_FRACTION, max_grad_norm: float = 1.0) -> dict:
    """Train a VerifyRM with BCE on task rows (``BCEWithLogits(s, label)``, docs/methods/cooper.md).

    Each step sees ``batch_size`` fresh rows of :func:`verification_examples` from the train split
    (``batch_size // 2`` problems, correct + wrong each). AdamW (no weight decay), linear warm-up
    over the first ``PRETRAIN_WARMUP`` (20%) of the steps, then a constant rate; gradients clipped
    at ``max_grad_norm``. Deviation, stated: the paper trains 3 epochs at lr 2e-5 on 58.7K
    hybrid-labelled rows. The tiny model needs a much higher rate, and its accuracy stays flat for
    the first few hundred steps before it rises. A cosine decay would cut the rate before that rise,
    so the rate stays constant (measured: docs/methods/cooper.md). Returns ``rm/pretrain_loss`` (mean
    of the last 10% of steps), ``rm/pretrain_steps`` and ``rm/pretrain_seconds``.
    """
    if steps <= 0:
        return {"rm/pretrain_steps": 0}
    if batch_size < 2:
        raise RewardError(f"VerifyRM pretraining: batch_size must be >= 2 (a correct and a wrong row), "
                          f"got {batch_size}")
    t0 = time.time()
    rows = verification_examples(task, "train", steps * (batch_size // 2) * 2, seed=seed,
                                 verbose_fraction=verbose_fraction)
    per_step = 2 * (batch_size // 2)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, int(steps * PRETRAIN_WARMUP))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    losses = []
    progress = PhaseProgress("VerifyRM pretraining", steps, logger=log, detail=(
        f"of {per_step} rows (a fresh verifier head; --cooper-rm DIR reuses a pretrained one)"))
    for step in range(steps):
        batch = rows[step * per_step:(step + 1) * per_step]
        labels = torch.tensor([float(e.label) for e in batch], device=model_device(model))     # [B]
        loss = F.binary_cross_entropy_with_logits(verify_logits(model, tokenizer, batch), labels)
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.update(loss=losses[-1])
    progress.close()
    tail = losses[-max(1, steps // 10):]
    return {"rm/pretrain_loss": sum(tail) / len(tail), "rm/pretrain_steps": steps,
            "rm/pretrain_seconds": round(time.time() - t0, 2)}


@torch.no_grad()
def evaluate_verify_rm(model, tokenizer, examples: Sequence[VerifyExample], *, batch_size: int = 64) -> dict:
    """Held-out verification quality on labelled rows (pairs adjacent, as :func:`verification_examples`).

    ``rm/accuracy``: σ(s) > 0.5 agrees with the label; ``rm/auc``: P(s⁺ > s⁻) over all positive ×
    negative rows (ties ½); ``rm/pair_accuracy``: the same within each problem's (correct, wrong)
    pair; ``rm/score_pos`` / ``rm/score_neg``: mean σ(s) of correct / wrong rows.
    """
    logits = verify_logits(model, tokenizer, examples, batch_size=batch_size).float().cpu()     # [N]
    labels = torch.tensor([e.label for e in examples], dtype=torch.bool)                        # [N]
    pos, neg = logits[labels], logits[~labels]
    wins = lambda a, b: ((a > b).float() + 0.5 * (a == b).float()).mean().item()  # noqa: E731
    metrics = {"rm/accuracy": ((logits > 0) == labels).float().mean().item(),
               "rm/auc": wins(pos[:, None], neg[None, :]),
               "rm/score_pos": torch.sigmoid(pos).mean().item(),
               "rm/score_neg": torch.sigmoid(neg).mean().item()}
    pairs = [(i, i + 1) for i in range(0, len(examples) - 1, 2)
             if examples[i].label == 1 and examples[i + 1].label == 0
             and examples[i].question == examples[i + 1].question]
    if pairs:
        first, second = zip(*pairs)
        metrics["rm/pair_accuracy"] = wins(logits[list(first)], logits[list(second)])
    return metrics


# -- negatives --------------------------------------------------------------------------------------

def corrupt_final_answer(completion: str, rng: random.Random, *, slips: Sequence[int] = SLIPS) -> str | None:
    """``completion`` with the first integer of its final answer shifted by ±slip (slip from ``slips``).

    The final answer is where :func:`rlxf.tasks.extract_answer` reads it: after the last ``#`` of
    the first paragraph. Returns None when there is no ``#`` or no integer after it.
    """
    end = completion.find("\n\n")
    end = len(completion) if end < 0 else end
    marker = completion.rfind("#", 0, end)
    if marker < 0:
        return None
    match = _INTEGER.search(completion, marker + 1, end)
    if match is None:
        return None
    value = int(match.group()) + rng.choice(slips) * rng.choice((-1, 1))
    return completion[:match.start()] + str(value) + completion[match.end():]


def truncate_before_answer(completion: str, rng: random.Random) -> str | None:
    """A prefix of ``completion`` cut at a random point before its final-answer ``#``, so it has no
    final answer (the stub a policy emits when it stops early); None when there is no ``#`` or
    nothing before it."""
    end = completion.find("\n\n")
    marker = completion.rfind("#", 0, len(completion) if end < 0 else end)
    if marker < 2:
        return None
    return completion[:rng.randrange(1, marker)]


def contrastive_loss(positive_logits: Tensor, negative_logits: Tensor) -> Tensor:
    """COOPER's RM loss ``−mean log σ(s⁺ − s⁻)`` (docs/methods/cooper.md); inputs [P], output a scalar."""
    return -F.logsigmoid(positive_logits - negative_logits).mean()


# -- the reward -------------------------------------------------------------------------------------

class CooperReward:
    """σ(VerifyRM logit) as the reward, with the RM updated contrastively after each policy step.

    Contract ``__call__(prompts, completions, *, answer, **fields) -> list[float]``; ``answer`` (the
    row's reference answer) is what the RM is shown. Stateful-reward hooks used by the GRPO loop:
    :meth:`after_step`, :meth:`evaluate`, :meth:`state_dict` / :meth:`load_state_dict`.

    A *rollout batch* is one whose rows come in runs of ``group_size`` identical prompts (the GRPO
    layout); only those give positives, so the greedy evaluation (one completion per prompt) never
    trains the RM. ``pretrain`` = ``{"steps", "lr", "batch_size"}`` runs :func:`pretrain_verify_rm`
    on first use (first call, :meth:`evaluate` or :meth:`after_step`) unless :meth:`load_state_dict`
    came first, so a resumed run does not pretrain again; it runs on a forked RNG, so the policy's
    random stream is the same with or without it. ``pretrain=None``: the model is already trained.
    ``save_dir``: where the freshly pretrained VerifyRM is written (HF format, with the tokenizer), so
    that other runs can start from it (``--cooper-rm``) instead of pretraining again.
    """

    def __init__(self, model, tokenizer, task, *, group_size: int, update: bool = True, lr: float = 1e-5,
                 seed: int = 0, eval_size: int = 256, pretrain: dict | None = None, max_grad_norm: float = 1.0,
                 batch_size: int = 64, save_dir: str | Path | None = None, negatives: str = "slip",
                 eval_seed: int = 0):
        if task is None:
            raise RewardError("reward 'cooper' needs a task verifier to pick positives (a task: dataset)")
        if group_size < 2:
            raise RewardError(f"reward 'cooper': group_size must be >= 2 (completions per prompt), got {group_size}")
        if negatives not in NEGATIVES:
            raise RewardError(f"reward 'cooper': negatives must be one of {', '.join(NEGATIVES)}, got {negatives!r}")
        self.model, self.tokenizer, self.task = model, tokenizer, task
        self.group_size, self.update, self.seed, self.negatives = group_size, update, seed, negatives
        self.max_grad_norm, self.batch_size = max_grad_norm, batch_size
        self.reward_name = "cooper"
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                           weight_decay=0.0)
        # the RM's held-out pairs follow the run's --eval-seed, not --seed: runs with other seeds compare
        self.eval_examples = verification_examples(task, "eval", eval_size, seed=eval_seed)
        self._pretrain, self.save_dir = pretrain, save_dir
        self._pretrain_metrics: dict = {}
        self.updates = 0
        self._reset_stash()

    # -- scoring ------------------------------------------------------------------------------
    def __call__(self, prompts: list[str], completions: list[str], *, answer: list | None = None,
                 **_fields) -> list[float]:
        if answer is None:
            raise RewardError("reward 'cooper' needs an 'answer' field (the reference answer the RM is shown)")
        self._ensure_pretrained()
        answers = [str(a) for a in answer]
        with torch.no_grad():
            logits = verify_logits(self.model, self.tokenizer, list(zip(prompts, answers, completions)),
                                   batch_size=self.batch_size)
        scores = torch.sigmoid(logits.float()).cpu().tolist()
        self._stash_groups(prompts, answers, completions, scores)
        return scores

    def _stash_groups(self, prompts, answers, completions, scores) -> None:
        G = self.group_size
        if len(prompts) % G:
            return
        for start in range(0, len(prompts), G):
            group = range(start, start + G)
            if len({(prompts[i], answers[i]) for i in group}) != 1:
                return  # not a rollout batch (e.g. greedy evaluation): nothing is kept
        self._stash["groups"] += len(prompts) // G
        for start in range(0, len(prompts), G):
            positive = None
            for i in range(start, start + G):
                correct = self.task.verify(completions[i], answers[i])
                key = "correct" if correct else "wrong"
                self._stash[f"n_{key}"] += 1
                self._stash[f"score_{key}"] += scores[i]
                self._stash["agree"] += (scores[i] > 0.5) == correct
                if correct and positive is None:
                    positive = (prompts[i], answers[i], completions[i])
            if positive is not None:
                self._stash["positives"].append(positive)

    def _reset_stash(self) -> None:
        self._stash = {"positives": [], "groups": 0, "n_correct": 0, "n_wrong": 0, "score_correct": 0.0,
                       "score_wrong": 0.0, "agree": 0}

    # -- hooks for the training loop -------------------------------------------------------------
    def build_pairs(self, step: int) -> list[tuple[str, str, str, str]]:
        """(question, answer, positive, negative) for the stashed positives.

        ``negatives="slip"``: :func:`corrupt_final_answer`; ``"mixed"``: each negative is, with
        probability ½, :func:`truncate_before_answer` instead. Drawn from a generator seeded by
        (seed, step) and checked to fail the verifier (up to 10 draws each; a positive without one
        is skipped)."""
        rng = random.Random(f"cooper:negatives:{self.seed}:{step}")
        pairs = []
        for question, answer, positive in self._stash["positives"]:
            for _ in range(10):
                corrupt = truncate_before_answer if self.negatives == "mixed" and rng.random() < 0.5 \
                    else corrupt_final_answer
                negative = corrupt(positive, rng)
                if negative is None:
                    break
                if not self.task.verify(negative, answer):
                    pairs.append((question, answer, positive, negative))
                    break
        return pairs

    data_parallel = True  # after_step merges every process's rollouts: the replicas stay identical

    def after_step(self, step: int) -> dict:
        """Use the rollouts scored since the last call: one contrastive RM step (when ``update``).

        Under torchrun every process contributes its rollouts (in rank order, which is the order one
        process would have seen them in) and every process takes the same RM step."""
        self._ensure_pretrained()
        stash = self._stash = _merged_over_processes(self._stash)
        pairs = self.build_pairs(step)
        metrics = {"rm/pairs": len(pairs), "rm/groups": stash["groups"]}
        if stash["n_correct"] + stash["n_wrong"]:
            metrics["rm/agreement"] = stash["agree"] / (stash["n_correct"] + stash["n_wrong"])
        for key in ("correct", "wrong"):
            if stash[f"n_{key}"]:
                metrics[f"rm/score_{key}"] = stash[f"score_{key}"] / stash[f"n_{key}"]
        self._reset_stash()
        if self.update and pairs:
            metrics.update(self.contrastive_step(pairs))
        return metrics

    def contrastive_step(self, pairs: Sequence[tuple[str, str, str, str]]) -> dict:
        """One AdamW step of :func:`contrastive_loss` on (question, answer, positive, negative) pairs.

        Returns the loss and pair accuracy (s⁺ > s⁻) measured before the step."""
        rows = [(q, a, pos) for q, a, pos, _ in pairs] + [(q, a, neg) for q, a, _, neg in pairs]
        with torch.enable_grad(), torch.autocast(model_device(self.model).type, enabled=False):
            logits = verify_logits(self.model, self.tokenizer, rows)                     # [2P]
            positive, negative = logits[:len(pairs)], logits[len(pairs):]                # [P], [P]
            loss = contrastive_loss(positive, negative)
            loss.backward()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        return {"rm/update_loss": loss.item(),
                "rm/update_pair_accuracy": (positive > negative).float().mean().item(),
                "rm/updates": self.updates}

    def evaluate(self) -> dict:
        """Held-out verification metrics (:func:`evaluate_verify_rm`); the first call after
        pretraining also reports the pretraining metrics."""
        self._ensure_pretrained()
        metrics = evaluate_verify_rm(self.model, self.tokenizer, self.eval_examples, batch_size=self.batch_size)
        metrics.update(self._pretrain_metrics)
        self._pretrain_metrics = {}
        return metrics

    def state_dict(self) -> dict:
        """RM weights, optimizer state and update counter (the stash is empty between steps)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])
        self._pretrain = None

    def _ensure_pretrained(self) -> None:
        if self._pretrain is None:
            return
        options, self._pretrain = self._pretrain, None
        device = model_device(self.model)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), \
                torch.autocast(device.type, enabled=False):
            torch.manual_seed(self.seed)
            self._pretrain_metrics = pretrain_verify_rm(self.model, self.tokenizer, self.task, seed=self.seed,
                                                        max_grad_norm=self.max_grad_norm, **options)
        if self._pretrain_metrics.get("rm/pretrain_steps"):
            held_out = evaluate_verify_rm(self.model, self.tokenizer, self.eval_examples, batch_size=self.batch_size)
            log.info("VerifyRM pretrained: %s; held-out %s", self._pretrain_metrics,
                     {k: round(v, 4) for k, v in held_out.items()})
            if self.save_dir is not None:
                save_pretrained(self.model, self.tokenizer, self.save_dir)
                log.info("pretrained VerifyRM saved to %s (reuse it with --cooper-rm %s)", self.save_dir,
                         self.save_dir)


@register_reward("cooper", factory=True)
def _cooper_factory(tokenizer, task=None, model=None, device=None, *, rm_path: str | None = None,
                    trust_remote_code: bool = False, group_size: int = 8, update: bool = True, rm_lr: float = 3e-4,
                    seed: int = 0, eval_size: int = 256, pretrain: dict | None = None, max_grad_norm: float = 1.0,
                    negatives: str = "slip", save_dir=None, eval_seed: int = 0):
    """COOPER: σ(reference-aware verifier RM), the RM updated contrastively after each step (rlxf cooper).

    Its own options (``rlxf cooper`` fills them from ``--cooper-*``): ``rm_path`` (a trained VerifyRM
    directory, or the policy checkpoint to start a fresh head from), ``pretrain`` (``{steps, lr,
    batch_size}`` for a fresh head, None for a trained one), ``update``, ``rm_lr``, ``negatives``,
    ``eval_size``, ``eval_seed`` (draws the held-out pairs), ``group_size``, ``seed``, ``max_grad_norm``,
    ``trust_remote_code``, ``save_dir``
    (where a freshly pretrained RM is saved). The RM uses the policy's tokenizer and dtype.
    """
    if rm_path is None:
        raise RewardError("reward 'cooper' needs rm_path: a trained VerifyRM directory or the checkpoint to start "
                          "a fresh verifier head from (rlxf cooper passes --cooper-rm or --model)")
    if task is None:
        raise RewardError("reward 'cooper' needs a built-in task (--dataset task:NAME): its verifier picks "
                          "the positives the RM is updated on")
    dtype = next(model.parameters()).dtype if model is not None else torch.float32
    devices = [device] if device is not None and torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the fresh head's init leaves the policy's RNG alone
        torch.manual_seed(seed)
        rm = load_reward_model(rm_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                               pad_token_id=tokenizer.pad_token_id, resize_to=len(tokenizer))
    return CooperReward(rm, tokenizer, task, group_size=group_size, update=update, lr=rm_lr, seed=seed,
                        eval_size=eval_size, pretrain=pretrain, max_grad_norm=max_grad_norm, negatives=negatives,
                        save_dir=save_dir, eval_seed=eval_seed)


def _merged_over_processes(stash: dict) -> dict:
    """Every process's stash, concatenated in rank order (counts summed); the stash itself outside torchrun."""
    from rlxf.runtime import distributed

    if not distributed.active():
        return stash
    parts = distributed.gather(stash)
    merged = {key: sum(part[key] for part in parts) for key in stash if key != "positives"}
    merged["positives"] = [positive for part in parts for positive in part["positives"]]
    return merged
