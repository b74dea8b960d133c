"""Network isolation of the pipeline namespace: the VPC CNI enforces NetworkPolicies, ingress is denied but for
Triton's ports, Prometheus's scrapes and the training job's own pods; egress stays open."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import synth_config, synth_stack
from tests.test_checkov import CHECKOV
from tools import synth
from workloads import serving

RELEASE = "kubernetes:helm.sh/v3:Release"


def policies(s: synth.Synth) -> dict[str, dict]:
    return {m["metadata"]["name"]: m for m in s.manifests() if m["kind"] == "NetworkPolicy"}


def selects(selector: dict, labels: dict) -> bool:
    """A podSelector with matchLabels only (all that these policies use), as the API server reads it."""
    assert set(selector) <= {"matchLabels"}
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def pod_templates(s: synth.Synth) -> dict[str, dict]:
    """Every pod template of the pipeline namespace, by the workload that runs it."""
    templates = {}
    for m in s.manifests():
        if m["metadata"].get("namespace") != "nemo":
            continue
        if m["kind"] in ("Deployment", "Job"):
            templates[m["metadata"]["name"]] = m["spec"]["template"]
        elif m["kind"] == "PyTorchJob":
            for replica, spec in m["spec"]["pytorchReplicaSpecs"].items():
                templates[f"{m['metadata']['name']}/{replica}"] = spec["template"]
    return templates


def container_port(template: dict, name: str) -> int:
    [port] = [p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", []) if p["name"] == name]
    return port


def test_the_vpc_cni_enforces_network_policies(stack_synth):
    [cluster] = stack_synth.resources("eks:index:Cluster")
    assert cluster.inputs["vpcCniOptions"]["enableNetworkPolicy"] is True
    assert not cluster.inputs.get("useDefaultVpcCni")  # pulumi-eks manages the vpc-cni add-on, with the flag


def test_ingress_is_denied_to_every_pod_of_the_namespace_and_egress_is_open(stack_synth):
    found = policies(stack_synth)
    deny = found["default-deny-ingress"]
    assert deny["metadata"]["namespace"] == "nemo"
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": []}
    for policy in found.values():
        assert policy["metadata"]["namespace"] == "nemo"
        assert policy["spec"]["policyTypes"] == ["Ingress"]  # no policy restricts egress (NGC, Hugging Face, S3)


def test_triton_takes_its_ports_from_any_pod_of_the_cluster():
    s = synth_stack("dev")
    allow = policies(s)["allow-triton"]
    [deployment] = [m for m in s.manifests() if m["kind"] == "Deployment" and m["metadata"]["name"] == "triton"]
    template = deployment["spec"]["template"]
    assert selects(allow["spec"]["podSelector"], template["metadata"]["labels"])
    [rule] = allow["spec"]["ingress"]
    assert rule["from"] == [{"namespaceSelector": {}}]
    assert sorted(p["port"] for p in rule["ports"]) == sorted(container_port(template, n) for n in serving.PORTS)
    assert sorted(p["port"] for p in rule["ports"]) == [8000, 8001, 8002]
    # The VPC CNI needs a Service's port to equal the container port it targets (EKS user guide, considerations).
    [service] = [m for m in s.manifests() if m["kind"] == "Service" and m["metadata"]["name"] == "triton"]
    assert {(p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {(v, k) for k, v in serving.PORTS.items()}
    # Only Triton's pods: a training or conversion pod is not opened by this rule.
    opened = [name for name, t in pod_templates(s).items() if selects(allow["spec"]["podSelector"], t["metadata"]["labels"])]
    assert opened == ["triton"]


def test_the_training_job_pods_reach_each_other_on_every_port(stack_synth):
    peers = policies(stack_synth)["allow-training-peers"]
    [job] = [m for m in stack_synth.manifests() if m["kind"] == "PyTorchJob"]
    # The training operator labels each pod with its job's name and its own name; those labels select them.
    expected = {"matchLabels": {"training.kubeflow.org/job-name": job["metadata"]["name"],
                                "training.kubeflow.org/operator-name": "pytorchjob-controller"}}
    assert peers["spec"]["podSelector"] == expected
    assert peers["spec"]["ingress"] == [{"from": [{"podSelector": expected}]}]  # no "ports": all of them


def test_prometheus_scrapes_the_training_evaluation_and_gatekeeper_metrics_ports():
    s = synth_stack("dev")
    found, templates = policies(s), pod_templates(s)
    [stack_release] = [r.inputs for r in s.resources(RELEASE) if r.inputs["chart"] == "kube-prometheus-stack"]
    [monitor] = [m for m in s.manifests() if m["kind"] == "PodMonitor"]
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    for component in ("training", "evaluation", "gatekeeper"):
        allow = found[f"allow-metrics-{component}"]
        scraped = {name: t for name, t in templates.items()
                   if t["metadata"]["labels"]["app.kubernetes.io/component"] == component}
        assert scraped and all(selects(allow["spec"]["podSelector"], t["metadata"]["labels"]) for t in scraped.values())
        [rule] = allow["spec"]["ingress"]
        # The port the PodMonitor scrapes by name, on every pod it scrapes.
        assert [p["port"] for p in rule["ports"]] == sorted({container_port(t, "metrics") for t in scraped.values()})
        # From the Prometheus pods of the release this stack installs, in that release's namespace.
        assert rule["from"] == [{
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": stack_release["namespace"]}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]
    assert found["allow-metrics-training"]["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 9401}]
    assert found["allow-metrics-evaluation"]["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 9400}]
    assert found["allow-metrics-gatekeeper"]["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 9402}]


def test_an_existing_prometheus_may_scrape_from_any_namespace():
    s = synth_config("existing-prometheus", {"nemo-eks:monitoring": {
        "stack": "existing", "prometheusUrl": "http://prometheus.observability.svc:9090"}})
    for component in ("training", "evaluation"):
        [rule] = policies(s)[f"allow-metrics-{component}"]["spec"]["ingress"]
        assert rule["from"] == [{"namespaceSelector": {}}]


def test_no_scrape_rules_without_a_metrics_stack_or_evaluation():
    assert set(policies(synth_config("no-monitoring", {"nemo-eks:monitoring": {"stack": "none"}}))) == {
        "default-deny-ingress", "allow-triton", "allow-training-peers"}
    assert "allow-metrics-evaluation" not in policies(synth_config("no-evaluation", {"nemo-eks:evaluation": {"enabled": False}}))


def test_policies_are_declared_in_the_namespace_they_police():
    s = synth_stack("dev")
    declared = s.resources("kubernetes:networking.k8s.io/v1:NetworkPolicy")
    assert {r.inputs["metadata"]["name"] for r in declared} == set(policies(s))
    for r in declared:
        assert "nemo-eks-dev-addons-namespace" in {s.name_of(u) for u in r.depends_on}


def test_checkov_flags_pipeline_pods_without_the_policies(tmp_path):
    """CKV2_K8S_6 is on: the same manifests without the NetworkPolicies fail it."""
    target = synth.write(synth_stack("dev"), tmp_path)
    for path in (target / "manifests").glob("*-NetworkPolicy-*.yaml"):
        path.unlink()
    result = subprocess.run([str(CHECKOV), "-d", str(target / "manifests"), "--config-file",
                             str(synth.ROOT / ".checkov.yaml"), "--check", "CKV2_K8S_6", "-o", "json"],
                            capture_output=True, text=True, timeout=600)
    report = json.loads(result.stdout)
    failed = {c["check_id"] for r in (report if isinstance(report, list) else [report])
              for c in r["results"]["failed_checks"]}
    assert failed == {"CKV2_K8S_6"}

