"""What ``rlxf cai-sft`` and ``rlxf rlaif`` share: the sampling options, prompts, a policy that
answers conversations, the judge, and writing files.

A *conversation* is a list of ``{"role", "content"}`` messages. The policy answers one through
:class:`PolicyChat`: a string prompt is encoded as plain text (``tokenizer(prompt)``, the form
rlxf's SFT rows and tasks use, so the first answer is the policy's ordinary completion); a
conversation goes through the tokenizer's chat template, or, when it has none, the
``Human: … Assistant:`` text format of the Constitutional AI paper. A rendering longer than
``max_prompt_length`` tokens keeps its last ``max_prompt_length`` tokens (counted).
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from rlxf.config import AT_LEAST_ONE, NON_NEGATIVE, SEED, ConfigError, check_numbers, option

log = logging.getLogger("rlxf.ai_feedback")


@dataclass(frozen=True)
class SamplingOptions:
    """Options shared by ``rlxf cai-sft`` and ``rlxf rlaif``: the policy, its prompts and sampling."""

    model: str = option("tiny", "policy: 'tiny' (embedded), a local HF directory, or a hub id")
    dataset: str = option("task:arithmetic", "prompts: task:NAME, or a .jsonl/.json/.parquet/.csv file, saved HF "
                          "dataset directory or hub dataset with a 'prompt' field")
    split: str = option("train", "split to read: train or eval for a task, the split name of a hub/saved dataset")
    num_prompts: int = option(256, "prompts to use: drawn from a task, or the first N rows of a file/dataset "
                              "(0 = every row of a file/dataset)", bounds=NON_NEGATIVE)
    principles: str | None = option(None, "principles YAML file (default: rlxf's constitution.yaml; "
                                    "docs/methods/rlaif.md)")
    principle: str | None = option(None, "use only the principle with this name (default: one drawn per "
                                   "prompt or pair)")
    temperature: float = option(1.0, "sampling temperature of the policy (0 = greedy)", bounds=NON_NEGATIVE)
    max_new_tokens: int = option(48, "most tokens per generated text", bounds=AT_LEAST_ONE)
    max_prompt_length: int = option(192, "most tokens of a rendered conversation the policy sees (longer ones "
                                    "keep their last tokens)", bounds=AT_LEAST_ONE)
    batch_size: int = option(256, "sequences generated per forward pass", bounds=AT_LEAST_ONE)
    seed: int = option(0, "random seed (prompts, principles, sampling)", bounds=SEED)
    overwrite: bool = option(False, "replace the files of an earlier run in output_dir")
    device: str = option("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = option("auto", "policy dtype while sampling: auto (bf16 on CUDA, else fp32) | float32 | "
                        "bfloat16 | float16")
    trust_remote_code: bool = option(False, "allow model repositories to run their own code")
    threads: int = option(0, "torch CPU threads; 0 = torch default", bounds=NON_NEGATIVE)

    def __post_init__(self):
        check_numbers(self)  # every numeric field of the (sub)class, before any other check uses one
        if self.num_prompts == 0 and self.dataset.startswith("task:"):
            raise ConfigError("--num-prompts must be > 0 for a task: dataset (how many problems to draw)")


# -- prompts ------------------------------------------------------------------------------------

def load_prompt_rows(cfg: SamplingOptions) -> tuple[list[dict], object | None]:
    """(validated prompt rows, the task or None). Rows keep their extra fields (``answer`` …)."""
    from rlxf.data import load_rows, validate_rows
    from rlxf.tasks import get_task

    is_task = cfg.dataset.startswith("task:")
    rows = load_rows(cfg.dataset, kind="prompt", split=cfg.split, seed=cfg.seed,
                     task_size=cfg.num_prompts if is_task else None,
                     limit=None if is_task or cfg.num_prompts == 0 else cfg.num_prompts)
    rows, _ = validate_rows(rows, kind="prompt", skip_hint=None)  # these commands have no --skip-invalid
    return rows, (get_task(cfg.dataset.split(":", 1)[1]) if is_task else None)


def verifier(task, rows: list[dict]):
    """``verify(text, row) -> bool | None``: the task's verifier, exact match on ``answer``, or None."""
    from rlxf.rewards import exact_match

    if task is not None:
        return lambda text, row: bool(task.verify(text, str(row["answer"])))
    if rows and all(row.get("answer") is not None for row in rows):
        return lambda text, row: exact_match([row["prompt"]], [text], answer=[row["answer"]])[0] == 1.0
    return lambda text, row: None


def user_turn(prompt) -> list[dict]:
    """A prompt (string or message list) as the opening messages of a conversation."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def as_completion(text: str, prompt):
    """A conversational prompt gets an assistant message, so prompt and completion share a form."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


