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
from functools import lru_cache
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

# Memory-relevant settings the training pods run with (finetune.py applies them from run.json), taken from NVIDIA's
# tuned Llama 3 fine-tuning recipes (Megatron-Bridge src/megatron/bridge/perf_recipes/llama/h100/llama3.py at
# 067f987d: every SFT and LoRA recipe sets ddp.grad_reduce_in_fp32 = False and
# model.disable_parameter_transpose_cache = True). The memory model below assumes them; without them the tuned
# layouts do not fit 80 GB.
GRAD_REDUCE_IN_FP32 = False
DISABLE_PARAMETER_TRANSPOSE_CACHE = True

# Bytes per parameter of mixed-precision training with Adam in Megatron-Core: 16-bit weights (2), the gradient
# buffer (4 in fp32, 2 in bf16: Megatron-Core megatron/core/distributed/distributed_data_parallel.py groups buffers
# by grad dtype from ddp_config.grad_reduce_in_fp32), and fp32 master weights + Adam moments (12), the last sharded
# over the data-parallel (x context-parallel) ranks by the distributed optimizer: Megatron-Core's own accounting,
# megatron/training/theoretical_memory_usage.py (Megatron-LM d98e8a64), ``6 + 12 / data_parallel_size`` with
# fp32 gradients.
WEIGHT_BYTES = 2
GRAD_BYTES = 4 if GRAD_REDUCE_IN_FP32 else 2
OPTIMIZER_BYTES = 12
# FP8 SFT runs with fp8_param_gather (finetune.py): Megatron keeps the compute weights in FP8 itself ("Keep the
# compute param in fp8 (do not use any other intermediate dtype)", megatron/training/arguments.py --fp8-param-gather),
# the fp32 master copy living in the optimizer state. With the transpose cache disabled no second FP8 copy persists.
FP8_PARAM_BYTES = 1 if DISABLE_PARAMETER_TRANSPOSE_CACHE else 2
# FP8 LoRA keeps its frozen base in 16 bits. Transformer Engine casts each weight to FP8 per GEMM; only with the
# parameter transpose cache on does Megatron pass is_first_microbatch to TE, which then keeps the FP8 weight and
# its transpose between micro-batches (megatron/core/extensions/transformer_engine.py: ``None if
# self.disable_parameter_transpose_cache else self.is_first_microbatch``).
FP8_WEIGHT_CACHE_BYTES = 0 if DISABLE_PARAMETER_TRANSPOSE_CACHE else 2
# LoRA adapters train with the plain (unsharded) optimizer in NeMo's recipes (use_distributed_optimizer=False).
# The frozen base gets no gradient buffer: Megatron's DDP skips parameters without requires_grad
# (distributed_data_parallel.py, ``if not param.requires_grad: continue``).
ADAPTER_BYTES = WEIGHT_BYTES + GRAD_BYTES + OPTIMIZER_BYTES
# A NeMo distributed checkpoint stores 16-bit weights and the fp32 optimizer state (no gradients).
CHECKPOINT_BYTES_PER_PARAM = WEIGHT_BYTES + OPTIMIZER_BYTES


@dataclass(frozen=True)
class MemorySettings:
    """Bytes per parameter a training run keeps, by what its optimizer and precision settings hold. The pods run
    ``POD_MEMORY`` (the constants above); a published run is judged under the settings it was run with."""

    grad_bytes: int  # the gradient buffer (SFT)
    optimizer_bytes: int  # master weights + Adam moments, sharded over the data-parallel x context-parallel ranks
    fp8_sft_weight_bytes: int  # FP8 SFT compute weights (and their cached transpose, if kept)
    fp8_frozen_weight_bytes: int  # FP8 LoRA's frozen base (and its cached FP8 copies, if kept)


POD_MEMORY = MemorySettings(GRAD_BYTES, OPTIMIZER_BYTES, FP8_PARAM_BYTES, WEIGHT_BYTES + FP8_WEIGHT_CACHE_BYTES)

# NeMo 24.07 (NeMo 1) fine-tuning on H100, as NeMo-Framework-Launcher's H100 examples for the published runs set it
# (launcher_scripts/conf/peft/llama/sft.yaml @ 1a7171d7, the July 2024 config; examples/peft/llama/h100/*.sh):
# - SFT: optim.name distributed_fused_adam with ``dtype: bf16``, NeMo's MegatronDistributedFusedAdam over Apex's
#   DistributedFusedAdam, whose ``dtype`` is the "datatype for optimizer state": with fp8_params NeMo sets
#   store_params=True (nemo/collections/nlp/models/language_modeling/megatron_base_model.py setup_optimization,
#   NeMo v2.0.0), and Apex then keeps params_shard, exp_avg_shard and exp_avg_sq_shard in that dtype
#   (apex/contrib/optimizers/distributed_fused_adam.py StateBucket, @ 6424da3b): 3 x 2 bytes, sharded over the
#   data-parallel ranks. Its contiguous gradient buffer is in grad_sync_dtype, bf16: 2 bytes;
# - ``fp8_params=true`` keeps every weight (the frozen base of LoRA too) in FP8, and the launcher config leaves
#   Megatron-Core's parameter transpose cache on (disable_parameter_transpose_cache defaults to False; see
#   FP8_WEIGHT_CACHE_BYTES), so Transformer Engine also keeps each FP8 weight's transpose: 1 + 1 bytes.
NEMO_2407_MEMORY = MemorySettings(grad_bytes=2, optimizer_bytes=3 * 2, fp8_sft_weight_bytes=2,
                                  fp8_frozen_weight_bytes=2)


# ---------------------------------------------------------------------------------------------------------
# NVIDIA's published fine-tuning runs: the tuned layouts the planner picks, and the measurements its throughput
# model is fitted to. The one table of them.

