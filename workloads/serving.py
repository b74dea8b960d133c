"""Triton Inference Server with the TensorRT-LLM backend: Deployment, Service, PodDisruptionBudget,
HorizontalPodAutoscaler and ServiceMonitor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from infra.catalog import InstanceType
from infra.monitoring import QUEUE_TIME_METRIC  # served to the autoscaler by prometheus-adapter
from workloads import pods
from workloads.entrypoints.layout import ENTRYPOINTS_DIR, RUN_CONFIG_FILE

PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
SELECTOR = {"app.kubernetes.io/name": "triton", "app.kubernetes.io/part-of": pods.PART_OF}


@dataclass(frozen=True)
class ServingSpec:
    name: str
    namespace: str
    run_id: str
    serving_id: str
    image: str
    instance: InstanceType
    world_size: int  # the engine's TP x PP: Triton runs exactly this many ranks, one GPU each
    node_group: str
    service_account: str
    run_configmap: str
    conversion_marker: str
    conversion_job: str
    progress_deadline_seconds: int
    ngc_pull_secret: bool
    min_replicas: int
    max_replicas: int
    target_queue_time_ms: int


def deployment_manifest(spec: ServingSpec) -> dict[str, Any]:
    share = pods.pod_share(spec.instance, spec.world_size, efa=False)
    mounts = pods.volume_mounts(read_only_fsx=True)
    labels = {**SELECTOR, "app.kubernetes.io/component": "serving", "nemo-eks/run-id": spec.run_id,
              "nemo-eks/serving-id": spec.serving_id}
    # New pods stay gated (holding nothing) until their engine exists; while they wait, the old ReplicaSet keeps
    # serving (maxUnavailable 0). A failed conversion holds them gated, with the reason in a pod condition
    # and an Event: a Deployment cannot fail, and failing the pods would make the ReplicaSet replace them
    # in a loop.
    annotations, gates = pods.input_gate(spec.conversion_marker, f"Job/{spec.conversion_job}", "hold")
    health = {"ready": {"httpGet": {"path": "/v2/health/ready", "port": "http"}},
              "live": {"httpGet": {"path": "/v2/health/live", "port": "http"}}}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": labels,
                     # A new model waits for its conversion, which can take hours: `pulumi up` does not.
                     "annotations": {"pulumi.com/skipAwait": "true"}},
        "spec": {
            # No replicas: the HorizontalPodAutoscaler owns the count (a fixed one would fight it on every up).
            "selector": {"matchLabels": SELECTOR},
            # A new model rolls in beside the old one, which keeps serving until the new pod is ready.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "progressDeadlineSeconds": spec.progress_deadline_seconds,
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": {
                    **pods.gpu_scheduling(spec.node_group),
                    "schedulingGates": gates,
                    "serviceAccountName": spec.service_account,
                    **pods.pull_secrets(spec.ngc_pull_secret),
                    "terminationGracePeriodSeconds": 60,
                    "containers": [{
                        "name": "triton",
                        "image": spec.image,
                        "command": ["python3"],
                        "args": [f"{ENTRYPOINTS_DIR}/serve.py", "--config", str(RUN_CONFIG_FILE)],
                        "env": pods.env({"PYTHONUNBUFFERED": "1", "HF_HOME": "/tmp/hf"}),
                        "ports": [{"name": name, "containerPort": port} for name, port in PORTS.items()],
                        # Loading a large engine takes minutes: the startup probe allows up to 30.
                        "startupProbe": {**health["ready"], "periodSeconds": 10, "failureThreshold": 180},
                        "readinessProbe": {**health["ready"], "periodSeconds": 5, "failureThreshold": 3},
                        "livenessProbe": {**health["live"], "periodSeconds": 10, "failureThreshold": 6},
                        "resources": share.resources(),
                        "volumeMounts": mounts,
                        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                    }],
                    "volumes": pods.volumes(spec.run_configmap, share.shm_gib),
                },
            },
        },
    }


def service_manifest(spec: ServingSpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": {**SELECTOR, "app.kubernetes.io/component": "serving"}},
            "spec": {"type": "ClusterIP", "selector": SELECTOR,
                     "ports": [{"name": name, "port": port, "targetPort": name} for name, port in PORTS.items()]}}


def disruption_budget_manifest(spec: ServingSpec) -> dict[str, Any]:
    # One replica down at a time for node drains and upgrades; never blocks a drain outright.
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": SELECTOR},
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": SELECTOR}}}


def autoscaler_manifest(spec: ServingSpec) -> dict[str, Any]:
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": SELECTOR},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.name},
                "minReplicas": spec.min_replicas, "maxReplicas": spec.max_replicas,
                "metrics": [{"type": "Pods", "pods": {
                    "metric": {"name": QUEUE_TIME_METRIC},
                    "target": {"type": "AverageValue", "averageValue": str(spec.target_queue_time_ms)}}}],
                # A replica costs a GPU node share for hours: scale down slowly.
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": 900}},
            }}


def service_monitor_manifest(spec: ServingSpec) -> dict[str, Any]:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": SELECTOR},
            "spec": {"selector": {"matchLabels": SELECTOR},
                     "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}]}}
