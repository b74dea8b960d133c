"""NeMo fine-tuning as a Kubeflow PyTorchJob: one pod per GPU node, torchrun with one process per GPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from infra.catalog import InstanceType
from workloads import fabric, pods
from workloads.observability import TRAINING_METRICS_PORT
from workloads.entrypoints.layout import ENTRYPOINTS_DIR, NCCL_TIMEOUT_ENV, RUN_CONFIG_FILE

MASTER_PORT = 23456  # the training operator's default; its Service for the master exposes it by this name
SAFE_TO_EVICT = "cluster-autoscaler.kubernetes.io/safe-to-evict"


def backoff_limit(nodes: int, pod_restarts: int) -> int:
    """The PyTorchJob's runPolicy.backoffLimit for surviving ``pod_restarts`` container-level faults.

    Training operator v1.9.3 fails a job when the restart counts of all containers (init containers
    included) of its Running pods, summed over the replicas whose restartPolicy is OnFailure, Always or
    ExitCode, reach the limit: ``result >= *runPolicy.BackoffLimit`` (kubeflow/trainer v1.9.3,
    pkg/core/job.go:93-133, PastBackoffLimit; called from pkg/controller.v1/common/job.go:200). One
    container-level fault can restart every node's container (the master's container hosts torchrun's
    rendezvous store, and every other node's agent fails without it), so each fault may add ``nodes``;
    the + 1 keeps the last tolerated fault below the ``>=``.
    """
    return pod_restarts * nodes + 1


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
    ngc_pull_secret: bool
    hf_token: bool
    await_completion: bool
    worker_restarts: int = 10
    pod_restarts: int = 3
    nccl_timeout_seconds: int = 1800
    rendezvous_timeout_seconds: int = 1800
    efa: fabric.EfaPreflight | None = None  # multi-node EFA runs: checks before torchrun (workloads/fabric.py)


def torchrun_command(spec: TrainingSpec) -> list[str]:
    """c10d rendezvous at the master's Service (MASTER_ADDR/MASTER_PORT come from the training operator);
    one process per GPU. The EFA libraries go on the library path first, or NCCL falls back to sockets; a
    multi-node run checks EFA (and its fabric) first and stops there if NCCL would not run over it.

    ``--max-restarts``: when a rank fails, torchrun's agent stops the node's ranks and starts them again in a
    new rendezvous round, in the same container (the restart count of the pod does not move); the agents of
    the other nodes join that round. ``join_timeout`` (torch.distributed.elastic.rendezvous.dynamic_rendezvous,
    create_handler; default 600 s) bounds how long a round waits for every node, here long enough for a
    replacement GPU node to join. These are explicit flags, so no elasticPolicy is needed: without one the
    operator only sets PET_NNODES, PET_NPROC_PER_NODE and PET_NODE_RANK (kubeflow/trainer v1.9.3,
    pkg/controller.v1/pytorch/envvar.go), which torchrun reads as defaults that flags override; an
    elasticPolicy would point PET_RDZV_ENDPOINT at worker-0 (elastic.go) and needs a Worker replica, which a
    single-node run does not have."""
    gpus = spec.instance.gpus
    script = (
        f"export LD_LIBRARY_PATH={pods.EFA_LIBRARY_PATH}:${{LD_LIBRARY_PATH:-}} && "
        f"{spec.efa.script() if spec.efa else ''}"
        f"exec torchrun --nnodes={spec.nodes} --nproc-per-node={gpus} --rdzv-backend=c10d "
        f"--rdzv-endpoint=${{MASTER_ADDR}}:${{MASTER_PORT}} --rdzv-id={spec.run_id} "
        f"--rdzv-conf=join_timeout={spec.rendezvous_timeout_seconds} --max-restarts={spec.worker_restarts} "
        f"{ENTRYPOINTS_DIR}/finetune.py --config {RUN_CONFIG_FILE}"
    )
    return ["/bin/bash", "-c", script]


def _pod_template(spec: TrainingSpec, role: str) -> dict[str, Any]:
    share = pods.pod_share(spec.instance, spec.instance.gpus, efa=spec.instance.efa)
    mounts = pods.volume_mounts()
    compute = share.resources()
    metadata: dict[str, Any] = {
        "labels": pods.labels("training", **{"nemo-eks/run-id": spec.run_id}),
        # Never evicted to consolidate nodes: one rank's eviction restarts every rank from the last checkpoint
        # (Cluster Autoscaler utils/drain/drain.go PodSafeToEvictKey, "false" blocks it).
        "annotations": {SAFE_TO_EVICT: "false"}}
    placement: dict[str, Any] = {}
    if role == "master":
        # Once per run, before any rank starts: lay out the data and import the base model. This is the
        # master's own work (it needs a GPU node's memory for the import), not a wait for another stage.
        placement["initContainers"] = [pods.script_container(
            "prepare", spec.image, "finetune.py", share.resources(devices=False), mounts, "--prepare",
            hf_token=spec.hf_token)]
    else:
        # Workers are gated until the master's prepare is done, so they hold no GPU node meanwhile. A failed
        # prepare holds them (the master retries it; the operator would only recreate a failed worker pod).
        annotations, gates = pods.input_gate(spec.prepared_marker, None, "hold")
        metadata["annotations"].update(annotations)
        placement["schedulingGates"] = gates
    env = {**pods.NCCL_EFA_ENV, NCCL_TIMEOUT_ENV: str(spec.nccl_timeout_seconds)}
    container = {
        "name": "pytorch",  # the training operator injects its rendezvous environment into this container
        "image": spec.image,
        "command": torchrun_command(spec),
        "env": pods.env({**env, **(spec.efa.env() if spec.efa else {})}, hf_token=spec.hf_token),
        "ports": [{"name": "pytorchjob-port", "containerPort": MASTER_PORT},
                  # Global rank 0 serves training metrics here (PodMonitor of the metrics stack).
                  {"name": "metrics", "containerPort": TRAINING_METRICS_PORT}],
        "resources": compute,
        "volumeMounts": mounts,
        "securityContext": pods.container_security(),
    }
    return {
        "metadata": metadata,
        "spec": {
            **pods.gpu_scheduling(spec.node_group),
            "serviceAccountName": spec.service_account,
            **pods.pull_secrets(spec.ngc_pull_secret),
            **placement,
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
            # On a final failure the operator deletes the job's pods whatever cleanPodPolicy says: it calls
            # DeletePodsAndServices before it sets the Failed condition (pkg/controller.v1/common/job.go:225
            # and :245), so no crash-looping pod keeps its GPUs.
            "runPolicy": {"backoffLimit": backoff_limit(spec.nodes, spec.pod_restarts), "cleanPodPolicy": "None"},
            "nprocPerNode": str(spec.instance.gpus),
            "pytorchReplicaSpecs": replicas,
        },
    }
