"""NetworkPolicies of the pipeline namespace: no pod takes traffic that a rule here does not allow.

Ingress is denied by default. Allowed: Triton's ports from any pod of the cluster (its clients, and Prometheus
scraping its metrics port); Prometheus's scrapes of the training, evaluation and gatekeeper metrics ports; and, between
the pods of one PyTorchJob, every port (torchrun's c10d rendezvous at the master, NCCL's bootstrap and socket
traffic on ports it picks at run time). EFA traffic bypasses the pod's network interface and no policy sees
it. Egress stays open: the pods pull images from NGC, the model from Hugging Face, and read and write S3.

The VPC CNI enforces these once its network policy support is on (infra/cluster.py). Its node agent always
lets a node reach its own pods (aws/aws-network-policy-agent#56, fixed by #65 in VPC CNI v1.15.1), so the
kubelet's probes need no rule, as Kubernetes specifies ("Pods cannot ... block access from their resident
node", https://kubernetes.io/docs/concepts/services-networking/network-policies/).
"""

from __future__ import annotations

from typing import Any, Mapping

from infra import monitoring
from infra.config import MonitoringConfig
from workloads import gatekeeper, pods, runconfig, serving
from workloads.observability import TRAINING_METRICS_PORT

# Labels the Kubeflow training operator v1 puts on every pod of a PyTorchJob (kubeflow/trainer v1.9.3:
# pkg/controller.v1/common/job_controller.go GenLabels, applied in pod.go createNewPod; the label keys are in
# pkg/apis/kubeflow.org/v1/common_types.go, the controller's name in pkg/controller.v1/pytorch/
# pytorchjob_controller.go). The job name makes the rule one job's own: two runs never reach each other.
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
OPERATOR_NAME_LABEL = "training.kubeflow.org/operator-name"
PYTORCHJOB_CONTROLLER = "pytorchjob-controller"

# Every namespace carries its name in this label (Kubernetes >= 1.22,
# https://kubernetes.io/docs/concepts/overview/working-with-objects/namespaces/#automatic-labelling).
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
# The prometheus-operator labels the pods of every Prometheus it runs so (prometheus-operator v0.93.0:
# pkg/prometheus/server/operator.go makeSelectorLabels).
PROMETHEUS_POD_LABELS = {"app.kubernetes.io/name": "prometheus"}

EVERY_NAMESPACE: dict[str, Any] = {"namespaceSelector": {}}


def _policy(name: str, namespace: str, pod_selector: Mapping[str, Any], ingress: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace, "labels": pods.labels("network-policy")},
            "spec": {"podSelector": dict(pod_selector), "policyTypes": ["Ingress"], "ingress": ingress}}


def _tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": port} for port in ports]


def default_deny_ingress(namespace: str) -> dict[str, Any]:
    """Every pod of the namespace, those of tomorrow included: ingress only where another policy allows it."""
    return _policy("default-deny-ingress", namespace, {}, [])


def triton_ingress(namespace: str) -> dict[str, Any]:
    """Inference (HTTP, gRPC) and metrics from any pod of the cluster: Triton's Service is ClusterIP only."""
    return _policy("allow-triton", namespace, {"matchLabels": serving.SELECTOR},
                   [{"from": [EVERY_NAMESPACE], "ports": _tcp(*serving.PORTS.values())}])


def training_peers(namespace: str, job_name: str) -> dict[str, Any]:
    """Every port between the pods of one PyTorchJob: NCCL picks its bootstrap and socket ports at run time."""
    job = {"matchLabels": {JOB_NAME_LABEL: job_name, OPERATOR_NAME_LABEL: PYTORCHJOB_CONTROLLER}}
    return _policy("allow-training-peers", namespace, job, [{"from": [{"podSelector": job}]}])


def prometheus_peer(cfg: MonitoringConfig) -> dict[str, Any]:
    """The Prometheus that scrapes the pipeline. One this stack installs runs in a known namespace; one that was
    already there (``existing``) may run anywhere, so its scrapes are allowed from any pod of the cluster."""
    if cfg.stack == "kube-prometheus-stack":
        return {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: monitoring.NAMESPACE}},
                "podSelector": {"matchLabels": PROMETHEUS_POD_LABELS}}
    return EVERY_NAMESPACE


def metrics_scrapes(namespace: str, component: str, port: int, cfg: MonitoringConfig) -> dict[str, Any]:
    """Prometheus's scrapes of a metrics port its PodMonitor (workloads/observability.py) names."""
    return _policy(f"allow-metrics-{component}", namespace,
                   {"matchLabels": {"app.kubernetes.io/part-of": pods.PART_OF, "app.kubernetes.io/component": component}},
                   [{"from": [prometheus_peer(cfg)], "ports": _tcp(port)}])


def manifests(namespace: str, training_job: str, monitoring_cfg: MonitoringConfig,
              evaluation: bool) -> dict[str, dict[str, Any]]:
    """The namespace's policies by name; scrapes only where a metrics stack scrapes."""
    policies = [default_deny_ingress(namespace), triton_ingress(namespace), training_peers(namespace, training_job)]
    if monitoring_cfg.enabled:
        policies.append(metrics_scrapes(namespace, "training", TRAINING_METRICS_PORT, monitoring_cfg))
        policies.append(metrics_scrapes(namespace, "gatekeeper", gatekeeper.METRICS_PORT, monitoring_cfg))
        if evaluation:
            policies.append(metrics_scrapes(namespace, "evaluation", runconfig.EVALUATION_METRICS_PORT, monitoring_cfg))
    return {policy["metadata"]["name"]: policy for policy in policies}
