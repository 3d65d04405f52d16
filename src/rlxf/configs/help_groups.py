"""Which options ``rlxf <recipe> --help`` lists, and which it folds into named groups that
``--help-all`` shows: the main help keeps what a user of the recipe sets in most runs; options for
one reward, one memory technique or fine control of the optimiser wait one flag away."""

GROUPS: dict[str, tuple[str, ...]] = {
    "data": ("eval_split", "eval_holdout", "task_size", "eval_size", "skip_invalid", "max_prompt_length",
             "eval_batch_size", "pair_kind", "truncation", "verbose_fraction"),
    "optimiser": ("weight_decay", "adam_beta1", "adam_beta2"),
    "logging and checkpoints": ("keep_checkpoints", "tensorboard", "progress"),
    "memory and speed": ("dtype", "autocast", "gradient_checkpointing", "compile", "activation_memory_budget",
                         "threads", "engine", "adapter_sampling", "share_prompt", "dp_rollouts", "precompute_ref"),
    "sharding (FSDP2)": ("fsdp_cpu_offload",),
    "LoRA": ("lora_alpha", "lora_dropout", "lora_targets", "merge_lora", "double_quant"),
    "model loading": ("trust_remote_code", "disable_dropout"),
    "reward: judges (--reward lmgt, d_rlaif)": ("judge", "judge_model", "judge_prompts", "lmgt_base", "lmgt_scale",
                                                "lmgt_decay", "lmgt_call_fraction", "lmgt_knowledge"),
    "reward: likelihood (--reward likelihood)": ("likelihood_kind", "likelihood_scorer"),
    "reward: Kimi length": ("length_reward_weight", "length_reward_warmup"),
    "reward: model-written code": ("unsafe_reward_code",),
    "reward health": ("max_reward_failure_share", "reward_failure_patience"),
    "sampling details": ("top_p", "top_k", "max_sample_batches", "overlong_buffer", "overlong_factor",
                         "mask_truncated"),
    "objective details": ("leave_one_out", "kl_kind", "reference", "kl_reward_coef"),
    "tool use (--env)": ("max_turns", "max_episode_tokens", "warmup_sft_steps", "warmup_sft_lr",
                         "warmup_sft_batch_size"),
}
GROUP_OF = {name: group for group, names in GROUPS.items() for name in names}
