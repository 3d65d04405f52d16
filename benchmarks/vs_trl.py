"""rlxf vs TRL (and transformers ``generate``) side by side, in one process, on one card.

    python benchmarks/vs_trl.py --out runs/bench            # the GPU run (Qwen2.5-0.5B shape)
    python benchmarks/vs_trl.py --quick --out /tmp/bench    # CPU smoke test, tiny config

Workloads (PERF.md, issue 5), on the Qwen2.5-0.5B architecture with **random-init weights**
(bf16; hidden 896, 24 layers, 14 query / 2 KV heads, intermediate 4864, vocab 151,936, tied
embeddings), synthetic token data from the character tokenizer (every prompt/completion has
exactly the stated token count):

- ``dpo``: one optimizer step on 8 pairs, prompt 128 + completion 384 tokens. rlxf = its loss +
  ``token_logps`` + fused AdamW with reference log-probs precomputed once (the preference recipe's
  default; the one-off cost is reported separately), with and without activation checkpointing.
  TRL DPOTrainer: defaults (activation checkpointing on), checkpointing off, and checkpointing off +
  ``precompute_ref_log_probs`` (the like-for-like setting).
- ``decode``: batch 128, 64-token prompts → 256 new tokens, greedy, no EOS (the EOS id is outside
  the vocabulary so every row runs the full length). transformers ``generate`` with the dynamic
  cache, the static cache (no compile) and the static cache with its automatic ``torch.compile``;
  rlxf ``HFEngine``; rlxf ``StaticEngine`` (CUDA graph) and ``StaticEngine(compile=True)``.
- ``grpo``: 16 prompts × 8 completions × 256 new tokens (temperature 1), random rewards, one
  optimizer step (token-mean clipped loss, β = 0 as TRL's default). rlxf = ``StaticEngine``
  generation + ``token_logps`` policy step (micro-batches of 32); TRL GRPOTrainer without vLLM
  (its defaults otherwise: activation checkpointing, β = 0).

Timing: warm-up, then ``torch.cuda.synchronize()`` around each step; the median of the timed
steps. Peak memory: ``torch.cuda.max_memory_allocated()`` with the peak reset (and everything of
the previous run freed) before each run. FLOPs: ``2·N`` per token forward, ``6·N`` forward +
backward, ``N`` = all parameters (494M: the tied embedding counted once, since it is also the
output-head matmul); attention score FLOPs and checkpointing recompute are not counted.

Each workload (and each variant) runs in its own try/except and the results file is rewritten
after every variant, so one failure or a deadline loses nothing else. ``--deadline`` skips what
would not finish in time. Results: ``results.json`` and ``results.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

FULL = dict(
    model=dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
               num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=32768,
               rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    dpo=dict(pairs=8, prompt=128, completion=384, warmup=3, steps=10),
    decode=dict(batch=128, prompt=64, new=256, warmup_new=8, runs=2),
    grpo=dict(prompts=16, group=8, prompt=64, new=256, micro=32, warmup=2, steps=3, trl_steps=2),
)
QUICK = dict(
    model=dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
               rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    dpo=dict(pairs=2, prompt=8, completion=16, warmup=1, steps=2),
    decode=dict(batch=4, prompt=8, new=8, warmup_new=2, runs=1),
    grpo=dict(prompts=2, group=2, prompt=8, new=8, micro=2, warmup=1, steps=1, trl_steps=1),
)
ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ +-*/=.,:;?!()"


# -- plumbing -----------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.t_start = time.time()
        self.cfg = QUICK if args.quick else FULL
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results: dict = {"meta": {}, "dpo": {}, "decode": {}, "grpo": {}, "profile": {}, "errors": {},
                              "skipped": {}}
        from rlxf.zoo.tokenizer import build_tokenizer

        self.tokenizer = build_tokenizer()
        self.tokenizer.model_max_length = 1 << 20

    # time left before the deadline
    def left(self) -> float:
        return self.args.deadline - (time.time() - self.t_start)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def fresh(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 1e9 if self.cuda else None

    def run(self, section: str, name: str, fn, *, need_s: float = 0.0):
        if self.args.match and not re.search(self.args.match, f"{section}/{name}"):
            return None
        if self.left() < need_s:
            self.results["skipped"][f"{section}/{name}"] = (f"not run: {self.left():.0f} s left before the "
                                                             f"deadline, needs ~{need_s:.0f} s")
            print(f"[skip] {section}/{name}: deadline", flush=True)
            self.save()
            return None
        print(f"[run ] {section}/{name} ({self.left():.0f} s left)", flush=True)
        t0 = time.time()
        try:
            self.fresh()
            res = fn()
            res["wall_s"] = round(time.time() - t0, 1)
            self.results[section][name] = res
            print(f"[done] {section}/{name}: {json.dumps(res, default=str)[:400]}", flush=True)
        except Exception as err:  # one failure must not lose the others
            self.results["errors"][f"{section}/{name}"] = f"{type(err).__name__}: {err}"[:2000]
            print(f"[fail] {section}/{name}: {type(err).__name__}: {err}", flush=True)
            traceback.print_exc()
            res = None
        finally:
            self.fresh()
        self.save()
        return res

    def build_model(self, seed: int = 0):
        from transformers import AutoModelForCausalLM, Qwen2Config

        config = Qwen2Config(**self.cfg["model"], bos_token_id=1, eos_token_id=2, pad_token_id=0)
        torch.manual_seed(seed)
        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        return model

    def text(self, rng: random.Random, n_chars: int) -> str:
        return "".join(rng.choice(ALPHABET) for _ in range(n_chars))

    def save(self):
        self.results["meta"]["elapsed_s"] = round(time.time() - self.t_start, 1)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str))
        (self.out / "results.md").write_text(render_markdown(self.results))


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# -- environment ---------------------------------------------------------------------------------

def meta(b: Bench):
    import transformers

    m = b.results["meta"]
    m.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), command=" ".join(sys.argv),
             python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
             device=torch.cuda.get_device_name() if b.cuda else platform.processor() or "cpu",
             dtype=str(b.dtype), weights="random-init weights (no checkpoint), synthetic tokens",
             quick=b.args.quick, model_config=b.cfg["model"])
    try:
        import trl

        m["trl"] = trl.__version__
    except Exception as err:
        m["trl"] = f"not importable: {err}"
    model = b.build_model()
    m["params"] = count_params(model)
    m["params_non_embedding"] = m["params"] - model.get_input_embeddings().weight.numel()
    del model
    if b.cuda:
        x = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")  # 1 GiB
        y = torch.empty_like(x)
        for _ in range(3):
            y.copy_(x)
        b.sync()
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            y.copy_(x)
            b.sync()
            times.append(time.perf_counter() - t0)
        m["copy_bandwidth_TBps"] = round(2 * x.numel() * 2 / median(times) / 1e12, 3)
        a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
        for _ in range(2):
            a @ a
        b.sync()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ a
        b.sync()
        m["matmul_TFLOPs"] = round(10 * 2 * 8192 ** 3 / (time.perf_counter() - t0) / 1e12, 1)
        del x, y, a
    b.save()


# -- DPO -----------------------------------------------------------------------------------------

def dpo_data(b: Bench, n_pairs: int, seed: int = 0):
    """Text triples whose character tokenisation is exactly prompt/completion tokens long."""
    c = b.cfg["dpo"]
    rng = random.Random(seed)
    rows = []
    for _ in range(n_pairs):
        rows.append(dict(prompt=b.text(rng, c["prompt"] - 1),            # + <bos>
                         chosen=b.text(rng, c["completion"] - 1),         # + <eos>
                         rejected=b.text(rng, c["completion"] - 1)))
    return rows


def dpo_batch(b: Bench, rows):
    """[chosen; rejected] token batch as the preference recipe collates it (right-sized: no padding)."""
    tok = b.tokenizer
    seqs, masks = [], []
    for key in ("chosen", "rejected"):
        for r in rows:
            prompt = tok(r["prompt"])["input_ids"]
            completion = tok(r[key], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seqs.append(prompt + completion)
            masks.append([0] * len(prompt) + [1] * len(completion))
    ids = torch.tensor(seqs, device=b.device)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                completion_mask=torch.tensor(masks, device=b.device))


def dpo_flops(b: Bench, n_params: int, tokens: int, *, reference_forward: bool) -> float:
    return (6 + (2 if reference_forward else 0)) * n_params * tokens


def rlxf_dpo(b: Bench, *, checkpointing: bool, label_mask: bool = True, fused: bool = True,
             compile_body: bool = False, micro_pairs: int | None = None, share_prompt: bool = False,
             memory_budget: float | None = None):
    """rlxf's DPO step. ``label_mask``: the head runs over completion positions only; ``fused``: the
    fused head (``_LinearLabelLogps``) instead of checkpointed chunks; ``compile_body``: ``--compile``
    (``rlxf.models.compile_layers``: each decoder layer compiled, one graph shared by the identical
    layers); ``micro_pairs``: pairs per forward/backward, gradients accumulated over the 8 pairs
    (the recipe's ``--grad-accum``), which lowers activation memory without recompute;
    ``share_prompt``: ``--share-prompt`` (each prompt encoded once for chosen and rejected);
    ``memory_budget``: torch's ``activation_memory_budget`` for the compiled layers (the partitioner
    recomputes what it does not save; 1.0 saves everything), a fresh compile."""
    from functools import partial

    import torch._functorch.config as functorch_config


    from rlxf.losses import dpo_loss
    from rlxf.models import compile_layers, sequence_logps, shared_prompt_logps, token_logps

    c = b.cfg["dpo"]
    model = b.build_model()
    n_params = count_params(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compile_s = None
    budget_before = functorch_config.activation_memory_budget
    if memory_budget is not None:   # a fresh compile under the budget (the recipes' --activation-memory-budget)
        torch._dynamo.reset()
    if compile_body:
        compile_layers(model, activation_memory_budget=memory_budget)
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=b.cuda)
    batch = dpo_batch(b, dpo_data(b, c["pairs"]))
    mask = batch["completion_mask"][:, 1:]
    n = c["pairs"]
    logps_fn = partial(token_logps, label_mask=mask if label_mask else None, fused_head=fused)

    # reference log-probs, once (the recipe caches them on disk keyed by model + data)
    b.sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = sequence_logps(logps_fn(model, batch["input_ids"], batch["attention_mask"]), mask)
    b.sync()
    ref_s = time.perf_counter() - t0
    ref_c, ref_r = ref[:n], ref[n:]

    phases = {"forward": [], "backward": [], "optimizer": []}

    m = micro_pairs or n
    micro = [torch.cat([torch.arange(i, min(i + m, n)), n + torch.arange(i, min(i + m, n))]).to(b.device)
             for i in range(0, n, m)]                                   # rows of [chosen; rejected]

    def micro_loss(rows):
        k = rows.numel() // 2
        mk = mask[rows]
        seq = sequence_logps(token_logps(model, batch["input_ids"][rows], batch["attention_mask"][rows],
                                         label_mask=mk if label_mask else None, fused_head=fused), mk)
        pairs = rows[:k]
        return dpo_loss(seq[:k], seq[k:], ref_c[pairs], ref_r[pairs], beta=0.1).sum() / n

    losses = [partial(micro_loss, rows) for rows in micro]
    p_len = int((batch["completion_mask"][0] == 0).sum())
    if share_prompt:  # prompts [n, P] (all the same length here: no padding), completions interleaved
        prompt_ids = batch["input_ids"][:n, :p_len]
        pair_ids = torch.stack([batch["input_ids"][:n, p_len:], batch["input_ids"][n:, p_len:]], 1).flatten(0, 1)
        ones_p, ones_c = torch.ones_like(prompt_ids), torch.ones_like(pair_ids)

        def shared_loss():
            seq = sequence_logps(shared_prompt_logps(model, prompt_ids, ones_p, pair_ids, ones_c), ones_c)
            return dpo_loss(seq[0::2], seq[1::2], ref_c, ref_r, beta=0.1).mean()

        losses = [shared_loss]

    def step(profile=False):
        t = [time.perf_counter()]
        for loss_fn in losses:
            loss = loss_fn()
            if profile and len(losses) == 1:
                b.sync(); t.append(time.perf_counter())
            loss.backward()
        if profile:
            if len(losses) > 1:
                t.append(t[-1])  # forward and backward interleave: all of it is reported as backward
            b.sync(); t.append(time.perf_counter())
        opt.step()
        opt.zero_grad(set_to_none=True)
        if profile:
            b.sync(); t.append(time.perf_counter())
            for k, (a, z) in zip(phases, zip(t, t[1:])):
                phases[k].append(z - a)
        return loss

    t0 = time.perf_counter()
    for _ in range(c["warmup"]):
        step()
    b.sync()
    if compile_body:
        compile_s = time.perf_counter() - t0
    times = []
    for _ in range(c["steps"]):
        t0 = time.perf_counter()
        loss = step()
        b.sync()
        times.append(time.perf_counter() - t0)
    step(profile=True)
    tokens = batch["input_ids"].numel()
    med = median(times)
    res = dict(pairs_per_s=n / med, step_ms=1e3 * med, peak_gb=b.peak_gb(),
               tflops=dpo_flops(b, n_params, tokens, reference_forward=False) / med / 1e12,
               flops_counted="6N per token (reference precomputed)", tokens_per_step=tokens,
               ref_precompute_s_per_pair=ref_s / n, checkpointing=checkpointing, loss=float(loss.detach()),
               head="completion positions only" if label_mask else "every non-padding position",
               head_impl="fused (_LinearLabelLogps)" if fused else "checkpointed chunks",
               compiled_layers=compile_body, warmup_incl_compile_s=compile_s, pairs_per_micro_batch=m,
               share_prompt=share_prompt,
               tokens_through_body=tokens - (n * p_len if share_prompt else 0),
               phase_ms={k: round(1e3 * median(v), 2) for k, v in phases.items()},
               step_times_ms=[round(1e3 * t, 2) for t in times], activation_memory_budget=memory_budget)
    del model, opt
    if memory_budget is not None:   # later variants compile with torch's default again
        functorch_config.activation_memory_budget = budget_before
        torch._dynamo.reset()
    return res


class _StepTimer:
    """TrainerCallback: wall time between consecutive optimizer steps (synchronised)."""

    def __init__(self, bench):
        from transformers import TrainerCallback

        outer = self

        class CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                bench.sync()
                outer.last = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                bench.sync()
                now = time.perf_counter()
                outer.times.append(now - outer.last)
                outer.last = now

        self.times: list[float] = []
        self.last = 0.0
        self.callback = CB()


def _datasets():
    """``datasets`` with random dataset fingerprints: hashing a table through dill fails on some
    Python 3.12 / pyarrow / dill combinations (seen on the GPU image); nothing here is cached."""
    import uuid

    import datasets.arrow_dataset

    datasets.arrow_dataset.generate_fingerprint = lambda dataset: uuid.uuid4().hex
    return datasets


def trl_dpo(b: Bench, *, checkpointing: bool | None, precompute: bool = False):
    Dataset = _datasets().Dataset
    from trl import DPOConfig, DPOTrainer

    c = b.cfg["dpo"]
    total = c["warmup"] + c["steps"]
    model = b.build_model()
    n_params = count_params(model)
    ref_model = copy.deepcopy(model)
    ds = Dataset.from_list(dpo_data(b, c["pairs"] * total))
    kwargs = dict(output_dir=tempfile.mkdtemp(prefix="trl-dpo-"), per_device_train_batch_size=c["pairs"],
                  max_steps=total, logging_steps=10_000, save_strategy="no", report_to="none",
                  learning_rate=1e-6, dataloader_num_workers=0, seed=0, precompute_ref_log_probs=precompute)
    if checkpointing is not None:
        kwargs["gradient_checkpointing"] = checkpointing
    if not b.cuda:
        kwargs.update(bf16=False, use_cpu=True)
    args = DPOConfig(**kwargs)
    timer = _StepTimer(b)
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=ds,
                         processing_class=b.tokenizer, callbacks=[timer.callback])
    setup_s = time.perf_counter() - t0
    first = trainer.train_dataset[0]
    lens = (len(first["prompt_ids"]), len(first["chosen_ids"]), len(first["rejected_ids"]))
    trainer.train()
    times = timer.times[c["warmup"]:]
    med = median(times)
    tokens = 2 * c["pairs"] * (c["prompt"] + c["completion"])
    res = dict(pairs_per_s=c["pairs"] / med, step_ms=1e3 * med, peak_gb=b.peak_gb(),
               tflops=dpo_flops(b, n_params, tokens, reference_forward=not precompute) / med / 1e12,
               flops_counted="8N per token" if not precompute else "6N per token (reference precomputed)",
               gradient_checkpointing=args.gradient_checkpointing, precompute_ref_log_probs=precompute,
               setup_s=setup_s, tokenized_lengths=lens, step_times_ms=[round(1e3 * t, 2) for t in timer.times])
    del trainer, model, ref_model
    return res


# -- decode --------------------------------------------------------------------------------------

def decode_prompts(b: Bench, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    vocab = b.cfg["model"]["vocab_size"]
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()


def decode_result(b: Bench, times, batch, new, model, avg_ctx, extra=None):
    med = median(times)
    tok_s = batch * new / med
    step_ms = 1e3 * med / new
    res = dict(tok_per_s=tok_s, ms_per_step=step_ms, run_s=[round(t, 3) for t in times])
    bw = b.results["meta"].get("copy_bandwidth_TBps")
    if bw:
        cfg = b.cfg["model"]
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        kv_bytes_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 2
        weight_bytes = count_params(model) * 2
        bound_ms = (weight_bytes + batch * avg_ctx * kv_bytes_token) / (bw * 1e12) * 1e3
        res.update(bound_ms_per_step=bound_ms, bound_tok_per_s=batch / bound_ms * 1e3,
                   fraction_of_bound=bound_ms / step_ms)
    if extra:
        res.update(extra)
    return res


def hf_generate(b: Bench, *, cache: str | None, compile_: bool):
    from transformers import GenerationConfig

    c = b.cfg["decode"]
    model = b.build_model().eval()
    ids = torch.tensor(decode_prompts(b, c["batch"], c["prompt"]), device=b.device)
    mask = torch.ones_like(ids)

    def gen(new):
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0,
                  use_cache=True)
        if cache:
            kw["cache_implementation"] = cache
        if cache == "static" and not compile_:
            kw["disable_compile"] = True
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(**kw))
        return out

    b.sync()
    t0 = time.perf_counter()
    gen(c["new"] if compile_ else c["warmup_new"])  # compiled: the first full call compiles
    b.sync()
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(c["runs"]):
        t0 = time.perf_counter()
        out = gen(c["new"])
        b.sync()
        times.append(time.perf_counter() - t0)
    assert out.shape[1] == c["prompt"] + c["new"], out.shape
    res = decode_result(b, times, c["batch"], c["new"], model, c["prompt"] + c["new"] / 2,
                        dict(first_call_s=first_s, sampling="greedy"))
    del model
    return res


def rlxf_engine(b: Bench, kind: str, *, compile_: bool = False, fuse: bool | None = None,
                device_sampling: bool | None = None, attention: str | None = None, temperature: float = 0.0,
                graph_steps: int = 8, compile_mode: str | None = None, sampling_kernel: bool | None = None,
                linear_kernel: bool | None = None, plain_batch_decode: bool = False):
    """``fuse``/``device_sampling``/``attention``/``sampling_kernel``: StaticEngine's
    ``fuse_projections``/``device_sampling``/``decode_attention``/``sampling_kernel`` (None = its
    default: on a GPU with Triton, fused projections, sampling in the graph with the sampling kernel,
    the Triton attention kernel); other values reproduce the engine before those changes."""
    from rlxf.rollout import HFEngine, SamplingParams, StaticEngine

    c = b.cfg["decode"]
    model = b.build_model()
    vocab = b.cfg["model"]["vocab_size"]
    kw = dict(max_batch_size=c["batch"], eos_token_ids=[vocab], pad_token_id=0)  # EOS never sampled
    engine = (HFEngine(model, b.tokenizer, **kw) if kind == "hf"
              else StaticEngine(model, b.tokenizer, compile=compile_, fuse_projections=fuse,
                                device_sampling=device_sampling, decode_attention=attention,
                                graph_steps=graph_steps, compile_mode=compile_mode,
                                sampling_kernel=sampling_kernel, linear_kernel=linear_kernel, **kw))
    if plain_batch_decode:  # the engine before the Rust-backend text decoding (session 5)
        from rlxf.rollout import sampling

        fast_decode = sampling.decode_texts
        sampling.decode_texts = lambda tok, lists: tok.batch_decode(lists, skip_special_tokens=True)
    prompts = decode_prompts(b, c["batch"], c["prompt"])
    b.sync()
    t0 = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_new_tokens=c["new"] if kind != "hf" else c["warmup_new"],
                                            temperature=temperature))
    b.sync()
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(c["runs"]):
        t0 = time.perf_counter()
        out = engine.generate(prompts, SamplingParams(max_new_tokens=c["new"], temperature=temperature))
        b.sync()
        times.append(time.perf_counter() - t0)
    assert out.completion_ids.shape == (c["batch"], c["new"]), out.completion_ids.shape
    extra = dict(first_call_s=first_s, sampling="greedy" if temperature == 0 else f"temperature {temperature}")
    if kind == "static":
        extra["stats"] = dict(engine.stats)
        state = next(iter(engine._states.values()), None)
        graph = None if state is None else (state.graph or state.loop_graphs.get("greedy")
                                            or state.loop_graphs.get("sample"))  # one token per replay
        extra["phases_ms"] = engine_phases(b, engine, prompts, SamplingParams(max_new_tokens=c["new"],
                                                                               temperature=temperature))
        if state is not None:
            extra["decode_attention"] = state.spec["attention"]
            extra["sampling_kernel"] = bool(state.spec.get("sampling_kernel"))
            extra["linear_kernel"] = bool(state.spec.get("linear_kernel"))
        if isinstance(graph, torch.cuda.CUDAGraph):  # replay alone: no host work between steps
            extra["fused_projections"] = state.fused is not None
            extra["graph_contains"] = "decode step" if state.graph is not None else "sample + record + decode step"
            state.slot.fill_(c["prompt"])  # 50 replays from slot P stay inside the static cache
            state.positions.fill_(c["prompt"])
            state.step_index.zero_()
            b.sync()
            t0 = time.perf_counter()
            for _ in range(50):
                graph.replay()
            b.sync()
            extra["graph_replay_ms"] = 1e3 * (time.perf_counter() - t0) / 50
    res = decode_result(b, times, c["batch"], c["new"], model, c["prompt"] + c["new"] / 2, extra)
    if (kind == "static" and fuse is None and device_sampling is None and temperature == 0
            and sampling_kernel is None and graph_steps == 8 and compile_mode is None and linear_kernel is None):
        key = "static_decode_step" + ("_compiled" if compile_ else "") + ("" if attention is None else f"_{attention}")
        b.results["profile"][key] = profile_decode_step(b, engine, prompts)
    if plain_batch_decode:
        sampling.decode_texts = fast_decode
    del engine, model
    return res


def engine_phases(b: Bench, engine, prompts, params) -> dict:
    """Where one ``generate`` call's wall time goes: prefill, state set-up (fused weight copies),
    assembling the result (tolist, text), and the rest (the decode loop); synchronised timers."""
    phases: dict = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            b.sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            b.sync()
            phases[name] = phases.get(name, 0.0) + 1e3 * (time.perf_counter() - t0)
            return out
        return wrapper

    saved = engine._prefill, engine._state, engine._assemble
    engine._prefill = timed("prefill", engine._prefill)
    engine._state = timed("state", engine._state)
    engine._assemble = timed("assemble", engine._assemble)
    try:
        timed("total", engine.generate)(prompts, params)
    finally:
        engine._prefill, engine._state, engine._assemble = saved
    phases["decode loop and the rest"] = phases["total"] - sum(v for k, v in phases.items() if k != "total")
    out = {k: round(v, 2) for k, v in phases.items()}
    if b.cuda:
        try:
            out["call_profile"] = call_profile(b, engine, prompts, params)
        except Exception as exc:  # noqa: BLE001 - diagnostics must not cost the variant
            out["call_profile"] = f"failed: {type(exc).__name__}: {exc}"
    return out


def call_profile(b: Bench, engine, prompts, params) -> dict:
    """One whole ``generate`` call: GPU busy time vs wall time (idle = host work the GPU waits for),
    the heaviest kernels, and the host functions with the most cumulative time (cProfile)."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    b.sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        engine.generate(prompts, params)
        b.sync()
        wall = time.perf_counter() - t0
    events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0)]
    busy = sum(e.self_device_time_total for e in events) / 1e3
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:8]
    host = cProfile.Profile()
    b.sync()
    host.enable()
    engine.generate(prompts, params)
    b.sync()
    host.disable()
    text = io.StringIO()
    pstats.Stats(host, stream=text).sort_stats("cumulative").print_stats(18)
    lines = [ln.strip() for ln in text.getvalue().splitlines() if ln.strip() and ln.strip()[0].isdigit()]
    return dict(wall_ms=round(1e3 * wall, 1), gpu_busy_ms=round(busy, 1),
                top_kernels=[dict(kernel=e.key[:70], count=e.count, ms=round(e.self_device_time_total / 1e3, 2))
                             for e in top],
                host_cumulative=lines)