# -- the policy as a chat model -------------------------------------------------------------------

class PolicyChat:
    """Sample answers to conversations from a causal LM with :class:`rlxf.rollout.HFEngine`."""

    def __init__(self, cfg: SamplingOptions):
        import torch

        from rlxf.models import ensure_pad_token, load_policy, load_tokenizer, resolve_device, resolve_dtype
        from rlxf.rollout import HFEngine

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        try:
            self.device = resolve_device(cfg.device)
            dtype = resolve_dtype(cfg.dtype, self.device)
        except ValueError as exc:
            raise ConfigError(f"--device/--dtype: {exc}") from None
        self.tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        resize = len(self.tokenizer) if ensure_pad_token(self.tokenizer) else None
        self.model = load_policy(cfg.model, dtype=dtype, device=self.device, trust_remote_code=cfg.trust_remote_code,
                                 resize_to=resize)
        self.engine = HFEngine(self.model, self.tokenizer, max_batch_size=cfg.batch_size)
        self.cfg = cfg
        self.truncated = 0
        torch.manual_seed(cfg.seed)

    def encode(self, messages: str | list[dict]) -> list[int]:
        """Token ids of a plain prompt, or of a conversation followed by the start of the assistant's
        turn (see the module docstring)."""
        tok = self.tokenizer
        if isinstance(messages, str):
            ids = list(tok(messages)["input_ids"])
        elif getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
            ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids)
        else:
            names = {"user": "Human", "assistant": "Assistant", "system": "System"}
            text = "".join(f"\n\n{names.get(m['role'], m['role'])}: {m['content']}" for m in messages)
            ids = list(tok(text.lstrip("\n") + "\n\nAssistant:")["input_ids"])
        if len(ids) > self.cfg.max_prompt_length:
            self.truncated += 1
            ids = ids[-self.cfg.max_prompt_length:]
        return ids

    def generate(self, conversations: list[str | list[dict]], *, n: int = 1) -> list[list[str]]:
        """``n`` sampled answers per plain prompt or conversation, ``[len(conversations)][n]``."""
        from rlxf.rollout import SamplingParams

        params = SamplingParams(max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature, n=n)
        chunk = max(1, self.cfg.batch_size // n)
        out: list[list[str]] = []
        for start in range(0, len(conversations), chunk):
            ids = [self.encode(c) for c in conversations[start:start + chunk]]
            texts = self.engine.generate(ids, params).text
            out += [texts[i * n:(i + 1) * n] for i in range(len(ids))]
        return out

    def release(self) -> None:
        """Free the sampling copy of the model (before a training run loads its own)."""
        import torch

        del self.engine, self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# -- judges -------------------------------------------------------------------------------------

def build_judge(spec: str, **options):
    """``rlxf.judges.build_judge(spec, **options)``, looked up at call time (tests replace it)."""
    try:
        judges = importlib.import_module("rlxf.judges")
        build = judges.build_judge
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"judge {spec!r}: rlxf.judges.build_judge is not available ({exc})") from None
    try:
        return build(spec, **options)
    except ValueError as exc:  # JudgeError: a bad spec or options
        raise ConfigError(f"judge {spec!r}: {exc}") from None


# -- files --------------------------------------------------------------------------------------

def prepare_output(out: Path, files: tuple[str, ...], *, overwrite: bool) -> None:
    existing = [name for name in files if (out / name).exists()]
    if existing and not overwrite:
        raise ConfigError(f"output dir {out} already holds {', '.join(existing)}; pass --overwrite to replace "
                          f"them, or choose another --output-dir (nothing was overwritten)")
    out.mkdir(parents=True, exist_ok=True)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({k: v for k, v in row.items() if not k.startswith("_")}, ensure_ascii=False) + "\n")
    tmp.replace(path)


def train_values(cfg, dataset: Path, output_dir: Path, config_file: str | None) -> dict:
    """Options for the downstream training recipe: the policy, the new file, our seed/device/threads,
    then the user's YAML file (``--sft-config`` / ``--train-config``) on top.

    With ``--overwrite`` an earlier training run in ``output_dir`` (inside our own output
    directory) is removed first, so the whole command can be re-run."""
    import shutil

    from rlxf.config import load_yaml

    if cfg.overwrite and output_dir.is_dir():
        shutil.rmtree(output_dir)

    values = {"model": cfg.model, "dataset": str(dataset), "output_dir": str(output_dir), "seed": cfg.seed,
              "device": cfg.device, "threads": cfg.threads, "trust_remote_code": cfg.trust_remote_code}
    if config_file:
        values.update(load_yaml(config_file))
    return values
