"""What operators watch: the pipeline's scrape targets, its alerts and its Grafana dashboard, as manifests.

The metric names here are the ones the exporters really emit (tests check each against its exporter):
- DCGM exporter (NVIDIA dcgm-exporter, default counters etc/default-counters.csv): DCGM_FI_DEV_GPU_UTIL (%),
  DCGM_FI_DEV_FB_USED and DCGM_FI_DEV_FB_FREE (MiB), labelled with the pod and namespace using the GPU.
- Triton (server docs/user_guide/metrics.md): nv_inference_request_success, nv_inference_request_failure,
  nv_inference_queue_duration_us (cumulative counters).
- kube-state-metrics (in kube-prometheus-stack): kube_pod_container_status_restarts_total, kube_pod_status_phase,
  kube_pod_status_unschedulable (1 while the pod's PodScheduled condition is False, whatever the reason:
  internal/store/pod.go), kube_pod_container_resource_requests (resource label sanitized: nvidia.com/gpu ->
  nvidia_com_gpu, SanitizeLabelName in internal/store/utils.go), kube_pod_status_reason{reason="SchedulingGated"}
  (from v2.19.0; older versions have no such series, and a gated GPU pod then counts as pending too).
- Cluster Autoscaler (cluster-autoscaler/metrics/metrics.go at cluster-autoscaler-1.34.5, namespace
  cluster_autoscaler): failed_scale_ups_total{reason}, unschedulable_pods_count{type}, and with
  --emit-per-nodegroup-metrics node_group_target_count{node_group} and node_group_backoff_status{node_group,reason}.
- Ours: workloads/entrypoints/training_metrics.py (nemo_training_*, nemo_validation_loss,
  nemo_throughput_tokens_per_sec, nemo_step_time_seconds), evaluate.py (nemo_eval_*) and gatekeeper.py
  (nemo_pipeline_job_failed).
"""

from __future__ import annotations

import json
from typing import Any

from infra.config import MonitoringConfig
from workloads import pods
from workloads.entrypoints import gatekeeper

TRAINING_METRICS_PORT = 9401
RUNBOOK = "https://github.com/nemo-eks/nemo-eks/blob/main/docs/runbook.md#runbook-{}"
DASHBOARD_LABEL = {"grafana_dashboard": "1"}  # kube-prometheus-stack's Grafana sidecar loads these ConfigMaps

GPU_UTIL = "DCGM_FI_DEV_GPU_UTIL"
GPU_FB_USED = "DCGM_FI_DEV_FB_USED"
GPU_FB_FREE = "DCGM_FI_DEV_FB_FREE"
TRITON_SUCCESS = "nv_inference_request_success"
TRITON_FAILURE = "nv_inference_request_failure"
TRITON_QUEUE_US = "nv_inference_queue_duration_us"
TRAINING_LOSS = "nemo_training_loss"
VALIDATION_LOSS = "nemo_validation_loss"
THROUGHPUT = "nemo_throughput_tokens_per_sec"
STEP_TIME = "nemo_step_time_seconds"
TRAINING_STEP = "nemo_training_step"
JOB_FAILED = gatekeeper.JOB_FAILED  # served by the gatekeeper (entrypoints/gatekeeper.py, metrics_text)
POD_UNSCHEDULABLE = "kube_pod_status_unschedulable"
POD_REQUESTS = "kube_pod_container_resource_requests"
POD_STATUS_REASON = "kube_pod_status_reason"
CA_FAILED_SCALE_UPS = "cluster_autoscaler_failed_scale_ups_total"
CA_GROUP_TARGET = "cluster_autoscaler_node_group_target_count"
CA_GROUP_BACKOFF = "cluster_autoscaler_node_group_backoff_status"


def pending_gpu_pods() -> str:
    """Pods in any namespace that ask for GPUs and have no node: nothing fits them (no GPU node, or the autoscaler
    cannot get one). Pods held back on purpose by a scheduling gate are not waiting for capacity."""
    return (f"(max by (namespace, pod) ({POD_UNSCHEDULABLE}) == 1)"
            f" and on (namespace, pod) (sum by (namespace, pod) ({POD_REQUESTS}{{resource=\"nvidia_com_gpu\"}}) > 0)"
            f" unless on (namespace, pod) ({POD_STATUS_REASON}{{reason=\"SchedulingGated\"}} == 1)")


def pod_monitor_manifest(namespace: str) -> dict[str, Any]:
    """Training pods (port 9401, our exporter on global rank 0), the evaluation pod (port 9400, while it
    lingers) and the gatekeeper (port 9402, nemo_pipeline_job_failed) are scraped directly: they have no Service."""
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
            "metadata": {"name": "nemo-pipeline", "namespace": namespace, "labels": pods.labels("monitoring")},
            "spec": {
                "selector": {"matchExpressions": [{"key": "app.kubernetes.io/component", "operator": "In",
                                                    "values": ["training", "evaluation", "gatekeeper"]},
                                                   {"key": "app.kubernetes.io/part-of", "operator": "In",
                                                    "values": [pods.PART_OF]}]},
                "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics", "interval": "30s"}],
            }}


