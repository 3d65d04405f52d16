"""``rlxf ppo``: PPO for RLHF with a critic (InstructGPT / "N+ implementation details", docs/methods/ppo.md).

One step, top to bottom:

    sampler picks ``batch_size`` prompts → engine samples ``group_size`` completions each (π_old)
    → score s_i (reward model read at the last token, or any reward function)
      [− missing_eos_penalty when the completion hit max_new_tokens without EOS]
    → per-token reward  r_t = −β·k_t (KL to π_ref, no gradient),  r_T += s_i   (KL-in-reward)
    → GAE(γ, λ) on the old values → advantages (whitened over valid tokens) and returns
    → ``ppo_epochs`` × ``mini_batches`` updates of
         L = token-mean( −min(ρ Â, clip(ρ, 1±ε) Â) ) + c_v · token-mean( ½ max((V−G)², (V_clip−G)²) )
    → β update (fixed, or the adaptive controller towards ``kl_target``)

The critic is a separate model (default: initialised from the reward model, as InstructGPT and
TRL do; or from the policy checkpoint with a fresh head) or a value head on the policy's body.
Deviations, stated: the score sits on the last generated token (EOS), as verl/OpenRLHF do, not
on the first padding position as TRL's port of the N+ code; one AdamW optimiser holds both policy
and critic parameters (the critic may get its own ``value_lr``); logged ``kl`` is the summed k1
per sequence, TRL's ``objective/kl``.

Under torchrun each process samples its share of every step's prompts; advantage whitening, the
token-mean losses and the adaptive KL controller use every process's tokens, and each mini-batch is
the same set of rows as in one process, so 2 processes give the 1-process numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from rlxf.config import ConfigError
from rlxf.configs.ppo import VALUE_MODELS, PPOConfig
from rlxf.losses import AdaptiveKLController, FixedKLController
from rlxf.recipes.common import load_model_for_training, load_split_rows, setup_logging
from rlxf.recipes.grpo import online_summary
from rlxf.recipes.online import RewardPipeline, build_engine, evaluate_greedy, load_prompts
from rlxf.recipes.ppo_step import PPOContext, ppo_step
from rlxf.reporting import Panel
from rlxf.runtime import distributed
from rlxf.train import Loop, lr_multiplier, run
from rlxf.train.rundir import check_output_dir, start_run_dir

log = logging.getLogger("rlxf.ppo")
def build_value_model(cfg: PPOConfig, policy, tokenizer, device, dtype):
    from rlxf.models import load_reward_model
    from rlxf.models.value import ValueModel

    if cfg.value_model == "head":
        return ValueModel.value_head(policy)
    source = cfg.reward_model if cfg.value_model == "reward_model" else cfg.model
    if cfg.dtype == "auto":   # the critic trains all its weights: fp32 masters, as full fine-tuning
        dtype = torch.float32
    critic = load_reward_model(source, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code,
                               pad_token_id=tokenizer.pad_token_id,
                               resize_to=policy.get_input_embeddings().num_embeddings)
    return ValueModel.from_sequence_classifier(critic)


def train(cfg: PPOConfig, *, recipe: str = "ppo"):
    """Run ``rlxf ppo`` on the shared loop; returns the run's result."""
    from rlxf.data.samplers import get_sampler
    from rlxf.models import Reference, save_pretrained
    from rlxf.rollout import SamplingParams

    setup_logging()
    if distributed.launched_world_size() > 1 and cfg.sampler != "uniform":
        raise ConfigError(f"--sampler {cfg.sampler} adapts to each step's pass rates, which every process would "
                          f"see only a share of; data parallel supports --sampler uniform (or run it as one process)")
    out = check_output_dir(cfg, recipe)
    rows = load_split_rows(cfg, "prompt")
    start_run_dir(cfg, out, recipe)    # only once the inputs are valid
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model_for_training(cfg)
    distributed.broadcast_parameters(model)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    prompts, eval_prompts = load_prompts(cfg, tokenizer, rows)
    reference = Reference.build(model, cfg.reference if cfg.reference != "auto" else
                                ("lora" if cfg.lora_r else "copy"))
    critic = build_value_model(cfg, model, tokenizer, device, dtype)
    distributed.broadcast_parameters(critic)
    critic.train()
    pipeline = RewardPipeline(cfg, tokenizer=tokenizer, task=prompts.task, policy=model, ref_model=reference)
    engine = build_engine(cfg, model, tokenizer, max_batch_size=max(256, cfg.batch_size * cfg.group_size))
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k, n=cfg.group_size)
    policy_params = [p for p in model.parameters() if p.requires_grad]
    critic_params = [p for p in critic.own_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": policy_params, "lr": cfg.lr}, {"params": critic_params, "lr": cfg.value_lr or cfg.lr}],
        betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    updates = cfg.ppo_epochs * cfg.mini_batches
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(
        s, warmup=cfg.warmup_steps * updates, total=cfg.max_steps * updates, schedule=cfg.schedule))
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target
              else FixedKLController(cfg.kl_coef))
    sampler = get_sampler(cfg.sampler, len(prompts), seed=cfg.seed)
    ctx = PPOContext(cfg=cfg, model=model, critic=critic, engine=engine, prompts=prompts, sampler=sampler,
                     pipeline=pipeline, reference=reference, optimizer=optimizer, scheduler=scheduler, params=params,
                     kl_ctl=kl_ctl, trainable=policy_params + critic_params)

    def step(index: int) -> dict:
        metrics = ppo_step(ctx, index)
        if hasattr(pipeline.base, "after_step"):  # stateful rewards (LMGT, COOPER) advance per step
            metrics.update(pipeline.base.after_step(index))
        return metrics

    def evaluate() -> dict:
        return evaluate_greedy(engine, eval_prompts, pipeline, max_new_tokens=cfg.max_new_tokens,
                               batch_size=max(cfg.eval_batch_size, 64))

    def summary(start: dict, last: dict) -> dict:
        return {**online_summary(cfg, start, last), "final_kl_coef": kl_ctl.value}

    return run(Loop(cfg=cfg, recipe=recipe, out=out, model=model, tokenizer=tokenizer, optimizer=optimizer,
                    scheduler=scheduler, total_steps=cfg.max_steps, step=step, evaluate=evaluate,
                    headline={"task_accuracy": "max", "reward": "max"}, panels=PANELS,
                    title=f"rlxf {recipe}: {cfg.model} on {cfg.dataset} ({cfg.reward_label})",
                    save_final=lambda path: save_pretrained(model, tokenizer, path,
                                                            merge_lora=cfg.merge_lora and cfg.lora_r > 0),
                    components={"sampler": sampler, "kl_controller": kl_ctl}, files={"critic.pt": critic},
                    summary=summary, progress_metric="score", reward_health=pipeline.health))


PANELS = [
    Panel("held-out reward (greedy)", ["reward"], split="eval"),
    Panel("held-out accuracy (greedy)", ["task_accuracy"], split="eval", ylabel="accuracy"),
    Panel("score and total reward", ["score", "non_score_reward"], split="train"),
    Panel("KL to reference (summed per sequence)", ["kl"], split="train"),
    Panel("losses", ["loss/policy", "loss/value"], split="train"),
    Panel("completion length", ["completion_length"], ylabel="tokens"),
    Panel("EOS fraction / clip fraction", ["eos_fraction", "clip_fraction", "value_clip_fraction"], split="train"),
]
