"""The sizing planner: model x method x precision x instance type -> parallelism, nodes, memory, time, cost,
storage and the serving shape, consistent by construction.

Pure Python, no Pulumi. Every consumer (the GPU node group's size, the training job's shape, the engine build
and Triton's world size) takes its numbers from one ``SizingPlan``; nothing is typed twice.

    python -m infra.sizing --model 70b --method lora --instance p5.48xlarge [--nodes N] [--tp N] [--pp N]
                           [--precision fp8] [--seq-length N] [--json]
    python -m infra.sizing --matrix      # all variants x methods x GPU types, as Markdown

Units: bytes for memory (``GiB`` only when printing), FLOPs, seconds, US dollars.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

from infra import catalog
from infra.catalog import InstanceType

GIB = 1024**3
METHODS = ("lora", "sft")
PRECISIONS = ("bf16", "fp8")

# ---------------------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class ModelSpec:
    """Architecture facts of a Llama-family decoder, as in the model's Hugging Face ``config.json`` and the
    matching NeMo 2 config class (``nemo.collections.llm.<nemo_config>``)."""

    key: str
    display: str
    hf_id: str
    nemo_config: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int  # grouped-query attention: the KV cache scales with these, not with ``heads``
    ffn: int  # SwiGLU intermediate size
    vocab: int
    max_seq_length: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def params_per_layer(self) -> int:
        attention = self.hidden * (2 * self.hidden + 2 * self.kv_dim)  # Q and O: h x h; K and V: h x kv_dim
        mlp = 3 * self.hidden * self.ffn  # gate, up (h x F) and down (F x h)
        return attention + mlp + 2 * self.hidden  # two RMSNorm weight vectors

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden  # one of: the input embedding, the (untied) output layer

    @property
    def params(self) -> int:
        return self.layers * self.params_per_layer + 2 * self.embedding_params + self.hidden  # + final norm

    def lora_params_per_layer(self, rank: int) -> int:
        """NeMo's LoRA on the fused modules (``linear_qkv``, ``linear_proj``, ``linear_fc1``, ``linear_fc2``):
        an adapter A (in x r) plus B (r x out) per module."""
        h, f = self.hidden, self.ffn
        shapes = ((h, h + 2 * self.kv_dim), (h, h), (h, 2 * f), (f, h))
        return sum(rank * (fan_in + fan_out) for fan_in, fan_out in shapes)


def _llama(key, display, hf_id, nemo_config, layers, hidden, heads, kv_heads, ffn, vocab, max_seq):
    return ModelSpec(key, display, hf_id, nemo_config, layers, hidden, heads, kv_heads, ffn, vocab, max_seq)


# Architecture facts from each model's config.json on Hugging Face (num_hidden_layers, hidden_size,
# num_attention_heads, num_key_value_heads, intermediate_size, vocab_size, max_position_embeddings).
MODELS: Mapping[str, ModelSpec] = MappingProxyType({m.key: m for m in (
    _llama("llama2-7b", "Llama-2-7B", "meta-llama/Llama-2-7b-hf", "Llama2Config7B", 32, 4096, 32, 32, 11008, 32000, 4096),
    _llama("llama2-13b", "Llama-2-13B", "meta-llama/Llama-2-13b-hf", "Llama2Config13B", 40, 5120, 40, 40, 13824, 32000, 4096),
    _llama("llama2-70b", "Llama-2-70B", "meta-llama/Llama-2-70b-hf", "Llama2Config70B", 80, 8192, 64, 8, 28672, 32000, 4096),
    _llama("llama31-8b", "Llama-3.1-8B", "meta-llama/Llama-3.1-8B", "Llama31Config8B", 32, 4096, 32, 8, 14336, 128256, 131072),
    _llama("llama31-70b", "Llama-3.1-70B", "meta-llama/Llama-3.1-70B", "Llama31Config70B", 80, 8192, 64, 8, 28672, 128256, 131072),
    _llama("llama31-405b", "Llama-3.1-405B", "meta-llama/Llama-3.1-405B", "Llama31Config405B", 126, 16384, 128, 8, 53248, 128256, 131072),
)})

# The product's variants: the default concrete model first, then the alternatives of the same size class.
VARIANTS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "7b": ("llama2-7b", "llama31-8b"),
    "13b": ("llama2-13b",),
    "70b": ("llama31-70b", "llama2-70b"),
    "405b": ("llama31-405b",),
})


def model_for(variant: str, preset: str | None = None) -> ModelSpec:
    return MODELS[preset or VARIANTS[variant][0]]


# ---------------------------------------------------------------------------------------------------------
# Calibration: what the planner assumes, each with its source

# Usable share of GPU memory: the CUDA context, NCCL buffers and allocator fragmentation take the rest.
MEMORY_HEADROOM = 0.10

# Bytes per parameter of mixed-precision training with Adam in Megatron-Core: 16-bit weights (2), fp32
# gradients (4), and fp32 master weights + Adam moments (12), the last sharded over the data-parallel ranks
# by the distributed optimizer: 6 + 12/d (Megatron-Core developer guide, "Distributed Optimizer";
# Megatron-Bridge docs/training/memory-estimator.md). FP8 training keeps these in bf16/fp32 too.
WEIGHT_BYTES = 2
GRAD_BYTES = 4
OPTIMIZER_BYTES = 12
# FP8 training: Transformer Engine keeps an FP8 copy of each weight for the forward GEMM and a transposed
# one for the backward (Hopper's FP8 GEMMs need both layouts; TE docs, "FP8 primer: handling transposes"),
# next to the 16-bit weights, for frozen LoRA bases too.
FP8_WEIGHT_COPY_BYTES = 2
# LoRA adapters train with the plain (unsharded) optimizer in NeMo's recipes (use_distributed_optimizer=False).
ADAPTER_BYTES = WEIGHT_BYTES + GRAD_BYTES + OPTIMIZER_BYTES
# A NeMo distributed checkpoint stores 16-bit weights and the fp32 optimizer state (no gradients).
CHECKPOINT_BYTES_PER_PARAM = WEIGHT_BYTES + OPTIMIZER_BYTES


@dataclass(frozen=True)
class PublishedThroughput:
    model: str  # MODELS key with the same architecture
    method: str
    precision: str
    gpu_model: str
    gpus: int
    tokens_per_sec_per_gpu: float
    source: str


_NEMO_2407 = "NVIDIA/NeMo docs/source/performance/performance_summary.md (NeMo 24.07, DGX-H100, packed seq 4096)"
_DGXC_2412 = "NVIDIA/dgxc-benchmarking ft_llama3/README_8b.md, README_70b.md (nvcr.io/nvidia/nemo:24.12, seq 4096)"
_BRIDGE_2606 = "NVIDIA-NeMo/Megatron-Bridge docs/performance-summary-archive.md (26.06, seq 4096)"
# NVIDIA's published fine-tuning throughput on H100 SXM, the points the efficiency figures are fitted to.
PUBLISHED: tuple[PublishedThroughput, ...] = (
    PublishedThroughput("llama2-7b", "sft", "fp8", "H100", 8, 16891, _NEMO_2407),
    PublishedThroughput("llama2-13b", "sft", "fp8", "H100", 8, 10176, _NEMO_2407),
    PublishedThroughput("llama2-70b", "sft", "fp8", "H100", 16, 1816, _NEMO_2407),
    PublishedThroughput("llama2-7b", "lora", "fp8", "H100", 8, 24824, _NEMO_2407),
    PublishedThroughput("llama2-13b", "lora", "fp8", "H100", 8, 14629, _NEMO_2407),
    PublishedThroughput("llama2-70b", "lora", "fp8", "H100", 8, 2621, _NEMO_2407),
    PublishedThroughput("llama31-8b", "sft", "bf16", "H100", 8, 12412, _DGXC_2412),
    PublishedThroughput("llama31-8b", "sft", "fp8", "H100", 8, 17246, _DGXC_2412),
    PublishedThroughput("llama31-8b", "lora", "bf16", "H100", 8, 17809, _DGXC_2412),
    PublishedThroughput("llama31-8b", "lora", "fp8", "H100", 8, 24094, _DGXC_2412),
    PublishedThroughput("llama31-70b", "sft", "bf16", "H100", 32, 1219, _DGXC_2412),
    PublishedThroughput("llama31-70b", "sft", "fp8", "H100", 32, 1812, _DGXC_2412),
    PublishedThroughput("llama31-70b", "lora", "bf16", "H100", 8, 1797, _DGXC_2412),
    PublishedThroughput("llama31-70b", "lora", "fp8", "H100", 8, 2521, _DGXC_2412),
    PublishedThroughput("llama31-70b", "sft", "fp8", "H100", 32, 1638, _BRIDGE_2606),
    PublishedThroughput("llama31-70b", "lora", "fp8", "H100", 8, 2643, _BRIDGE_2606),
)
CALIBRATION_SEQ_LENGTH = 4096


def published_efficiency(point: PublishedThroughput) -> float:
    """Achieved model FLOP/s of a published run, with this module's FLOPs formula, over the dense peak."""
    model_flops = point.tokens_per_sec_per_gpu * flops_per_token(MODELS[point.model], CALIBRATION_SEQ_LENGTH, point.method)
    return model_flops / (catalog.GPU_PEAK_TFLOPS[point.gpu_model][point.precision] * 1e12)


