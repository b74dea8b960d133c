"""Conversion as a batch/v1 Job: export the fine-tuned checkpoint to Hugging Face format (merging LoRA) in
the NeMo image, then build the TensorRT-LLM engine and the Triton model repository in the same Triton image
tag that serves it (an engine only loads in the TensorRT-LLM version that built it)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from infra.catalog import InstanceType
from workloads import pods
from workloads.entrypoints.layout import ENTRYPOINTS_DIR, RUN_CONFIG_FILE

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
    wait_seconds: int
    ngc_pull_secret: bool
    await_completion: bool


def export_memory_gib(model_params: int) -> int:
    """Merging LoRA and writing Hugging Face safetensors hold the 16-bit model about two and a half times."""
    return math.ceil(model_params * 2 * 2.5 / GIB) + 16


def job_manifest(spec: ConversionSpec) -> dict[str, Any]:
    share = pods.pod_share(spec.instance, spec.gpus, efa=False, min_memory_gib=export_memory_gib(spec.model_params))
    mounts = pods.volume_mounts()
    cpu_and_memory = {kind: {k: v for k, v in amounts.items() if k in ("cpu", "memory")}
                      for kind, amounts in share.resources().items()}
    no_privileges = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    labels = pods.labels("conversion", **{"nemo-eks/run-id": spec.run_id, "nemo-eks/serving-id": spec.serving_id})
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": labels,
                     "annotations": {} if spec.await_completion else {"pulumi.com/skipAwait": "true"}},
        "spec": {
            "backoffLimit": BACKOFF_LIMIT,
            # No ttlSecondsAfterFinished: a deleted Job would be created again by the next `pulumi up`.
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    **pods.gpu_scheduling(spec.node_group),
                    "serviceAccountName": spec.service_account,
                    **pods.pull_secrets(spec.ngc_pull_secret),
                    "restartPolicy": "Never",
                    "initContainers": [
                        pods.wait_for_container("wait-for-upstream", spec.nemo_image, spec.upstream_marker,
                                                spec.wait_seconds, mounts),
                        {"name": "export", "image": spec.nemo_image, "command": ["python3"],
                         "args": [f"{ENTRYPOINTS_DIR}/export.py", "--config", str(RUN_CONFIG_FILE)],
                         "env": pods.env({"PYTHONUNBUFFERED": "1"}), "resources": cpu_and_memory,
                         "volumeMounts": mounts, "securityContext": no_privileges},
                    ],
                    "containers": [
                        {"name": "build", "image": spec.triton_image, "command": ["python3"],
                         "args": [f"{ENTRYPOINTS_DIR}/build_engine.py", "--config", str(RUN_CONFIG_FILE)],
                         "env": pods.env({"PYTHONUNBUFFERED": "1"}), "resources": share.resources(),
                         "volumeMounts": mounts, "securityContext": no_privileges},
                    ],
                    "volumes": pods.volumes(spec.run_configmap, share.shm_gib),
                },
            },
        },
    }
