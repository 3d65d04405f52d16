"""StaticEngine: the fast rollout engine for Llama/Qwen2/Qwen3/Mistral-shaped transformers models.

Same contract as :class:`rlxf.rollout.HFEngine` (``generate(prompt_ids, SamplingParams) ->
Rollouts``, same sampling and log-prob convention, same tokens under greedy decoding), but the
decode loop does not go through the transformers forward:

- **static KV cache**: per micro-batch one preallocated ``[B, H_kv, L, D]`` key and value buffer
  per layer (``L`` = prompt width + ``max_new_tokens``, rounded up to a multiple of 64) and one
  additive attention mask ``[B, 1, 1, L]`` over it; nothing grows or is reallocated while decoding;
- **batched prefill**: one pass over the left-padded prompts writes cache slots ``0..P-1``
  (causal + padding mask, positions from the mask as ``generate`` computes them);
- **decode step written against the model's weights**: embedding, per layer RMSNorm → q/k/v
  projections (biases and Qwen3's q/k norms included) → RoPE from a table built once by the
  model's own rotary module → write slot ``P + t`` → attention with the mask (grouped-query
  attention without repeating the KV heads: the ``H_q / H_kv`` query heads of one KV head are laid
  out as ``G`` query rows): on CUDA by default one Triton kernel does the RoPE, the cache write and
  the attention over the filled slots (:func:`rlxf.rollout.kernels.rope_decode_attention`), otherwise
  ``scaled_dot_product_attention`` or two matmuls over the whole static cache → o-projection → RMSNorm → MLP; final norm and output head. The step reads the policy's
  parameters in place, so after an optimizer step the next ``generate`` samples from the new
  weights; the only copies are the optional fused q/k/v and gate/up weights, refreshed in place at
  the start of every ``generate``;
- **CUDA graph**: on CUDA the decode step is captured once per ``(batch, L)`` shape and replayed;
  the graph reads the parameters' storage, so in-place optimizer updates are seen; if a parameter
  is replaced by a new tensor (``model.to(...)``, loading a new module) the graph is re-captured.
  ``compile=True`` additionally runs the step through ``torch.compile`` before capture (fuses the
  element-wise work: fewer kernels per step, at a one-off compile cost).

With ``device_sampling`` (the default with a CUDA graph; see the class) sampling (Gumbel-max: the
same distribution, not the same draws as ``HFEngine``), the log-prob, the output writes and the EOS
test run inside the captured step, several steps per graph. Otherwise — CPU, top-k, top-p, stop
strings — sampling, log-probs, EOS and stop strings are handled exactly as in ``HFEngine`` (the
same functions, :mod:`rlxf.rollout.sampling`), outside the graph. Finished rows keep feeding the pad
token (their outputs are not read); whether every row has finished is checked every ``sync_every``
steps (on CUDA without a host sync: the answer of an earlier check, copied behind an event), and the
completion is trimmed to the last step any row was active, so the result equals a loop that stops at
the first all-finished step.

A LoRA policy (and a QLoRA one, 4-bit base) decodes through stand-ins of its adapted layers,
refreshed before every call (:mod:`rlxf.rollout.folding`): with ``adapters="fold"`` (the default)
plain ``nn.Linear`` layers holding ``W + s·BA`` (and dequantised copies of the other 4-bit
layers), with ``adapters="lowrank"`` modules computing ``W x + s·B(A x)`` from the policy's own
base layers and copies of the small factors.

Falls back to ``HFEngine`` (same arguments) for other architectures, adapters that do not fold
(DoRA, adapters on embeddings, ...), sliding-window attention shorter than the sequence, and rope
types whose frequencies depend on the length.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlxf.rollout import kernels
from rlxf.models.loading import eval_mode, is_peft_model
from rlxf.rollout.folding import ADAPTER_MODES, adapter_stand_ins, folding_support, needs_folding
from rlxf.models.logprobs import logps_from_logits
from rlxf.rollout.hf_engine import HFEngine
from rlxf.rollout.sampling import (DecodedBatch, StopChecker, assemble_rollouts, check_prompts, left_padded,
                                   sample_next_tokens)
from rlxf.rollout.types import Rollouts, SamplingParams

log = logging.getLogger("rlxf.rollout")

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")
_CACHE_ALIGN = 64
# the attention kernel splits the cache into slices of _SPLIT_SLOTS slots (flash-decoding) when too few
# rows × KV heads would each walk a long cache; the thresholds come from the H100 split sweep
# (benchmarks/vs_trl.py "decode/split sweep", docs/performance.md): at 128 rows × 2 KV heads the split
# is slower at every fill level, at 64 programs it pays from ~512 filled slots, at 128 from ~1024
_MIN_KERNEL_PROGRAMS = 32
_SPLIT_SLOTS = 128


def _attention_split(batch: int, n_kv: int, length: int) -> int:
    """Cache slots per program of the attention kernel for this decode shape (0: no split).

    ``length`` is the static cache length; a call fills about half of it on average, so each rule
    asks for a cache twice as long as the fill level where the split started to win in the sweep.
    """
    programs = batch * n_kv
    if programs < _MIN_KERNEL_PROGRAMS and length > 2 * _SPLIT_SLOTS:
        return _SPLIT_SLOTS
    if programs <= 2 * _MIN_KERNEL_PROGRAMS and length >= 8 * _SPLIT_SLOTS:
        return _SPLIT_SLOTS
    if programs <= 4 * _MIN_KERNEL_PROGRAMS and length >= 16 * _SPLIT_SLOTS:
        return 2 * _SPLIT_SLOTS
    return 0


# the decode projections rlxf.rollout.kernels.decode_linear can run, and those it runs by default on CUDA
LINEAR_PROJECTIONS = ("qkv", "o", "gate_up", "down")
_LINEAR_DEFAULT: tuple = ()


def static_engine_support(model: nn.Module) -> str | None:
    """None when :class:`StaticEngine` can run ``model`` natively; else the reason it falls back."""
    if is_peft_model(model):
        why_not = folding_support(model)
        if why_not:
            return f"PEFT model whose adapters do not fold into plain weights ({why_not}): use HFEngine"
        model = model.get_base_model()
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} not in {SUPPORTED_MODEL_TYPES}"
    body = getattr(model, "model", None)
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(body, name):
            return f"{type(model).__name__}.model has no {name!r}"
    if not isinstance(getattr(model, "lm_head", None), nn.Module):
        return f"{type(model).__name__} has no lm_head"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = str(rope.get("rope_type", rope.get("type", "default"))) if isinstance(rope, dict) else "default"
    if any(tag in rope_type for tag in _LENGTH_DEPENDENT_ROPE):
        return f"rope type {rope_type!r} depends on the sequence length"
    for layer in body.layers:
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not hasattr(attn, name):
                return f"attention module {type(attn).__name__} has no {name}"
    return None


class StaticEngine:
    """Static-KV-cache, CUDA-graph rollout engine (implements :class:`RolloutEngine`).

    Arguments as :class:`HFEngine`, plus ``use_cuda_graph`` (capture and replay the decode step on
    CUDA; ignored on CPU), ``compile`` (``torch.compile`` the decode step before capture),
    ``sync_every`` (decode steps between checks that every row has finished),
    ``max_cached_graphs`` (captured shapes kept; each holds its own KV cache),
    ``fuse_projections`` (decode with one q/k/v and one gate/up matmul per layer from concatenated
    weight copies, refreshed from the parameters at every ``generate``; None = on CUDA only) and
    ``device_sampling`` (sample, record and test for EOS inside the captured step; None = on when a
    CUDA graph is used and the call has no top-k, top-p or stop strings) and ``decode_attention``
    (``"triton"``: the :func:`rlxf.rollout.kernels.rope_decode_attention` kernel, RoPE + cache write +
    attention over the filled slots only; ``"sdpa"``: ``scaled_dot_product_attention`` over the
    whole static cache; ``"matmul"``: two matmuls and a softmax, which ``compile`` fuses; None =
    ``"triton"`` on CUDA where Triton runs, the head shape allows, the kernels pass
    :func:`rlxf.rollout.kernels.probe`, else ``"matmul"`` with ``compile``, else ``"sdpa"``; the kernel
    splits the cache for few rows over a long one, see :func:`_attention_split` and
    docs/performance.md) and ``linear_kernel`` (projections run through
    :func:`rlxf.rollout.kernels.decode_linear` instead of cuBLAS: True for all, or a subset of
    :data:`LINEAR_PROJECTIONS`; None = none, which measured fastest) and ``sampling_kernel`` (device
    sampling draws the token and its log-prob with the one-pass :func:`rlxf.rollout.kernels.sample_tokens`
    kernel; None = on CUDA where Triton runs and the probe passes) and ``graph_steps`` (decode steps
    unrolled into one captured graph with device sampling: fewer replays and host round trips) and
    ``compile_mode`` (``torch.compile``'s ``mode``, e.g. ``"max-autotune-no-cudagraphs"`` to autotune
    the skinny decode matmuls; the graph capture is rlxf's own either way) and ``adapters`` (how a
    LoRA or QLoRA policy is served, :mod:`rlxf.rollout.folding`: ``"fold"`` writes ``W + s·BA`` of
    each adapted layer, and a dequantised copy of each other 4-bit layer, into plain weights before
    every call: one matmul per projection and fusable projections, for one copy of those layers in
    the compute dtype; ``"lowrank"`` computes ``W x + s·B(A x)`` in the step from the policy's own
    base layers (4-bit ones called as they are) and copies of ``A`` and ``s·B``: no weight-sized
    copy, two skinny matmuls more per adapted projection, and no fused projections or
    ``linear_kernel``; docs/qlora.md weighs them; ignored for a model without adapters or 4-bit
    layers).
    """

    def __init__(self, model: nn.Module, tokenizer, *, max_batch_size: int = 256,
                 eos_token_ids: Sequence[int] | None = None, pad_token_id: int | None = None,
                 use_cuda_graph: bool = True, compile: bool = False, sync_every: int = 16,
                 max_cached_graphs: int = 2, fuse_projections: bool | None = None,
                 device_sampling: bool | None = None, decode_attention: str | None = None,
                 graph_steps: int = 8, compile_mode: str | None = None,
                 sampling_kernel: bool | None = None, linear_kernel: bool | Sequence[str] | None = None,
                 adapters: str = "fold"):
        if adapters not in ADAPTER_MODES:
            raise ValueError(f"adapters must be 'fold' (LoRA folded into plain weights) or 'lowrank' (the "
                             f"low-rank update applied in the decode step), got {adapters!r}")
        self._fallback = HFEngine(model, tokenizer, max_batch_size=max_batch_size,
                                  eos_token_ids=eos_token_ids, pad_token_id=pad_token_id)
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.eos_token_ids = self._fallback.eos_token_ids
        self.pad_token_id = self._fallback.pad_token_id
        self.use_cuda_graph = use_cuda_graph
        self.compile = compile
        self.compile_mode = compile_mode
        if not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"sync_every must be an integer >= 1, got {sync_every!r}")
        self.sync_every = sync_every
        self.max_cached_graphs = max_cached_graphs
        self.fuse_projections = fuse_projections
        self.device_sampling = device_sampling
        if not isinstance(graph_steps, int) or graph_steps < 1:
            raise ValueError(f"graph_steps must be an integer >= 1, got {graph_steps!r}")
        self.graph_steps = graph_steps
        if decode_attention not in (None, "sdpa", "matmul", "triton"):
            raise ValueError(f"decode_attention must be 'sdpa', 'matmul', 'triton' or None, got {decode_attention!r}")
        self.decode_attention = decode_attention
        self.sampling_kernel = sampling_kernel
        if linear_kernel is True:
            linear_kernel = LINEAR_PROJECTIONS
        elif linear_kernel is False:
            linear_kernel = ()
        if linear_kernel is not None and (isinstance(linear_kernel, str)
                                          or not set(linear_kernel) <= set(LINEAR_PROJECTIONS)):
            raise ValueError(f"linear_kernel must be True, False, None or a subset of {LINEAR_PROJECTIONS}, "
                             f"got {linear_kernel!r}")
        self.linear_kernel = None if linear_kernel is None else frozenset(linear_kernel)
        self.unsupported = static_engine_support(model)
        if self.unsupported:
            log.warning("StaticEngine: %s; falling back to HFEngine", self.unsupported)
        # the module tree the decode step reads: the model itself, or a LoRA/QLoRA policy's base
        # model with stand-ins swapped in for its adapted (and, folding, 4-bit) layers during each call
        self.adapters = adapters
        self._folds = adapter_stand_ins(model, adapters) if not self.unsupported and needs_folding(model) else None
        self._native = self._folds.base if self._folds is not None else model
        self._states: OrderedDict[tuple, _DecodeState] = OrderedDict()
        # (parameter pointers, per-layer fused q/k/v and gate/up copies): one copy shared by every cached
        # (batch, L) state, so an evaluation shape beside the training shape does not hold a second one
        self._fused: tuple[tuple, list] | None = None
        self._compiled = {}
        self.stats = {"graph_captures": 0, "fallback_calls": 0, "device_sampling_calls": 0}

    # -- public ---------------------------------------------------------------------------------

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollouts:
        """Sample ``params.n`` completions for each prompt; see :class:`Rollouts` for the result."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        reason = self.unsupported or self._length_reason(prompt_ids, params)
        if reason:
            self.stats["fallback_calls"] += 1
            return self._fallback.generate(prompt_ids, params)
        prompts = check_prompts(prompt_ids, self.model.get_input_embeddings().num_embeddings)
        device = self.model.get_input_embeddings().weight.device
        rows = [prompt for prompt in prompts for _ in range(params.n)]
        on_device = self._device_sampling(params, device)
        generator = None
        if params.seed is not None and not on_device:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        # device sampling draws from the default generator of the device (the only one a CUDA graph
        # can advance); a seeded call forks it, so the caller's random state is left as it was
        fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                                     enabled=on_device and params.seed is not None)
        # the static KV cache holds the parameters' dtype, so decode runs in it: an enclosing autocast
        # (bf16 mixed-precision training) is switched off here rather than mixing dtypes in the cache
        with torch.no_grad(), eval_mode(self.model), torch.autocast(device.type, enabled=False), fork, \
                self._folded():
            starts = range(0, len(rows), self.max_batch_size)
            if on_device:
                batches = [self._generate_batch_on_device(rows[i:i + self.max_batch_size], params, device,
                                                          batch_index=k)
                           for k, i in enumerate(starts)]
            else:
                batches = [self._generate_batch(rows[i:i + self.max_batch_size], params, generator, device)
                           for i in starts]
        if on_device:
            self.stats["device_sampling_calls"] += 1
        return self._assemble(rows, batches, params, device)

    def _assemble(self, rows: list[list[int]], batches: list[DecodedBatch], params: SamplingParams,
                  device: torch.device) -> Rollouts:
        return assemble_rollouts(self.tokenizer, self.pad_token_id, rows, batches, params, device)

    def release(self) -> None:
        """Drop the captured graphs, their KV caches, the fused weight copies and a LoRA policy's
        stand-ins (frees their memory)."""
        self._states.clear()
        self._fused = None
        if self._folds is not None:
            self._folds.release()

    @contextmanager
    def _folded(self):
        """For a LoRA/QLoRA policy: refresh the stand-ins and swap them in for the call."""
        if self._folds is None:
            yield
            return
        self._folds.refresh()
        with self._folds.swapped():
            yield

    # -- one micro-batch ------------------------------------------------------------------------

    def _length_reason(self, prompt_ids, params: SamplingParams) -> str | None:
        """Sliding-window attention shorter than the longest sequence is not implemented here."""
        try:
            longest = max(len(p) for p in prompt_ids) + params.max_new_tokens
        except TypeError:
            return None  # let check_prompts raise its message
        for layer in self._native.model.layers:
            window = getattr(layer.self_attn, "sliding_window", None)
            if window is not None and window < longest:
                return f"sliding window {window} < sequence length {longest}"
        return None

    def _device_sampling(self, params: SamplingParams, device: torch.device) -> bool:
        """Whether this call samples inside the (captured) step rather than on the host side."""
        simple = params.top_k == 0 and params.top_p == 1.0 and not params.stop
        if self.device_sampling is None:
            return simple and device.type == "cuda" and self.use_cuda_graph
        return simple and bool(self.device_sampling)

    def _left_padded(self, rows: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
        return left_padded(rows, self.pad_token_id, device)                    # [B, P]

    def _generate_batch_on_device(self, rows: list[list[int]], params: SamplingParams,
                                  device: torch.device, batch_index: int = 0) -> DecodedBatch:
        """Sampling, log-probs, outputs and EOS tests run inside the step (``graph_steps`` tokens a replay).

        The draw is Gumbel-max, ``argmax(z/τ − log E)`` with ``E ~ Exp(1)`` from the device's default
        generator: the same distribution as ``softmax(z/τ)`` sampling, not the same draws as
        ``HFEngine`` for a given seed. With a seed, the generator is seeded after any capture or
        compile warm-up (which draw too) with ``seed`` and the micro-batch index, so a call is
        reproducible whether or not it had to capture. The host checks for all-finished every
        ``sync_every`` steps.
        """
        input_ids, prompt_mask = self._left_padded(rows, device)
        batch, width = input_ids.shape
        steps = params.max_new_tokens
        length = -(-(width + steps) // _CACHE_ALIGN) * _CACHE_ALIGN            # L, static
        state = self._state(batch, length, device)
        state.configure(params, self.eos_token_ids, self.pad_token_id)
        greedy = params.greedy
        unroll = min(self.graph_steps, steps - 1) if steps > 1 else 1
        block = self._loop_fn(state, greedy, unroll)                            # captured before prefill
        single = self._loop_fn(state, greedy, 1) if (steps - 1) % unroll else block
        logits = self._prefill(state, input_ids, prompt_mask)                   # [B, V]
        state.clear_outputs()
        if params.seed is not None:
            _seed_device(device, params.seed + 1_000_003 * batch_index)
        if state.spec["sampling_kernel"]:
            state.seed.random_(0, 2 ** 62)                                      # the kernel's Philox key
        state.tokens.copy_(_sample_and_record(state, greedy, logits))           # the first token
        done, checked = 1, 1
        check = _FinishedCheck(state)
        while done < steps:                                                     # decode, sample, record
            if steps - done >= unroll:
                block()
                done += unroll
            else:
                single()
                done += 1
            if done - checked >= self.sync_every and done < steps:
                checked = done
                if check.all_finished():
                    break
        return _trimmed_batch(input_ids, prompt_mask, state.out_ids[:, :done].clone(),
                              state.out_mask[:, :done].clone(), state.out_logps[:, :done].clone(),
                              state.finished, torch.tensor(self.eos_token_ids, device=device))

    def _loop_fn(self, state: _DecodeState, greedy: bool, unroll: int = 1):
        """A callable running ``unroll`` tokens: a captured graph on CUDA, else the (compiled) eager step."""
        mode = "greedy" if greedy else "sample"
        key = mode if unroll == 1 else f"{mode}x{unroll}"
        if key not in state.loop_graphs:
            step = partial(self._maybe_compile(_loop_step, mode), state, greedy)
            if state.device.type == "cuda" and self.use_cuda_graph:
                state.loop_graphs[key] = _capture(step, state, unroll)[0]
                self.stats["graph_captures"] += 1
            else:
                state.loop_graphs[key] = step if unroll == 1 else partial(_repeat, step, unroll)
        entry = state.loop_graphs[key]
        return entry.replay if isinstance(entry, torch.cuda.CUDAGraph) else entry

    def _maybe_compile(self, fn, key: str):
        if not self.compile:
            return fn
        if key not in self._compiled:
            self._compiled[key] = torch.compile(fn, dynamic=False, mode=self.compile_mode)
        return self._compiled[key]

    def _generate_batch(self, rows: list[list[int]], params: SamplingParams,
                        generator: torch.Generator | None, device: torch.device) -> DecodedBatch:
        input_ids, prompt_mask = self._left_padded(rows, device)
        batch, width = input_ids.shape
        steps = params.max_new_tokens
        pad = self.pad_token_id

        length = -(-(width + steps) // _CACHE_ALIGN) * _CACHE_ALIGN            # L, static
        state = self._state(batch, length, device)
        if device.type == "cuda" and self.use_cuda_graph and state.graph is None:
            state.capture()
            self.stats["graph_captures"] += 1
        logits = self._prefill(state, input_ids, prompt_mask)                   # [B, V]

        eos_ids = torch.tensor(self.eos_token_ids, device=device)
        completion_ids = torch.full((batch, steps), pad, dtype=torch.long, device=device)
        logps = torch.zeros(batch, steps, dtype=torch.float32, device=device)
        completion_mask = torch.zeros(batch, steps, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        stop_checker = StopChecker(self.tokenizer, params.stop, batch) if params.stop else None
        for step in range(steps):
            tokens = sample_next_tokens(logits, params, generator)                # [B]
            token_logps = logps_from_logits(logits, tokens, temperature=params.logp_temperature)
            active = ~finished
            fed = torch.where(active, tokens, pad)
            completion_ids[:, step] = fed
            logps[:, step] = torch.where(active, token_logps, 0.0)
            completion_mask[:, step] = active.long()
            finished = finished | (active & torch.isin(tokens, eos_ids))
            if stop_checker is not None:
                finished = finished | stop_checker.update(fed, active, device)
            if step == steps - 1:
                break
            if stop_checker is not None or (step + 1) % self.sync_every == 0:
                if bool(finished.all()):
                    break
            logits = state.decode(fed)                                           # [B, V]

        return _trimmed_batch(input_ids, prompt_mask, completion_ids, completion_mask, logps, finished, eos_ids)

    # -- state: static buffers, prefill and the (captured) decode step --------------------------

    def _kernels_failed(self, device: torch.device) -> str | None:
        """Why the Triton kernels cannot be used on ``device`` after a first check (None: they can)."""
        spec = _head_spec(self._native)
        dtype = self._native.get_input_embeddings().weight.dtype
        return kernels.probe(device, dtype, spec["n_kv"], spec["groups"], spec["head_dim"])

    def _attention_kind(self, device: torch.device, batch: int, length: int) -> str:
        spec = _head_spec(self._native)
        why_not = kernels.attention_supported(spec["head_dim"], spec["groups"])
        if self.decode_attention == "triton":
            if not kernels.available(device):
                raise RuntimeError(f"decode_attention='triton' needs Triton and a CUDA device (or the Triton "
                                   f"interpreter, TRITON_INTERPRET=1, on the CPU), got {device}; "
                                   "pass decode_attention=None to choose automatically")
            if why_not:
                raise ValueError(f"decode_attention='triton' cannot run this model: {why_not}")
            failed = self._kernels_failed(device)
            if failed:
                raise RuntimeError(f"decode_attention='triton': the kernel failed its first check on {device}: "
                                   f"{failed}; pass decode_attention=None to fall back to the torch path")
        if self.decode_attention is not None:
            return self.decode_attention
        if _kernels_by_default(device) and why_not is None and not self._kernels_failed(device):
            return "triton"
        return "matmul" if self.compile else "sdpa"

    def _linear_kind(self, device: torch.device, attention: str, fuse: bool) -> frozenset:
        """The decode step's projections that run through :func:`rlxf.rollout.kernels.decode_linear`."""
        wanted = self.linear_kernel if self.linear_kernel is not None else frozenset(_LINEAR_DEFAULT)
        if not wanted:
            return frozenset()
        why_not = None
        if attention != "triton":
            why_not = f"it runs with the Triton attention kernel, and this call uses {attention!r} attention"
        elif not fuse:
            why_not = "it reads the fused q/k/v and gate/up copies (fuse_projections is off)"
        else:
            why_not = _linear_kernel_support(self._native) or self._kernels_failed(device)
        if why_not and self.linear_kernel:
            raise ValueError(f"linear_kernel={sorted(self.linear_kernel)} cannot run here: {why_not}; pass "
                             "linear_kernel=None to choose automatically")
        if why_not or (self.linear_kernel is None and not _kernels_by_default(device)):
            return frozenset()
        return wanted

    def _state(self, batch: int, length: int, device: torch.device) -> _DecodeState:
        params = tuple(p.data_ptr() for p in self._native.parameters())
        key = (batch, length, str(device))
        state = self._states.get(key)
        if state is not None and state.param_ptrs == params:
            self._states.move_to_end(key)
            state.refresh_fused()                                               # current weights
            return state
        self._states.pop(key, None)
        while len(self._states) >= self.max_cached_graphs:
            self._states.popitem(last=False)
        fuse = self.fuse_projections if self.fuse_projections is not None else device.type == "cuda"
        sampler = self.sampling_kernel
        if sampler is None:
            sampler = _kernels_by_default(device)
            failed = self._kernels_failed(device) if sampler else None
            if failed:
                log.warning("StaticEngine: the Triton decode kernels failed a first check on %s (%s); "
                            "using the torch attention and sampling", device, failed)
                sampler = False
        elif sampler:
            if not kernels.available(device):
                raise RuntimeError(f"sampling_kernel=True needs Triton and a CUDA device (or TRITON_INTERPRET=1 "
                                   f"on the CPU), got {device}; pass sampling_kernel=None to choose automatically")
            failed = self._kernels_failed(device)
            if failed:
                raise RuntimeError(f"sampling_kernel=True: the kernels failed their first check on {device}: "
                                   f"{failed}; pass sampling_kernel=None to fall back to the torch sampling")
        attention = self._attention_kind(device, batch, length)
        shared = self._fused[1] if self._fused is not None and self._fused[0] == params else None
        state = _DecodeState.build(self._native, batch, length, device, param_ptrs=params, fuse=fuse,
                                   attention=attention, sampling_kernel=bool(sampler),
                                   linear_kernel=self._linear_kind(device, attention, fuse), fused=shared)
        self._fused = (params, state.fused) if state.fused is not None else self._fused
        state.step_fn = self._maybe_compile(_decode_step, "decode")
        self._states[key] = state
        return state

    def _prefill(self, state: _DecodeState, input_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        # eager: compiling it (symbolic batch and width) measured 28.9 → 25.7 ms a call on the H100
        # for the 128 × 64-token benchmark, under 1% of the call, for a second compile per process
        return state.prefill(input_ids, prompt_mask)


@dataclass
class _DecodeState:
    """Static buffers of one ``(batch, L)`` shape and the decode step that reads/writes them."""

    model: nn.Module
    batch: int
    length: int
    param_ptrs: tuple
    k_cache: list[Tensor]       # per layer [B, H_kv, L, D]
    v_cache: list[Tensor]
    mask: Tensor                # [B, 1, 1, L] additive (0 = visible, -inf = hidden), model dtype
    tokens: Tensor              # [B] long, the token fed at this step
    positions: Tensor           # [B] long, its RoPE position
    slot: Tensor                # [1] long, the cache slot it is written to
    cos: Tensor                 # [L, D] RoPE table (model dtype)
    sin: Tensor
    spec: dict
    step_fn: object = None
    graph: object = None
    graph_logits: Tensor | None = None
    fused: list | None = None   # per layer (w_qkv, b_qkv | None, w_gate_up, b_gate_up | None) copies
    seed: Tensor | None = None  # [1] long, the sampling kernel's Philox key (plus step_index)
    finished_flag: Tensor | None = None  # [1] bool in pinned host memory: the all-finished check's copy
    out_ids: Tensor | None = None  # [B, L] long, tokens fed (pad once finished)
    out_logps: Tensor | None = None  # [B, L] float32
    out_mask: Tensor | None = None  # [B, L] long, 1 while the row is active
    finished: Tensor | None = None  # [B] bool
    step_index: Tensor | None = None  # [1] long, the output column of the next token
    eos_ids: Tensor | None = None
    inv_temperature: Tensor | None = None  # [] float32, 1/τ for sampling
    logp_inv_temperature: Tensor | None = None  # [] float32, 1/τ of the recorded log-probs
    pad: int = 0
    loop_graphs: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.mask.device

    @classmethod
    def build(cls, model, batch: int, length: int, device, *, param_ptrs, fuse: bool = False,
              attention: str = "sdpa", sampling_kernel: bool = False,
              linear_kernel: frozenset = frozenset(), fused: list | None = None) -> _DecodeState:
        """``fused``: another state's fused copies of these same parameters, refreshed and shared."""
        body = model.model
        dtype = body.embed_tokens.weight.dtype
        spec = {**_head_spec(model), "attention": attention, "sampling_kernel": sampling_kernel}
        spec["split_slots"] = _attention_split(batch, spec["n_kv"], length)
        fuse = fuse and all(_fusable(layer) for layer in body.layers)
        spec["linear_kernel"] = linear_kernel if fuse else frozenset()
        n_kv, head_dim = spec["n_kv"], spec["head_dim"]
        caches = [torch.zeros(batch, n_kv, length, head_dim, dtype=dtype, device=device)
                  for _ in range(2 * len(body.layers))]
        probe = torch.zeros(1, dtype=dtype, device=device)
        cos, sin = body.rotary_emb(probe, torch.arange(length, device=device)[None])   # [1, L, D]
        state = cls(model=model, batch=batch, length=length, param_ptrs=param_ptrs,
                    k_cache=caches[0::2], v_cache=caches[1::2],
                    mask=torch.full((batch, 1, 1, length), float("-inf"), dtype=dtype, device=device),
                    tokens=torch.zeros(batch, dtype=torch.long, device=device),
                    positions=torch.zeros(batch, dtype=torch.long, device=device),
                    slot=torch.zeros(1, dtype=torch.long, device=device),
                    cos=cos[0].to(dtype).contiguous(), sin=sin[0].to(dtype).contiguous(), spec=spec,
                    seed=torch.zeros(1, dtype=torch.long, device=device),
                    out_ids=torch.zeros(batch, length, dtype=torch.long, device=device),
                    out_logps=torch.zeros(batch, length, dtype=torch.float32, device=device),
                    out_mask=torch.zeros(batch, length, dtype=torch.long, device=device),
                    finished=torch.zeros(batch, dtype=torch.bool, device=device),
                    step_index=torch.zeros(1, dtype=torch.long, device=device),
                    inv_temperature=torch.ones((), dtype=torch.float32, device=device),
                    logp_inv_temperature=torch.ones((), dtype=torch.float32, device=device))
        if fuse:
            state.fused = fused if fused is not None else [_fused_buffers(layer) for layer in body.layers]
            state.refresh_fused()
        return state

    def refresh_fused(self) -> None:
        """Copy the current q/k/v and gate/up weights into the fused buffers (in place: graphs stay valid)."""
        if self.fused is None:
            return
        for layer, (w_qkv, b_qkv, w_gu, b_gu) in zip(self.model.model.layers, self.fused):
            attn, mlp = layer.self_attn, layer.mlp
            torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], out=w_qkv)
            if b_qkv is not None:
                torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias], out=b_qkv)
            torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], out=w_gu)
            if b_gu is not None:
                torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias], out=b_gu)

    def clear_outputs(self) -> None:
        """Empty the device-sampling outputs before a call (after prefill)."""
        self.out_mask.zero_()
        self.out_logps.zero_()
        self.out_ids.fill_(self.pad)
        self.finished.zero_()
        self.step_index.zero_()

    def configure(self, params: SamplingParams, eos_token_ids, pad: int) -> None:
        """Set this call's temperatures, EOS ids and pad (a changed EOS count or pad re-captures)."""
        self.inv_temperature.fill_(1.0 if params.greedy else 1.0 / params.temperature)
        self.logp_inv_temperature.fill_(1.0 / params.logp_temperature)
        eos = torch.tensor(tuple(eos_token_ids), dtype=torch.long, device=self.device)
        if self.eos_ids is None or self.eos_ids.shape != eos.shape:
            if self.loop_graphs:            # captured graphs read the old buffer: re-capture
                self.loop_graphs.clear()
            self.eos_ids = eos
        else:
            self.eos_ids.copy_(eos)
        if pad != self.pad:
            self.loop_graphs.clear()
            self.pad = pad

    # prefill: eager, all prompt positions at once -----------------------------------------------

    def prefill(self, input_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        """Write cache slots ``0..P-1`` for the left-padded prompts; return last-position logits [B, V]."""
        model = self.model
        body = model.model
        batch, width = input_ids.shape
        device = input_ids.device
        real = prompt_mask.bool()                                                # [B, P]
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)                    # [B, P]
        cos = self.cos[positions].unsqueeze(1)                                   # [B, 1, P, D]
        sin = self.sin[positions].unsqueeze(1)
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        allowed = causal[None] & real[:, None, :]                                # [B, P(q), P(k)]
        allowed = allowed | torch.eye(width, dtype=torch.bool, device=device)[None]  # pad rows: no NaN
        dtype = self.mask.dtype
        bias = torch.zeros(batch, 1, width, width, dtype=dtype, device=device)
        bias = bias.masked_fill(~allowed[:, None], float("-inf"))
        hidden = body.embed_tokens(input_ids)                                    # [B, P, H]
        last = _prefill_layers(self, hidden, cos, sin, bias)                     # [B, 1, H], normed
        logits = model.lm_head(last)[:, 0]                                       # [B, V]
        # decode state: prompt slots visible where real, everything after hidden until written
        self.mask.fill_(float("-inf"))
        self.mask[:, 0, 0, :width].masked_fill_(real, 0.0)
        self.positions.copy_(prompt_mask.sum(-1))
        self.slot.fill_(width)
        return logits

    # decode: one token per row, captured in a CUDA graph on CUDA ---------------------------------

    def decode(self, tokens: Tensor) -> Tensor:
        """Feed ``tokens`` [B] at the current slot; return next-token logits [B, V]."""
        self.tokens.copy_(tokens)
        if self.graph is not None:
            self.graph.replay()
            return self.graph_logits
        return self.step_fn(self)

    def capture(self) -> None:
        """Capture one decode step (host-side sampling path) into a CUDA graph; see :func:`_capture`."""
        self.graph, self.graph_logits = _capture(partial(self.step_fn, self), self)


