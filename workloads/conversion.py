"""Conversion as a batch/v1 Job: export the fine-tuned checkpoint to Hugging Face format (merging LoRA) in
the NeMo image, then build the TensorRT-LLM engine and the Triton model repository in the same Triton image
tag that serves it (an engine only loads in the TensorRT-LLM version that built it)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from infra.catalog import InstanceType
from workloads import pods

BACKOFF_LIMIT = 2
GIB = 1024**3


@dataclass(frozen=True)
class ConversionSpec:
    name: str
    namespace: str
    run_id: str
    serving_id: str
    nemo_image: str
    triton_image: str
    instance: InstanceType
    gpus: int  # TP x PP of the serving plan for an engine build; 0 when nothing is built (llmapi)
    model_params: int
    node_group: str
    service_account: str
    run_configmap: str
    upstream_marker: str  # the evaluation's marker, or training's when there is no evaluation
    upstream: str  # "<Kind>/<name>" of the evaluation Job, or of the PyTorchJob when there is no evaluation
    ngc_pull_secret: bool
    await_completion: bool


def export_memory_gib(model_params: int) -> int:
    """Merging LoRA and writing Hugging Face safetensors hold the 16-bit model about two and a half times."""
    return math.ceil(model_params * 2 * 2.5 / GIB) + 16


def job_manifest(spec: ConversionSpec) -> dict[str, Any]:
    share = pods.pod_share(spec.instance, spec.gpus, efa=False, min_memory_gib=export_memory_gib(spec.model_params))
    mounts = pods.volume_mounts()
    labels = pods.labels("conversion", **{"nemo-eks/run-id": spec.run_id, "nemo-eks/serving-id": spec.serving_id})
    # Gated until the upstream's marker exists; fails at once when the upstream failed (podFailurePolicy).
    annotations, gates = pods.input_gate(spec.upstream_marker, spec.upstream, "fail")
    return pods.job_manifest(spec.name, spec.namespace, labels, spec.await_completion, BACKOFF_LIMIT, {
        **pods.gpu_scheduling(spec.node_group),
        "schedulingGates": gates,
        "serviceAccountName": spec.service_account,
        **pods.pull_secrets(spec.ngc_pull_secret),
        "initContainers": [
            pods.script_container("export", spec.nemo_image, "export.py", share.resources(devices=False), mounts),
        ],
        "containers": [pods.script_container("build", spec.triton_image, "build_engine.py", share.resources(), mounts)],
        "volumes": pods.volumes(spec.run_configmap, share.shm_gib),
    }, pod_annotations=annotations, podFailurePolicy={"rules": [pods.upstream_failed_rule()]})
