"""Pieces every pipeline pod shares: what it may request of a node, its volumes, the EFA/NCCL environment,
GPU scheduling and labels. Pure functions returning Kubernetes manifest fragments."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from infra.addons import FSX_CLAIM_NAME
from infra.catalog import InstanceType
from infra.gpu_nodes import NODE_GROUP_LABEL, workload_tolerations
from workloads.entrypoints import gatekeeper
from workloads.entrypoints.layout import ENTRYPOINTS_DIR, FSX_MOUNT, RUN_CONFIG_DIR, RUN_CONFIG_FILE, failure_marker

PART_OF = "nemo-eks"
ENTRYPOINTS_CONFIGMAP = "nemo-eks-entrypoints"
NGC_PULL_SECRET = "ngc-pull"
HF_TOKEN_SECRET = "hf-token"
EFA_RESOURCE = "vpc.amazonaws.com/efa"
GPU_RESOURCE = "nvidia.com/gpu"

# The environment of a current EFA stack (libfabric >= 1.18, aws-ofi-nccl >= 1.7; the AWS EFA cheat sheet):
# only FI_EFA_USE_HUGE_PAGE=0 is recommended (huge pages make os.fork() of data-loader workers fail with
# ENOMEM). FI_PROVIDER=efa and NCCL_PROTO=simple were for old aws-ofi-nccl; RDMAV_FORK_SAFE must not be set.
# The rest are the NeMo/Megatron settings of NVIDIA's and AWS's reference jobs.
NCCL_EFA_ENV: Mapping[str, str] = {
    "FI_EFA_USE_HUGE_PAGE": "0",
    "NCCL_SOCKET_IFNAME": "^lo,docker",  # bootstrap over the pod's VPC interface, never loopback
    "NCCL_DEBUG": "WARN",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",  # Megatron's TP communication overlap needs one hardware queue
    "NVTE_DP_AMAX_REDUCE_INTERVAL": "0",
    "NVTE_ASYNC_AMAX_REDUCTION": "1",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    "PYTHONUNBUFFERED": "1",
}
# NGC images carry EFA's libfabric and the aws-ofi-nccl plugin under /opt/amazon but do not always put them
# on the library path; without them NCCL silently falls back to TCP sockets.
EFA_LIBRARY_PATH = "/opt/amazon/aws-ofi-nccl/lib:/opt/amazon/efa/lib"


@dataclass(frozen=True)
class PodShare:
    """What one pod requests of a node: a share of its GPUs and the same share of what the node can give."""

    gpus: int
    efa: int
    cpu: int
    memory_gib: int
    shm_gib: int

    def resources(self, devices: bool = True) -> dict[str, Any]:
        """Requests and limits; ``devices=False`` leaves out GPUs and EFA (for init containers, which run
        before the main container and share the pod's devices)."""
        amounts: dict[str, Any] = {"cpu": str(self.cpu), "memory": f"{self.memory_gib}Gi"}
        if self.gpus and devices:
            amounts[GPU_RESOURCE] = self.gpus
        if self.efa and devices:
            amounts[EFA_RESOURCE] = self.efa
        # Requests equal limits: Guaranteed QoS, so a training pod is the last the kubelet evicts.
        return {"requests": dict(amounts), "limits": dict(amounts)}


def allocatable(instance: InstanceType) -> tuple[int, int]:
    """CPU cores and GiB of memory a pod can count on: the node minus the kubelet's and the OS's reserve and
    the add-on DaemonSets (VPC CNI, kube-proxy, FSx CSI, device plugins), kept generous on purpose."""
    cpu = instance.vcpus - max(2, math.ceil(instance.vcpus * 0.04))
    memory = math.floor(instance.memory_gib * 0.92) - 8
    return cpu, memory


def pod_share(instance: InstanceType, gpus: int, efa: bool, min_memory_gib: int = 0) -> PodShare:
    """A pod taking ``gpus`` of the node's GPUs gets the same fraction of its CPU and memory; /dev/shm (a
    memory emptyDir, counted in the pod's memory) gets an eighth of that, at most 256 GiB."""
    cpu, memory = allocatable(instance)
    fraction = gpus / instance.gpus if gpus else 1 / instance.gpus
    pod_memory = min(memory, max(min_memory_gib, math.floor(memory * fraction)))
    return PodShare(gpus=gpus, efa=instance.efa_interfaces if efa else 0, cpu=max(1, math.floor(cpu * fraction)),
                    memory_gib=pod_memory, shm_gib=max(1, min(256, pod_memory // 8)))


def labels(component: str, **extra: str) -> dict[str, str]:
    return {"app.kubernetes.io/part-of": PART_OF, "app.kubernetes.io/component": component, **extra}


def volumes(run_configmap: str, shm_gib: int) -> list[dict[str, Any]]:
    return [
        {"name": "fsx", "persistentVolumeClaim": {"claimName": FSX_CLAIM_NAME}},
        # The container runtime's /dev/shm is 64 MiB: NCCL and data-loader workers need far more.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_gib}Gi"}},
        {"name": "entrypoints", "configMap": {"name": ENTRYPOINTS_CONFIGMAP, "defaultMode": 0o555}},
        {"name": "run-config", "configMap": {"name": run_configmap}},
    ]


def volume_mounts(read_only_fsx: bool = False) -> list[dict[str, Any]]:
    return [
        {"name": "fsx", "mountPath": str(FSX_MOUNT), **({"readOnly": True} if read_only_fsx else {})},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "entrypoints", "mountPath": str(ENTRYPOINTS_DIR), "readOnly": True},
        {"name": "run-config", "mountPath": str(RUN_CONFIG_DIR), "readOnly": True},
    ]


def env(values: Mapping[str, str], hf_token: bool = False) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in values.items()]
    if hf_token:
        entries.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": HF_TOKEN_SECRET, "key": "token"}}})
    return entries


def gpu_scheduling(node_group: str) -> dict[str, Any]:
    """Pin to the plan's node group and tolerate the GPU taint (not the FSx start-up taint: these pods mount
    FSx and must wait for its node agent); the pod-level hardening every
    pipeline pod shares (the runtime's seccomp profile; no Kubernetes API token, as none of them calls the
    API: AWS credentials come from Pod Identity, which mounts its own token)."""
    return {"nodeSelector": {NODE_GROUP_LABEL: node_group}, "tolerations": workload_tolerations(),
            "automountServiceAccountToken": False,
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}}}