def _prefill_layers(state: _DecodeState, hidden: Tensor, cos: Tensor, sin: Tensor, bias: Tensor) -> Tensor:
    """The decoder layers over the prompt positions ``hidden`` [B, P, H] (RoPE tables [B, 1, P, D],
    additive attention bias [B, 1, P, P]); writes cache slots ``0..P-1``; returns the final-normed
    hidden state of the last position [B, 1, H]."""
    spec = state.spec
    body = state.model.model
    batch, width, _ = hidden.shape
    for i, layer in enumerate(body.layers):
        fused = state.fused[i] if state.fused is not None else None
        q, k, v = _qkv(layer, layer.input_layernorm(hidden), spec, cos, sin, fused)   # [B, H, P, D]
        state.k_cache[i][:, :, :width].copy_(k)
        state.v_cache[i][:, :, :width].copy_(v)
        g = spec["groups"]
        if g > 1:
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=spec["scaling"])
        out = out.transpose(1, 2).reshape(batch, width, -1)                      # [B, P, H_q·D]
        hidden = hidden + layer.self_attn.o_proj(out)
        hidden = hidden + _mlp(layer, layer.post_attention_layernorm(hidden), fused)
    return body.norm(hidden[:, -1:])


def _decode_step(state: _DecodeState) -> Tensor:
    """One decode step over the static buffers (graph-safe: only in-place writes, device indices)."""
    model, spec = state.model, state.spec
    body = model.model
    batch = state.batch
    n_kv, groups, head_dim = spec["n_kv"], spec["groups"], spec["head_dim"]
    state.mask.index_fill_(-1, state.slot, 0.0)                                  # the new slot is visible
    kernel = spec["attention"] == "triton"
    linear = spec["linear_kernel"] if kernel else frozenset()
    if not kernel:
        cos = state.cos.index_select(0, state.positions)[:, None, None, :]       # [B, 1, 1, D]
        sin = state.sin.index_select(0, state.positions)[:, None, None, :]
    hidden = body.embed_tokens(state.tokens[:, None])                            # [B, 1, H]
    for i, layer in enumerate(body.layers):
        fused = state.fused[i] if state.fused is not None else None
        x = layer.input_layernorm(hidden)
        if kernel:   # RoPE, the cache write and attention over the filled slots in one kernel
            if "qkv" in linear:
                q, k, v = _heads(layer, _linear(x[:, 0], fused[0], fused[1])[:, None], spec)
            else:
                q, k, v = _project(layer, x, spec, fused)                        # [B, 1, H, D]
            out = kernels.rope_decode_attention(
                q[:, 0].view(batch, n_kv, groups, head_dim), k[:, 0], v[:, 0], state.k_cache[i],
                state.v_cache[i], state.mask, state.slot, state.positions, state.cos, state.sin, spec["scaling"],
                spec["split_slots"])
            hidden = hidden + _projection(layer.self_attn.o_proj, out.reshape(batch, 1, -1), "o" in linear)
            hidden = hidden + _mlp(layer, layer.post_attention_layernorm(hidden), fused, linear)
            continue
        q, k, v = _qkv(layer, x, spec, cos, sin, fused)                          # [B, H, 1, D]
        state.k_cache[i].index_copy_(2, state.slot, k)
        state.v_cache[i].index_copy_(2, state.slot, v)
        # the G query heads sharing a KV head become G query rows of that head: no KV repeat
        q = q.reshape(batch, n_kv, groups, head_dim)                             # [B, H_kv, G, D]
        if spec["attention"] == "matmul":   # plain matmuls: compile fuses mask + softmax into one kernel
            scores = torch.matmul(q, state.k_cache[i].transpose(-1, -2)).float() * spec["scaling"]
            probs = (scores + state.mask).softmax(-1).to(q.dtype)                # [B, H_kv, G, L]
            out = torch.matmul(probs, state.v_cache[i])                          # [B, H_kv, G, D]
        else:
            out = F.scaled_dot_product_attention(q, state.k_cache[i], state.v_cache[i],
                                                 attn_mask=state.mask, scale=spec["scaling"])
        hidden = hidden + layer.self_attn.o_proj(out.reshape(batch, 1, -1))
        hidden = hidden + _mlp(layer, layer.post_attention_layernorm(hidden), fused)
    logits = model.lm_head(body.norm(hidden))[:, 0]                              # [B, V]
    state.positions.add_(1)
    state.slot.add_(1)
    return logits