_BRIDGE_COMMIT = "067f987df03b8355b03192d88d70f1709fedf51a"
_BRIDGE_RECIPES = f"NVIDIA-NeMo/Megatron-Bridge src/megatron/bridge/perf_recipes/llama/h100/llama3.py @ {_BRIDGE_COMMIT[:8]}"
_BRIDGE_2606 = (f"NVIDIA-NeMo/Megatron-Bridge docs/performance-summary-archive.md, 26.06 NeMo Container "
                f"@ {_BRIDGE_COMMIT[:8]}")
_NEMO_2407 = ("NVIDIA/NeMo docs/source/performance/performance_summary.md @ 8e3d65dc (NeMo 24.07, DGX-H100, "
              "SQuAD packed to 4096)")
# The summary gives TP and PP only. NeMo-Framework-Launcher's H100 examples of the same runs (same model, GPUs,
# TP, PP, micro-batch 1, global batch 32, FP8, SQuAD packed to 4096) give the rest: virtual pipeline 10 for 13B
# SFT and 20 for 70B SFT, none for 70B LoRA, no activation recompute, the optimizer of NEMO_2407_MEMORY.
_LAUNCHER_2407 = ("NVIDIA/NeMo-Framework-Launcher examples/peft/llama/h100/{}.sh, "
                  "launcher_scripts/conf/peft/llama/sft.yaml @ 1a7171d7")
_DGXC_2412 = ("NVIDIA/dgxc-benchmarking llama3/finetuning/README_8b.md, README_70b.md @ 8f5cbb37 "
              "(nvcr.io/nvidia/nemo:24.12, DGX-H100)")


@dataclass(frozen=True)
class PublishedRun:
    """One published fine-tuning configuration on DGX-H100 (8 GPUs per node, 8 x 400 Gb/s InfiniBand: the same
    GPUs and per-node network bandwidth as p5.48xlarge's 3,200 Gb/s of EFA)."""

    model: str  # MODELS key with the same architecture (Llama 3 and 3.1 share it)
    method: str
    precision: str
    gpu_model: str
    gpus: int
    tp: int
    pp: int
    cp: int
    vp: int | None  # None: no interleaving
    recompute: str
    micro_batch_size: int
    global_batch_size: int
    seq_length: int
    tokens_per_sec_per_gpu: float | None  # None: a tuned recipe without a published measurement
    source: str
    tuned: bool = False  # a tuned layout the planner must pick for this model, method, precision, GPU and count
    memory_settings: MemorySettings = POD_MEMORY  # what it kept per parameter (optimizer, precision settings)
    note: str = ""

    @property
    def vp_size(self) -> int:
        return self.vp or 1


def _run(model, method, precision, gpus, tp, pp, vp, tokens, source, *, gbs=32, recompute="none", tuned=False,
         memory_settings=POD_MEMORY, note=""):
    return PublishedRun(model, method, precision, "H100", gpus, tp, pp, 1, vp, recompute, 1, gbs, 4096, tokens,
                        source, tuned, memory_settings, note)


PUBLISHED: tuple[PublishedRun, ...] = (
    # The tuned layouts: Megatron-Bridge's H100 performance recipes for Llama 3 fine-tuning (seq 4096, MBS 1,
    # GBS 32), with the tokens/s/GPU of the 26.06 performance summary where it publishes one.
    _run("llama31-8b", "sft", "bf16", 8, 1, 1, None, None, _BRIDGE_RECIPES, tuned=True),
    _run("llama31-8b", "sft", "fp8", 8, 1, 1, None, None, _BRIDGE_RECIPES, tuned=True),
    _run("llama31-70b", "sft", "bf16", 32, 4, 4, 5, None, _BRIDGE_RECIPES, tuned=True),
    _run("llama31-70b", "sft", "fp8", 32, 4, 4, 5, 1638, f"{_BRIDGE_RECIPES}; {_BRIDGE_2606}", tuned=True),
    # recompute_granularity full, method block, 1 layer per virtual stage: with 80 layers / (PP4 x VP20) = 1 layer
    # per stage that recomputes every layer, the same as the uniform one-layer recompute finetune.py sets.
    _run("llama31-70b", "lora", "bf16", 8, 1, 4, 20, None, _BRIDGE_RECIPES, recompute="full", tuned=True,
         note="LoRA on linear_qkv only in the recipe; the product adapts all four projections"),
    _run("llama31-70b", "lora", "fp8", 8, 2, 4, 20, 2643, f"{_BRIDGE_RECIPES}; {_BRIDGE_2606}", tuned=True,
         note="LoRA on linear_qkv only in the recipe; the product adapts all four projections"),
    # Earlier measurements: the throughput model's other data points.
    _run("llama2-7b", "sft", "fp8", 8, 1, 1, None, 16891, f"{_NEMO_2407}; {_LAUNCHER_2407.format('7b_1node')}",
         memory_settings=NEMO_2407_MEMORY),
    _run("llama2-13b", "sft", "fp8", 8, 1, 4, 10, 10176, f"{_NEMO_2407}; {_LAUNCHER_2407.format('13b_1node')}",
         memory_settings=NEMO_2407_MEMORY),
    # DP 1: the optimizer state is not sharded. Under the pods' Megatron-Core settings (12 bytes of fp32 state per
    # parameter) this layout would not fit without recompute; with NeMo 24.07's bf16 optimizer state it does.
    _run("llama2-70b", "sft", "fp8", 16, 4, 4, 20, 1816, f"{_NEMO_2407}; {_LAUNCHER_2407.format('70b_2node')}",
         memory_settings=NEMO_2407_MEMORY),
    _run("llama2-7b", "lora", "fp8", 8, 1, 1, None, 24824, f"{_NEMO_2407}; {_LAUNCHER_2407.format('7b_1node_lora')}",
         memory_settings=NEMO_2407_MEMORY),
    _run("llama2-13b", "lora", "fp8", 8, 1, 1, None, 14629, f"{_NEMO_2407}; {_LAUNCHER_2407.format('13b_1node_lora')}",
         memory_settings=NEMO_2407_MEMORY),
    _run("llama2-70b", "lora", "fp8", 8, 2, 4, None, 2621, f"{_NEMO_2407}; {_LAUNCHER_2407.format('70b_1node_lora')}",
         memory_settings=NEMO_2407_MEMORY),
    # dgxc-benchmarking prints "PP=41" for the 8B runs, a typo for PP=1 (8 GPUs, DP 8, GBS 32 = 4 micro-batches each).
    *(_run("llama31-8b", method, precision, gpus, 1, 1, None, tokens / gpus, _DGXC_2412, gbs=4 * gpus)
      for method, precision, by_gpus in (
          ("sft", "bf16", ((8, 99296), (16, 198593), (32, 397184))),
          ("sft", "fp8", ((8, 137970), (16, 273066), (32, 546133))),
          ("lora", "bf16", ((8, 142469), (16, 284939), (32, 569878))),
          ("lora", "fp8", ((8, 192752), (16, 385505), (32, 771011))))
      for gpus, tokens in by_gpus),
    _run("llama31-70b", "sft", "bf16", 32, 4, 4, 5, 39009 / 32, _DGXC_2412),
    _run("llama31-70b", "sft", "fp8", 32, 4, 4, 5, 57996 / 32, _DGXC_2412),
    *(_run("llama31-70b", "lora", precision, gpus, 2, 4, 20, tokens / gpus, _DGXC_2412, gbs=4 * gpus)
      for precision, by_gpus in (("bf16", ((8, 14375), (16, 27887), (32, 53663))),
                                 ("fp8", ((8, 20164), (16, 39125), (32, 68985))))
      for gpus, tokens in by_gpus),
)
TUNED: tuple[PublishedRun, ...] = tuple(r for r in PUBLISHED if r.tuned)
MEASURED: tuple[PublishedRun, ...] = tuple(r for r in PUBLISHED if r.tokens_per_sec_per_gpu is not None)


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