def _fit_efficiency() -> Mapping[tuple[str, str, str], float]:
    """Efficiency per (GPU generation, precision, method): the mean over the published points. NVIDIA
    publishes no NeMo Llama fine-tuning numbers on A100; Ampere takes Hopper's BF16 figures, in line with
    NVIDIA's A100 BF16 GPT-3 pretraining at 48-54% of the 312 TFLOP/s peak (BigNLP-Scripts README, 7.1.2)."""
    fitted: dict[tuple[str, str, str], float] = {}
    for precision in PRECISIONS:
        for method in METHODS:
            points = [published_efficiency(p) for p in PUBLISHED if p.precision == precision and p.method == method]
            fitted[("hopper", precision, method)] = round(sum(points) / len(points), 3)
    for method in METHODS:
        fitted[("ampere", "bf16", method)] = fitted[("hopper", "bf16", method)]
    return MappingProxyType(fitted)


# LoRA freezes the base: the weight-gradient GEMMs of frozen layers are skipped, so they cost 2/3 of a full
# step (Megatron-Bridge src/megatron/bridge/training/utils/flop_utils.py; NeMo 24.07's LoRA/SFT FLOPs per
# token, 26.7 vs 39.8 GF for Llama2-7B, have the same ratio). Attention-score FLOPs are not reduced.
LORA_FROZEN_FLOPS_SHARE = 2 / 3

# Serving: TensorRT-LLM hands this share of the memory left after the weights to the paged KV cache
# (kv_cache_free_gpu_mem_fraction, default 0.9 in TensorRT-LLM's KvCacheConfig).
KV_CACHE_FREE_FRACTION = 0.9
SERVING_MAX_NUM_TOKENS = 8192  # TensorRT-LLM's default max_num_tokens for the inflight batcher
SERVING_MAX_BATCH = 256
MIN_CONCURRENT_FULL_SEQUENCES = 4  # a serving TP must hold at least this many max-length sequences
# Weights may take at most this share of usable memory: the paged KV cache is what gives inflight batching its
# throughput. NVIDIA's published TensorRT-LLM setups agree (TensorRT-LLM docs/source/performance/perf-overview.md:
# Llama-3.3-70B FP8 at TP2 on H100 80 GB, where weights alone would fill 91% at TP1, but TP1 on H200 141 GB).
SERVING_MAX_WEIGHT_SHARE = 0.7

CHECKPOINT_WRITE_SECONDS = 600  # FSx sized so a full checkpoint writes in about ten minutes
DATASET_BYTES_PER_TOKEN = 6  # JSONL text: ~4 characters per token plus the JSON keys and escapes
MAX_NODES = 64


# ---------------------------------------------------------------------------------------------------------
# Requests and plans


@dataclass(frozen=True)
class TrainingRequest:
    model: ModelSpec
    method: str
    instance: InstanceType
    precision: str = "bf16"
    seq_length: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int = 128
    lora_rank: int = 16
    dataset_tokens: int | None = None
    epochs: float = 1.0
    nodes: int | None = None
    tp: int | None = None
    pp: int | None = None
    checkpoints_kept: int = 2  # NeMo ModelCheckpoint save_top_k; one more ("last") is kept besides
    serving_tp: int | None = None
    serving_max_seq_length: int | None = None