def _loop_step(state: _DecodeState, greedy: bool) -> None:
    """Device-sampling step: decode ``state.tokens``, sample from the logits, record, keep the token to feed."""
    state.tokens.copy_(_sample_and_record(state, greedy, _decode_step(state)))


def _sample_and_record(state: _DecodeState, greedy: bool, logits: Tensor) -> Tensor:
    """Draw one token per row from ``logits`` [B, V] and write it, its log-prob and the mask at ``step_index``.

    Greedy: argmax. Otherwise Gumbel-max: ``argmax(z/τ − log E)``, ``E ~ Exp(1)``, which samples
    ``softmax(z/τ)`` exactly: from the device generator in torch, or from Philox counters keyed by
    ``state.seed + step_index`` in the :func:`rlxf.rollout.kernels.sample_tokens` kernel (one pass over the
    logits). Returns the token fed next (pad for rows that already finished).
    """
    if state.spec["sampling_kernel"]:
        tokens, logp = kernels.sample_tokens(logits, state.seed, state.step_index, state.inv_temperature,
                                             state.logp_inv_temperature, greedy)
    else:
        logits = logits.float()                                                  # [B, V]
        if greedy:
            tokens = logits.argmax(-1)
        else:
            scaled = logits * state.inv_temperature
            noise = torch.empty_like(scaled).exponential_().clamp_(min=torch.finfo(torch.float32).tiny)
            tokens = (scaled - noise.log()).argmax(-1)                           # [B]
        z = logits * state.logp_inv_temperature
        logp = z.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(z, dim=-1)  # [B]
    active = ~state.finished
    fed = torch.where(active, tokens, state.pad)
    state.out_ids.index_copy_(1, state.step_index, fed[:, None])
    state.out_logps.index_copy_(1, state.step_index, torch.where(active, logp, 0.0)[:, None])
    state.out_mask.index_copy_(1, state.step_index, active.long()[:, None])
    # a comparison table, not torch.isin: isin sorts (and syncs) for many EOS ids, which capture forbids
    state.finished.logical_or_(active & (tokens[:, None] == state.eos_ids[None, :]).any(-1))
    state.step_index.add_(1)
    return fed