def kernel_sweep(b: Bench) -> dict:
    """Microseconds per call of rlxf.rollout.kernels' decode attention and sampling kernels under several launch
    settings, against the torch ops they replace, on the decode workload's shapes (each timed as 20
    calls in one CUDA graph, so launch overhead is excluded)."""
    if not b.cuda:
        return {}
    from rlxf.rollout import kernels

    m, c = b.cfg["model"], b.cfg["decode"]
    batch, n_kv, n_heads = c["batch"], m["num_key_value_heads"], m["num_attention_heads"]
    head_dim = m["hidden_size"] // n_heads
    length = -(-(c["prompt"] + c["new"]) // 64) * 64
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(batch, n_kv, n_heads // n_kv, head_dim, device=dev, dtype=dt)
    k_cache = torch.randn(batch, n_kv, length, head_dim, device=dev, dtype=dt)
    v_cache = torch.randn_like(k_cache)
    mask = torch.zeros(batch, 1, 1, length, device=dev, dtype=dt)
    slot = torch.tensor([c["prompt"] + c["new"] // 2], device=dev)       # mid-generation
    k_new = torch.randn(batch, n_kv, head_dim, device=dev, dtype=dt)
    v_new = torch.randn_like(k_new)
    positions = slot.expand(batch).contiguous()
    cos, sin = torch.rand(length, head_dim, device=dev, dtype=dt), torch.rand(length, head_dim, device=dev, dtype=dt)
    logits = torch.randn(batch, m["vocab_size"], device=dev, dtype=dt)
    seed, step = torch.tensor([1], device=dev), torch.tensor([0], device=dev)
    inv_t = torch.tensor(1.0, device=dev)

    us = _graph_us

    def matmul_attention():
        scores = torch.matmul(q, k_cache.transpose(-1, -2)).float() * head_dim ** -0.5
        return torch.matmul((scores + mask).softmax(-1).to(dt), v_cache)

    out = {"attention": {"torch matmul path (eager)": us(matmul_attention)},
           "sampling": {"torch argmax + logsumexp (eager)":
                        us(lambda: (logits.float().argmax(-1), torch.logsumexp(logits.float(), -1)))}}
    attention_default, sample_default = dict(kernels.ATTENTION_CONFIG), dict(kernels.SAMPLE_CONFIG)
    try:
        for block, warps, stages in ((64, 4, 2), (64, 4, 3), (64, 2, 2), (32, 4, 2), (128, 4, 2), (128, 8, 2)):
            kernels.ATTENTION_CONFIG.update(BLOCK_N=block, num_warps=warps, num_stages=stages, SPLIT_SLOTS=0)
            out["attention"][f"kernel BLOCK_N={block} warps={warps} stages={stages}"] = us(
                lambda: kernels.decode_attention(q, k_cache, v_cache, mask, slot, head_dim ** -0.5))
            out["attention"][f"RoPE + cache write + kernel BLOCK_N={block} warps={warps} stages={stages}"] = us(
                lambda: kernels.rope_decode_attention(q, k_new, v_new, k_cache, v_cache, mask, slot, positions,
                                                      cos, sin, head_dim ** -0.5))
        # as in the decode step, the caches come from HBM: each call of the timed graph reads its own
        # layer's cache (24 caches, more than the L2 cache holds)
        caches = [(torch.randn_like(k_cache), torch.randn_like(v_cache)) for _ in range(m["num_hidden_layers"])]
        turn = iter(range(10 ** 9))

        def cold_attention():
            kc, vc = caches[next(turn) % len(caches)]
            return kernels.rope_decode_attention(q, k_new, v_new, kc, vc, mask, slot, positions, cos, sin,
                                                 head_dim ** -0.5)

        # few rows over a long cache (2 rows × 2 KV heads, 2048 slots, ~1900 filled), the case the
        # engine splits the cache for: the torch path against the kernel with and without the split
        few_q, few_kn = q[:2].contiguous(), k_new[:2].contiguous()
        few_vn, few_pos = v_new[:2].contiguous(), torch.full((2,), 1900, device=dev)
        few_slot = torch.tensor([1900], device=dev)
        few_mask = torch.zeros(2, 1, 1, 2048, device=dev, dtype=dt)
        few_cos, few_sin = torch.rand(2048, head_dim, device=dev, dtype=dt), torch.rand(2048, head_dim, device=dev, dtype=dt)
        few_caches = [(torch.randn(2, n_kv, 2048, head_dim, device=dev, dtype=dt),
                       torch.randn(2, n_kv, 2048, head_dim, device=dev, dtype=dt)) for _ in range(64)]
        few_turn = iter(range(10 ** 9))
        few = out["attention_2_rows_2048_slots_cold"] = {}

        def few_torch():
            kc, vc = few_caches[next(few_turn) % 64]
            scores = torch.matmul(few_q, kc.transpose(-1, -2)).float() * head_dim ** -0.5
            return torch.matmul((scores + few_mask).softmax(-1).to(dt), vc)

        few["torch matmul path (eager, no RoPE or cache write)"] = _graph_us(few_torch, 64)
        for split in (0, 64, 128, 256, 512):
            def few_kernel(split=split):
                kc, vc = few_caches[next(few_turn) % 64]
                return kernels.rope_decode_attention(few_q, few_kn, few_vn, kc, vc, few_mask, few_slot, few_pos,
                                                     few_cos, few_sin, head_dim ** -0.5, split)
            few[f"RoPE kernel split_slots={split}"] = _graph_us(few_kernel, 64)
        # fixed cost against per-slot cost: the default kernel at several fill levels, with and
        # without the RoPE prologue (cold caches)
        by_slot = out["attention_cold_by_slot"] = {}
        for filled in (1, 64, 128, 192, 300):
            at = torch.tensor([filled], device=dev)
            at_rows = at.expand(batch).contiguous()

            def rope_at():
                kc, vc = caches[next(turn) % len(caches)]
                return kernels.rope_decode_attention(q, k_new, v_new, kc, vc, mask, at, at_rows, cos, sin,
                                                     head_dim ** -0.5, 0)

            def plain_at():
                kc, vc = caches[next(turn) % len(caches)]
                return kernels.decode_attention(q, kc, vc, mask, at, head_dim ** -0.5, 0)

            kernels.ATTENTION_CONFIG.update(attention_default)
            by_slot[f"slot {filled}: RoPE kernel"] = _graph_us(rope_at, len(caches))
            by_slot[f"slot {filled}: kernel without RoPE"] = _graph_us(plain_at, len(caches))
        cold = out["attention_cold_cache"] = {}
        for split, block, warps, stages in ((0, 128, 4, 2), (0, 64, 4, 2), (64, 64, 4, 2), (128, 128, 4, 2),
                                            (128, 64, 4, 2), (256, 128, 4, 2), (64, 32, 2, 2)):
            kernels.ATTENTION_CONFIG.update(BLOCK_N=block, num_warps=warps, num_stages=stages, SPLIT_SLOTS=split)
            cold[f"RoPE kernel SPLIT_SLOTS={split} BLOCK_N={block} warps={warps} stages={stages}"] = _graph_us(
                cold_attention, len(caches))
        for chunk, warps in ((4096, 8), (2048, 4), (8192, 8), (1024, 4), (4096, 4)):
            kernels.SAMPLE_CONFIG.update(CHUNK=chunk, num_warps=warps)
            for greedy in (True, False):
                out["sampling"][f"kernel CHUNK={chunk} warps={warps} {'greedy' if greedy else 'sample'}"] = us(
                    lambda: kernels.sample_tokens(logits, seed, step, inv_t, inv_t, greedy))
    finally:
        kernels.ATTENTION_CONFIG.clear()
        kernels.ATTENTION_CONFIG.update(attention_default)
        kernels.SAMPLE_CONFIG.clear()
        kernels.SAMPLE_CONFIG.update(sample_default)
    return out


def split_sweep(b: Bench) -> dict:
    """Where the attention kernel's cache split (flash-decoding) starts to pay: microseconds per call
    of ``rope_decode_attention`` without the split and with 128- and 256-slot slices, for 1..128 rows
    (× the model's KV heads) over 256..2048 filled slots, caches read cold (rotated over copies that
    together exceed the L2 cache). The engine's rule (``_attention_split``) is set from this table."""
    if not b.cuda:
        return {}
    from rlxf.rollout import kernels
    from rlxf.rollout.static_engine import _attention_split

    m = b.cfg["model"]
    n_kv, n_heads = m["num_key_value_heads"], m["num_attention_heads"]
    head_dim = m["hidden_size"] // n_heads
    dev, dt = "cuda", torch.bfloat16
    out = {}
    for filled in (256, 512, 1024, 2048):
        length = filled + 64
        cos, sin = (torch.rand(length, head_dim, device=dev, dtype=dt) for _ in range(2))
        for rows in (1, 2, 4, 8, 16, 32, 64, 128):
            copy_bytes = 2 * rows * n_kv * length * head_dim * 2
            copies = max(4, min(512, -(-(160 << 20) // copy_bytes)))
            caches = [(torch.randn(rows, n_kv, length, head_dim, device=dev, dtype=dt),
                       torch.randn(rows, n_kv, length, head_dim, device=dev, dtype=dt)) for _ in range(copies)]
            q = torch.randn(rows, n_kv, n_heads // n_kv, head_dim, device=dev, dtype=dt)
            k_new, v_new = (torch.randn(rows, n_kv, head_dim, device=dev, dtype=dt) for _ in range(2))
            mask = torch.zeros(rows, 1, 1, length, device=dev, dtype=dt)
            slot = torch.tensor([filled], device=dev)
            positions = slot.expand(rows).contiguous()
            turn = iter(range(10 ** 9))
            cell = out[f"{rows} rows x {n_kv} KV heads, {filled} slots"] = {
                "engine_split": _attention_split(rows, n_kv, length)}
            for split in (0, 128, 256):
                def call(split=split):
                    kc, vc = caches[next(turn) % copies]
                    return kernels.rope_decode_attention(q, k_new, v_new, kc, vc, mask, slot, positions, cos, sin,
                                                         head_dim ** -0.5, split)
                cell[f"split {split}"] = _graph_us(call, copies)
            print(f"[split sweep] {rows} rows, {filled} slots: {cell}", flush=True)
            del caches
    return out


def split_end_to_end(b: Bench) -> list:
    """The cache-split rule end to end: ``StaticEngine(compile=True)`` greedy decode of few rows over a
    long cache with the engine's split (``_attention_split``) against no split, tok/s and the share
    of equal tokens (the split changes the summation order of the softmax, so ties can flip)."""
    from rlxf.rollout import SamplingParams, StaticEngine, static_engine

    vocab = b.cfg["model"]["vocab_size"]
    rule = static_engine._attention_split
    rows_out = []
    for rows, new in ((8, 1024), (32, 1024), (64, 2048)):
        model = b.build_model()
        prompts = decode_prompts(b, rows, 64, seed=1)
        params = SamplingParams(max_new_tokens=new, temperature=0.0)
        rec, tokens = dict(rows=rows, prompt=64, new=new), {}
        for label, fn in (("split", rule), ("no split", lambda *a: 0)):
            static_engine._attention_split = fn
            try:
                engine = StaticEngine(model, b.tokenizer, compile=True, max_batch_size=rows, eos_token_ids=[vocab],
                                      pad_token_id=0)
                engine.generate(prompts, params)
                times = []
                for _ in range(2):
                    b.sync()
                    t0 = time.perf_counter()
                    out = engine.generate(prompts, params)
                    b.sync()
                    times.append(time.perf_counter() - t0)
                state = next(iter(engine._states.values()))
                rec[label] = dict(tok_per_s=round(rows * new / min(times), 1), split_slots=state.spec["split_slots"])
                tokens[label] = out.completion_ids
                del engine
            finally:
                static_engine._attention_split = rule
        rec["split speed-up"] = round(rec["split"]["tok_per_s"] / rec["no split"]["tok_per_s"], 3)
        rec["equal tokens"] = round(float((tokens["split"] == tokens["no split"]).float().mean()), 4)
        print(f"[split end to end] {rec}", flush=True)
        rows_out.append(rec)
        del model
        b.fresh()
    return rows_out


def _graph_us(fn, calls: int = 20) -> float:
    """Microseconds per call of ``fn``, timed as ``calls`` calls in one CUDA graph (no launch overhead)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return round(sorted(times)[2], 2)


def linear_sweep(b: Bench) -> dict:
    """Microseconds per call of the decode step's four projections at the decode batch: cuBLAS
    (``F.linear``, plus the SiLU·mul for gate/up) against :func:`rlxf.rollout.kernels.decode_linear` under
    launch settings searched in two stages (tiles and K splits, then M block, warps and stages
    around the best). The best setting of each shape goes into ``kernels.LINEAR_CONFIGS`` for the
    rest of the run (and is what rlxf ships; docs/performance.md). Weights are read cold (from HBM,
    as in the decode step), and split settings are timed with the sum of their partials."""
    if not b.cuda:
        return {}
    import itertools

    import torch.nn.functional as F

    from rlxf.rollout import kernels

    m, c = b.cfg["model"], b.cfg["decode"]
    rows, hidden, inter = c["batch"], m["hidden_size"], m["intermediate_size"]
    head_dim = hidden // m["num_attention_heads"]
    qkv_n = hidden + 2 * m["num_key_value_heads"] * head_dim
    dev, dt = "cuda", torch.bfloat16
    shapes = {"q/k/v": (qkv_n, hidden, False, True), "o": (hidden, hidden, False, False),
              "gate/up + silu·mul": (inter, hidden, True, False), "down": (hidden, inter, False, False)}
    out = {"rows": rows, "shapes": {}}
    for name, (n, k, silu_mul, bias) in shapes.items():
        x = torch.randn(rows, k, device=dev, dtype=dt)
        w = torch.randn(2 * n if silu_mul else n, k, device=dev, dtype=dt) / k ** 0.5
        bvec = torch.randn(w.shape[0], device=dev, dtype=dt) if bias else None
        ref = kernels.decode_linear_reference(x, w, bvec, silu_mul)
        # in the decode step every weight comes from HBM (24 layers do not fit the L2 cache): each
        # call of a timed graph reads its own copy, and the copies together exceed the L2 cache
        copies = min(64, max(8, -(-160_000_000 // (w.numel() * w.element_size()))))
        pool = [w.clone() for _ in range(copies)]
        turn = iter(range(10 ** 9))

        def cold(fn):
            return lambda: fn(pool[next(turn) % copies])

        if silu_mul:
            cublas = _graph_us(cold(lambda wc: kernels.decode_linear_reference(x, wc, bvec, True)), copies)
        else:
            cublas = _graph_us(cold(lambda wc: F.linear(x, wc, bvec)), copies)
        warm = _graph_us(lambda: F.linear(x, w, bvec))
        rec = {"n": n, "k": k, "cublas_us": cublas, "cublas_matmul_l2_warm_us": warm, "weight_copies": copies,
               "configs": []}

        def timed(cfg):
            key = {kk: v for kk, v in cfg.items() if kk != "BLOCK_M"}
            try:
                res = kernels.linear_result(kernels._linear_launch(x, w, bvec, silu_mul, cfg), dt)
                err = float((res.float() - ref.float()).abs().max() / ref.float().abs().max())
                # split partials are timed with their sum (a separate kernel in the compiled step too)
                us = _graph_us(cold(lambda wc: kernels.linear_result(
                    kernels._linear_launch(x, wc, bvec, silu_mul, cfg), dt)), copies)
            except Exception as exc:  # noqa: BLE001 - a setting that does not compile is recorded, not fatal
                rec["configs"].append({**cfg, "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
                return None
            rec["configs"].append({**cfg, "us": us, "rel_error": round(err, 5)})
            return (us, key, cfg) if err < 2e-2 else None

        splits = (1,) if silu_mul else (1, 2, 4, 8)
        stage1 = []
        for bn, bk, split in itertools.product((16, 32, 64, 128), (64, 128, 256), splits):
            programs = -(-n // bn) * split
            if programs < 32 or programs > 1024 or k // split < bk:
                continue
            r = timed({"BLOCK_M": 128, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": 4,
                       "num_stages": 3})
            if r:
                stage1.append(r)
        best = min(stage1, key=lambda r: r[0])
        results = [best]
        for bm, warps, stages in itertools.product((64, 128), (4, 8), (2, 3, 4, 5)):
            cfg = {**best[2], "BLOCK_M": bm, "num_warps": warps, "num_stages": stages}
            if cfg == best[2]:
                continue
            r = timed(cfg)
            if r:
                results.append(r)
        us, _, cfg = min(results, key=lambda r: r[0])
        rec["best"] = {**cfg, "us": us}
        rec["speedup_vs_cublas"] = round(cublas / us, 3)
        kernels.LINEAR_CONFIGS[(n, k, silu_mul)] = {kk: v for kk, v in cfg.items() if kk != "BLOCK_M"}
        out["shapes"][name] = rec
        print(f"[linear sweep] {name}: cuBLAS {cublas} us, best {us} us {cfg}", flush=True)
    out["chosen"] = {f"{n},{k},{s}": v for (n, k, s), v in kernels.LINEAR_CONFIGS.items()}
    return out


def _with_blas(library: str, fn):
    """Run ``fn`` with torch's preferred BLAS library set to ``library`` (restored after)."""
    default = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(library)
    try:
        return fn()
    finally:
        torch.backends.cuda.preferred_blas_library(default)


def matmul_layouts(b: Bench) -> dict:
    """Microseconds per call of the decode step's four projections at the decode batch through
    cuBLAS, cold weights, for the weight as nn.Linear stores it (``[N, K]``: ``x @ W.T``) and
    transposed (``[K, N]`` contiguous: ``x @ Wt``), each with torch's default BLAS choice and with
    cuBLASLt preferred: whether a stored layout would let cuBLAS pick a faster kernel."""
    if not b.cuda:
        return {}
    import torch.nn.functional as F

    m, c = b.cfg["model"], b.cfg["decode"]
    rows, hidden, inter = c["batch"], m["hidden_size"], m["intermediate_size"]
    head_dim = hidden // m["num_attention_heads"]
    shapes = {"q/k/v": (hidden + 2 * m["num_key_value_heads"] * head_dim, hidden), "o": (hidden, hidden),
              "gate/up": (2 * inter, hidden), "down": (hidden, inter)}
    out = {}
    default = torch.backends.cuda.preferred_blas_library()
    try:
        for name, (n, k) in shapes.items():
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            copies = min(64, max(8, -(-160_000_000 // (n * k * 2))))
            pool = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            pool_t = [w.t().contiguous() for w in pool]
            rec = out[name] = {"n": n, "k": k}
            for library in ("default", "cublaslt", "cublas"):
                torch.backends.cuda.preferred_blas_library(default if library == "default" else library)
                for layout, weights, fn in (("[N, K] (x @ W.T)", pool, F.linear), ("[K, N] (x @ Wt)", pool_t, torch.mm)):
                    turn = iter(range(10 ** 9))
                    try:
                        rec[f"{layout}, {library}"] = _graph_us(lambda: fn(x, weights[next(turn) % copies]), copies)
                    except Exception as exc:  # noqa: BLE001 - recorded, not fatal
                        rec[f"{layout}, {library}"] = f"{type(exc).__name__}: {str(exc)[:100]}"
            print(f"[matmul layouts] {name}: {rec}", flush=True)
            del pool, pool_t
    finally:
        torch.backends.cuda.preferred_blas_library(default)
    return out


def profile_decode_step(b: Bench, engine, prompts) -> dict:
    """Kernels and GPU time of one greedy loop step (sample + record + decode), run outside the graph
    (compiled when the engine compiles): where the 'where does the time go' answer starts."""
    if not b.cuda:
        return {}
    from torch.profiler import ProfilerActivity, profile

    from rlxf.rollout.static_engine import _loop_step

    state = next(iter(engine._states.values()))
    fn = engine._compiled.get("greedy", _loop_step)

    def one():
        state.slot.fill_(len(prompts[0]))  # inside the static cache
        state.positions.fill_(len(prompts[0]))
        state.step_index.zero_()
        fn(state, True)

    with torch.no_grad():
        one()
        b.sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            one()
            b.sync()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
    kernels = sum(e.count for e in events)
    table = sorted(((e.key, e.count, getattr(e, "self_device_time_total", 0.0)) for e in events),
                   key=lambda x: -x[2])[:15]
    total_us = sum(getattr(e, "self_device_time_total", 0.0) for e in events)
    return dict(kernels_per_step=kernels, gpu_busy_ms=total_us / 1e3,
                top=[dict(kernel=k[:90], count=n, ms=round(t / 1e3, 3)) for k, n, t in table])


# -- GRPO ----------------------------------------------------------------------------------------

def grpo_prompts(b: Bench):
    c = b.cfg["grpo"]
    rng = random.Random(1)
    return [b.text(rng, c["prompt"] - 1) for _ in range(c["prompts"])]  # + <bos>


def rlxf_grpo(b: Bench, *, compile_: bool = False, memory_budget: float | None = None, share_prompt: bool = False):
    """``compile_``: ``rlxf grpo --compile`` (compiled decoder layers for training, compiled decode step);
    ``memory_budget``: ``--activation-memory-budget`` (a fresh compile of the layers); ``share_prompt``:
    ``--share-prompt`` (each group's prompt encoded once for its completions in the training forward)."""
    import torch._functorch.config as functorch_config

    budget_before = functorch_config.activation_memory_budget
    if memory_budget is not None:
        torch._dynamo.reset()
    from rlxf.losses import aggregate, clipped_policy_loss, group_advantages
    from rlxf.models import labels_from, shared_prompt_logps, token_logps
    from rlxf.rollout import SamplingParams, StaticEngine

    c = b.cfg["grpo"]
    G = c["group"]
    assert not share_prompt or c["micro"] % G == 0, "whole groups per micro-batch"
    model = b.build_model()
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=b.cuda)
    if compile_ and b.cuda:
        from rlxf.models import compile_layers

        compile_layers(model, activation_memory_budget=memory_budget)
    engine = StaticEngine(model, b.tokenizer, max_batch_size=c["prompts"] * c["group"],
                          compile=compile_ and b.cuda)
    prompts = [b.tokenizer(p)["input_ids"] for p in grpo_prompts(b)]
    params = SamplingParams(max_new_tokens=c["new"], temperature=1.0, n=c["group"])
    g = torch.Generator().manual_seed(0)

    def step():
        b.sync()
        t0 = time.perf_counter()
        ro = engine.generate(prompts, params)
        b.sync()
        t1 = time.perf_counter()
        rewards = torch.rand(len(ro), generator=g)
        adv = group_advantages(rewards, c["group"], scale="group").to(b.device)
        ro = ro.to(b.device)
        ids, attn = ro.sequences()
        P = ro.prompt_ids.shape[1]
        mask = ro.completion_mask.float()
        total = mask.sum().clamp(min=1)
        model.train()
        for s in range(0, len(ro), c["micro"]):
            sl = slice(s, s + c["micro"])
            if share_prompt:  # rows come in whole groups of G (the engine repeats each prompt n times)
                logps = shared_prompt_logps(model, ids[sl][::G, :P], attn[sl][::G, :P], ids[sl][:, P:],
                                            attn[sl][:, P:])
            else:
                logps = token_logps(model, ids[sl], attn[sl], label_mask=labels_from(P - 1, ids))[:, P - 1:]
            per_tok = clipped_policy_loss(logps, logps.detach(), adv[sl], eps_low=0.2, eps_high=0.2)
            loss = aggregate(per_tok, mask[sl], mode="token-mean") * (mask[sl].sum() / total)
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        b.sync()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, ro.num_tokens(), int(attn.sum()), float(grad_norm)

    for _ in range(c["warmup"]):
        step()
    runs = [step() for _ in range(c["steps"])]
    gen = median([r[0] for r in runs])
    train = median([r[1] for r in runs])
    n_params = count_params(model)
    res = dict(step_s=gen + train, generation_s=gen, training_s=train, engine_compiled=compile_ and b.cuda,
               generation_fraction=gen / (gen + train), sample_tok_per_s=runs[-1][2] / gen,
               train_tflops=6 * n_params * runs[-1][3] / train / 1e12, peak_gb=b.peak_gb(),
               grad_norm=runs[-1][4], engine_stats=dict(engine.stats),
               steps=[[round(x, 3) for x in r[:2]] for r in runs], activation_memory_budget=memory_budget,
               share_prompt=share_prompt)
    del engine, model, opt
    if memory_budget is not None:
        functorch_config.activation_memory_budget = budget_before
        torch._dynamo.reset()
    return res


def trl_grpo(b: Bench):
    Dataset = _datasets().Dataset
    from trl import GRPOConfig, GRPOTrainer

    c = b.cfg["grpo"]
    model = b.build_model()
    n_rows = c["prompts"] * c["group"]
    total = c["trl_steps"]
    prompts = grpo_prompts(b)
    ds = Dataset.from_list([{"prompt": p} for _ in range(total + 1) for p in prompts])
    rng = random.Random(0)

    def reward(prompts, completions, **kw):
        return [rng.random() for _ in completions]

    micro = min(16, n_rows)
    kwargs = dict(output_dir=tempfile.mkdtemp(prefix="trl-grpo-"), per_device_train_batch_size=micro,
                  gradient_accumulation_steps=n_rows // micro, num_generations=c["group"],
                  max_completion_length=c["new"], max_steps=total, logging_steps=10_000, save_strategy="no",
                  report_to="none", learning_rate=1e-6, seed=0, use_vllm=False, temperature=1.0)
    if not b.cuda:
        kwargs.update(bf16=False, use_cpu=True)
    args = GRPOConfig(**kwargs)
    timer = _StepTimer(b)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds,
                          processing_class=b.tokenizer, callbacks=[timer.callback])
    gen_times = []
    orig = model.generate

    def timed_generate(*a, **k):
        b.sync()
        t0 = time.perf_counter()
        out = orig(*a, **k)
        b.sync()
        gen_times.append(time.perf_counter() - t0)
        return out

    model.generate = timed_generate
    trainer.train()
    times = timer.times
    last = times[-1]
    res = dict(step_s=last, generation_s=gen_times[-1] if gen_times else None,
               training_s=(last - gen_times[-1]) if gen_times else None,
               generation_fraction=(gen_times[-1] / last) if gen_times else None,
               step_times_s=[round(t, 2) for t in times], generate_calls_s=[round(t, 2) for t in gen_times],
               peak_gb=b.peak_gb(), gradient_checkpointing=args.gradient_checkpointing, beta=args.beta,
               note="step_s is the last timed step (TRL's first step includes warm-up)")
    del trainer, model
    return res


# -- report --------------------------------------------------------------------------------------

def _fmt(x, nd=1):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{nd}f}"


def render_markdown(r: dict) -> str:
    m = r.get("meta", {})
    lines = [f"# rlxf vs TRL — {m.get('device', '?')}, {m.get('date', '?')}", "",
             f"`{m.get('command', '')}` · torch {m.get('torch')} · transformers {m.get('transformers')} · "
             f"TRL {m.get('trl')} · {m.get('dtype')} · {m.get('weights')} · "
             f"{m.get('params', 0) / 1e6:.0f}M parameters · copy bandwidth {m.get('copy_bandwidth_TBps')} TB/s · "
             f"bf16 matmul {m.get('matmul_TFLOPs')} TFLOP/s", ""]
    d = r.get("dpo", {})
    if d:
        lines += ["## DPO step (8 pairs, 128 + 384 tokens)", "",
                  "| run | pairs/s | step ms | peak GB | TFLOP/s (counted) | share of measured bf16 matmul rate "
                  "| FLOPs counted |", "|---|---|---|---|---|---|---|"]
        peak = m.get("matmul_TFLOPs")
        for k, v in d.items():
            share = v["tflops"] / peak if peak and v.get("tflops") else None
            lines.append(f"| {k} | {_fmt(v.get('pairs_per_s'))} | {_fmt(v.get('step_ms'))} | "
                         f"{_fmt(v.get('peak_gb'), 2)} | {_fmt(v.get('tflops'))} | {_fmt(share, 2)} | "
                         f"{v.get('flops_counted', '')} |")
        lines.append("")
    dec = r.get("decode", {})
    if dec:
        lines += ["## Decode (batch 128, 64 → +256 tokens, greedy)", "",
                  "| engine | tok/s | ms/step | fraction of bandwidth bound | first call s |", "|---|---|---|---|---|"]
        for k, v in dec.items():
            lines.append(f"| {k} | {_fmt(v.get('tok_per_s'), 0)} | {_fmt(v.get('ms_per_step'), 2)} | "
                         f"{_fmt(v.get('fraction_of_bound'), 3)} | {_fmt(v.get('first_call_s'))} |")
        lines.append("")
    g = r.get("grpo", {})
    if g:
        lines += ["## GRPO step (16 prompts × 8 × 256 new tokens)", "",
                  "| run | step s | generation s | training s | generation share | sampling tok/s "
                  "| training TFLOP/s (counted) | peak GB |", "|---|---|---|---|---|---|---|---|"]
        for k, v in g.items():
            lines.append(f"| {k} | {_fmt(v.get('step_s'), 2)} | {_fmt(v.get('generation_s'), 2)} | "
                         f"{_fmt(v.get('training_s'), 2)} | {_fmt(v.get('generation_fraction'), 2)} | "
                         f"{_fmt(v.get('sample_tok_per_s'), 0)} | {_fmt(v.get('train_tflops'))} | "
                         f"{_fmt(v.get('peak_gb'), 2)} |")
        lines.append("")
    lines += ["## Ratios", "", "| comparison | ratio | target |", "|---|---|---|"]
    for name, value, target in ratios(r):
        lines.append(f"| {name} | {_fmt(value, 2)} | {target} |")
    for key in ("skipped", "errors"):
        if r.get(key):
            lines += ["", f"## {key}", ""] + [f"- {k}: {v}" for k, v in r[key].items()]
    return "\n".join(lines) + "\n"


def ratios(r: dict) -> list[tuple[str, float | None, str]]:
    d, dec, g = r.get("dpo", {}), r.get("decode", {}), r.get("grpo", {})

    def get(section, name, key):
        return section.get(name, {}).get(key)

    def div(a, b_):
        return a / b_ if a is not None and b_ else None

    out = []
    for mine in ("rlxf", "rlxf (grad ckpt)", "rlxf --compile", "rlxf --compile (grad ckpt)",
                 "rlxf --compile --activation-memory-budget 0.05",
                 "rlxf --compile, 4 micro-batches of 2 pairs", "rlxf --compile, 8 micro-batches of 1 pair"):
        for peer, target in (("TRL defaults (grad ckpt)", "≥ 2.0 at ≤ its memory"),
                             ("TRL no ckpt", "≥ 1.5 at ≤ its memory"),
                             ("TRL no ckpt + precomputed ref", "")):
            if mine in d and peer in d:
                out.append((f"DPO pairs/s: {mine} / {peer}", div(get(d, mine, "pairs_per_s"), get(d, peer, "pairs_per_s")),
                            target))
                out.append((f"DPO peak memory: {mine} / {peer}", div(get(d, mine, "peak_gb"), get(d, peer, "peak_gb")),
                            "≤ 1" if target else ""))
    for mine in ("rlxf StaticEngine", "rlxf StaticEngine (compile)", "rlxf HFEngine"):
        for peer, target in (("HF generate static (compiled)", "≥ 10"), ("HF generate static", ""),
                             ("HF generate dynamic", "")):
            if mine in dec and peer in dec:
                out.append((f"decode tok/s: {mine} / {peer}", div(get(dec, mine, "tok_per_s"), get(dec, peer, "tok_per_s")),
                            target if mine.startswith("rlxf Static") else ""))
        if mine in dec:
            out.append((f"decode: {mine} fraction of bandwidth bound", get(dec, mine, "fraction_of_bound"), ""))
    for mine in ("rlxf", "rlxf --compile", "rlxf --compile --activation-memory-budget 0.05"):
        if mine in g and "TRL GRPOTrainer" in g:
            out.append((f"GRPO step time: TRL / {mine}",
                        div(get(g, "TRL GRPOTrainer", "step_s"), get(g, mine, "step_s")), "≥ 5"))
    return out


# -- main ----------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny config on CPU (smoke test)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available")
    p.add_argument("--out", default="runs/bench", help="output directory (results.json, results.md)")
    p.add_argument("--workloads", default="dpo,decode,grpo", help="comma-separated subset of dpo,decode,grpo")
    p.add_argument("--no-trl", action="store_true", help="skip the TRL runs")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--match", default=None,
                   help="regular expression: run only the variants whose 'workload/name' matches")
    p.add_argument("--deadline", type=float, default=540.0, help="seconds; later variants are skipped")
    args = p.parse_args(argv)
    if args.quick:
        torch.set_num_threads(1)
        args.cpu = args.cpu or not torch.cuda.is_available()
    b = Bench(args)
    work = set(args.workloads.split(","))
    trl_ok = not args.no_trl
    if trl_ok:
        try:
            import datasets  # noqa: F401
            import trl  # noqa: F401
        except Exception as err:
            trl_ok = False
            b.results["skipped"]["trl"] = f"TRL not importable: {err}"
    meta(b)
    q = args.quick
    s = (lambda x: 0.0) if q else (lambda x: x)  # noqa: E731  (estimated seconds; none in quick mode)
    if "dpo" in work:
        b.run("dpo", "rlxf", lambda: rlxf_dpo(b, checkpointing=False), need_s=s(15))
        b.run("dpo", "rlxf (grad ckpt)", lambda: rlxf_dpo(b, checkpointing=True), need_s=s(15))
        b.run("dpo", "rlxf, head on all positions, checkpointed chunks (before)",
              lambda: rlxf_dpo(b, checkpointing=False, label_mask=False, fused=False), need_s=s(15))
        b.run("dpo", "rlxf, completion-only head, checkpointed chunks",
              lambda: rlxf_dpo(b, checkpointing=False, fused=False), need_s=s(15))
        b.run("dpo", "rlxf --share-prompt", lambda: rlxf_dpo(b, checkpointing=False, share_prompt=True), need_s=s(15))
        if not args.no_compile and b.cuda:
            b.run("dpo", "rlxf --compile", lambda: rlxf_dpo(b, checkpointing=False, compile_body=True),
                  need_s=s(40))
            b.run("dpo", "rlxf --compile (grad ckpt)",
                  lambda: rlxf_dpo(b, checkpointing=True, compile_body=True), need_s=s(40))
            for budget in (0.05, 0.1, 0.2):
                b.run("dpo", f"rlxf --compile --activation-memory-budget {budget}",
                      lambda budget=budget: rlxf_dpo(b, checkpointing=False, compile_body=True, memory_budget=budget),
                      need_s=s(40))
            for m in (2, 1):
                b.run("dpo", f"rlxf --compile, {b.cfg['dpo']['pairs'] // m} micro-batches of {m} pair{'s' * (m > 1)}",
                      lambda m=m: rlxf_dpo(b, checkpointing=False, compile_body=True, micro_pairs=m),
                      need_s=s(40))
        if trl_ok:
            b.run("dpo", "TRL defaults (grad ckpt)", lambda: trl_dpo(b, checkpointing=None), need_s=s(30))
            b.run("dpo", "TRL no ckpt", lambda: trl_dpo(b, checkpointing=False), need_s=s(30))
            b.run("dpo", "TRL no ckpt + precomputed ref",
                  lambda: trl_dpo(b, checkpointing=False, precompute=True), need_s=s(30))
    if "decode" in work:
        b.run("decode", "rlxf StaticEngine", lambda: rlxf_engine(b, "static"), need_s=s(15))
        b.run("decode", "rlxf StaticEngine (sdpa attention, torch sampling: before the kernels)",
              lambda: rlxf_engine(b, "static", attention="sdpa", sampling_kernel=False), need_s=s(15))
        b.run("decode", "rlxf StaticEngine (unfused, host sampling, sdpa: first engine)",
              lambda: rlxf_engine(b, "static", fuse=False, device_sampling=False, attention="sdpa"), need_s=s(15))
        b.run("decode", "rlxf HFEngine", lambda: rlxf_engine(b, "hf"), need_s=s(25))
        b.run("decode", "HF generate dynamic", lambda: hf_generate(b, cache=None, compile_=False), need_s=s(25))
        b.run("decode", "HF generate static", lambda: hf_generate(b, cache="static", compile_=False), need_s=s(25))
    if "grpo" in work:
        b.run("grpo", "rlxf", lambda: rlxf_grpo(b), need_s=s(20))
        b.run("grpo", "rlxf --share-prompt", lambda: rlxf_grpo(b, share_prompt=True), need_s=s(20))
        if not args.no_compile and b.cuda:
            b.run("grpo", "rlxf --compile", lambda: rlxf_grpo(b, compile_=True), need_s=s(60))
            b.run("grpo", "rlxf --compile --activation-memory-budget 0.05",
                  lambda: rlxf_grpo(b, compile_=True, memory_budget=0.05), need_s=s(60))
        if trl_ok:
            b.run("grpo", "TRL GRPOTrainer", lambda: trl_grpo(b), need_s=s(75))
    if "decode" in work and b.cuda and (not args.match or re.search(args.match, "decode/kernel sweep")):
        try:
            b.results["profile"]["kernel_sweep_us"] = kernel_sweep(b)
        except Exception as exc:  # noqa: BLE001 - a failed sweep must not cost the run
            b.results["errors"]["decode/kernel sweep"] = f"{type(exc).__name__}: {exc}"
    if "decode" in work and b.cuda and (not args.match or re.search(args.match, "decode/split sweep")):
        try:
            b.results["profile"]["split_sweep_us"] = split_sweep(b)
        except Exception as exc:  # noqa: BLE001 - a failed sweep must not cost the run
            b.results["errors"]["decode/split sweep"] = f"{type(exc).__name__}: {exc}"
    if "decode" in work and b.cuda and not args.no_compile and (not args.match
                                                                or re.search(args.match, "decode/split end to end")):
        try:
            b.results["profile"]["split_end_to_end"] = split_end_to_end(b)
        except Exception as exc:  # noqa: BLE001 - a failed sweep must not cost the run
            b.results["errors"]["decode/split end to end"] = f"{type(exc).__name__}: {exc}"
    if "decode" in work and b.cuda and (not args.match or re.search(args.match, "decode/matmul layouts")):
        try:
            b.results["profile"]["matmul_layouts_us"] = matmul_layouts(b)
        except Exception as exc:  # noqa: BLE001 - a failed sweep must not cost the run
            b.results["errors"]["decode/matmul layouts"] = f"{type(exc).__name__}: {exc}"
    if "decode" in work and b.cuda and (not args.match or re.search(args.match, "decode/linear sweep")):
        try:
            b.results["profile"]["linear_sweep_us"] = linear_sweep(b)
        except Exception as exc:  # noqa: BLE001 - a failed sweep must not cost the run
            b.results["errors"]["decode/linear sweep"] = f"{type(exc).__name__}: {exc}"
        b.save()
    if "decode" in work and not args.no_compile and b.cuda:
        b.run("decode", "rlxf StaticEngine (compile)", lambda: rlxf_engine(b, "static", compile_=True, attention=None),
              need_s=s(80))
        b.run("decode", "rlxf StaticEngine (compile; batch_decode for the texts: before session 5)",
              lambda: rlxf_engine(b, "static", compile_=True, attention=None, plain_batch_decode=True),
              need_s=s(40))
        b.run("decode", "rlxf StaticEngine (compile; cuBLASLt preferred)",
              lambda: _with_blas("cublaslt", lambda: rlxf_engine(b, "static", compile_=True, attention=None)),
              need_s=s(60))
        for which in (("qkv", "o", "gate_up", "down"), ("gate_up",), ("o",)):
            b.run("decode", f"rlxf StaticEngine (compile; decode_linear kernel for {', '.join(which)})",
                  lambda which=which: rlxf_engine(b, "static", compile_=True, attention=None, linear_kernel=which),
                  need_s=s(60))
        b.run("decode", "rlxf StaticEngine (compile; cuBLAS projections)",
              lambda: rlxf_engine(b, "static", compile_=True, attention=None, linear_kernel=False), need_s=s(60))
        b.run("decode", "rlxf StaticEngine (compile; matmul attention, torch sampling: before the kernels)",
              lambda: rlxf_engine(b, "static", compile_=True, attention="matmul", sampling_kernel=False),
              need_s=s(60))
        b.run("decode", "rlxf StaticEngine (compile; Triton attention, torch sampling)",
              lambda: rlxf_engine(b, "static", compile_=True, attention="triton", sampling_kernel=False,
                                  linear_kernel=False),
              need_s=s(60))
        b.run("decode", "rlxf StaticEngine (compile; matmul attention, sampling kernel)",
              lambda: rlxf_engine(b, "static", compile_=True, attention="matmul", sampling_kernel=True),
              need_s=s(60))
        b.run("decode", "rlxf StaticEngine (compile, temperature 1)",
              lambda: rlxf_engine(b, "static", compile_=True, attention=None, temperature=1.0), need_s=s(60))
        b.run("decode", "HF generate static (compiled)", lambda: hf_generate(b, cache="static", compile_=True),
              need_s=s(100))
    b.save()
    print()
    print((b.out / "results.md").read_text())
    return b.results


if __name__ == "__main__":
    main()