# The stack config's default (training.loraRank) and the planner's. Published LoRA runs are modelled at this rank
# too: at rank 16 the adapters are at most 0.5% of the parameters of any model in MODELS (Llama-2-7B's share is the
# largest), so the rank hardly moves a LoRA step's estimate.
DEFAULT_LORA_RANK = 16


@dataclass(frozen=True)
class TrainingRequest:
    model: ModelSpec
    method: str
    instance: InstanceType
    precision: str = "bf16"
    seq_length: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int = 128
    lora_rank: int = DEFAULT_LORA_RANK
    dataset_tokens: int | None = None
    epochs: float = 1.0
    nodes: int | None = None
    tp: int | None = None
    pp: int | None = None
    vp: int | None = None
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
    vp: int = 1  # virtual pipeline stages per pipeline rank (interleaved 1F1B); 1 = not interleaved

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
        parts = [f"TP{self.tp}", f"PP{self.pp}"] + ([f"VP{self.vp}"] if self.vp > 1 else []) + \
            ([f"CP{self.cp}"] if self.cp > 1 else []) + [f"DP{self.dp}"]
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
    tuned: PublishedRun | None = None  # NVIDIA's tuned layout this plan uses, if one matches the request
    step_seconds: float = 0.0  # estimated time of one global batch

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
            "tuned": None if self.tuned is None else {
                "source": self.tuned.source, "measured_tokens_per_sec_per_gpu": self.tuned.tokens_per_sec_per_gpu,
                "global_batch_size": self.tuned.global_batch_size},
            "throughput": {"flops_per_token": self.flops_per_token, "efficiency": self.efficiency,
                           "step_seconds": round(self.step_seconds, 4), "estimate": True,
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


def layers_per_pipeline_rank(model: ModelSpec, pp: int) -> int:
    """What Megatron-Core divides by the virtual pipeline size: the layers of one pipeline rank, counting the
    embedding and the loss as a layer each when the layers alone do not split (account_for_*_in_pipeline_split)."""
    return model.layers // pp if model.layers % pp == 0 else (model.layers + 2) // pp


def virtual_pipeline_problem(model: ModelSpec, pp: int, vp: int, micro_batches: int) -> str:
    """Why Megatron-Core would reject this interleaved layout ("" when it accepts it). Its rules:
    - VP needs more than one pipeline stage (a single stage has nothing to interleave);
    - each pipeline rank's layers must divide into VP chunks (megatron/core/transformer/transformer_config.py,
      "number of layers on each pipeline rank ... must be divisible by virtual_pipeline_model_parallel_size");
    - the interleaved schedule runs micro-batches in groups of microbatch_group_size_per_vp_stage, which defaults
      to PP (megatron/core/model_parallel_config.py), and requires PP <= micro-batches with a remainder of 0 or
      at least PP (megatron/core/pipeline_parallel/schedules.py): with groups of PP, a multiple of PP."""
    if vp <= 1:
        return ""
    if pp <= 1:
        return f"virtual pipeline size {vp} needs pipeline parallelism (PP > 1); PP is {pp}"
    per_rank = layers_per_pipeline_rank(model, pp)
    if per_rank % vp:
        allowed = [v for v in range(2, per_rank + 1) if per_rank % v == 0]
        return (f"virtual pipeline size {vp} must divide the {per_rank} layers of each of the {pp} pipeline stages "
                f"({model.display}); allowed: {', '.join(map(str, allowed)) or 'none'}")
    if micro_batches < pp or micro_batches % pp:
        return (f"virtual pipeline size {vp} needs the micro-batches per step ({micro_batches}: global batch / "
                f"(micro-batch x data parallel)) to be a multiple of PP {pp}")
    return ""


def activation_bytes_per_token_per_layer(model: ModelSpec) -> float:
    """16-bit activations one transformer layer keeps for its backward pass, per token: Megatron-Core's own
    accounting, h x (18 + 4 F / h) bytes (megatron/training/theoretical_memory_usage.py,
    compute_activation_memory, after Korthikanti et al. 2022, arXiv:2205.05198, Table 2, with flash attention
    keeping no s x s scores). Tensor and sequence parallelism split it t ways."""
    return model.hidden * (18 + 4 * model.ffn / model.hidden)


def memory_breakdown(request: TrainingRequest, tp: int, pp: int, cp: int, dp: int, recompute: str,
                     vp: int = 1, settings: MemorySettings = POD_MEMORY) -> MemoryBreakdown:
    """The most loaded GPU's bytes under ``settings`` (the pods' unless a published run's own are given)."""
    model, instance = request.model, request.instance
    layers_here = stage_layers(model, pp)
    # The first stage holds the input embedding, the last the output layer; with one stage, both.
    embedding_here = model.embedding_params * (2 if pp == 1 else 1)
    params_here = (layers_here * model.params_per_layer + embedding_here) // tp

    if request.method == "sft":
        weights = params_here * (settings.fp8_sft_weight_bytes if request.precision == "fp8" else WEIGHT_BYTES)
        gradients = params_here * settings.grad_bytes
        optimizer = params_here * settings.optimizer_bytes // (dp * cp)  # distributed optimizer
        adapters = 0
    else:
        # frozen base: weights only, no gradient buffer
        weights = params_here * (settings.fp8_frozen_weight_bytes if request.precision == "fp8" else WEIGHT_BYTES)
        gradients = optimizer = 0
        adapters = layers_here * model.lora_params_per_layer(request.lora_rank) // tp * ADAPTER_BYTES

    tokens = request.seq_length * request.micro_batch_size // cp  # tokens per micro-batch on this GPU
    per_layer = int(activation_bytes_per_token_per_layer(model) * tokens) // tp
    layer_input = 2 * model.hidden * tokens // tp  # what full recompute keeps of each layer
    # Megatron-Core's accounting for the first stage (compute_activation_memory): with 1F1B it holds PP
    # micro-batches of its layers/PP layers in flight, all layers' worth; fewer when a step has fewer
    # micro-batches than stages; interleaving (VP) adds a factor 1 + (PP - 1) / (PP x VP).
    micro_batches = request.global_batch_size // (request.micro_batch_size * dp)
    if vp > 1:
        in_flight = pp * (1 + (pp - 1) / (pp * vp))
    else:
        in_flight = min(pp, max(1, micro_batches))
    kept_per_layer = layer_input if recompute == "full" else per_layer
    # With full recompute one layer's activations are rebuilt at a time in the backward pass.
    activations = int(kept_per_layer * layers_here * in_flight) + (per_layer if recompute == "full" else 0)
    # Inputs of the output layer and the fp32 cross-entropy: s x b x h x 4 x (1 + V / h) (the same accounting),
    # on the last stage.
    logits = int(tokens * model.hidden * 4 * (1 + model.vocab / model.hidden)) // tp
    if pp > 1:
        # Worst stage: the first (most micro-batches in flight) or the last (logits, one micro-batch in flight).
        last_stage = kept_per_layer * layers_here + (per_layer if recompute == "full" else 0) + logits
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


def recompute_overhead(recompute: str, method: str) -> float:
    """Full recomputation runs every layer's forward a second time. A full step is three forward-sized passes
    (forward, input gradients, weight gradients); a LoRA step skips the frozen weight gradients, so two."""
    passes = 3 if method == "sft" else 2
    return (passes + 1) / passes if recompute == "full" else 1.0


@dataclass(frozen=True)
class ThroughputFit:
    """The throughput model's two kinds of fitted figures: the share of the dense Tensor Core peak the GEMMs
    reach, per (precision, method), and the share of tensor- and pipeline-parallel communication that the
    overlap (tp_comm_overlap, overlapped P2P) leaves exposed. Everything else is computed from the layout."""

    efficiency: Mapping[tuple[str, str], float]
    comm_exposed: float


# A published DGX-H100 run is modelled on p5.48xlarge: the same 8 H100 SXM per node and the same 3,200 Gb/s
# per node between nodes (DGX-H100: 8 x 400 Gb/s ConnectX-7; p5: 3,200 Gb/s of EFA).
_PUBLISHED_INSTANCE = "p5.48xlarge"
_COMM_EXPOSED_GRID = tuple(i / 20 for i in range(21))


def _link_bytes_per_second(instance: InstanceType, ranks_apart: int, group_size: int) -> float:
    """Bandwidth one GPU gets to the next rank of a group whose ranks are ``ranks_apart`` apart (Megatron orders
    ranks TP, CP, DP, PP, TP fastest): NVLink (one direction) inside a node; between nodes, the instance's network
    bandwidth shared by the node's GPUs, each group using the share of the NICs its members on the node own."""
    nvlink = catalog.GPU_NVLINK_GB_S[instance.gpu_model] / 2 * 1e9
    if ranks_apart * group_size <= instance.gpus:
        return nvlink
    members_per_node = max(1, instance.gpus // ranks_apart)
    return min(nvlink, instance.network_gbps / 8 * 1e9 * members_per_node / instance.gpus)


def step_seconds(model: ModelSpec, method: str, precision: str, instance: InstanceType, par: Parallelism,
                 seq_length: int, micro_batch_size: int, global_batch_size: int, fit: ThroughputFit | None = None,
                 lora_rank: int = DEFAULT_LORA_RANK, overlap_data_parallel: bool = False) -> float:
    """Estimated seconds per global batch of this layout. Per micro-batch and GPU: the model FLOPs of its share
    (1 / TP x PP x CP) at the fitted GEMM efficiency, times the recompute cost; plus the exposed share of the
    tensor-parallel collectives on NVLink and of the pipeline sends. A 1F1B step is (m + (PP - 1) / VP)
    micro-batch times (the interleaved schedule's bubble, Narayanan et al. 2021, arXiv:2104.04473, section 2.2).
    Then the data-parallel gradient reduce-scatter and parameter all-gather (or LoRA's all-reduce), over NVLink
    or the instance's network. NVIDIA's published runs overlap them with the last backward and the first forward
    (Megatron-Bridge src/megatron/bridge/recipes/common.py: overlap_grad_reduce=True, overlap_param_gather=True);
    the pods run NeMo 2.7.3's MegatronStrategy default DistributedDataParallelConfig(check_for_nan_in_grad=True),
    where megatron-core 0.16 leaves both off, so for them the whole exchange counts."""
    fit = fit or FIT
    terms = _step_terms(model, method, precision, instance, par, seq_length, micro_batch_size, global_batch_size,
                        lora_rank)
    return _step_seconds(terms, fit.efficiency[(precision, method)], fit.comm_exposed, overlap_data_parallel)


@dataclass(frozen=True)
class _StepTerms:
    """What ``step_seconds`` computes from the layout alone, before the fitted figures come in: the fit evaluates
    the same published layouts some 18,000 times, and this part is the same each time."""

    work: float  # FLOPs per micro-batch on one GPU; divided by peak x efficiency, the compute seconds
    peak: float  # FLOP/s
    recompute: float
    slots: float  # micro-batch times per step: (m + (PP - 1) / VP)
    comm: float  # TP and PP communication seconds per micro-batch, before the exposed share
    reduce: float  # data-parallel gradient exchange seconds (0 with one data-parallel rank)
    gather: float  # data-parallel parameter all-gather seconds
    data_parallel: bool  # more than one rank to exchange with


def _step_terms(model: ModelSpec, method: str, precision: str, instance: InstanceType, par: Parallelism,
                seq_length: int, micro_batch_size: int, global_batch_size: int, lora_rank: int) -> _StepTerms:
    peak = catalog.GPU_PEAK_TFLOPS[instance.gpu_model][precision] * 1e12
    tokens = seq_length * micro_batch_size
    micro_batches = global_batch_size // (micro_batch_size * par.dp)
    work = flops_per_token(model, seq_length, method) * tokens / (par.tp * par.pp * par.cp)
    layers = stage_layers(model, par.pp)
    activation = tokens // par.cp * model.hidden * 2  # one 16-bit [s, b, h] tensor of this GPU's sequence share
    comm = 0.0
    if par.tp > 1:
        # Sequence parallelism: per layer an all-gather before QKV and fc1 and a reduce-scatter after the output
        # projection and fc2, in the forward and again in the backward; full recompute repeats the forward's four.
        collectives = 8 + (4 if par.recompute == "full" else 0)
        comm += layers * collectives * (par.tp - 1) / par.tp * activation / _link_bytes_per_second(instance, 1, par.tp)
    if par.pp > 1:
        # Each micro-batch enters each of the rank's VP chunks forward and backward: 2 x VP sends of the
        # sequence-parallel shard, each way.
        comm += 4 * par.vp * activation / par.tp / _link_bytes_per_second(instance, par.tp * par.cp * par.dp, par.pp)

    reduce = gather = 0.0
    ranks = par.dp * par.cp  # the distributed optimizer shards over data x context parallel ranks
    if ranks > 1:
        bandwidth = _link_bytes_per_second(instance, par.tp, ranks)
        share = (ranks - 1) / ranks
        if method == "sft":
            params = (layers * model.params_per_layer + model.embedding_params * (2 if par.pp == 1 else 1)) / par.tp
            reduce = share * params * GRAD_BYTES / bandwidth
            gather = share * params * (FP8_PARAM_BYTES if precision == "fp8" else WEIGHT_BYTES) / bandwidth
        else:
            adapters = layers * model.lora_params_per_layer(lora_rank) / par.tp
            reduce, gather = 2 * share * adapters * GRAD_BYTES / bandwidth, 0.0  # all-reduce, no optimizer sharding
    return _StepTerms(work, peak, recompute_overhead(par.recompute, method), micro_batches + (par.pp - 1) / par.vp,
                      comm, reduce, gather, ranks > 1)


def _step_seconds(terms: _StepTerms, efficiency: float, comm_exposed: float, overlap_data_parallel: bool) -> float:
    compute = terms.work / (terms.peak * efficiency)
    compute *= terms.recompute
    pipeline = terms.slots * (compute + comm_exposed * terms.comm)
    exposed = 0.0
    if terms.data_parallel:
        if overlap_data_parallel:
            exposed = max(0.0, terms.reduce - compute * 2 / 3) + max(0.0, terms.gather - compute / 3)
        else:
            exposed = terms.reduce + terms.gather
    return pipeline + exposed


@lru_cache(maxsize=None)
def _published_terms(run: PublishedRun) -> _StepTerms:
    instance = catalog.get(_PUBLISHED_INSTANCE)
    dp = run.gpus // (run.tp * run.pp * run.cp)
    par = Parallelism(run.tp, run.pp, run.cp, dp, max(1, run.gpus // instance.gpus), instance.gpus, run.recompute,
                      run.vp_size)
    return _step_terms(MODELS[run.model], run.method, run.precision, instance, par, run.seq_length,
                       run.micro_batch_size, run.global_batch_size, lora_rank=DEFAULT_LORA_RANK)


def _published_tokens_per_second(run: PublishedRun, fit: ThroughputFit) -> float:
    return _published_rate(run, _published_terms(run), fit.efficiency[(run.precision, run.method)], fit.comm_exposed)


def _published_rate(run: PublishedRun, terms: _StepTerms, efficiency: float, comm_exposed: float) -> float:
    """``step_seconds`` of the published layout (``terms``), with NVIDIA's data-parallel overlap, as tokens/s/GPU."""
    seconds = _step_seconds(terms, efficiency, comm_exposed, overlap_data_parallel=True)
    return run.global_batch_size * run.seq_length / seconds / run.gpus


def fit_throughput(runs: Sequence[PublishedRun]) -> ThroughputFit:
    """Least squares in log space: for each exposed-communication share on a grid, each (precision, method)
    group's efficiency is set so that its mean log error is zero (bisection; the prediction grows with the
    efficiency); the share with the smallest sum of squared log errors wins."""
    groups: dict[tuple[str, str], list[PublishedRun]] = {}
    for run in runs:
        groups.setdefault((run.precision, run.method), []).append(run)
    missing = [f"{p} {m}" for p in PRECISIONS for m in METHODS if (p, m) not in groups]
    if missing:
        raise ValueError(f"no published measurement to fit for {', '.join(missing)}")
    layouts = {key: [(r, _published_terms(r)) for r in members] for key, members in groups.items()}
    best: tuple[float, ThroughputFit] | None = None
    for exposed in _COMM_EXPOSED_GRID:
        efficiency: dict[tuple[str, str], float] = {}
        squared = 0.0
        for key, members in sorted(layouts.items()):
            low, high = 0.05, 1.0
            for _ in range(30):
                middle = (low + high) / 2
                errors = [math.log(_published_rate(r, t, middle, exposed) / r.tokens_per_sec_per_gpu)
                          for r, t in members]
                low, high = (middle, high) if sum(errors) < 0 else (low, middle)
            efficiency[key] = (low + high) / 2
            squared += sum(math.log(_published_rate(r, t, efficiency[key], exposed) / r.tokens_per_sec_per_gpu) ** 2
                           for r, t in members)
        if best is None or squared < best[0] - 1e-12:
            best = (squared, ThroughputFit(MappingProxyType(efficiency), exposed))
    assert best is not None
    return best[1]


@dataclass(frozen=True)
class HeldOut:
    run: PublishedRun
    predicted: float  # tokens/s/GPU from a fit on every other measurement

    @property
    def error(self) -> float:
        return self.predicted / self.run.tokens_per_sec_per_gpu - 1


def leave_one_out(runs: Sequence[PublishedRun] = MEASURED) -> list[HeldOut]:
    """Fit on all measurements but one, predict the one left out; for each in turn."""
    return [HeldOut(run, _published_tokens_per_second(run, fit_throughput(runs[:i] + runs[i + 1:])))
            for i, run in enumerate(runs)]


# Fitted once on every published measurement. NVIDIA publishes no NeMo Llama fine-tuning numbers on A100 or
# H200: Ampere takes Hopper's BF16 figure (in line with NVIDIA's A100 BF16 GPT-3 pretraining at 48-54% of the
# 312 TFLOP/s peak, BigNLP-Scripts README, 7.1.2), and H200 runs H100's compute; both are estimates.
FIT = fit_throughput(MEASURED)


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
                        ("lora_rank", request.lora_rank), ("tp", request.tp), ("pp", request.pp), ("vp", request.vp), ("nodes", request.nodes)):
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
    if request.vp is not None and request.vp > 1 and request.pp is not None:
        # the micro-batch rule depends on the data-parallel size, checked per layout
        problem = virtual_pipeline_problem(model, request.pp, request.vp, request.pp)
        if problem:
            raise SizingError(problem, "vp")


def _vp_candidates(request: TrainingRequest, pp: int, dp: int) -> list[int]:
    """Virtual pipeline sizes Megatron-Core accepts for this PP and DP: divisors of the layers per rank that
    keep the interleaved schedule's micro-batch rule; 1 (no interleaving) always."""
    micro_batches = request.global_batch_size // (request.micro_batch_size * dp)
    if request.vp is not None:
        return [request.vp] if not virtual_pipeline_problem(request.model, pp, request.vp, micro_batches) else []
    if pp == 1:
        return [1]
    per_rank = layers_per_pipeline_rank(request.model, pp)
    return [v for v in range(1, per_rank + 1)
            if per_rank % v == 0 and not virtual_pipeline_problem(request.model, pp, v, micro_batches)]


def _candidates(request: TrainingRequest, nodes: int) -> Iterable[Parallelism]:
    gpn = request.instance.gpus
    gpus = nodes * gpn
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
                for vp in _vp_candidates(request, pp, dp):
                    for recompute in ("none", "full"):
                        yield Parallelism(tp, pp, cp, dp, nodes, gpn, recompute, vp)


def _seconds(request: TrainingRequest, par: Parallelism) -> float:
    return step_seconds(request.model, request.method, request.precision, request.instance, par, request.seq_length,
                        request.micro_batch_size, request.global_batch_size, lora_rank=request.lora_rank)


# Layouts whose estimated step times differ by less than this are equal to the planner: the simpler one wins
# (no recompute, less model parallelism, fewer pipeline stages, fewer virtual stages). The estimate cannot
# tell them apart.
RANKING_TOLERANCE = 0.01
# Across node counts the planner minimises the estimated cost per token; node counts within this share of the
# cheapest count as equal, and the fewest nodes win (less capacity to hold, sooner scheduled).
NODE_COST_TOLERANCE = 0.03
# How far beyond the fewest nodes that fit the planner looks for a cheaper layout.
NODE_SEARCH_FACTOR = 4


@dataclass(frozen=True)
class _Option:
    par: Parallelism
    memory: MemoryBreakdown
    seconds: float
    tuned: PublishedRun | None = None


def _rank_key(option: _Option) -> tuple:
    p = option.par
    return (round(math.log(option.seconds) / math.log(1 + RANKING_TOLERANCE)), p.recompute != "none",
            p.model_parallel, p.pp, p.vp, p.cp)


def _tuned_for(request: TrainingRequest, nodes: int) -> PublishedRun | None:
    """NVIDIA's tuned layout for this request on ``nodes`` nodes, if one was published: same model architecture,
    method, precision, GPU, GPU count, sequence length and micro-batch, and not overridden by a fixed TP/PP/VP."""
    for run in TUNED:
        if (run.model, run.method, run.precision, run.gpu_model, run.gpus, run.seq_length, run.micro_batch_size) == (
                request.model.key, request.method, request.precision, request.instance.gpu_model,
                nodes * request.instance.gpus, request.seq_length, request.micro_batch_size) and \
                request.tp in (None, run.tp) and request.pp in (None, run.pp) and request.vp in (None, run.vp_size):
            return run
    return None


def _tuned_option(request: TrainingRequest, nodes: int) -> _Option | None:
    run = _tuned_for(request, nodes)
    if run is None:
        return None
    dp = run.gpus // (run.tp * run.pp * run.cp)
    micro_batches = request.global_batch_size // (request.micro_batch_size * dp)
    if request.global_batch_size % (request.micro_batch_size * dp) or \
            virtual_pipeline_problem(request.model, run.pp, run.vp_size, micro_batches):
        return None  # the request's global batch does not suit the tuned layout: search instead
    par = Parallelism(run.tp, run.pp, run.cp, dp, nodes, request.instance.gpus, run.recompute, run.vp_size)
    memory = memory_breakdown(request, par.tp, par.pp, par.cp, par.dp, par.recompute, par.vp)
    return _Option(par, memory, _seconds(request, par), run) if memory.fits else None


def _best_on(request: TrainingRequest, nodes: int) -> tuple[_Option | None, tuple[Parallelism, MemoryBreakdown] | None]:
    """The fastest fitting layout on ``nodes`` nodes (NVIDIA's tuned one where it exists), and the layout
    closest to fitting when none fits."""
    tuned = _tuned_option(request, nodes)
    if tuned is not None:
        return tuned, None
    best: _Option | None = None
    tightest: tuple[Parallelism, MemoryBreakdown] | None = None
    fits_without_recompute: set[tuple[int, int, int, int]] = set()
    for par in _candidates(request, nodes):
        shape = (par.tp, par.pp, par.cp, par.vp)
        if par.recompute == "full" and shape in fits_without_recompute:
            continue  # recomputing only adds time to a layout that fits without it
        memory = memory_breakdown(request, par.tp, par.pp, par.cp, par.dp, par.recompute, par.vp)
        if not memory.fits:
            if tightest is None or memory.total < tightest[1].total:
                tightest = (par, memory)
            continue
        if par.recompute == "none":
            fits_without_recompute.add(shape)
        option = _Option(par, memory, _seconds(request, par))
        if best is None or _rank_key(option) < _rank_key(best):
            best = option
    return best, tightest


def _finish(request: TrainingRequest, option: _Option, reasons: Sequence[str], nearest: str = "") -> SizingPlan:
    instance, model, par = request.instance, request.model, option.par
    per_token = flops_per_token(model, request.seq_length, request.method)
    tokens_per_sec = request.global_batch_size * request.seq_length / option.seconds / par.gpus
    training_tokens = int(request.dataset_tokens * request.epochs) if request.dataset_tokens else None
    hours = cost = None
    if training_tokens:
        hours = training_tokens / (tokens_per_sec * par.gpus) / 3600
        cost = hours * par.nodes * instance.on_demand_usd_per_hour
    serving = serving_plan(model, instance, request.serving_max_seq_length or request.seq_length, request.serving_tp)
    fits = option.memory.fits and serving.fits
    all_reasons = list(reasons) + ([serving.reason] if not serving.fits else [])
    return SizingPlan(request, par, option.memory, fits, tuple(all_reasons), per_token,
                      FIT.efficiency[(request.precision, request.method)], tokens_per_sec, training_tokens, hours,
                      cost, storage_plan(request), serving, evaluation_plan(model, instance), nearest, option.tuned,
                      option.seconds)


def _no_layout(request: TrainingRequest) -> SizingError:
    """Say which setting leaves no layout: a fixed TP, PP, VP or node count, or else the batch sizes."""
    gpn = request.instance.gpus
    node_counts = [request.nodes] if request.nodes else list(range(1, MAX_NODES + 1))
    shapes = [t * p for t in _tp_candidates(request) for p in _pp_candidates(request)]
    if not any((n * gpn) % shape == 0 for n in node_counts for shape in shapes):
        fixed = [(name, value) for name, value in (("pp", request.pp), ("tp", request.tp), ("nodes", request.nodes)) if value]
        name, value = fixed[0] if fixed else ("nodes", request.nodes)
        return SizingError(f"{name.upper() if name != 'nodes' else 'nodes'} {value}: no TP x PP layout of "
                           f"{request.nodes or 'any number of'} x {request.instance.name} ({gpn} GPUs each) fits "
                           f"TP {request.tp or 'any'} x PP {request.pp or 'any'}", name)
    if request.vp is not None and request.vp > 1:
        return SizingError(f"VP {request.vp}: no layout of {request.nodes or 'up to ' + str(MAX_NODES)} x "
                           f"{request.instance.name} keeps Megatron-Core's interleaving rules (PP > 1, VP dividing "
                           f"each stage's layers, micro-batches per step a multiple of PP) with global batch "
                           f"{request.global_batch_size} and micro-batch {request.micro_batch_size}", "vp")
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
    """Choose the layout and node count (unless fixed) and derive everything else. On each node count the
    fastest fitting layout by estimated step time, NVIDIA's tuned one where it exists; across node counts,
    with none fixed, the fewest nodes of a tuned layout, else the lowest estimated cost per token."""
    validate_request(request)
    node_range = [request.nodes] if request.nodes else range(1, MAX_NODES + 1)
    options: list[_Option] = []
    tightest: tuple[Parallelism, MemoryBreakdown] | None = None
    for nodes in node_range:
        if options and nodes > NODE_SEARCH_FACTOR * options[0].par.nodes:
            break
        best, tight = _best_on(request, nodes)
        if best is not None:
            options.append(best)
        elif tight is not None and (tightest is None or tight[1].total < tightest[1].total):
            tightest = tight
    if options:
        tuned = [o for o in options if o.tuned is not None]
        if tuned:
            return _finish(request, tuned[0], ())
        cheapest = min(o.seconds * o.par.nodes for o in options)
        return _finish(request, next(o for o in options if o.seconds * o.par.nodes <= cheapest * (1 + NODE_COST_TOLERANCE)), ())
    if tightest is None:
        raise _no_layout(request)
    par, memory = tightest
    nearest = _nearest_working(request) if find_nearest else ""
    return _finish(request, _Option(par, memory, _seconds(request, par)), (_does_not_fit(request, par, memory),), nearest)


def _nearest_working(request: TrainingRequest) -> str:
    """The closest setting that does fit: first keep the instance type and free what the user fixed, then
    try the other GPU types."""
    free = replace(request, nodes=None, tp=None, pp=None, vp=None)
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
                par = Parallelism(tp, pp, 1, 1, nodes, instance.gpus, recompute)
                return _finish(request, _Option(par, memory, _seconds(request, par)), ())
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
        f"  tuned layout:  " + (f"yes, NVIDIA's ({p.tuned.source})" + (
            f"; measured {p.tuned.tokens_per_sec_per_gpu:,.0f} tokens/s/GPU at global batch {p.tuned.global_batch_size}"
            if p.tuned.tokens_per_sec_per_gpu else "; no published measurement")
            if p.tuned else "none published for this request: chosen by estimated step time"),
        f"  throughput:    {p.tokens_per_sec_per_gpu:,.0f} tokens/s/GPU estimated ({p.step_seconds:.2f} s per step, "
        f"{p.flops_per_token / 1e9:.1f} GFLOP/token, GEMMs at {p.efficiency:.0%} of {r.precision} peak); "
        f"${p.cost_per_billion_tokens:,.0f} per billion tokens on demand",
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
    """Every variant x method x GPU instance type, as a Markdown table. Throughput is the estimate; layouts NVIDIA
    tuned and published are marked with their source (``tuned_table``)."""
    header = ("| variant | model | method | instance | fits | nodes | layout | recompute | tuned | GiB/GPU (usable) "
              "| est. tokens/s/GPU | $/1B tokens | serving TP | KV tokens |")
    lines = [header, "| " + " | ".join(["---"] * 14) + " |"]
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
                    f"{p.parallelism.recompute} | {_tuned_mark(p.tuned)} | {m['total']} ({m['usable']}) | "
                    f"{p.tokens_per_sec_per_gpu:,.0f} | {p.cost_per_billion_tokens:,.0f} | {p.serving.tp} | "
                    f"{p.serving.kv_cache_tokens:,} |")
    return "\n".join(lines)


def _tuned_mark(run: PublishedRun | None) -> str:
    return "-" if run is None else f"T{TUNED.index(run) + 1}"


def tuned_table() -> str:
    """NVIDIA's tuned layouts (the planner picks them where the request matches) and the layout the planner
    chooses for each, with the published and estimated throughput."""
    lines = ["| # | model | method | precision | GPUs | TP | PP | CP | VP | recompute | MBS | GBS | planner picks | "
             "measured tokens/s/GPU | estimated | source |", "| " + " | ".join(["---"] * 16) + " |"]
    instance = catalog.get(_PUBLISHED_INSTANCE)
    for i, run in enumerate(TUNED, 1):
        request = TrainingRequest(MODELS[run.model], run.method, instance, run.precision, run.seq_length,
                                  run.micro_batch_size, run.global_batch_size, nodes=run.gpus // instance.gpus)
        p = plan(request)
        picked = p.parallelism.describe() + (", full recompute" if p.parallelism.recompute == "full" else "")
        picked += " (the tuned one)" if p.tuned is run else " (NOT the tuned one)"
        measured = f"{run.tokens_per_sec_per_gpu:,.0f}" if run.tokens_per_sec_per_gpu else "-"
        lines.append(f"| T{i} | {MODELS[run.model].display} | {run.method} | {run.precision} | {run.gpus} x {run.gpu_model} "
                     f"| {run.tp} | {run.pp} | {run.cp} | {run.vp or '-'} | {run.recompute} | {run.micro_batch_size} "
                     f"| {run.global_batch_size} | {picked} | {measured} | {p.tokens_per_sec_per_gpu:,.0f} | "
                     f"{run.source}{'; ' + run.note if run.note else ''} |")
    return "\n".join(lines)


def _measurement_source(run: PublishedRun) -> str:
    """Where the measurement was published (a tuned row cites its recipe first)."""
    return next((part for part in run.source.split("; ") if "perf_recipes" not in part and "Launcher" not in part),
                run.source).split(" @")[0]


def leave_one_out_table(held_out: Sequence[HeldOut] | None = None) -> str:
    """Each published measurement predicted by a fit on all the others."""
    held_out = leave_one_out() if held_out is None else held_out
    lines = ["| model | method | precision | GPUs | layout | GBS | measured | predicted (held out) | error | source |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for h in held_out:
        r = h.run
        layout = f"TP{r.tp} PP{r.pp}" + (f" VP{r.vp}" if r.vp else "")
        lines.append(f"| {MODELS[r.model].display} | {r.method} | {r.precision} | {r.gpus} | {layout} | "
                     f"{r.global_batch_size} | {r.tokens_per_sec_per_gpu:,.0f} | {h.predicted:,.0f} | {h.error:+.1%} | "
                     f"{_measurement_source(r)} |")
    errors = [abs(h.error) for h in held_out]
    within = sum(e <= 0.10 for e in errors)
    lines.append("")
    lines.append(f"{within} of {len(errors)} held-out points within 10%; largest error {max(errors):.1%}, "
                 f"mean absolute error {sum(errors) / len(errors):.1%}.")
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
    parser.add_argument("--lora-rank", type=int, default=DEFAULT_LORA_RANK)
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
        print("\nThroughput is estimated (fitted to NVIDIA's published runs; see `make bench` for the leave-one-out "
              "errors); `tuned` marks NVIDIA's tuned layouts:\n")
        print(tuned_table())
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