class _FinishedCheck:
    """Whether every row has finished, without draining the GPU queue on CUDA.

    On CUDA each check copies ``finished.all()`` to pinned host memory behind an event and answers
    with the copy issued at the previous check, waiting for that event if the GPU has not reached
    it yet. The host so stays at most one check interval ahead of the GPU: the GPU always has that
    interval's steps queued (no idle gap), and the loop stops at most one interval late (the extra
    steps only feed pad to finished rows, whose outputs are masked and trimmed). Without the wait a
    host faster than the GPU (a small model) queues every step of the call before any copy lands,
    and never stops early. Elsewhere it reads the flag directly.
    """

    def __init__(self, state: _DecodeState):
        self.state = state
        self.cuda = state.device.type == "cuda"
        if self.cuda and state.finished_flag is None:    # pinned once per state, not per call
            state.finished_flag = torch.zeros(1, dtype=torch.bool, pin_memory=True)
        self.flag = state.finished_flag
        self.event = None

    def all_finished(self) -> bool:
        if not self.cuda:
            return bool(self.state.finished.all())
        if self.event is not None:
            self.event.synchronize()       # the copy issued one check ago; the steps since stay queued
            if bool(self.flag[0]):
                return True
        self.flag.copy_(self.state.finished.all().reshape(1), non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()
        return False


def _repeat(fn, times: int) -> None:
    for _ in range(times):
        fn()


def _capture(fn, state: _DecodeState, unroll: int = 1):
    """Warm the one-token ``fn`` up on a side stream, then capture ``unroll`` calls of it as one graph.

    Returns ``(graph, output of the last captured call)``. Runs before prefill: prefill and
    ``clear_outputs`` reset every buffer the warm-up wrote (the last cache slot and output column,
    positions from 0, so the RoPE lookup stays in the table whatever an earlier call left there);
    capturing itself runs nothing.
    """

    def park():
        state.slot.fill_(state.length - 1)
        state.step_index.fill_(state.length - 1)
        state.positions.zero_()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compile (if any), allocator and library warm-up
            park()
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    park()
    graph, out = torch.cuda.CUDAGraph(), None
    with torch.cuda.graph(graph):
        for _ in range(unroll):
            out = fn()
    return graph, out


def _trimmed_batch(input_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor,
                   logps: Tensor, finished: Tensor, eos_ids: Tensor) -> DecodedBatch:
    """Cut ``[B, steps]`` outputs to the last step any row was active (step 0 always is)."""
    used = int(completion_mask.any(0).nonzero().max()) + 1
    completion_ids, logps, completion_mask = completion_ids[:, :used], logps[:, :used], completion_mask[:, :used]
    hit_eos = torch.isin(completion_ids, eos_ids) & completion_mask.bool()      # [B, C]
    return DecodedBatch(prompt_ids=input_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                        completion_mask=completion_mask, logps=logps, finished=finished.tolist(),
                        ends_with_eos=hit_eos.any(-1).tolist())


def _seed_device(device: torch.device, seed: int) -> None:
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def _kernels_by_default(device: torch.device) -> bool:
    """The Triton kernels are the default on CUDA where Triton is importable (not on the CPU interpreter)."""
    return device.type == "cuda" and kernels.available(device)


def _head_spec(model) -> dict:
    """Head counts, head size and score scale of a supported model's attention."""
    config = model.config
    attn0 = model.model.layers[0].self_attn
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(attn0, "head_dim", None) or config.hidden_size // n_heads
    return {"n_heads": n_heads, "n_kv": n_kv, "head_dim": head_dim, "groups": n_heads // n_kv,
            "scaling": getattr(attn0, "scaling", head_dim ** -0.5)}


def _fusable(layer) -> bool:
    attn, mlp = layer.self_attn, getattr(layer, "mlp", None)
    linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
    linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(type(m) is nn.Linear for m in linears) or not callable(getattr(mlp, "act_fn", None)):
        return False
    return (len({m.bias is None for m in linears[:3]}) == 1
            and len({m.bias is None for m in linears[3:5]}) == 1)


def _fused_buffers(layer) -> tuple:
    attn, mlp = layer.self_attn, layer.mlp
    qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
    w = qkv[0].weight
    w_qkv = torch.empty(sum(m.out_features for m in qkv), w.shape[1], dtype=w.dtype, device=w.device)
    b_qkv = (torch.empty(w_qkv.shape[0], dtype=w.dtype, device=w.device)
             if qkv[0].bias is not None else None)
    w_gu = torch.empty(2 * mlp.gate_proj.out_features, w.shape[1], dtype=w.dtype, device=w.device)
    b_gu = (torch.empty(w_gu.shape[0], dtype=w.dtype, device=w.device)
            if mlp.gate_proj.bias is not None else None)
    return w_qkv, b_qkv, w_gu, b_gu


def _project(layer, x: Tensor, spec: dict, fused=None) -> tuple[Tensor, Tensor, Tensor]:
    """Projections and Qwen3's per-head q/k norms, before RoPE: ``[B, T, H]`` → q ``[B, T, H_q, D]``,
    k, v ``[B, T, H_kv, D]`` (views of one fused projection when ``fused`` is given)."""
    attn = layer.self_attn
    if fused is not None:
        return _heads(layer, F.linear(x, fused[0], fused[1]), spec)
    batch, length, _ = x.shape
    head_dim = spec["head_dim"]
    q = attn.q_proj(x).view(batch, length, -1, head_dim)
    k = attn.k_proj(x).view(batch, length, -1, head_dim)
    v = attn.v_proj(x).view(batch, length, -1, head_dim)
    return _head_norms(attn, q, k, v)


def _heads(layer, qkv: Tensor, spec: dict) -> tuple[Tensor, Tensor, Tensor]:
    """Split one fused q/k/v projection ``[B, T, (H_q + 2·H_kv)·D]`` into heads (views), then the q/k norms."""
    batch, length, _ = qkv.shape
    head_dim = spec["head_dim"]
    n_q, n_kv = spec["n_heads"] * head_dim, spec["n_kv"] * head_dim
    q, k, v = (t.view(batch, length, -1, head_dim) for t in qkv.split((n_q, n_kv, n_kv), dim=-1))
    return _head_norms(layer.self_attn, q, k, v)


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` [M, N] through :func:`rlxf.rollout.kernels.decode_linear` (sums its split partials)."""
    return kernels.linear_result(kernels.decode_linear(x, weight, bias), x.dtype)


def _projection(linear: nn.Linear, x: Tensor, kernel: bool) -> Tensor:
    """``linear(x)`` for ``x`` [B, 1, K]: through :func:`rlxf.rollout.kernels.decode_linear` when ``kernel``."""
    if not kernel:
        return linear(x)
    return _linear(x[:, 0], linear.weight, linear.bias)[:, None]


def _linear_kernel_support(model) -> str | None:
    """None when the decode step can run every projection through :func:`rlxf.rollout.kernels.decode_linear`."""
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        if not _fusable(layer) or type(layer.self_attn.o_proj) is not nn.Linear:
            return f"layer {i} has projections that are not plain nn.Linear (LoRA or quantized layers?)"
        if type(mlp.act_fn).__name__ not in ("SiLU", "SiLUActivation"):
            return f"layer {i}'s MLP activation is {type(mlp.act_fn).__name__}, not SiLU"
    return None


def _head_norms(attn, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    return q, k, v


def _qkv(layer, x: Tensor, spec: dict, cos: Tensor, sin: Tensor, fused=None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_project`, then RoPE: q ``[B, H_q, T, D]``, k, v ``[B, H_kv, T, D]``."""
    q, k, v = (t.transpose(1, 2) for t in _project(layer, x, spec, fused))
    return _rope(q, cos, sin), _rope(k, cos, sin), v


def _mlp(layer, x: Tensor, fused=None, linear: frozenset = frozenset()) -> Tensor:
    """The layer's MLP, through the fused gate/up copy when there is one; ``linear`` names the
    projections (``"gate_up"``, ``"down"``) that run through :func:`rlxf.rollout.kernels.decode_linear`
    (rows ``x`` [B, 1, H]; the gate/up kernel applies silu(gate)·up in its epilogue)."""
    if fused is None:
        return layer.mlp(x)
    if "gate_up" in linear:
        act = kernels.decode_linear(x[:, 0], fused[2], fused[3], True)[:, None]
    else:
        gate, up = F.linear(x, fused[2], fused[3]).chunk(2, dim=-1)
        act = layer.mlp.act_fn(gate) * up
    return _projection(layer.mlp.down_proj, act, "down" in linear)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