@dataclass(frozen=True)
class Parallelism:
    tp: int
    pp: int
    cp: int
    dp: int
    nodes: int
    gpus_per_node: int
    recompute: str  # "none" | "full" (activation recomputation of every layer)

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.cp

    @property
    def sequence_parallel(self) -> bool:
        return self.tp > 1  # Megatron's sequence parallelism only applies with TP

    def describe(self) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}"] + ([f"CP{self.cp}"] if self.cp > 1 else []) + [f"DP{self.dp}"]
        return " x ".join(parts)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Per-GPU bytes on the most loaded GPU (the first pipeline stage, or the last when the logits dominate)."""

    weights: int
    gradients: int
    optimizer: int
    lora_adapters: int
    activations: int
    logits: int
    gpu_memory: int
    usable: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.lora_adapters + self.activations + self.logits

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    def gib(self) -> dict[str, float]:
        fields = ("weights", "gradients", "optimizer", "lora_adapters", "activations", "logits", "total", "usable", "gpu_memory")
        return {name: round(getattr(self, name) / GIB, 1) for name in fields}


@dataclass(frozen=True)
class StoragePlan:
    checkpoint_bytes: int
    checkpoints_kept: int
    base_model_bytes: int
    export_bytes: int
    dataset_bytes: int
    needed_bytes: int
    fsx_capacity_gib: int
    fsx_throughput_per_tib: int

    @property
    def fsx_throughput_mb_s(self) -> int:
        return self.fsx_capacity_gib * self.fsx_throughput_per_tib // 1024


@dataclass(frozen=True)
class ServingPlan:
    instance_type: str
    tp: int
    pp: int
    precision: str  # weights: "fp8" on Hopper, else "bf16"
    kv_cache_dtype: str
    weight_bytes_per_gpu: int
    kv_bytes_per_token: int  # the whole model, all layers, K and V
    kv_cache_tokens: int  # paged KV-cache tokens that fit across the TP x PP group
    max_batch_size: int
    max_num_tokens: int
    max_seq_length: int
    kv_cache_free_fraction: float
    fits: bool
    reason: str = ""

    @property
    def world_size(self) -> int:
        return self.tp * self.pp  # Triton's MPI world size must equal the engine's TP x PP

    @property
    def gpus(self) -> int:
        return self.world_size


@dataclass(frozen=True)
class EvaluationPlan:
    """Inference for the evaluation stage: 16-bit weights (Hugging Face transformers in the NeMo image) spread
    over the fewest GPUs of one node that hold them with room for generation; CPU offload when even the whole
    node cannot (the largest models on 80 GiB GPUs: slow, so evaluate fewer examples)."""

    gpus: int
    cpu_offload: bool
    weight_bytes_per_gpu: int


@dataclass(frozen=True)
class SizingPlan:
    request: TrainingRequest
    parallelism: Parallelism
    memory: MemoryBreakdown
    fits: bool
    reasons: tuple[str, ...]
    flops_per_token: float
    efficiency: float
    tokens_per_sec_per_gpu: float
    training_tokens: int | None
    hours: float | None
    cost_usd: float | None
    storage: StoragePlan
    serving: ServingPlan
    evaluation: EvaluationPlan
    nearest: str = ""  # a working setting, when this one does not fit

    @property
    def model(self) -> ModelSpec:
        return self.request.model

    @property
    def cost_per_billion_tokens(self) -> float:
        hours = 1e9 / (self.tokens_per_sec_per_gpu * self.parallelism.gpus) / 3600
        return hours * self.parallelism.nodes * self.request.instance.on_demand_usd_per_hour

    def to_dict(self) -> dict[str, Any]:
        request = asdict(self.request)
        request["model"] = self.model.key
        request["instance"] = self.request.instance.name
        return {
            "model": {**asdict(self.model), "params": self.model.params},
            "request": request,
            "fits": self.fits,
            "reasons": list(self.reasons),
            "nearest": self.nearest,
            "parallelism": {**asdict(self.parallelism), "gpus": self.parallelism.gpus,
                            "sequence_parallel": self.parallelism.sequence_parallel},
            "memory_gib": self.memory.gib(),
            "memory_bytes": {**asdict(self.memory), "total": self.memory.total},
            "throughput": {"flops_per_token": self.flops_per_token, "efficiency": self.efficiency,
                           "tokens_per_sec_per_gpu": round(self.tokens_per_sec_per_gpu, 1),
                           "training_tokens": self.training_tokens, "hours": self.hours, "cost_usd": self.cost_usd,
                           "cost_per_billion_tokens_usd": round(self.cost_per_billion_tokens, 2),
                           "price_region": catalog.PRICE_REGION, "price_date": catalog.PRICE_DATE},
            "storage": {**asdict(self.storage), "fsx_throughput_mb_s": self.storage.fsx_throughput_mb_s},
            "serving": {**asdict(self.serving), "world_size": self.serving.world_size},
            "evaluation": asdict(self.evaluation),
        }


class SizingError(ValueError):
    """A request no setting can satisfy (as opposed to a plan that does not fit, which is reported).
    ``field`` names the TrainingRequest field at fault, so config can name the stack-config key."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


# ---------------------------------------------------------------------------------------------------------
# Memory model


def stage_layers(model: ModelSpec, pp: int) -> int:
    return math.ceil(model.layers / pp)


def pipeline_split_valid(model: ModelSpec, pp: int) -> bool:
    """Megatron splits layers evenly; with account_for_embedding/loss_in_pipeline_split the embedding and the
    loss count as one layer each (how Llama-3.1-405B's 126 layers split over 8 stages)."""
    return model.layers % pp == 0 or (model.layers + 2) % pp == 0


def activation_bytes_per_token_per_layer(model: ModelSpec) -> int:
    """16-bit activations one transformer layer keeps for its backward pass, per token, counted tensor by
    tensor in the manner of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
    Models", arXiv:2205.05198, section 4.1), for a Llama layer with flash attention (no s x s scores kept):
      attention: RMSNorm input 2h, QKV input 2h, Q 2h, K and V 4*kv_dim, attention output (proj input) 2h
      MLP:       RMSNorm input 2h, fc1 input 2h, gate and up 4F, SwiGLU output (fc2 input) 2F
    = 12h + 4*kv_dim + 6F bytes. With tensor and sequence parallelism every term is split t ways."""
    return 12 * model.hidden + 4 * model.kv_dim + 6 * model.ffn