def alert_rules(namespace: str, cfg: MonitoringConfig) -> list[dict[str, Any]]:
    training = f'namespace="{namespace}", pod=~"train-.+"'
    window = f"{cfg.loss_window_minutes}m"
    queue_ms = (f"sum by (namespace, pod) (rate({TRITON_QUEUE_US}{{namespace=\"{namespace}\"}}[5m])) / 1000"
                f" / clamp_min(sum by (namespace, pod) (rate({TRITON_SUCCESS}{{namespace=\"{namespace}\"}}[5m])), 1e-9)")
    failure_ratio = (f"sum by (namespace, pod) (rate({TRITON_FAILURE}{{namespace=\"{namespace}\"}}[5m]))"
                     f" / clamp_min(sum by (namespace, pod) (rate({TRITON_SUCCESS}{{namespace=\"{namespace}\"}}[5m]))"
                     f" + sum by (namespace, pod) (rate({TRITON_FAILURE}{{namespace=\"{namespace}\"}}[5m])), 1e-9)")

    def rule(name: str, expr: str, duration: str, severity: str, summary: str) -> dict[str, Any]:
        return {"alert": name, "expr": expr, "for": duration, "labels": {"severity": severity},
                "annotations": {"summary": summary, "runbook_url": RUNBOOK.format(name.lower())}}

    return [
        rule("NemoGpuUtilizationLow",
             f"avg by (namespace, pod) ({GPU_UTIL}{{{training}}}) < 80"
             f" and on (namespace, pod) (kube_pod_status_phase{{{training}, phase=\"Running\"}} == 1)",
             "15m", "warning", "GPUs of training pod {{ $labels.pod }} are under 80% busy"),
        rule("NemoGpuMemoryHigh",
             f"max by (namespace, pod, gpu) ({GPU_FB_USED}{{namespace=\"{namespace}\"}}"
             f" / ({GPU_FB_USED}{{namespace=\"{namespace}\"}} + {GPU_FB_FREE}{{namespace=\"{namespace}\"}})) > 0.95",
             "5m", "warning", "GPU {{ $labels.gpu }} of {{ $labels.pod }} has over 95% of its memory in use"),
        rule("NemoTrainingLossNotFalling",
             f"avg_over_time({TRAINING_LOSS}[{window}]) >= avg_over_time({TRAINING_LOSS}[{window}] offset {window})"
             f" and on (run_id) (delta({TRAINING_STEP}[{window}]) > 0)",
             "30m", "warning", "Training loss of run {{ $labels.run_id }} has not fallen over " + window),
        rule("NemoValidationLossDiverging",
             f"({VALIDATION_LOSS} / {TRAINING_LOSS} > 1.25) and on (run_id) (deriv({VALIDATION_LOSS}[1h]) > 0)"
             f" and on (run_id) (deriv({TRAINING_LOSS}[1h]) <= 0)",
             "30m", "warning", "Validation loss of run {{ $labels.run_id }} rises while training loss falls"),
        rule("NemoThroughputDropped",
             f"{THROUGHPUT} < {1 - cfg.throughput_drop_fraction:.2f} * avg_over_time({THROUGHPUT}[6h] offset 15m)",
             "15m", "warning",
             f"Training throughput of run {{{{ $labels.run_id }}}} is {cfg.throughput_drop_fraction:.0%} below its 6-hour average"),
        rule("NemoTrainingPodRestarting",
             f"increase(kube_pod_container_status_restarts_total{{{training}}}[30m]) > 0",
             "0m", "warning", "Training pod {{ $labels.pod }} restarted"),
        # The gatekeeper reads every pipeline PyTorchJob's and Job's Failed condition (the training operator's
        # own failure counter misses backoff-limit failures: common/job.go never increments it).
        rule("NemoTrainingFailed",
             f"max by (namespace, name, run_id) ({JOB_FAILED}{{namespace=\"{namespace}\", component=\"training\"}}) == 1",
             "0m", "critical", "Training run {{ $labels.run_id }} ({{ $labels.name }}) failed for good"),
        rule("NemoPipelineStageFailed",
             f"max by (namespace, name, component) ({JOB_FAILED}{{namespace=\"{namespace}\", "
             f"component=~\"evaluation|conversion\"}}) == 1",
             "0m", "warning", "{{ $labels.component }} Job {{ $labels.name }} failed"),
        rule("NemoTritonRequestFailures", f"{failure_ratio} > {cfg.triton_failure_ratio}",
             "5m", "critical", f"Over {cfg.triton_failure_ratio:.1%} of requests to {{{{ $labels.pod }}}} fail"),
        rule("NemoTritonQueueTimeHigh", f"{queue_ms} > {cfg.triton_queue_time_ms}",
             "10m", "warning", f"Requests wait over {cfg.triton_queue_time_ms} ms in {{{{ $labels.pod }}}}'s queue"),
        rule("NemoGpuPodPending", pending_gpu_pods(), f"{cfg.pending_gpu_pod_minutes}m", "warning",
             f"GPU pod {{{{ $labels.namespace }}}}/{{{{ $labels.pod }}}} has waited over {cfg.pending_gpu_pod_minutes} "
             "minutes for a node"),
    ]


