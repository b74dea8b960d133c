"""Metrics, alerts and dashboards: valid against the prometheus-operator CRDs, every PromQL expression parses,
and every metric they use is one an exporter really emits."""

from __future__ import annotations

import json

import jsonschema
import promql_parser
import pytest
import yaml

from infra.config import ConfigError, load
from infra.monitoring import QUEUE_TIME_METRIC, prometheus_adapter_values
from tests.conftest import raw_config, synth_config, synth_stack
from tools import synth
from workloads import observability

RELEASE = "kubernetes:helm.sh/v3:Release"

# dcgm-exporter's default counters (etc/default-counters.csv) include these fields, exported under these names.
DCGM_METRICS = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE"}
# Triton's metrics (server docs/user_guide/metrics.md).
TRITON_METRICS = {"nv_inference_request_success", "nv_inference_request_failure", "nv_inference_queue_duration_us"}
# kube-state-metrics, shipped by kube-prometheus-stack.
KUBE_STATE_METRICS = {"kube_pod_container_status_restarts_total", "kube_pod_status_phase", "kube_pod_status_unschedulable",
                      "kube_pod_container_resource_requests", "kube_pod_status_reason"}
# Cluster Autoscaler (cluster-autoscaler/metrics/metrics.go at cluster-autoscaler-1.34.5).
CLUSTER_AUTOSCALER_METRICS = {"cluster_autoscaler_failed_scale_ups_total", "cluster_autoscaler_node_group_target_count",
                              "cluster_autoscaler_node_group_backoff_status"}


def crd_schema(file: str) -> dict:
    crd = yaml.safe_load((synth.ROOT / "schemas" / file).read_text())
    [entry] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return entry["schema"]["openAPIV3Schema"]


def metric_names(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)
        for attr in ("expr", "lhs", "rhs", "vector_selector", "param"):
            child = getattr(node, attr, None)
            if isinstance(child, promql_parser.Expr):
                visit(child)
        for child in getattr(node, "args", None) or []:
            visit(child)

    visit(promql_parser.parse(expr))
    return names


def our_metrics() -> set[str]:
    """The names our exporters emit (their own tests scrape them and check these are what they serve)."""
    from workloads.entrypoints import evaluate, gatekeeper, training_metrics

    return set(training_metrics.METRICS) | set(evaluate.METRICS) | set(gatekeeper.METRICS)


def manifest(s: synth.Synth, kind: str) -> dict:
    [found] = [m for m in s.manifests() if m["kind"] == kind and m["metadata"]["namespace"] == "nemo"]
    return found


def validate(instance: dict, schema_file: str) -> None:
    # Not jsonschema.validate: it checks the schema first, and the upstream CRD has a Go regular expression
    # ('^(?i)(abort|warn)?$') Python's re rejects; it is only evaluated for a field we do not set.
    jsonschema.Draft7Validator(crd_schema(schema_file)).validate(instance)


def test_prometheus_rule_and_pod_monitor_validate_against_their_crds(stack_synth):
    validate(manifest(stack_synth, "PrometheusRule"), "monitoring.coreos.com_prometheusrules.yaml")
    validate(manifest(stack_synth, "PodMonitor"), "monitoring.coreos.com_podmonitors.yaml")
    broken = manifest(stack_synth, "PrometheusRule")
    broken["spec"]["groups"][0]["rules"][0]["for"] = 15
    with pytest.raises(jsonschema.ValidationError):
        validate(broken, "monitoring.coreos.com_prometheusrules.yaml")


