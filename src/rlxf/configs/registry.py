"""The one recipe registry: name → config class, train function, example configs, capabilities.

Read by the CLI (its sub-commands and ``--help``), ``rlxf compare``, the data-parallel launch check
and the multi-run workflows (COOL-RLHF's policy recipe, RLAIF's training recipe). Config classes
and train functions are named as ``module:attribute`` and imported when used, so reading the table
imports neither torch nor a recipe.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass

from rlxf.config import ConfigError


@dataclass(frozen=True)
class Recipe:
    """One single-run recipe.

    config: ``module:ConfigClass`` (torch-free). train: ``module:function`` taking the config and
    returning the run's result (``summary``, ``output_dir``). kind: ``offline`` (a fixed dataset)
    or ``online`` (samples from the policy). data_parallel: runs under torchrun. examples: config
    files under ``configs/`` that run it on the embedded tiny model.
    """

    name: str
    config: str
    train: str
    summary: str
    kind: str
    data_parallel: bool = True
    examples: tuple[str, ...] = ()

    def config_class(self) -> type:
        return _attribute(self.config)

    def train_fn(self):
        return _attribute(self.train)


_GRPO = "rlxf.recipes.grpo:train"
RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("sft", "rlxf.configs.sft:SFTConfig", "rlxf.recipes.sft:train",
           "supervised fine-tuning on prompt/completion or messages", "offline", examples=("configs/sft_tiny.yaml",)),
    Recipe("rm", "rlxf.configs.rm:RewardModelConfig", "rlxf.recipes.reward_model:train",
           "reward model: Bradley-Terry (margin, centering) or focal ranking", "offline",
           examples=("configs/rm_tiny.yaml", "configs/rm_focal_tiny.yaml")),
    Recipe("dpo", "rlxf.configs.preference:PreferenceConfig", "rlxf.recipes.preference:train",
           "DPO / IPO / cDPO / DPO+NLL on preference pairs", "offline",
           examples=("configs/dpo_tiny.yaml", "configs/ipo_tiny.yaml", "configs/cdpo_tiny.yaml", "configs/dpo_nll_tiny.yaml",
                     "configs/dpo_lora_tiny.yaml", "configs/simpo_tiny.yaml")),
    Recipe("rpo", "rlxf.configs.preference:RPOConfig", "rlxf.recipes.preference:train",
           "NVIDIA reward-aware preference optimisation (scored pairs)", "offline", examples=("configs/rpo_tiny.yaml",)),
    Recipe("orpo", "rlxf.configs.preference:ORPOConfig", "rlxf.recipes.preference:train",
           "odds-ratio preference optimisation (reference-free)", "offline", examples=("configs/orpo_tiny.yaml",)),
    Recipe("kto", "rlxf.configs.kto:KTOConfig", "rlxf.recipes.kto:train",
           "KTO on unpaired thumbs-up/down examples (pairs are split)", "offline", examples=("configs/kto_tiny.yaml",)),
    Recipe("grpo", "rlxf.configs.grpo:GRPOConfig", _GRPO,
           "GRPO: group-relative policy optimisation with any reward", "online",
           examples=("configs/grpo_tiny.yaml", "configs/gspo_tiny.yaml", "configs/cispo_tiny.yaml",
                     "configs/grpo_calculator_tiny.yaml")),
    Recipe("dr_grpo", "rlxf.configs.grpo:DrGRPOConfig", _GRPO,
           "Dr. GRPO: no std scaling, constant length normaliser", "online", examples=("configs/dr_grpo_tiny.yaml",)),
    Recipe("dapo", "rlxf.configs.grpo:DAPOConfig", _GRPO,
           "DAPO: clip-higher, dynamic sampling, token-mean loss, overlong shaping", "online",
           examples=("configs/dapo_tiny.yaml",)),
    Recipe("rloo", "rlxf.configs.grpo:RLOOConfig", _GRPO, "RLOO: leave-one-out baseline, no std scaling", "online",
           examples=("configs/rloo_tiny.yaml",)),
    Recipe("online-dpo", "rlxf.configs.online_dpo:OnlineDPOConfig", "rlxf.recipes.online_dpo:train",
           "online DPO: two samples per prompt, labelled by a reward, model or judge", "online",
           data_parallel=False, examples=("configs/online_dpo_tiny.yaml",)),
    Recipe("ppo", "rlxf.configs.ppo:PPOConfig", "rlxf.recipes.ppo:train",
           "PPO-RLHF: reward model, critic, KL-in-reward, GAE", "online", examples=("configs/ppo_tiny.yaml",)),
    Recipe("cooper", "rlxf.configs.cooper:CooperConfig", "rlxf.recipes.cooper:train",
           "COOPER: GRPO against a verifier RM co-trained on the rollouts", "online",
           examples=("configs/cooper_tiny.yaml",)),
)}


def get_recipe(name: str, *, where: str = "") -> Recipe:
    """The registered recipe ``name``; a :class:`ConfigError` naming the closest one otherwise."""
    if name in RECIPES:
        return RECIPES[name]
    close = difflib.get_close_matches(str(name), list(RECIPES), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    prefix = f"{where}: " if where else ""
    raise ConfigError(f"{prefix}unknown recipe {name!r}; {hint}choose one of {', '.join(RECIPES)}")


def recipe_names(*, kind: str | None = None, data_parallel: bool | None = None) -> tuple[str, ...]:
    """Registered names, optionally only those of one ``kind`` or data-parallel capability."""
    return tuple(name for name, r in RECIPES.items()
                 if (kind is None or r.kind == kind) and (data_parallel is None or r.data_parallel == data_parallel))


def _attribute(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)
