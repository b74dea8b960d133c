"""Evaluation as a batch/v1 Job between training and conversion: export the fine-tuned model, measure it and
the base model on the held-out validation set, and gate the rest of the pipeline on the result."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from infra.catalog import InstanceType
from workloads import pods
from workloads.conversion import export_memory_gib

GATE_FAILED_EXIT_CODE = 3  # evaluate.py's exit code when the gate fails: a retry cannot change the verdict
BACKOFF_LIMIT = 2
GIB = 1024**3


@dataclass(frozen=True)
class EvaluationSpec:
    name: str
    namespace: str
    run_id: str
    eval_id: str
    image: str
    instance: InstanceType
    gpus: int
    cpu_offload: bool
    model_params: int
    metrics_port: int
    node_group: str
    service_account: str
    run_configmap: str
    training_marker: str
    training_job: str  # the PyTorchJob whose failure fails this Job
    ngc_pull_secret: bool
    await_completion: bool


def host_memory_gib(spec: EvaluationSpec) -> int:
    """Export needs the model about two and a half times in host memory; CPU offload keeps what the GPUs
    cannot hold there too."""
    offloaded = math.ceil(spec.model_params * 2 / GIB) if spec.cpu_offload else 0
    return max(export_memory_gib(spec.model_params), offloaded + 32)


def job_manifest(spec: EvaluationSpec) -> dict[str, Any]:
    share = pods.pod_share(spec.instance, spec.gpus, efa=False, min_memory_gib=host_memory_gib(spec))
    mounts = pods.volume_mounts()
    labels = pods.labels("evaluation", **{"nemo-eks/run-id": spec.run_id, "nemo-eks/eval-id": spec.eval_id})
    evaluate = pods.script_container("evaluate", spec.image, "evaluate.py", share.resources(), mounts,
                                     env_values={"HF_HUB_OFFLINE": "1"})
    # Scraped while it lingers after the evaluation (PodMonitor of the metrics stack).
    evaluate["ports"] = [{"name": "metrics", "containerPort": spec.metrics_port}]
    # The gate's reason is the termination message; an out-of-memory kill leaves the log tail instead.
    evaluate["terminationMessagePolicy"] = "FallbackToLogsOnError"
    # Gated until training's marker exists: the pod holds no GPU while the run trains.
    annotations, gates = pods.input_gate(spec.training_marker, f"PyTorchJob/{spec.training_job}", "fail")
    return pods.job_manifest(
        spec.name, spec.namespace, labels, spec.await_completion, BACKOFF_LIMIT, {
            **pods.gpu_scheduling(spec.node_group),
            "schedulingGates": gates,
            "serviceAccountName": spec.service_account,
            **pods.pull_secrets(spec.ngc_pull_secret),
            "initContainers": [
                pods.script_container("export", spec.image, "export.py", share.resources(devices=False), mounts),
            ],
            "containers": [evaluate],
            "volumes": pods.volumes(spec.run_configmap, share.shm_gib),
        },
        pod_annotations=annotations,
        # A failed gate fails the Job at once, with the reason in the pod's termination message; so does a
        # failed training run (the gatekeeper's pod condition). Other failures (a node lost, an
        # out-of-memory) are retried.
        podFailurePolicy={"rules": [
            {"action": "FailJob", "onExitCodes": {"containerName": "evaluate", "operator": "In",
                                                  "values": [GATE_FAILED_EXIT_CODE]}},
            pods.upstream_failed_rule()]})