def test_every_expression_parses_and_uses_real_metrics():
    s = synth_stack("prod")
    expressions = [rule["expr"] for group in manifest(s, "PrometheusRule")["spec"]["groups"] for rule in group["rules"]]
    board = json.loads(next(m for m in s.manifests() if m["metadata"]["name"] == "nemo-eks-dashboard")["data"]["nemo-eks-pipeline.json"])
    expressions += [target["expr"] for panel in board["panels"] for target in panel["targets"]]
    known = DCGM_METRICS | TRITON_METRICS | KUBE_STATE_METRICS | CLUSTER_AUTOSCALER_METRICS | our_metrics()
    used: set[str] = set()
    for expr in expressions:
        used |= metric_names(expr)
    assert used and used <= known, used - known
    # Every metric of the seed's monitoring table is alerted on and on the dashboard.
    for name in ("nemo_training_loss", "nemo_validation_loss", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED",
                 "nemo_throughput_tokens_per_sec"):
        assert name in used


def test_a_broken_expression_is_caught():
    with pytest.raises(ValueError):
        promql_parser.parse("sum(rate(nv_inference_request_success[5m])")


def test_alerts_cover_the_issue_list_and_have_runbooks():
    rules = {r["alert"]: r for r in observability.alert_rules("nemo", load(raw_config(), "dev").pipeline.monitoring)}
    assert set(rules) == {"NemoGpuUtilizationLow", "NemoGpuMemoryHigh", "NemoTrainingLossNotFalling",
                          "NemoValidationLossDiverging", "NemoThroughputDropped", "NemoTrainingPodRestarting",
                          "NemoTritonRequestFailures", "NemoTritonQueueTimeHigh", "NemoTrainingFailed",
                          "NemoPipelineStageFailed", "NemoGpuPodPending"}
    assert rules["NemoGpuUtilizationLow"]["for"] == "15m" and "< 80" in rules["NemoGpuUtilizationLow"]["expr"]
    assert "> 0.95" in rules["NemoGpuMemoryHigh"]["expr"]
    runbook = (synth.ROOT / "docs" / "runbook.md").read_text()
    for name, rule in rules.items():
        url, anchor = rule["annotations"]["runbook_url"].rsplit("#", 1)
        assert url.endswith("/docs/runbook.md"), url
        assert f'<a id="{anchor}"></a>' in runbook, name


def test_alert_thresholds_come_from_config():
    cfg = load(raw_config({"nemo-eks:monitoring": {"throughputDropFraction": 0.5, "tritonQueueTimeMs": 250,
                                                   "lossWindowMinutes": 120}}), "dev")
    rules = {r["alert"]: r["expr"] for r in observability.alert_rules("nemo", cfg.pipeline.monitoring)}
    assert "0.50 * avg_over_time" in rules["NemoThroughputDropped"]
    assert rules["NemoTritonQueueTimeHigh"].endswith("> 250")
    assert "[120m] offset 120m" in rules["NemoTrainingLossNotFalling"]


def test_dashboard_is_provisioned_through_a_configmap():
    s = synth_stack("dev")
    [board] = [m for m in s.manifests() if m["metadata"]["name"] == "nemo-eks-dashboard"]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(board["data"]["nemo-eks-pipeline.json"])
    titles = [p["title"] for p in dashboard["panels"]]
    assert len(titles) == len(set(titles)) >= 8
    assert len({p["id"] for p in dashboard["panels"]}) == len(titles)