def pull_secrets(ngc: bool) -> dict[str, Any]:
    return {"imagePullSecrets": [{"name": NGC_PULL_SECRET}]} if ngc else {}


NO_PRIVILEGES: Mapping[str, Any] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def container_security() -> dict[str, Any]:
    # EFA registers GPU and host memory with the NIC: it needs to lock memory (IPC_LOCK), nothing else.
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"], "add": ["IPC_LOCK"]}}


def script_container(name: str, image: str, script: str, resources: dict[str, Any],
                     mounts: Sequence[dict[str, Any]], *extra_args: str,
                     env_values: Mapping[str, str] | None = None, hf_token: bool = False) -> dict[str, Any]:
    """A container that runs one of our entrypoints on the pod's run.json."""
    return {"name": name, "image": image, "command": ["python3"],
            "args": [f"{ENTRYPOINTS_DIR}/{script}", "--config", str(RUN_CONFIG_FILE), *extra_args],
            "env": env({"PYTHONUNBUFFERED": "1", **(env_values or {})}, hf_token=hf_token),
            "resources": resources, "volumeMounts": list(mounts), "securityContext": dict(NO_PRIVILEGES)}


def job_manifest(name: str, namespace: str, labels: Mapping[str, str], await_completion: bool,
                 backoff_limit: int, pod_spec: dict[str, Any], pod_annotations: Mapping[str, str] | None = None,
                 **job_spec: Any) -> dict[str, Any]:
    """A batch/v1 Job of the pipeline. No ttlSecondsAfterFinished: a Job deleted by its TTL would be created
    again by the next `pulumi up`. Unless `pulumi up` is to wait for it, Pulumi does not await it."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels),
                     "annotations": {} if await_completion else {"pulumi.com/skipAwait": "true"}},
        "spec": {"backoffLimit": backoff_limit, **job_spec,
                 "template": {"metadata": {"labels": dict(labels),
                                           **({"annotations": dict(pod_annotations)} if pod_annotations else {})},
                              "spec": {"restartPolicy": "Never", **pod_spec}}},
    }


def input_gate(marker: str, upstream: str | None, on_failure: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Pod-template annotations and scheduling gates that keep a pod unscheduled (no node, no GPU, not pending
    for the node autoscaler) until ``marker`` exists on FSx; the gatekeeper (workloads/gatekeeper.py) removes
    the gate then. When the upstream stage leaves its failure marker, or ``upstream`` ("<Kind>/<name>") has
    failed for good, it fails the pod (``on_failure="fail"``, pods of a Job) or holds it gated with the
    reason (``"hold"``, pods of a Deployment whose old pods keep serving)."""
    annotations = {gatekeeper.WAIT_FOR: marker, gatekeeper.FAILURE_MARKER: failure_marker(marker),
                   gatekeeper.ON_FAILURE: on_failure}
    if upstream:
        annotations[gatekeeper.UPSTREAM] = upstream
    return annotations, [{"name": gatekeeper.GATE}]


def upstream_failed_rule() -> dict[str, Any]:
    """The podFailurePolicy rule that fails a Job at once when the gatekeeper failed its pod for an upstream
    failure (the Job's condition then names the pod, whose status message carries the reason)."""
    return {"action": "FailJob", "onPodConditions": [{"type": gatekeeper.CONDITION, "status": "True"}]}