def memory_breakdown(request: TrainingRequest, tp: int, pp: int, cp: int, dp: int, recompute: str) -> MemoryBreakdown:
    model, instance = request.model, request.instance
    layers_here = stage_layers(model, pp)
    # The first stage holds the input embedding, the last the output layer; with one stage, both.
    embedding_here = model.embedding_params * (2 if pp == 1 else 1)
    params_here = (layers_here * model.params_per_layer + embedding_here) // tp

    weight_bytes = WEIGHT_BYTES + (FP8_WEIGHT_COPY_BYTES if request.precision == "fp8" else 0)
    if request.method == "sft":
        weights = params_here * weight_bytes
        gradients = params_here * GRAD_BYTES
        optimizer = params_here * OPTIMIZER_BYTES // (dp * cp)  # distributed optimizer
        adapters = 0
    else:
        weights = params_here * weight_bytes  # frozen base: weights only
        gradients = optimizer = 0
        adapters = layers_here * model.lora_params_per_layer(request.lora_rank) // tp * ADAPTER_BYTES

    tokens = request.seq_length * request.micro_batch_size // cp  # tokens per micro-batch on this GPU
    per_layer = activation_bytes_per_token_per_layer(model) * tokens // tp
    # With 1F1B the first stage keeps pp micro-batches in flight: pp x (layers/pp) = all layers' worth
    # (Korthikanti et al. 2022, section 4.2.3), or fewer when there are fewer micro-batches than stages.
    micro_batches = request.global_batch_size // (request.micro_batch_size * dp)
    in_flight = min(pp, max(1, micro_batches))
    if recompute == "full":
        # Only each layer's input is kept; one layer's activations are rebuilt at a time in backward.
        layer_input = 2 * model.hidden * tokens // tp
        activations = layer_input * layers_here * in_flight + per_layer
    else:
        activations = per_layer * layers_here * in_flight
    # fp32 logits for the loss on the last stage: s x b x V x 4 bytes, split over TP.
    logits = 4 * tokens * model.vocab // tp
    if pp > 1:
        # Worst stage: the first (most micro-batches in flight) or the last (logits, one in flight).
        last_stage = per_layer * layers_here + logits if recompute != "full" else \
            2 * model.hidden * tokens // tp * layers_here + per_layer + logits
        if last_stage > activations:
            activations, logits = last_stage - logits, logits
        else:
            logits = 0
    gpu_memory = instance.gpu_memory_gib * GIB
    return MemoryBreakdown(weights, gradients, optimizer, adapters, activations, logits, gpu_memory,
                           int(gpu_memory * (1 - MEMORY_HEADROOM)))


# ---------------------------------------------------------------------------------------------------------
# Throughput, time and cost


def flops_per_token(model: ModelSpec, seq_length: int, method: str) -> float:
    """Model FLOPs per trained token, NeMo's formula for Llama (nemo/utils/flops_formulas.py, ``llama3``):
    per step GBS*s*L*h^2*(12 + 12*g/a + 18*F/h + 12*(s/h)*0.5 + 6*V/(L*h)), g KV heads, a heads; divided by
    the GBS*s tokens of a step. For LoRA the frozen GEMMs count 2/3 (LORA_FROZEN_FLOPS_SHARE)."""
    L, h, s = model.layers, model.hidden, seq_length
    dense = L * h * h * (12 + 12 * model.kv_heads / model.heads + 18 * model.ffn / h) + 6 * model.vocab * h
    attention = L * h * h * 12 * (s / h) * 0.5
    if method == "lora":
        dense *= LORA_FROZEN_FLOPS_SHARE
    return dense + attention


EFFICIENCY = _fit_efficiency()


def recompute_overhead(recompute: str, method: str) -> float:
    """Full recomputation runs every layer's forward a second time. A full step is three forward-sized passes
    (forward, input gradients, weight gradients); a LoRA step skips the frozen weight gradients, so two."""
    passes = 3 if method == "sft" else 2
    return (passes + 1) / passes if recompute == "full" else 1.0


# ---------------------------------------------------------------------------------------------------------
# Storage


def storage_plan(request: TrainingRequest) -> StoragePlan:
    model = request.model
    if request.method == "sft":
        checkpoint = model.params * CHECKPOINT_BYTES_PER_PARAM
    else:
        checkpoint = model.layers * model.lora_params_per_layer(request.lora_rank) * CHECKPOINT_BYTES_PER_PARAM
    kept = request.checkpoints_kept + 1  # save_top_k plus the "last" checkpoint
    base = model.params * WEIGHT_BYTES * 2  # the Hugging Face download and its NeMo import
    # The Hugging Face export and the serving engine; LoRA first merges into a full NeMo checkpoint too.
    export = model.params * WEIGHT_BYTES * (3 if request.method == "lora" else 2)
    dataset = (request.dataset_tokens or 0) * DATASET_BYTES_PER_TOKEN
    needed = int((checkpoint * kept + base + export + dataset) * 1.2)  # 20% free: Lustre slows when full
    capacity = smallest_fsx_capacity(needed)
    # Throughput: write one checkpoint within CHECKPOINT_WRITE_SECONDS; more capacity buys more throughput.
    need_mb_s = checkpoint / 1e6 / CHECKPOINT_WRITE_SECONDS
    while True:
        for per_tib in (125, 250, 500, 1000):
            if capacity / 1024 * per_tib >= need_mb_s:
                return StoragePlan(checkpoint, kept, base, export, dataset, needed, capacity, per_tib)
        capacity = 2400 if capacity == 1200 else capacity + 2400


def smallest_fsx_capacity(needed_bytes: int) -> int:
    """The smallest PERSISTENT_2 step (1200, 2400, then multiples of 2400 GiB) that holds ``needed_bytes``."""
    return 1200 if needed_bytes <= 1200 * GIB else math.ceil(needed_bytes / (2400 * GIB)) * 2400


# ---------------------------------------------------------------------------------------------------------
# Serving


def kv_bytes_per_token(model: ModelSpec, dtype_bytes: int) -> int:
    """K and V for every layer: 2 x layers x kv_heads x head_dim x bytes (grouped-query attention)."""
    return 2 * model.layers * model.kv_heads * model.head_dim * dtype_bytes