def test_metrics_stack_releases():
    s = synth_stack("dev")
    releases = {r.inputs["chart"]: r for r in s.resources(RELEASE)}
    kps, dcgm, adapter = releases["kube-prometheus-stack"], releases["dcgm-exporter"], releases["prometheus-adapter"]
    assert kps.inputs["version"] == "85.1.2" and dcgm.inputs["version"] == "4.8.2" and adapter.inputs["version"] == "5.3.0"
    spec = kps.inputs["values"]["prometheus"]["prometheusSpec"]
    assert spec["podMonitorSelectorNilUsesHelmValues"] is False and spec["ruleSelectorNilUsesHelmValues"] is False
    assert dcgm.inputs["values"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    tolerated = {(t["key"], t["effect"]) for t in dcgm.inputs["values"]["tolerations"]}
    # the exporter must run on a new node before the FSx agent clears its start-up taint
    assert {("nvidia.com/gpu", "NoSchedule"), ("fsx.csi.aws.com/agent-not-ready", "NoExecute")} <= tolerated
    [rule] = adapter.inputs["values"]["rules"]["custom"]
    assert rule["name"]["as"] == QUEUE_TIME_METRIC  # what the HPA asks for
    hpa = next(m for m in s.manifests() if m["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == QUEUE_TIME_METRIC
    assert adapter.inputs["values"]["prometheus"] == {"url": "http://kube-prometheus-stack-prometheus.monitoring.svc",
                                                      "port": 9090, "path": ""}
    # Monitors wait for the CRDs the stack installs.
    rule_resource = s.one("kubernetes:monitoring.coreos.com/v1:PrometheusRule", "nemo-eks-dev-pipeline-alerts")
    assert "nemo-eks-dev-monitoring-kube-prometheus-stack" in {s.name_of(u) for u in rule_resource.depends_on}


def test_training_pods_expose_their_metrics_port():
    job = next(m for m in synth_stack("dev").manifests() if m["kind"] == "PyTorchJob")
    [container] = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    assert {"name": "metrics", "containerPort": observability.TRAINING_METRICS_PORT} in container["ports"]


def test_existing_prometheus():
    s = synth_config("existing-prometheus", {"nemo-eks:monitoring": {
        "stack": "existing", "prometheusUrl": "http://prometheus.observability.svc:9090"}})
    charts = {r.inputs["chart"] for r in s.resources(RELEASE)}
    assert "kube-prometheus-stack" not in charts and {"dcgm-exporter", "prometheus-adapter"} <= charts
    adapter = next(r for r in s.resources(RELEASE) if r.inputs["chart"] == "prometheus-adapter")
    assert adapter.inputs["values"]["prometheus"] == {"url": "http://prometheus.observability.svc", "port": 9090,
                                                      "path": ""}
    assert s.resources("kubernetes:monitoring.coreos.com/v1:PrometheusRule")


def rendered_prometheus_url(values: dict) -> str:
    """What prometheus-adapter 5.3.0's deployment template makes of the values: url, ':port' if a port is set,
    then path (charts/prometheus-adapter/templates/deployment.yaml)."""
    prometheus = {"port": 9090, "path": "", **values["prometheus"]}  # the chart's values.yaml defaults
    return prometheus["url"] + (f":{prometheus['port']}" if prometheus["port"] else "") + prometheus["path"]


@pytest.mark.parametrize("given,rendered", [
    ("https://amp.example.com/workspaces/ws-1", "https://amp.example.com:443/workspaces/ws-1"),
    ("http://prometheus.observability.svc:9090", "http://prometheus.observability.svc:9090"),
    ("http://thanos-query.monitoring.svc:10902/prefix/", "http://thanos-query.monitoring.svc:10902/prefix/"),
    ("http://kube-prometheus-stack-prometheus.monitoring.svc:9090", "http://kube-prometheus-stack-prometheus.monitoring.svc:9090"),
])
def test_prometheus_adapter_gets_the_url_the_chart_can_render(given, rendered):
    assert rendered_prometheus_url(prometheus_adapter_values(given)) == rendered


def test_existing_prometheus_needs_its_url():
    with pytest.raises(ConfigError) as caught:
        load(raw_config({"nemo-eks:monitoring": {"stack": "existing"}}), "dev")
    assert caught.value.key == "nemo-eks:monitoring.prometheusUrl"


def test_no_metrics_stack():
    s = synth_config("no-monitoring", {"nemo-eks:monitoring": {"stack": "none"}})
    assert not s.resources("kubernetes:monitoring.coreos.com/v1:PrometheusRule")
    assert not any(r.inputs["chart"] in ("kube-prometheus-stack", "dcgm-exporter") for r in s.resources(RELEASE))