def prometheus_rule_manifest(namespace: str, cfg: MonitoringConfig) -> dict[str, Any]:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "nemo-pipeline", "namespace": namespace, "labels": pods.labels("monitoring")},
            "spec": {"groups": [{"name": "nemo-pipeline", "rules": alert_rules(namespace, cfg)}]}}


def _panel(panel_id: int, title: str, exprs: list[tuple[str, str]], unit: str, x: int, y: int) -> dict[str, Any]:
    return {"id": panel_id, "type": "timeseries", "title": title,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
                        for i, (expr, legend) in enumerate(exprs)]}


def dashboard(namespace: str) -> dict[str, Any]:
    """The seed's monitoring table, panel by panel, plus Triton and the evaluation."""
    ns = f'namespace="{namespace}"'
    panels = [
        ("Training loss (keeps falling)", [(TRAINING_LOSS, "{{run_id}}")], "none"),
        ("Validation loss (tracks training loss)", [(VALIDATION_LOSS, "validation {{run_id}}"),
                                                   (TRAINING_LOSS, "training {{run_id}}")], "none"),
        ("GPU utilization (> 80%)", [(f"avg by (pod) ({GPU_UTIL}{{{ns}}})", "{{pod}}")], "percent"),
        ("GPU memory used (< 95%)", [(f"max by (pod) ({GPU_FB_USED}{{{ns}}} / ({GPU_FB_USED}{{{ns}}} + {GPU_FB_FREE}{{{ns}}}))",
                                      "{{pod}}")], "percentunit"),
        ("Throughput (tokens/s)", [(THROUGHPUT, "{{run_id}}")], "short"),
        ("Step time", [(STEP_TIME, "{{run_id}}")], "s"),
        ("Triton queue time per request", [(f"sum by (pod) (rate({TRITON_QUEUE_US}{{{ns}}}[5m])) / 1000 / clamp_min("
                                            f"sum by (pod) (rate({TRITON_SUCCESS}{{{ns}}}[5m])), 1e-9)", "{{pod}}")], "ms"),
        ("Triton requests", [(f"sum by (pod) (rate({TRITON_SUCCESS}{{{ns}}}[5m]))", "ok {{pod}}"),
                             (f"sum by (pod) (rate({TRITON_FAILURE}{{{ns}}}[5m]))", "failed {{pod}}")], "reqps"),
        # The evaluation pod serves its numbers only while it lingers: show the last value of the last 30 days.
        ("Evaluation: validation loss", [("last_over_time(nemo_eval_validation_loss[30d])", "{{model}} {{run_id}}")],
         "none"),
        ("Evaluation: exact match and ROUGE-L", [("last_over_time(nemo_eval_exact_match_ratio[30d])", "exact match {{model}}"),
                                                 ("last_over_time(nemo_eval_rouge_l_f1[30d])", "ROUGE-L {{model}}")],
         "percentunit"),
        ("Pending GPU pods (waiting for a node)", [(f"count({pending_gpu_pods()}) or vector(0)", "pending")], "short"),
        ("GPU nodes: autoscaler target and scale-up failures",
         [(f"max by (node_group) ({CA_GROUP_TARGET})", "target {{node_group}}"),
          (f"max by (node_group, reason) ({CA_GROUP_BACKOFF}) > 0", "backed off {{node_group}} {{reason}}"),
          (f"sum by (reason) (increase({CA_FAILED_SCALE_UPS}[1h]))", "failed scale-ups {{reason}}")], "short"),
    ]
    return {
        "title": "nemo-eks pipeline", "uid": "nemo-eks-pipeline", "schemaVersion": 39, "version": 1,
        "editable": False, "refresh": "30s", "time": {"from": "now-6h", "to": "now"}, "tags": ["nemo-eks"],
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus"}]},
        "panels": [_panel(i + 1, title, exprs, unit, (i % 2) * 12, (i // 2) * 8)
                   for i, (title, exprs, unit) in enumerate(panels)],
    }


def dashboard_configmap_manifest(namespace: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "nemo-eks-dashboard", "namespace": namespace,
                         "labels": {**pods.labels("monitoring"), **DASHBOARD_LABEL}},
            "data": {"nemo-eks-pipeline.json": json.dumps(dashboard(namespace), indent=2)}}
