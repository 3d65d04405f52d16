"""Config of ``rlxf cooper``: docs/methods/cooper.md."""

from __future__ import annotations

from dataclasses import dataclass

from rlxf.config import NON_NEGATIVE, POSITIVE, Bounds, ConfigError, check_choice, option
from rlxf.configs.choices import COOPER_NEGATIVES as NEGATIVES
from rlxf.configs.grpo import GRPOConfig


@dataclass(frozen=True)
class CooperConfig(GRPOConfig):
    """Config of ``rlxf cooper``: GRPO fields plus the VerifyRM's (``cooper_*``)."""

    reward: str = option("cooper", "reward: 'cooper' (the co-trained VerifyRM); use rlxf grpo for others")
    beta: float | None = option(0.001, "KL-in-loss coefficient β (COOPER's script: 0.001, k3)")
    lr: float = option(1e-4, "learning rate (AdamW); the tiny-model rate docs/methods/cooper.md measured — the "
                       "paper uses 1e-6")
    cooper_rm: str | None = option(None, "a trained VerifyRM directory, e.g. an earlier cooper run's "
                                   "<output_dir>/verify_rm; None = start from --model with a fresh head, pretrain "
                                   "it on the task and save it to <output_dir>/verify_rm")
    cooper_update: bool = option(True, "update the VerifyRM contrastively after every policy step (false = the "
                                 "static-RM baseline)")
    cooper_negatives: str = option("slip", "negatives for the RM update: slip = the positive with its final answer "
                                   "shifted; mixed = half of them cut before the final answer instead",
                                   choices=NEGATIVES)
    cooper_rm_lr: float = option(3e-4, "VerifyRM learning rate for the contrastive updates (AdamW); tuned for "
                                 "the tiny model — the paper uses 1e-5", bounds=POSITIVE)
    cooper_pretrain_steps: int = option(800, "BCE pretraining steps of a fresh VerifyRM (ignored with --cooper-rm)",
                                        bounds=NON_NEGATIVE)
    cooper_pretrain_lr: float = option(1e-3, "VerifyRM pretraining learning rate; tuned for the tiny model — the "
                                       "paper uses 2e-5", bounds=POSITIVE)
    cooper_pretrain_batch_size: int = option(64, "rows per pretraining step (half correct, half wrong)",
                                             bounds=Bounds(low=2))
    cooper_eval_size: int = option(256, "held-out verification rows (task eval split, balanced) for rm/* eval metrics",
                                   bounds=Bounds(low=2))

    def __post_init__(self):
        super().__post_init__()
        check_choice(self, "cooper_negatives")
        if not self.dataset.startswith("task:"):
            raise ConfigError(f"rlxf cooper needs a built-in task dataset (--dataset task:NAME): its verifier picks "
                              f"the positive rollouts the reward model learns from; got {self.dataset!r}")
        if self.reward != "cooper":
            raise ConfigError(f"rlxf cooper trains against --reward cooper, got {self.reward!r}; use rlxf grpo "
                              "for another reward")

    def reward_options(self) -> dict:
        """The VerifyRM's own options (``rlxf.rewards.cooper``), from ``--cooper-*``."""
        from pathlib import Path

        fresh = self.cooper_rm is None
        save_dir = Path(self.output_dir or "runs/cooper") / "verify_rm" if fresh else None
        return {**super().reward_options(), "rm_path": self.cooper_rm or self.model, "update": self.cooper_update,
                "rm_lr": self.cooper_rm_lr, "eval_size": self.cooper_eval_size, "negatives": self.cooper_negatives,
                "max_grad_norm": self.max_grad_norm, "save_dir": save_dir, "eval_seed": self.eval_seed,
                "pretrain": {"steps": self.cooper_pretrain_steps, "lr": self.cooper_pretrain_lr,
                             "batch_size": self.cooper_pretrain_batch_size} if fresh else None}
