"""The metrics stack: kube-prometheus-stack (Prometheus, Alertmanager, Grafana, kube-state-metrics), the NVIDIA
DCGM exporter on the GPU nodes and prometheus-adapter for the autoscaler's Triton metric."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Any, Sequence

import pulumi
import pulumi_kubernetes as k8s

from infra.config import MonitoringConfig
from infra.gpu_nodes import GPU_PRESENT_LABEL, NODE_ROLE_LABEL, node_agent_tolerations

NAMESPACE = "monitoring"
PROMETHEUS_COMMUNITY_REPO = "https://prometheus-community.github.io/helm-charts"
DCGM_EXPORTER_REPO = "https://nvidia.github.io/dcgm-exporter/helm-charts"
# Triton's average queue time per request, per pod, for the HorizontalPodAutoscaler (workloads/serving.py).
QUEUE_TIME_METRIC = "triton_queue_time_per_request_ms"


def kube_prometheus_stack_values() -> dict[str, Any]:
    system = {"nodeSelector": {NODE_ROLE_LABEL: "system"}}
    return {
        "prometheus": {"prometheusSpec": {
            **system,
            "retention": "15d",
            # Pick up every ServiceMonitor, PodMonitor and PrometheusRule in the cluster, not only this release's.
            "serviceMonitorSelectorNilUsesHelmValues": False,
            "podMonitorSelectorNilUsesHelmValues": False,
            "ruleSelectorNilUsesHelmValues": False,
        }},
        "alertmanager": {"alertmanagerSpec": system},
        "prometheusOperator": system,
        "kube-state-metrics": system,
        # Dashboards come as ConfigMaps labelled grafana_dashboard=1, from any namespace.
        "grafana": {**system, "sidecar": {"dashboards": {"enabled": True, "label": "grafana_dashboard",
                                                         "labelValue": "1", "searchNamespace": "ALL"}}},
        # Node metrics from every node, GPU nodes included.
        "prometheus-node-exporter": {"tolerations": [{"operator": "Exists"}]},
    }


def dcgm_exporter_values() -> dict[str, Any]:
    # GPU nodes only, through their taints; the chart's ServiceMonitor makes Prometheus scrape it.
    return {"nodeSelector": {GPU_PRESENT_LABEL: "true"}, "tolerations": node_agent_tolerations(),
            "serviceMonitor": {"enabled": True, "interval": "15s"}}


def prometheus_endpoint(prometheus_url: str) -> dict[str, Any]:
    """The chart's prometheus.url, port and path: it renders ``--prometheus-url={{ url }}{{ if port }}:{{ port
    }}{{ end }}{{ path }}`` (prometheus-community/helm-charts, tag prometheus-adapter-5.3.0,
    charts/prometheus-adapter/templates/deployment.yaml; values.yaml defaults port 9090, path ""), so a URL
    with a path must be split, or the port lands after the path."""
    parts = urllib.parse.urlsplit(prometheus_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return {"url": f"{parts.scheme}://{parts.hostname}", "port": port, "path": path}


def prometheus_adapter_values(prometheus_url: str) -> dict[str, Any]:
    return {
        "prometheus": prometheus_endpoint(prometheus_url),
        "nodeSelector": {NODE_ROLE_LABEL: "system"},
        "rules": {"default": False, "custom": [{
            "seriesQuery": 'nv_inference_queue_duration_us{namespace!="",pod!=""}',
            "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
            "name": {"matches": "^nv_inference_queue_duration_us$", "as": QUEUE_TIME_METRIC},
            # Triton's counters are cumulative microseconds: the rate over requests is the mean wait, in ms.
            "metricsQuery": ("sum(rate(<<.Series>>{<<.LabelMatchers>>}[2m])) by (<<.GroupBy>>) / 1000 / "
                             "clamp_min(sum(rate(nv_inference_request_success{<<.LabelMatchers>>}[2m])) "
                             "by (<<.GroupBy>>), 1e-9)"),
        }]},
    }


@dataclass(frozen=True)
class MonitoringArgs:
    config: MonitoringConfig
    provider: k8s.Provider
    system_nodes: pulumi.Resource
    device_plugins: Sequence[pulumi.Resource]


class Monitoring(pulumi.ComponentResource):
    """``crds_ready``: what a ServiceMonitor, PodMonitor or PrometheusRule must wait for."""

    crds_ready: list[pulumi.Resource]

    def __init__(self, name: str, args: MonitoringArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("nemo-eks:infra:Monitoring", name, None, opts)
        cfg = args.config
        self.crds_ready = []
        base = dict(parent=self, provider=args.provider)
        after_nodes = pulumi.ResourceOptions(**base, depends_on=[args.system_nodes])
        stack: list[pulumi.Resource] = []
        if cfg.stack == "kube-prometheus-stack":
            stack.append(k8s.helm.v3.Release(
                f"{name}-kube-prometheus-stack", name="kube-prometheus-stack", chart="kube-prometheus-stack",
                version=cfg.kube_prometheus_stack_version, repository_opts={"repo": PROMETHEUS_COMMUNITY_REPO},
                namespace=NAMESPACE, create_namespace=True, values=kube_prometheus_stack_values(), opts=after_nodes))
            self.crds_ready = list(stack)
        after_stack = pulumi.ResourceOptions(**base, depends_on=[args.system_nodes, *stack])
        # The exporter's ServiceMonitor needs the CRDs; it reads the GPUs the device plugin exposes.
        k8s.helm.v3.Release(
            f"{name}-dcgm-exporter", name="dcgm-exporter", chart="dcgm-exporter", version=cfg.dcgm_exporter_version,
            repository_opts={"repo": DCGM_EXPORTER_REPO}, namespace=NAMESPACE, create_namespace=True,
            values=dcgm_exporter_values(),
            opts=pulumi.ResourceOptions(**base, depends_on=[args.system_nodes, *stack, *args.device_plugins]))
        k8s.helm.v3.Release(
            f"{name}-prometheus-adapter", name="prometheus-adapter", chart="prometheus-adapter",
            version=cfg.prometheus_adapter_version, repository_opts={"repo": PROMETHEUS_COMMUNITY_REPO},
            namespace=NAMESPACE, create_namespace=True, values=prometheus_adapter_values(cfg.prometheus_url),
            opts=after_stack)
        self.register_outputs({"stack": cfg.stack})
