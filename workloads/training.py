"""NeMo fine-tuning as a Kubeflow PyTorchJob: one pod per GPU node, torchrun with one process per GPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from infra.catalog import InstanceType
from workloads import fabric, pods
from workloads.observability import TRAINING_METRICS_PORT
from workloads.entrypoints.layout import ENTRYPOINTS_DIR, RUN_CONFIG_FILE

MASTER_PORT = 23456  # the training operator's default; its Service for the master exposes it by this name
BACKOFF_LIMIT = 3  # pod restarts (OnFailure) resume from the last checkpoint; after that the job fails


@dataclass(frozen=True)
class TrainingSpec:
    name: str
    namespace: str
    run_id: str
    image: str
    instance: InstanceType
    nodes: int
    node_group: str
    service_account: str
    run_configmap: str
    prepared_marker: str
    wait_seconds: int
    ngc_pull_secret: bool
    hf_token: bool
    await_completion: bool
    efa: fabric.EfaPreflight | None = None  # multi-node EFA runs: checks before torchrun (workloads/fabric.py)


def torchrun_command(spec: TrainingSpec) -> list[str]:
    """c10d rendezvous at the master's Service (MASTER_ADDR/MASTER_PORT come from the training operator);
    one process per GPU. The EFA libraries go on the library path first, or NCCL falls back to sockets; a
    multi-node run checks EFA (and its fabric) first and stops there if NCCL would not run over it."""
    gpus = spec.instance.gpus
    script = (
        f"export LD_LIBRARY_PATH={pods.EFA_LIBRARY_PATH}:${{LD_LIBRARY_PATH:-}} && "
        f"{spec.efa.script() if spec.efa else ''}"
        f"exec torchrun --nnodes={spec.nodes} --nproc-per-node={gpus} --rdzv-backend=c10d "
        f"--rdzv-endpoint=${{MASTER_ADDR}}:${{MASTER_PORT}} --rdzv-id={spec.run_id} "
        f"{ENTRYPOINTS_DIR}/finetune.py --config {RUN_CONFIG_FILE}"
    )
    return ["/bin/bash", "-c", script]


def _pod_template(spec: TrainingSpec, role: str) -> dict[str, Any]:
    share = pods.pod_share(spec.instance, spec.instance.gpus, efa=spec.instance.efa)
    mounts = pods.volume_mounts()
    compute = share.resources()
    if role == "master":
        # Once per run, before any rank starts: lay out the data and import the base model.
        init = pods.script_container("prepare", spec.image, "finetune.py", share.resources(devices=False), mounts,
                                     "--prepare", hf_token=spec.hf_token)
    else:
        init = pods.wait_for_container("wait-for-prepare", spec.image, spec.prepared_marker, spec.wait_seconds, mounts)
    container = {
        "name": "pytorch",  # the training operator injects its rendezvous environment into this container
        "image": spec.image,
        "command": torchrun_command(spec),
        "env": pods.env({**pods.NCCL_EFA_ENV, **(spec.efa.env() if spec.efa else {})}, hf_token=spec.hf_token),
        "ports": [{"name": "pytorchjob-port", "containerPort": MASTER_PORT},
                  # Global rank 0 serves training metrics here (PodMonitor of the metrics stack).
                  {"name": "metrics", "containerPort": TRAINING_METRICS_PORT}],
        "resources": compute,
        "volumeMounts": mounts,
        "securityContext": pods.container_security(),
    }
    return {
        "metadata": {"labels": pods.labels("training", **{"nemo-eks/run-id": spec.run_id})},
        "spec": {
            **pods.gpu_scheduling(spec.node_group),
            "serviceAccountName": spec.service_account,
            **pods.pull_secrets(spec.ngc_pull_secret),
            "initContainers": [init],
            "containers": [container],
            "volumes": pods.volumes(spec.run_configmap, share.shm_gib),
        },
    }


def pytorchjob_manifest(spec: TrainingSpec) -> dict[str, Any]:
    replicas: dict[str, Any] = {
        "Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": _pod_template(spec, "master")},
    }
    if spec.nodes > 1:
        replicas["Worker"] = {"replicas": spec.nodes - 1, "restartPolicy": "OnFailure",
                              "template": _pod_template(spec, "worker")}
    # Awaiting a run of hours would hold `pulumi up` open; by default the job runs on its own and the next
    # stage waits for its marker in-cluster.
    annotations = ({"pulumi.com/waitFor": "condition=Succeeded"} if spec.await_completion
                   else {"pulumi.com/skipAwait": "true"})
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "annotations": annotations,
                     "labels": pods.labels("training", **{"nemo-eks/run-id": spec.run_id})},
        "spec": {
            # No ttlSecondsAfterFinished: the operator would delete the finished job and the next refresh
            # would create it again, re-running the training.
            "runPolicy": {"backoffLimit": BACKOFF_LIMIT, "cleanPodPolicy": "None"},
            "nprocPerNode": str(spec.instance.gpus),
            "pytorchReplicaSpecs": replicas,
        },
    }
