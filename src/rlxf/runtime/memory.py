"""Per-GPU memory estimates from a model's ``config.json`` alone (``rlxf plan``; docs/distributed.md#will-it-fit).

Pure functions: a :class:`ModelShape` (read by :func:`read_shape`, no weights loaded) and a
:class:`Workload` (what one training step runs) give an :class:`Estimate` of the peak bytes one GPU
allocates, part by part. All sizes are bytes; reports use GB = 10⁹ bytes, the unit of the measured
peaks (``torch.cuda.max_memory_allocated``) they are checked against.

The parts, for a Llama-style decoder (``H`` hidden, ``I`` MLP width, ``L`` layers, ``V`` vocabulary,
``N`` parameters, ``b`` bytes per parameter of ``--dtype``: 4 for rlxf's default fp32 master weights,
2 for bf16):

* **weights** ``N·b``; NF4 (QLoRA) stores the decoder's linear layers in ~4.13 bits a weight (4-bit
  codes, one fp8 scale per 64 weights, double-quantised, Dettmers et al. 2023, arXiv:2305.14314 §3)
  and the rest in bf16.
* **gradients** and **AdamW state** ``b`` and ``2b`` per *trained* parameter (torch keeps the
  moments in the parameter's dtype). LoRA trains ``r·(in + out)`` per adapted linear layer, in fp32
  (peft's default), so 16 bytes each.
* **FSDP2** (``--fsdp``, N processes) divides weights, gradients and optimiser state by N, computes
  in bf16 (activations as for bf16 weights), and adds the working set: two decoder layers gathered in bf16 (the current one and the prefetched next),
  the root's embeddings and head gathered in bf16 from forward to backward, and one layer's fp32
  gradient before its reduce-scatter. ``--fsdp-cpu-offload`` moves the sharded parts to host memory.
* **activations** of one micro-batch of ``T`` tokens: what autograd keeps per token and layer in a
  transformers decoder under bf16 compute, ``20·H + 8·I + 4·kv + 6·heads`` bytes (the two RMSNorms
  keep their fp32 input and bf16 output, attention keeps q, k, v, its output and log-sum-exp, the
  gated MLP keeps gate, up, the activation and their product; ``kv`` = key/value width), plus
  ``10·H`` with fp32 weights under autocast, which also keeps a bf16 copy of every linear weight
  for backward (``2`` bytes a weight). Measured exactly against the tensors autograd saves in
  ``tests/test_memory.py``. With activation checkpointing each layer keeps only its input
  (``H·b`` per token) and one layer at a time is recomputed. The fused output head
  (docs/performance.md) adds three fp32 ``[chunk, V]`` blocks.
* **no-grad forwards** (reference log-probs precomputed for DPO-style losses, evaluation, old-policy
  log-probs) hold one layer's MLP intermediates at a time, ``6·I + 2·H·b`` bytes per token, over
  the eval batch (``--eval-batch-size``); the run's peak is the larger of this and the training
  micro-batch.
* **KV cache** of online recipes: ``2·L·kv·2`` bytes (bf16 keys and values) per token of every
  sampled sequence on the process.
* **reference model**: a frozen copy of the weights when the run keeps one (GRPO family / PPO with
  β > 0, a DPO loss without ``--precompute-ref``); LoRA runs use the base with adapters off (free).

What it leaves out: the CUDA context and allocator fragmentation (the card check keeps
:data:`HEADROOM` of the card free for them), compiled-graph workspaces, and sampling engines'
own buffers beyond the KV cache. docs/distributed.md states the measured error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

GB = 1e9
MIB = 2**20
# Total memory of common cards as nvidia-smi reports it (MiB); a run must leave HEADROOM of it free.
CARDS_MIB = {"h100": 81559, "h200": 143771, "a100-80": 81920, "a100-40": 40960, "l40s": 46068, "a10g": 23028,
             "l4": 23034, "rtx4090": 24564, "rtx3090": 24576, "t4": 15360}
HEADROOM = 0.08   # CUDA context, allocator fragmentation, kernels' workspaces
NF4_BITS = 4.127  # 4-bit codes + fp8 absmax per 64 weights + fp32 per 256 absmax (double quantisation)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in a decoder-only transformer (read from config.json)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    attention_bias: bool = False   # biases on q, k, v (Qwen2; Llama's attention_bias)
    output_bias: bool = False      # a bias on o_proj too (Llama's attention_bias)
    mlp_bias: bool = False

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer, by its transformers name."""
        H, I, q = self.hidden, self.intermediate, self.heads * self.head_dim
        return {"q_proj": (H, q), "k_proj": (H, self.kv_width), "v_proj": (H, self.kv_width), "o_proj": (q, H),
                "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}

    def layer_linear_params(self) -> int:
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.attention_bias else 0
        bias += self.hidden * self.output_bias + (2 * self.intermediate + self.hidden) * self.mlp_bias
        return sum(i * o for i, o in self.linear_shapes().values()) + bias

    def layer_params(self) -> int:
        return self.layer_linear_params() + 2 * self.hidden   # + two RMSNorm weights

    def root_params(self) -> int:
        """Embeddings, final norm and (untied) output head: what FSDP2's root unit holds."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self) -> int:
        return self.layers * self.layer_params() + self.root_params()


def read_shape(model_dir: str | Path) -> ModelShape:
    """The :class:`ModelShape` of a Hugging Face model directory, from its config.json only.

    Raises ``ValueError`` naming the file and the missing field for configs that are not a
    decoder-only transformer with these fields (mixture-of-experts configs are refused: their
    memory depends on the experts, which this estimate does not model)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{path}: no config.json; --model must be a Hugging Face model directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    config = {**config.get("text_config", {}), **config} if isinstance(config.get("text_config"), dict) else config
    if any(k in config for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        raise ValueError(f"{path}: a mixture-of-experts model; rlxf plan estimates dense decoders only")

    def need(name: str) -> int:
        value = config.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 10**7:
            raise ValueError(f"{path}: field {name!r} must be a positive integer, got {value!r}")
        return value

    qwen2 = config.get("model_type") == "qwen2"   # q, k, v biases without a flag, none on o_proj
    hidden, heads = need("hidden_size"), need("num_attention_heads")
    kv = heads if config.get("num_key_value_heads") is None else config["num_key_value_heads"]
    head_dim = hidden // heads if config.get("head_dim") is None else config["head_dim"]
    for name, value in (("num_key_value_heads", kv), ("head_dim", head_dim)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 10**6:
            raise ValueError(f"{path}: field {name!r} must be a positive integer, got {value!r}")
    return ModelShape(hidden=hidden, layers=need("num_hidden_layers"), intermediate=need("intermediate_size"),
                      heads=heads, kv_heads=kv, head_dim=head_dim, vocab=need("vocab_size"),
                      tied=bool(config.get("tie_word_embeddings", False)),
                      attention_bias=bool(config.get("attention_bias", qwen2)),
                      output_bias=bool(config.get("attention_bias", False)) and not qwen2,
                      mlp_bias=bool(config.get("mlp_bias", False)))


@dataclass(frozen=True)
class Workload:
    """One process's share of a training step. ``train_tokens``: tokens of one training micro-batch;
    ``nograd_tokens``: tokens of the largest no-grad forward (reference precompute, evaluation);
    ``scored_tokens``: positions of a micro-batch that reach the output head; ``kv_tokens``: tokens
    of every sequence sampled at once (online recipes; 0 offline)."""

    train_tokens: int
    nograd_tokens: int = 0
    scored_tokens: int | None = None
    kv_tokens: int = 0
    param_bytes: int = 4
    lora_r: int = 0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    quantize: str | None = None
    gradient_checkpointing: bool = False
    reference_copy: bool = False
    fsdp: bool = False
    nproc: int = 1
    cpu_offload: bool = False
    head_chunk: int = 1024


@dataclass
class Estimate:
    """Bytes by part on one GPU (``parts``: what is held throughout, then the parts of the phase with
    the highest peak) and in host memory (``host``); ``phases``: each phase's own parts' total
    (training step, no-grad forward, sampling); ``peak`` is the GPU sum."""

    parts: dict[str, float] = field(default_factory=dict)
    host: dict[str, float] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def peak(self) -> float:
        return sum(self.parts.values())


def lora_params(shape: ModelShape, r: int, targets: tuple[str, ...]) -> int:
    """Trainable LoRA parameters: ``r·(in + out)`` for every targeted linear layer of every layer."""
    linears = shape.linear_shapes()
    unknown = [t for t in targets if t not in linears]
    if unknown:
        raise ValueError(f"LoRA targets {unknown} are not linear layers of this model; use some of {list(linears)}")
    return shape.layers * sum(r * (linears[t][0] + linears[t][1]) for t in targets)


def weight_bytes(shape: ModelShape, w: Workload) -> float:
    """The stored weights: ``N·b``, or NF4 decoder linears + bf16 rest under ``quantize="nf4"``."""
    if w.quantize == "nf4":
        linear = shape.layers * shape.layer_linear_params()
        return linear * NF4_BITS / 8 + (shape.params() - linear) * 2
    if w.quantize not in (None, "none"):
        raise ValueError(f"quantize {w.quantize!r} is not one of none, nf4")
    return shape.params() * w.param_bytes


def layer_activation_bytes(shape: ModelShape, param_bytes: int) -> float:
    """Bytes autograd keeps per token for one decoder layer of a transformers Llama-style model under
    bf16 compute (see the module docstring; ``tests/test_memory.py`` checks it against the tensors
    autograd saves): ``20·H + 8·I + 4·kv + 6·heads``, plus ``10·H`` with fp32 weights under autocast
    (fp32 residual stream and norm outputs)."""
    H, I = shape.hidden, shape.intermediate
    return 20 * H + 8 * I + 4 * shape.kv_width + 6 * shape.heads + (10 * H if param_bytes == 4 else 0)


def activation_bytes(shape: ModelShape, w: Workload) -> float:
    """One training micro-batch: the decoder's saved activations, autocast's bf16 copies of fp32
    linear weights (kept for backward; one layer's under checkpointing) and the fused head's blocks."""
    compute_bytes = 2 if w.fsdp else w.param_bytes   # FSDP2's mixed precision gathers bf16 weights
    per_layer = layer_activation_bytes(shape, compute_bytes)
    cast_copies = 2 * shape.layer_linear_params() if compute_bytes == 4 else 0
    if w.gradient_checkpointing:
        body = (shape.layers * w.train_tokens * shape.hidden * compute_bytes + w.train_tokens * per_layer
                + cast_copies)
    else:
        body = shape.layers * (w.train_tokens * per_layer + cast_copies)
    scored = w.train_tokens if w.scored_tokens is None else w.scored_tokens
    return body + head_bytes(shape, scored, w.head_chunk)


def head_bytes(shape: ModelShape, scored_tokens: int, chunk: int) -> float:
    """The fused head's working memory: three fp32 ``[chunk, V]`` blocks (logits, their float32
    reduction, the gradient block in backward), fewer rows when fewer positions are scored."""
    return 3 * min(chunk, max(scored_tokens, 1)) * shape.vocab * 4


def nograd_bytes(shape: ModelShape, tokens: int, chunk: int = 1024, param_bytes: int = 2) -> float:
    """The peak of a forward without gradients over ``tokens``: one layer's MLP intermediates (the
    activation, up and their product in bf16: ``6·I``), the residual stream and the MLP's input
    (``2·H·b``), plus one block of the head."""
    if tokens <= 0:
        return 0.0
    return tokens * (6 * shape.intermediate + 2 * shape.hidden * param_bytes) + head_bytes(shape, tokens, chunk) / 3


def kv_cache_bytes(shape: ModelShape, tokens: int) -> float:
    """bf16 keys and values of every layer for ``tokens`` sampled tokens."""
    return tokens * shape.layers * 2 * shape.kv_width * 2


def estimate(shape: ModelShape, w: Workload) -> Estimate:
    """Per-GPU peak memory of a training run, by part (see the module docstring): what is held
    throughout, plus the largest of the phases (training micro-batch, no-grad forward, sampling)."""
    _check(w)
    out = Estimate()
    for name, size in held_bytes(shape, w).items():
        (out.host if w.cpu_offload and name != "KV cache (static engine)" else out.parts)[name] = size
    phases = phase_bytes(shape, w)
    out.phases = {name: sum(parts.values()) for name, parts in phases.items()}
    out.parts.update(phases[max(out.phases, key=out.phases.get)])
    return out


def _check(w: Workload) -> None:
    if w.nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {w.nproc}")
    if w.cpu_offload and not w.fsdp:
        raise ValueError("CPU offload moves FSDP2 shards to host memory: it needs fsdp")
    if w.fsdp and (w.lora_r or w.quantize not in (None, "none")):
        raise ValueError("rlxf's --fsdp trains full weights: it does not combine with LoRA or NF4")


def held_bytes(shape: ModelShape, w: Workload) -> dict[str, float]:
    """What a process holds for the whole run: weights, gradients, AdamW state, a reference copy
    (each divided over the processes under FSDP2), and a static engine's KV cache."""
    trained = lora_params(shape, w.lora_r, w.lora_targets) if w.lora_r else shape.params()
    trained_bytes = 4 if w.lora_r else w.param_bytes
    share = w.nproc if w.fsdp else 1
    held = {"weights": (weight_bytes(shape, w) + (trained * 4 if w.lora_r else 0)) / share,
            "gradients": trained * trained_bytes / share, "optimizer (AdamW)": 2 * trained * trained_bytes / share}
    if w.reference_copy and not w.lora_r:
        held["reference model"] = weight_bytes(shape, w) / share
    if w.kv_tokens and not w.fsdp:   # the static engine keeps its cache between steps
        held["KV cache (static engine)"] = kv_cache_bytes(shape, w.kv_tokens)
    return held


def phase_bytes(shape: ModelShape, w: Workload) -> dict[str, dict[str, float]]:
    """The transient parts of each phase of a step. Under FSDP2 every phase also holds the gathered
    working set (two layers and the root in bf16, one layer's fp32 gradient); sampling holds every
    sharded model whole in bf16 (:func:`rlxf.runtime.fsdp.gathered`) and a dynamic KV cache."""
    models = 2 if w.reference_copy else 1
    working = {}
    if w.fsdp:
        working = {"FSDP2 gathered layers": 2 * 2 * shape.layer_params() + 4 * shape.layer_params()
                   + models * 2 * shape.root_params()}
    phases = {"training step": {**working, "activations": activation_bytes(shape, w)}}
    if w.nograd_tokens:
        nograd = nograd_bytes(shape, w.nograd_tokens, w.head_chunk, 2 if w.fsdp else w.param_bytes)
        phases["no-grad forward"] = {**working, "no-grad forward (reference / eval)": nograd}
    if w.kv_tokens and w.fsdp:
        phases["sampling"] = {"gathered weights (bf16)": models * 2 * shape.params(),
                              "KV cache (sampling)": kv_cache_bytes(shape, w.kv_tokens)}
    return phases


def card_bytes(card: str | None = None, gpu_gb: float | None = None) -> float | None:
    """A card's total memory in bytes, from its name (:data:`CARDS_MIB`) or ``gpu_gb`` GB; None if neither."""
    if card is not None and gpu_gb is not None:
        raise ValueError("give either --card or --gpu-gb, not both")
    if card is not None:
        key = card.strip().lower()
        if key not in CARDS_MIB:
            raise ValueError(f"unknown card {card!r}; use one of {', '.join(CARDS_MIB)} or --gpu-gb")
        return CARDS_MIB[key] * MIB
    if gpu_gb is not None:
        if not (isinstance(gpu_gb, (int, float)) and math.isfinite(gpu_gb) and gpu_gb > 0):
            raise ValueError(f"--gpu-gb must be a positive number of GB, got {gpu_gb!r}")
        return gpu_gb * GB
    return None


def fits(est: Estimate, capacity: float) -> bool:
    """Whether the estimate leaves :data:`HEADROOM` of ``capacity`` bytes free."""
    return est.peak <= capacity * (1 - HEADROOM)


__all__ = ["CARDS_MIB", "GB", "HEADROOM", "Estimate", "ModelShape", "Workload", "activation_bytes", "card_bytes",
           "estimate", "fits", "head_bytes", "held_bytes", "kv_cache_bytes", "layer_activation_bytes", "lora_params", "nograd_bytes",
           "phase_bytes", "read_shape", "weight_bytes"]