def _power_of_two_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def serving_plan(model: ModelSpec, instance: InstanceType, max_seq_length: int, tp: int | None = None) -> ServingPlan:
    """The engine and Triton shape: FP8 weights and KV cache on Hopper (TensorRT-LLM's FP8 needs SM89+),
    16-bit on Ampere; the smallest TP (within one node, a divisor of the KV heads or a multiple of them)
    that holds the weights and at least MIN_CONCURRENT_FULL_SEQUENCES max-length sequences of KV cache."""
    precision = "fp8" if instance.fp8 else "bf16"
    dtype_bytes = 1 if precision == "fp8" else 2
    kv_token = kv_bytes_per_token(model, dtype_bytes)
    usable = instance.gpu_memory_gib * GIB * (1 - MEMORY_HEADROOM)
    candidates = [tp] if tp else [t for t in (1, 2, 4, 8) if t <= instance.gpus]
    best = None
    for t in candidates:
        weights = model.params * dtype_bytes // t
        kv_shards = min(t, model.kv_heads)  # beyond the KV heads, heads are replicated, not split
        free = max(0.0, usable - weights) * KV_CACHE_FREE_FRACTION
        tokens = int(free / (kv_token / kv_shards))
        fits = weights <= usable * SERVING_MAX_WEIGHT_SHARE and tokens >= MIN_CONCURRENT_FULL_SEQUENCES * max_seq_length
        valid = t <= instance.gpus and (model.kv_heads % t == 0 or t % model.kv_heads == 0) and model.heads % t == 0
        reason = ""
        if not valid:
            reason = f"serving TP {t} must divide the {model.heads} attention heads and fit one {instance.name} ({instance.gpus} GPUs)"
        elif not fits:
            reason = (f"serving TP {t}: {weights / GIB:.1f} GiB of {precision} weights per GPU (at most "
                      f"{usable * SERVING_MAX_WEIGHT_SHARE / GIB:.1f} GiB) leave KV cache for {tokens:,} tokens "
                      f"(at least {MIN_CONCURRENT_FULL_SEQUENCES} x {max_seq_length} wanted)")
        batch = min(SERVING_MAX_BATCH, _power_of_two_floor(tokens // max(1, max_seq_length // 2)))
        plan = ServingPlan(instance.name, t, 1, precision, precision, int(weights), kv_token, tokens, batch,
                           max(SERVING_MAX_NUM_TOKENS, max_seq_length), max_seq_length,
                           KV_CACHE_FREE_FRACTION, valid and fits, reason)
        best = plan
        if plan.fits:
            return plan
    assert best is not None
    return best


EVALUATION_MAX_WEIGHT_SHARE = 0.8  # the rest of usable memory for activations and the generation KV cache


def evaluation_plan(model: ModelSpec, instance: InstanceType) -> EvaluationPlan:
    weights = model.params * WEIGHT_BYTES
    usable = instance.gpu_memory_gib * GIB * (1 - MEMORY_HEADROOM)
    for gpus in (1, 2, 4, 8):
        if gpus <= instance.gpus and weights / gpus <= usable * EVALUATION_MAX_WEIGHT_SHARE:
            return EvaluationPlan(gpus, False, weights // gpus)
    return EvaluationPlan(instance.gpus, True, weights // instance.gpus)


# ---------------------------------------------------------------------------------------------------------
# The planner


def _tp_candidates(request: TrainingRequest) -> list[int]:
    model, gpn = request.model, request.instance.gpus
    # Sequence parallelism (on whenever TP > 1) splits the sequence across the TP ranks.
    options = [t for t in (1, 2, 4, 8) if t <= gpn and model.heads % t == 0 and model.kv_heads % t == 0
               and request.seq_length % t == 0]
    return [request.tp] if request.tp else options


def _pp_candidates(request: TrainingRequest) -> list[int]:
    options = [p for p in (1, 2, 4, 8, 16) if pipeline_split_valid(request.model, p)]
    return [request.pp] if request.pp else options


def _cp_candidates(request: TrainingRequest) -> list[int]:
    # Context parallelism only where long sequences make activations the problem.
    return [c for c in (1, 2, 4, 8) if c == 1 or (request.seq_length >= 16384 and request.seq_length % (2 * c) == 0)]


def validate_request(request: TrainingRequest) -> None:
    model, instance = request.model, request.instance
    for name, value in (("micro_batch_size", request.micro_batch_size), ("global_batch_size", request.global_batch_size),
                        ("lora_rank", request.lora_rank), ("tp", request.tp), ("pp", request.pp), ("nodes", request.nodes)):
        if value is not None and value < 1:
            raise SizingError(f"{name.replace('_', ' ')} {value}: must be at least 1", name)
    if request.epochs <= 0:
        raise SizingError(f"epochs {request.epochs}: must be more than 0", "epochs")
    if request.method not in METHODS:
        raise SizingError(f"method {request.method!r}: allowed {', '.join(METHODS)}", "method")
    if request.precision not in PRECISIONS:
        raise SizingError(f"precision {request.precision!r}: allowed {', '.join(PRECISIONS)}", "precision")
    if request.precision == "fp8" and not instance.fp8:
        raise SizingError(f"precision fp8 needs Hopper GPUs; {instance.name} has {instance.gpu_model} "
                          f"(use bf16, or p5.48xlarge / p5e.48xlarge / p5en.48xlarge)", "precision")
    if not 128 <= request.seq_length <= model.max_seq_length:
        raise SizingError(f"sequence length {request.seq_length}: {model.display} allows 128..{model.max_seq_length}",
                          "seq_length")
    if request.global_batch_size % request.micro_batch_size:
        raise SizingError(f"global batch size {request.global_batch_size} must be a multiple of the micro batch "
                          f"size {request.micro_batch_size}", "global_batch_size")
    if request.tp is not None:
        if request.tp > instance.gpus or model.heads % request.tp or model.kv_heads % request.tp:
            near = max(t for t in (1, 2, 4, 8) if t <= instance.gpus and model.heads % t == 0 and model.kv_heads % t == 0
                       and t <= request.tp) if request.tp >= 1 else 1
            raise SizingError(f"TP {request.tp} must divide {model.display}'s {model.heads} attention heads and "
                              f"{model.kv_heads} KV heads and stay within one {instance.name} ({instance.gpus} GPUs); "
                              f"nearest: TP {near}", "tp")
    if request.tp is not None and request.tp > 1 and request.seq_length % request.tp:
        raise SizingError(f"sequence length {request.seq_length} must be a multiple of TP {request.tp} (sequence "
                          f"parallelism splits it); nearest: {request.seq_length // request.tp * request.tp}", "seq_length")
    if request.pp is not None and (request.pp < 1 or not pipeline_split_valid(model, request.pp)):
        near = min((p for p in (1, 2, 4, 8, 16) if pipeline_split_valid(model, p)), key=lambda p: abs(p - request.pp))
        raise SizingError(f"PP {request.pp} cannot split {model.display}'s {model.layers} layers evenly; nearest: PP {near}",
                          "pp")
    if request.nodes is not None and not 1 <= request.nodes <= MAX_NODES:
        raise SizingError(f"nodes {request.nodes}: allowed 1..{MAX_NODES}", "nodes")


def _candidates(request: TrainingRequest, nodes: int) -> Iterable[Parallelism]:
    gpn = request.instance.gpus
    gpus = nodes * gpn
    options = []
    for recompute in ("none", "full"):
        for tp in _tp_candidates(request):
            for pp in _pp_candidates(request):
                for cp in _cp_candidates(request):
                    if cp > 1 and request.seq_length % (2 * cp * tp):
                        continue  # context parallelism splits each sequence into 2 x CP chunks, then TP
                    mp = tp * pp * cp
                    if gpus % mp:
                        continue
                    dp = gpus // mp
                    if request.global_batch_size % (request.micro_batch_size * dp):
                        continue
                    options.append(Parallelism(tp, pp, cp, dp, nodes, gpn, recompute))
    # Preference: no recomputation, then the most data parallelism (least model parallel), then no pipeline
    # bubble, then no context parallelism. TP stays inside a node's NVLink domain by construction.
    options.sort(key=lambda p: (p.recompute != "none", p.model_parallel, p.pp, p.cp))
    return options


def _finish(request: TrainingRequest, par: Parallelism, memory: MemoryBreakdown, reasons: Sequence[str],
            nearest: str = "") -> SizingPlan:
    instance, model = request.instance, request.model
    efficiency = EFFICIENCY[(instance.gpu_arch, request.precision, request.method)]
    per_token = flops_per_token(model, request.seq_length, request.method)
    peak = catalog.GPU_PEAK_TFLOPS[instance.gpu_model][request.precision] * 1e12
    tokens_per_sec = peak * efficiency / per_token / recompute_overhead(par.recompute, request.method)
    training_tokens = int(request.dataset_tokens * request.epochs) if request.dataset_tokens else None
    hours = cost = None
    if training_tokens:
        hours = training_tokens / (tokens_per_sec * par.gpus) / 3600
        cost = hours * par.nodes * instance.on_demand_usd_per_hour
    serving = serving_plan(model, instance, request.serving_max_seq_length or request.seq_length, request.serving_tp)
    fits = memory.fits and serving.fits
    all_reasons = list(reasons) + ([serving.reason] if not serving.fits else [])
    return SizingPlan(request, par, memory, fits, tuple(all_reasons), per_token, efficiency, tokens_per_sec,
                      training_tokens, hours, cost, storage_plan(request), serving,
                      evaluation_plan(model, instance), nearest)


def _no_layout(request: TrainingRequest) -> SizingError:
    """Say which setting leaves no layout: a fixed TP, PP or node count, or else the batch sizes."""
    gpn = request.instance.gpus
    node_counts = [request.nodes] if request.nodes else list(range(1, MAX_NODES + 1))
    shapes = [t * p for t in _tp_candidates(request) for p in _pp_candidates(request)]
    if not any((n * gpn) % shape == 0 for n in node_counts for shape in shapes):
        fixed = [(name, value) for name, value in (("pp", request.pp), ("tp", request.tp), ("nodes", request.nodes)) if value]
        name, value = fixed[0] if fixed else ("nodes", request.nodes)
        return SizingError(f"{name.upper() if name != 'nodes' else 'nodes'} {value}: no TP x PP layout of "
                           f"{request.nodes or 'any number of'} x {request.instance.name} ({gpn} GPUs each) fits "
                           f"TP {request.tp or 'any'} x PP {request.pp or 'any'}", name)
    return SizingError(f"global batch size {request.global_batch_size}: no data-parallel size of "
                       f"{request.nodes or 'up to ' + str(MAX_NODES)} x {request.instance.name} divides it by "
                       f"micro-batch {request.micro_batch_size}; use a power of two", "global_batch_size")


def _does_not_fit(request: TrainingRequest, par: Parallelism, memory: MemoryBreakdown) -> str:
    gib = memory.gib()
    return (f"{request.model.display} {request.method.upper()} ({request.precision}, seq {request.seq_length}, "
            f"micro-batch {request.micro_batch_size}) with {par.describe()} on {par.nodes} x {request.instance.name} needs "
            f"{gib['total']} GiB per GPU (weights {gib['weights']}, gradients {gib['gradients']}, optimizer "
            f"{gib['optimizer']}, LoRA {gib['lora_adapters']}, activations {gib['activations']} with "
            f"{par.recompute} recompute, logits {gib['logits']}), more than the {gib['usable']} GiB usable of a "
            f"{request.instance.gpu_memory_gib} GiB {request.instance.gpu_model}")


def plan(request: TrainingRequest, *, find_nearest: bool = True) -> SizingPlan:
    """Choose the parallelism and node count (unless fixed) and derive everything else."""
    validate_request(request)
    node_range = [request.nodes] if request.nodes else range(1, MAX_NODES + 1)
    tightest: tuple[Parallelism, MemoryBreakdown] | None = None
    for nodes in node_range:
        for par in _candidates(request, nodes):
            memory = memory_breakdown(request, par.tp, par.pp, par.cp, par.dp, par.recompute)
            if memory.fits:
                return _finish(request, par, memory, ())
            if tightest is None or memory.total < tightest[1].total:
                tightest = (par, memory)
    if tightest is None:
        raise _no_layout(request)
    par, memory = tightest
    nearest = _nearest_working(request) if find_nearest else ""
    return _finish(request, par, memory, (_does_not_fit(request, par, memory),), nearest)


def _nearest_working(request: TrainingRequest) -> str:
    """The closest setting that does fit: first keep the instance type and free what the user fixed, then
    try the other GPU types."""
    free = replace(request, nodes=None, tp=None, pp=None)
    for candidate in (free, *(replace(free, instance=catalog.get(name)) for name in catalog.GPU_INSTANCE_TYPES
                               if name != request.instance.name)):
        if candidate.precision == "fp8" and not candidate.instance.fp8:
            continue
        try:
            result = plan(candidate, find_nearest=False)
        except SizingError:
            continue
        if result.memory.fits:
            p = result.parallelism
            return (f"{p.nodes} x {candidate.instance.name} with {p.describe()}"
                    f"{', full recompute' if p.recompute == 'full' else ''}")
    return "none up to " + str(MAX_NODES) + " nodes of any GPU type"


# ---------------------------------------------------------------------------------------------------------
# The common sizing table, checked

# A widely copied rule of thumb: the GPUs each variant needs. Rows: variant, GPUs, instance type as usually
# written, the GPU it assumes. The planner reproduces it where it holds and says so where it does not.
SEED_TABLE: tuple[tuple[str, int, str, int], ...] = (
    ("7b", 1, "p4d.24xlarge", 80),
    ("13b", 2, "p4d.24xlarge", 80),
    ("70b", 8, "p4d.24xlarge", 80),
    ("405b", 32, "p5.48xlarge", 80),
)


@dataclass(frozen=True)
class SeedCheck:
    variant: str
    method: str
    gpus: int
    instance_type: str  # the instance type whose GPUs match the row's GPU memory
    holds: bool
    planner_min_gpus: int  # smallest group (TP x PP, no data parallelism) that fits on that instance type
    detail: str


def check_seed_table(seq_length: int = 4096) -> list[SeedCheck]:
    checks = []
    for variant, gpus, written_type, gpu_gib in SEED_TABLE:
        # p4d.24xlarge has 40 GiB A100s; the 80 GiB A100 is p4de.24xlarge.
        instance = catalog.get(written_type)
        if instance.gpu_memory_gib != gpu_gib:
            instance = next(catalog.get(n) for n in catalog.GPU_INSTANCE_TYPES
                            if catalog.get(n).gpu_model == instance.gpu_model and catalog.get(n).gpu_memory_gib == gpu_gib)
        model = model_for(variant)
        for method in METHODS:
            # The table counts a group of GPUs that holds the model on its own (no data parallelism to shard
            # the optimizer over): the planner's smallest such group, up to 64 nodes.
            min_gpus = next((g for g in (2**k for k in range(10)) if g <= MAX_NODES * instance.gpus
                             and _fits_on_gpus(model, method, instance, g, seq_length)), 0)
            fixed = _fits_on_gpus(model, method, instance, gpus, seq_length)
            if fixed is not None:
                p = fixed.parallelism
                detail = (f"fits {gpus} x {instance.gpu_model} {instance.gpu_memory_gib} GiB with TP{p.tp} PP{p.pp}: "
                          f"{fixed.memory.total / GIB:.1f} of {fixed.memory.usable / GIB:.1f} GiB per GPU")
            else:
                worst = _tightest_on_gpus(model, method, instance, gpus, seq_length)
                detail = ("does not fit: " + worst) if worst else "no valid layout"
            checks.append(SeedCheck(variant, method, gpus, instance.name, fixed is not None, min_gpus, detail))
    return checks


def _layouts_on(model: ModelSpec, instance: InstanceType, gpus: int) -> list[tuple[int, int]]:
    return [(t, gpus // t) for t in (8, 4, 2, 1) if gpus % t == 0 and t <= instance.gpus
            and model.heads % t == 0 and model.kv_heads % t == 0 and pipeline_split_valid(model, gpus // t)]


def _fits_on_gpus(model, method, instance, gpus, seq_length) -> SizingPlan | None:
    """A model-parallel group of exactly ``gpus`` GPUs (DP 1), as the table means it."""
    request = TrainingRequest(model, method, instance, seq_length=seq_length, global_batch_size=max(gpus, 8))
    for tp, pp in _layouts_on(model, instance, gpus):
        for recompute in ("none", "full"):
            memory = memory_breakdown(request, tp, pp, 1, 1, recompute)
            if memory.fits:
                nodes = max(1, math.ceil(gpus / instance.gpus))
                return _finish(request, Parallelism(tp, pp, 1, 1, nodes, instance.gpus, recompute), memory, ())
    return None


def _tightest_on_gpus(model, method, instance, gpus, seq_length) -> str:
    request = TrainingRequest(model, method, instance, seq_length=seq_length, global_batch_size=max(gpus, 8))
    best = None
    for tp, pp in _layouts_on(model, instance, gpus):
        memory = memory_breakdown(request, tp, pp, 1, 1, "full")
        if best is None or memory.total < best[2].total:
            best = (tp, pp, memory)
    if best is None:
        return ""
    tp, pp, memory = best
    par = Parallelism(tp, pp, 1, 1, max(1, math.ceil(gpus / instance.gpus)), instance.gpus, "full")
    return _does_not_fit(request, par, memory)


# ---------------------------------------------------------------------------------------------------------
# Printing


def format_plan(p: SizingPlan) -> str:
    r, par, m, s, sv = p.request, p.parallelism, p.memory.gib(), p.storage, p.serving
    lines = [
        f"{p.model.display} ({p.model.params / 1e9:.1f}B params, {p.model.hf_id}) {r.method.upper()} in {r.precision} "
        f"on {r.instance.name} ({r.instance.gpus} x {r.instance.gpu_model} {r.instance.gpu_memory_gib} GiB)",
        f"  fits:          {'yes' if p.fits else 'NO'}",
        *(f"  why not:       {reason}" for reason in p.reasons),
        *([f"  nearest fit:   {p.nearest}"] if p.nearest else []),
        f"  layout:        {par.nodes} node(s), {par.gpus} GPUs, {par.describe()}, sequence parallel "
        f"{'on' if par.sequence_parallel else 'off'}, recompute {par.recompute}",
        f"  batch:         seq {r.seq_length}, micro {r.micro_batch_size}, global {r.global_batch_size}"
        + (f", LoRA rank {r.lora_rank}" if r.method == "lora" else ""),
        f"  memory/GPU:    {m['total']} GiB of {m['usable']} usable ({m['gpu_memory']} GiB, {int(MEMORY_HEADROOM * 100)}% headroom): "
        f"weights {m['weights']}, gradients {m['gradients']}, optimizer {m['optimizer']}, LoRA {m['lora_adapters']}, "
        f"activations {m['activations']}, logits {m['logits']}",
        f"  throughput:    {p.tokens_per_sec_per_gpu:,.0f} tokens/s/GPU ({p.flops_per_token / 1e9:.1f} GFLOP/token, "
        f"{p.efficiency:.0%} of {r.precision} peak); ${p.cost_per_billion_tokens:,.0f} per billion tokens on demand",
    ]
    if p.hours is not None:
        lines.append(f"  training:      {p.training_tokens:,} tokens in {p.hours:.1f} h, ${p.cost_usd:,.0f} on demand "
                     f"({catalog.PRICE_REGION}, {catalog.PRICE_DATE})")
    lines += [
        f"  checkpoint:    {s.checkpoint_bytes / GIB:.1f} GiB each, {s.checkpoints_kept} kept",
        f"  FSx:           {s.fsx_capacity_gib} GiB at {s.fsx_throughput_per_tib} MB/s/TiB ({s.fsx_throughput_mb_s} MB/s) "
        f"for {s.needed_bytes / GIB:.0f} GiB needed",
        f"  serving:       TP{sv.tp} x PP{sv.pp} = world size {sv.world_size} on {sv.instance_type}, {sv.precision} weights "
        f"{sv.weight_bytes_per_gpu / GIB:.1f} GiB/GPU, KV {sv.kv_bytes_per_token // 1024} KiB/token, {sv.kv_cache_tokens:,} "
        f"KV tokens, max batch {sv.max_batch_size}, max tokens {sv.max_num_tokens}, max seq {sv.max_seq_length}"
        + ("" if sv.fits else f" (does not fit: {sv.reason})"),
        f"  evaluation:    {p.evaluation.gpus} GPU(s), 16-bit weights {p.evaluation.weight_bytes_per_gpu / GIB:.1f} GiB/GPU"
        + (", CPU offload (the weights exceed one node)" if p.evaluation.cpu_offload else ""),
    ]
    return "\n".join(lines)


def matrix(seq_length: int = 4096) -> str:
    """Every variant x method x GPU instance type, as a Markdown table."""
    header = ("| variant | model | method | instance | fits | nodes | layout | recompute | GiB/GPU (usable) "
              "| tokens/s/GPU | $/1B tokens | serving TP | KV tokens |")
    lines = [header, "| " + " | ".join(["---"] * 13) + " |"]
    for variant in VARIANTS:
        model = model_for(variant)
        for method in METHODS:
            for name in catalog.GPU_INSTANCE_TYPES:
                instance = catalog.get(name)
                precision = "fp8" if instance.fp8 else "bf16"
                p = plan(TrainingRequest(model, method, instance, precision=precision, seq_length=seq_length))
                m = p.memory.gib()
                lines.append(
                    f"| {variant} | {model.display} | {method} | {name} ({precision}) | {'yes' if p.fits else 'no'} "
                    f"| {p.parallelism.nodes if p.memory.fits else '-'} | {p.parallelism.describe()} | "
                    f"{p.parallelism.recompute} | {m['total']} ({m['usable']}) | {p.tokens_per_sec_per_gpu:,.0f} | "
                    f"{p.cost_per_billion_tokens:,.0f} | {p.serving.tp} | {p.serving.kv_cache_tokens:,} |")
    return "\n".join(lines)


def seed_table_markdown() -> str:
    lines = ["| variant | GPUs in the table | on | method | holds | planner's minimum | detail |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in check_seed_table():
        lines.append(f"| {c.variant} | {c.gpus} | {c.instance_type} | {c.method} | {'yes' if c.holds else 'no'} "
                     f"| {c.planner_min_gpus or '-'} | {c.detail} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.sizing", description="Plan a fine-tuning run and its serving shape.")
    parser.add_argument("--model", default="7b", help="variant (7b, 13b, 70b, 405b) or preset (" + ", ".join(MODELS) + ")")
    parser.add_argument("--method", default="lora", choices=METHODS)
    parser.add_argument("--instance", default="p4d.24xlarge", choices=catalog.GPU_INSTANCE_TYPES)
    parser.add_argument("--precision", default="bf16", choices=PRECISIONS)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--global-batch", type=int, default=128)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--dataset-tokens", type=int)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--tp", type=int)
    parser.add_argument("--pp", type=int)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--matrix", action="store_true", help="print every variant x method x GPU type as Markdown")
    parser.add_argument("--seed-table", action="store_true", help="check the common sizing table, as Markdown")
    args = parser.parse_args(argv)
    if args.matrix:
        print(matrix(args.seq_length))
        return 0
    if args.seed_table:
        print(seed_table_markdown())
        return 0
    if args.model in VARIANTS:
        model = model_for(args.model)
    elif args.model in MODELS:
        model = MODELS[args.model]
    else:
        parser.error(f"--model {args.model!r}: allowed {', '.join([*VARIANTS, *MODELS])}")
    # The stack config's limits, from the same code: the CLI plans nothing the config would refuse.
    from infra import config

    flags = {"seqLength": "--seq-length", "microBatchSize": "--micro-batch", "globalBatchSize": "--global-batch",
             "loraRank": "--lora-rank", "datasetTokens": "--dataset-tokens", "epochs": "--epochs", "nodes": "--nodes",
             "tp": "--tp", "pp": "--pp"}
    numbers = (args.seq_length, args.micro_batch, args.global_batch, args.lora_rank, args.dataset_tokens,
               args.epochs, args.nodes, args.tp, args.pp)
    try:
        config.check_training_numbers(model, dict(zip(config.TRAINING_NUMBERS, numbers)), flags.__getitem__)
    except config.ConfigError as error:
        key = next(name for name, flag in flags.items() if flag == error.key)
        print(f"error: {error.render(f'{error.key} (training.{key} in a stack file)')}", file=sys.stderr)
        return 2
    request = TrainingRequest(model, args.method, catalog.get(args.instance), args.precision, args.seq_length,
                              args.micro_batch, args.global_batch, args.lora_rank, args.dataset_tokens, args.epochs,
                              args.nodes, args.tp, args.pp)
    try:
        result = plan(request)
    except SizingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_plan(result))
    return 0 if result.fits else 1


if __name__ == "__main__":
    sys.exit(main())
