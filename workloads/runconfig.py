"""The resolved run configuration: everything a pipeline pod needs, generated from the sizing plan.

It is written into the run's ConfigMap as ``run.json``. The run id is a digest of the training part of it, so a
changed training config names a new checkpoint directory and a new PyTorchJob (a new run), while an
unchanged one leaves every resource as it is (``pulumi up`` re-runs nothing). The serving id is a digest of
what the conversion builds, so a new engine shape rebuilds without retraining.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from infra import images, sizing
from infra.config import StackConfig
from workloads.entrypoints.layout import RunPaths

SCHEMA_VERSION = 1
# NeMo's LoRA recipes: adapters on the fused attention and MLP projections, alpha = 2 x rank.
LORA_TARGET_MODULES = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
CHECKPOINTS_KEPT = 2  # NeMo ModelCheckpoint save_top_k; the "last" checkpoint is kept besides
TRITON_BATCH_SCHEDULER_POLICY = "guaranteed_no_evict"  # never evicts an admitted request (the backend's default)
TRITON_MAX_QUEUE_DELAY_US = 1000  # a millisecond lets concurrent requests join one batch


def _digest(document: Any, length: int = 10) -> str:
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def training_section(cfg: StackConfig) -> dict[str, Any]:
    """What determines the trained weights: any change here is a new run."""
    plan, par, request = cfg.sizing, cfg.sizing.parallelism, cfg.sizing.request
    model = plan.model
    val_interval = max(1, min(50, cfg.pipeline.max_steps // 10))
    return {
        "model": {"key": model.key, "display": model.display, "hf_model_id": cfg.hf_model_id,
                  "nemo_config": model.nemo_config, "layers": model.layers, "hidden": model.hidden,
                  "heads": model.heads, "kv_heads": model.kv_heads, "ffn": model.ffn, "vocab": model.vocab,
                  "max_seq_length": model.max_seq_length},
        "method": request.method,
        "precision": request.precision,
        "dataset": cfg.pipeline.dataset,
        # vp: NeMo's virtual_pipeline_model_parallel_size, None when the schedule is not interleaved
        "parallelism": {"nodes": par.nodes, "gpus_per_node": par.gpus_per_node, "tp": par.tp, "pp": par.pp,
                        "vp": par.vp if par.vp > 1 else None, "cp": par.cp, "dp": par.dp,
                        "sequence_parallel": par.sequence_parallel, "recompute": par.recompute},
        # the memory-relevant settings the sizing plan assumes (those of NVIDIA's tuned recipes)
        "memory": {"grad_reduce_in_fp32": sizing.GRAD_REDUCE_IN_FP32,
                   "disable_parameter_transpose_cache": sizing.DISABLE_PARAMETER_TRANSPOSE_CACHE},
        "batch": {"seq_length": request.seq_length, "micro_batch_size": request.micro_batch_size,
                  "global_batch_size": request.global_batch_size},
        "lora": {"rank": request.lora_rank, "alpha": 2 * request.lora_rank, "dropout": 0.0,
                 "target_modules": list(LORA_TARGET_MODULES)} if request.method == "lora" else None,
        "optimizer": {"lr": cfg.pipeline.learning_rate, "min_lr": 0.0, "warmup_steps": min(50, cfg.pipeline.max_steps // 10),
                      "adam_beta2": 0.98, "weight_decay": 0.01, "clip_grad": 1.0},
        "schedule": {"max_steps": cfg.pipeline.max_steps, "val_check_interval": val_interval,
                     "limit_val_batches": 32},
        "checkpointing": {"save_top_k": CHECKPOINTS_KEPT, "every_n_train_steps": val_interval,
                          "monitor": "val_loss"},
        "image": cfg.pipeline.nemo_image,
    }


def serving_section(cfg: StackConfig) -> dict[str, Any]:
    """What the conversion builds and Triton serves: a change here rebuilds, without retraining."""
    serving = cfg.sizing.serving
    backend = cfg.pipeline.serving_backend
    return {
        "backend": backend,
        "image": cfg.pipeline.triton_image,
        "trtllm_version": images.TRITON_TRTLLM.get(images.parse(cfg.pipeline.triton_image).release or ""),
        "tp": serving.tp, "pp": serving.pp, "world_size": serving.world_size,
        "precision": serving.precision, "kv_cache_dtype": serving.kv_cache_dtype,
        "max_batch_size": serving.max_batch_size, "max_num_tokens": serving.max_num_tokens,
        "max_seq_length": serving.max_seq_length,
        "kv_cache_free_gpu_mem_fraction": serving.kv_cache_free_fraction,
        "batch_scheduler_policy": TRITON_BATCH_SCHEDULER_POLICY,
        "max_queue_delay_microseconds": TRITON_MAX_QUEUE_DELAY_US,
        "decoupled": True,  # streaming responses
        # FP8 post-training quantization calibrates on the run's own training data, never on a download.
        "calibration": {"source": "training", "samples": 512, "max_seq_length": min(2048, serving.max_seq_length)},
    }


EVALUATION_METRICS_PORT = 9400


def evaluation_section(cfg: StackConfig) -> dict[str, Any]:
    """What the evaluation measures and the gate it applies; a change here re-evaluates, without retraining."""
    evaluation, plan = cfg.pipeline.evaluation, cfg.sizing.evaluation
    return {
        "loss_samples": evaluation.loss_samples, "generation_samples": evaluation.generation_samples,
        "max_new_tokens": evaluation.max_new_tokens,
        "gate": {"min_loss_improvement_percent": evaluation.min_loss_improvement_percent,
                 "max_exact_match_drop": evaluation.max_exact_match_drop},
        "gpus": plan.gpus, "cpu_offload": plan.cpu_offload,
        "metrics_port": EVALUATION_METRICS_PORT, "metrics_linger_seconds": evaluation.metrics_linger_seconds,
        "image": cfg.pipeline.nemo_image,
    }


def eval_id(cfg: StackConfig) -> str:
    return f"eval-{_digest(evaluation_section(cfg), 8)}"


def run_id(cfg: StackConfig) -> str:
    return f"{cfg.sizing.model.key}-{cfg.sizing.request.method}-{_digest(training_section(cfg))}"


def serving_id(cfg: StackConfig) -> str:
    return f"{cfg.pipeline.serving_backend}-{_digest(serving_section(cfg), 8)}"


def run_paths(cfg: StackConfig) -> RunPaths:
    return RunPaths(run_id(cfg), serving_id(cfg), cfg.pipeline.dataset, cfg.hf_model_id, eval_id(cfg))


TRAINING_PATHS = ("dataset_dir", "base_hf_dir", "base_nemo_dir", "run_dir", "data_dir", "nemo_log_dir",
                  "prepared_marker", "training_marker")


def training_document(cfg: StackConfig) -> dict[str, Any]:
    """run.json of the training pods: the training part only, so a new serving shape leaves the job alone."""
    paths = run_paths(cfg).as_dict()
    return {"schema": SCHEMA_VERSION, "stack": cfg.stack, "run_id": run_id(cfg),
            "training": training_section(cfg), "paths": {k: paths[k] for k in TRAINING_PATHS}}


EVALUATION_PATHS = TRAINING_PATHS + ("export_dir", "base_eval_cache_dir", "evaluation_dir", "evaluation_report",
                                     "evaluation_marker")


def evaluation_document(cfg: StackConfig) -> dict[str, Any]:
    """run.json of the evaluation pods: training, evaluation and the paths they read and write."""
    paths = run_paths(cfg).as_dict()
    return {"schema": SCHEMA_VERSION, "stack": cfg.stack, "run_id": run_id(cfg), "eval_id": eval_id(cfg),
            "training": training_section(cfg), "evaluation": evaluation_section(cfg),
            "paths": {k: paths[k] for k in EVALUATION_PATHS}}


def run_document(cfg: StackConfig) -> dict[str, Any]:
    """run.json of the conversion and serving pods: everything."""
    return {
        "schema": SCHEMA_VERSION,
        "stack": cfg.stack,
        "run_id": run_id(cfg),
        "serving_id": serving_id(cfg),
        "eval_id": eval_id(cfg),
        "training": training_section(cfg),
        "evaluation": evaluation_section(cfg) if cfg.pipeline.evaluation.enabled else None,
        "serving": serving_section(cfg),
        "paths": run_paths(cfg).as_dict(),
    }
