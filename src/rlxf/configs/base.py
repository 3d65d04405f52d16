"""The configuration every recipe shares (``RunConfig``) and every offline recipe adds (``TrainConfig``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlxf.config import (AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, SEED, ConfigError, between, check_choice,
                         check_numbers, option)


@dataclass(frozen=True)
class RunConfig:
    """Fields shared by every recipe, offline (sft, rm, dpo, rpo, orpo) and online (grpo, ppo)."""

    model: str = option("tiny", "model: 'tiny' (the embedded 0.9M-parameter model: every default is tuned for "
                        "it; for a real model start from the values in the option's help and docs/cli.md#defaults), "
                        "a local HF directory, or a hub id")
    dataset: str = option("task:arithmetic", "training data: task:NAME, a .jsonl/.json/.parquet/.csv file, "
                          "a saved HF dataset directory or a hub dataset name")
    eval_dataset: str | None = option(None, "held-out data (default: the task's eval split, or a holdout "
                                      "of eval_holdout of a file dataset)")
    eval_split: str = option("test", "split of a hub/saved eval_dataset to use (tasks use their eval split)")
    eval_holdout: float = option(0.05, "fraction of a file dataset held out for eval when no eval_dataset",
                                 bounds=between(0, 1, high_open=True))
    task_size: int = option(4000, "training rows drawn from a built-in task", bounds=AT_LEAST_ONE)
    eval_size: int = option(512, "eval rows drawn from a built-in task (also caps file eval sets)", bounds=AT_LEAST_ONE)
    skip_invalid: bool = option(False, "drop malformed rows (counted in the log) instead of stopping")
    output_dir: str | None = option(None, "where the run writes its files (None = runs/<recipe>)")
    seed: int = option(0, "random seed (training rows, data order, sampling, init of new heads); the held-out "
                       "rows follow --eval-seed", bounds=SEED)
    eval_seed: int = option(0, "seed of the held-out rows (a task's eval problems, a file's holdout), fixed "
                            "so that runs with different --seed evaluate on the same rows", bounds=SEED)
    max_steps: int = option(0, "optimizer steps; 0 = derive from epochs", bounds=NON_NEGATIVE)
    lr: float = option(1e-4, "peak learning rate (AdamW)", bounds=POSITIVE)
    weight_decay: float = option(0.0, "AdamW weight decay", bounds=NON_NEGATIVE)
    adam_beta1: float = option(0.9, "AdamW beta1", bounds=between(0, 1, high_open=True))
    adam_beta2: float = option(0.999, "AdamW beta2", bounds=between(0, 1, high_open=True))
    warmup_steps: int = option(10, "linear warm-up steps", bounds=NON_NEGATIVE)
    schedule: str = option("cosine", "learning-rate schedule after warm-up", choices=("cosine", "linear", "constant"))
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 disables", bounds=NON_NEGATIVE)
    max_prompt_length: int = option(128, "max prompt tokens (prompts are cut from the left)", bounds=AT_LEAST_ONE)
    log_every: int = option(5, "log train metrics every N steps", bounds=AT_LEAST_ONE)
    eval_every: int = option(50, "evaluate every N steps (and at start and end); 0 = start and end only",
                             bounds=NON_NEGATIVE)
    eval_batch_size: int = option(64, "examples per eval batch", bounds=AT_LEAST_ONE)
    eval_generate: int = option(0, "with a task dataset: greedy accuracy on N held-out task problems at each eval",
                                bounds=NON_NEGATIVE)
    max_new_tokens: int = option(64, "generation budget for eval_generate", bounds=AT_LEAST_ONE)
    save_every: int = option(0, "checkpoint every N steps (and at the end); 0 = end only", bounds=NON_NEGATIVE)
    keep_checkpoints: int = option(2, "how many step checkpoints to keep (0 = all)", bounds=NON_NEGATIVE)
    resume: bool = option(False, "continue from the newest complete checkpoint in output_dir")
    device: str = option("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = option("auto", "parameter dtype: auto (fp32 master weights; with --autocast, bf16 compute on "
                        "CUDA; with LoRA on CUDA the frozen base is bf16 and the adapters fp32) | float32 | "
                        "bfloat16 | float16")
    autocast: bool = option(True, "bf16 autocast on CUDA when trained parameters are fp32 (mixed precision): "
                            "full fine-tuning's fp32 weights, LoRA adapters over a bf16 or 4-bit base")
    gradient_checkpointing: bool = option(False, "recompute activations in backward (less memory, slower)")
    compile: bool = option(False, "torch.compile each decoder layer, and the static engine's decode step in "
                           "online recipes (CUDA only; ignored on CPU): fewer kernels and less activation "
                           "memory after a one-off compile of tens of seconds")
    activation_memory_budget: float = option(1.0, "with --compile: share of the compiled layers' activations "
                                             "kept for backward; torch's partitioner recomputes the rest "
                                             "(0.05: memory near --gradient-checkpointing at close to full "
                                             "speed, measured in docs/performance.md); 1 = keep all",
                                             bounds=between(0, 1, low_open=True))
    disable_dropout: bool = option(True, "set dropout to 0 in the trained model (TRL's default)")
    lora_r: int = option(0, "LoRA rank; 0 = full fine-tuning", bounds=NON_NEGATIVE)
    lora_alpha: int = option(16, "LoRA alpha", bounds=POSITIVE)
    lora_dropout: float = option(0.0, "LoRA dropout", bounds=between(0, 1, high_open=True))
    lora_targets: str = option("q_proj,k_proj,v_proj,o_proj", "comma-separated module names LoRA adapts, "
                               "or all-linear")
    fsdp: bool = option(False, "under torchrun: shard parameters, gradients and optimiser state over the processes "
                        "with FSDP2 (docs/distributed.md#sharded-training-fsdp2)")
    fsdp_cpu_offload: bool = option(False, "with --fsdp on CUDA: keep the shards, their gradients and the optimiser "
                                    "state in host memory (the optimiser steps on the CPU)")
    merge_lora: bool = option(True, "also write the merged model to final/merged for LoRA runs (a plain "
                              "bf16 model when --quantize dequantises it)")
    quantize: str = option("none", "store the frozen base weights quantised: nf4 = 4-bit NormalFloat through "
                           "bitsandbytes, trained through LoRA adapters (QLoRA; needs --lora-r > 0), or none",
                           choices=("none", "nf4"))
    double_quant: bool = option(False, "with --quantize nf4: also quantise the per-block scales (QLoRA's "
                                "double quantisation, about 0.37 bits a weight less)")
    trust_remote_code: bool = option(False, "allow model repositories to run their own code")
    tensorboard: bool = option(False, "also log to TensorBoard (output_dir/tensorboard)")
    progress: bool = option(True, "show a progress bar")
    threads: int = option(0, "torch CPU threads; 0 = torch default", bounds=NON_NEGATIVE)

    def __post_init__(self):
        check_numbers(self)  # every numeric field of the (sub)class, before any other check uses one
        check_choice(self, "schedule")
        check_choice(self, "quantize")
        if self.quantize != "none" and self.lora_r == 0:
            raise ConfigError(f"--quantize {self.quantize} freezes the base weights in 4 bits, so only LoRA adapters "
                              "can train: add --lora-r (e.g. --lora-r 16), or drop --quantize")
        if self.double_quant and self.quantize == "none":
            raise ConfigError("--double-quant quantises the scales of quantised weights: add --quantize nf4, or "
                              "drop --double-quant")
        if self.activation_memory_budget < 1 and not self.compile:
            raise ConfigError("--activation-memory-budget applies to the compiled layers: add --compile "
                              "(or use --gradient-checkpointing without it)")
        self._check_fsdp()

    def _check_fsdp(self) -> None:
        if self.fsdp_cpu_offload and not self.fsdp:
            raise ConfigError("--fsdp-cpu-offload offloads FSDP2 shards: add --fsdp")
        if not self.fsdp:
            return
        if self.lora_r > 0:
            raise ConfigError("--fsdp with LoRA (--lora-r) is not supported: a LoRA run trains a few adapter weights, "
                              "so replicated data parallel (torchrun without --fsdp) or QLoRA fits it; drop --fsdp")
        if self.compile:
            raise ConfigError("--fsdp with --compile is not supported; drop one of them")

    def resolved_output_dir(self, recipe: str) -> Path:
        return Path(self.output_dir or f"runs/{recipe}")


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    """Fields shared by every offline recipe (sft, rm, dpo, rpo, orpo): a fixed dataset in batches."""

    pair_kind: str = option("mixed", "preference pairs from a task: correct vs wrong, concise vs verbose, or both",
                            choices=("mixed", "correctness", "conciseness"))
    epochs: float = option(1.0, "passes over the training data when max_steps is 0", bounds=NON_NEGATIVE)
    batch_size: int = option(16, "examples (pairs for preference recipes) per micro-batch", bounds=AT_LEAST_ONE)
    grad_accum: int = option(1, "micro-batches per optimizer step", bounds=AT_LEAST_ONE)
    max_length: int = option(256, "max tokens of prompt + completion", bounds=AT_LEAST_ONE)
    truncation: str = option("truncate", "rows longer than max_length: cut them or drop them",
                             choices=("truncate", "drop"))

    def __post_init__(self):
        super().__post_init__()
        for name in ("pair_kind", "truncation"):
            check_choice(self, name)
        if self.epochs <= 0 and self.max_steps == 0:
            raise ConfigError("set --max-steps > 0 or --epochs > 0")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"--max-prompt-length ({self.max_prompt_length}) must be < --max-length "
                              f"({self.max_length})")
