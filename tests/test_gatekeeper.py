"""The gatekeeper: its decisions on API objects shaped as the Kubernetes API returns them, the calls that carry
them out, that its Role grants exactly those calls, its HTTP client, and its Deployment's hardening."""

from __future__ import annotations

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import synth_stack
from workloads import gatekeeper as manifests
from workloads.entrypoints import gatekeeper

API = json.loads((Path(__file__).parent / "fixtures" / "gatekeeper_api.json").read_text())
NS = "nemo"
NOW = "2026-12-06T05:00:10Z"
TRAINING_MARKER = "/fsx/checkpoints/7b-lora-0123456789/TRAINING_COMPLETE"
CONVERSION_MARKER = "/fsx/models/7b-lora-0123456789/engine-9f8e7d6c/CONVERSION_COMPLETE"


def pods() -> list[dict]:
    return copy.deepcopy(API["pods"]["items"])


def pod(name_prefix: str) -> dict:
    [found] = [p for p in pods() if p["metadata"]["name"].startswith(name_prefix)]
    return found


def upstreams(training_failed: bool = False) -> dict:
    pytorchjobs = copy.deepcopy(API["pytorchjobs"])
    if training_failed:
        pytorchjobs["items"][0]["status"] = copy.deepcopy(API["pytorchjob_failed_status"])
    return gatekeeper.upstream_index(pytorchjobs, copy.deepcopy(API["jobs"]))


class Fsx:
    """The shared volume as the controller sees it: paths that exist, and their text."""

    def __init__(self, files: dict[str, str] | None = None):
        self.files = dict(files or {})

    def exists(self, path: str) -> bool:
        return path in self.files

    def read(self, path: str) -> str:
        return self.files.get(path, "")


def decide(p: dict, fsx: Fsx, index: dict | None = None):
    return gatekeeper.decide(p, fsx.exists, fsx.read, upstreams() if index is None else index)


# ------------------------------------------------------------------------------------------------ decisions


def test_a_gated_pod_waits_while_its_input_is_missing():
    # Nothing has failed: the conversion Job runs (the fixture's failed one left out).
    running = {key: obj for key, obj in upstreams().items() if not key.startswith("Job/convert-")}
    assert decide(pod("eval-"), Fsx(), running) is None
    assert decide(pod("triton-"), Fsx(), running) is None
    assert gatekeeper.decide_all(pods(), Fsx().exists, Fsx().read, running) == []


def test_the_gate_is_removed_once_the_marker_exists():
    fsx = Fsx({TRAINING_MARKER: '{"completed_at": "2026-12-06T04:00:00Z", "run_id": "7b-lora-0123456789"}'})
    decision = decide(pod("eval-"), fsx)
    assert decision.action == "release" and "7b-lora-0123456789" in decision.reason
    [call] = gatekeeper.requests_for(NS, pods(), [decision], NOW)
    assert (call.method, call.path) == ("PATCH", f"/api/v1/namespaces/{NS}/pods/{decision.pod}")
    assert call.content_type == "application/json-patch+json"
    # Optimistic concurrency, then the only gate goes (a gate can be removed, never added back).
    assert call.body == [{"op": "test", "path": "/metadata/resourceVersion", "value": "918201"},
                         {"op": "remove", "path": "/spec/schedulingGates"}]


def test_only_our_gate_is_removed():
    fsx = Fsx({CONVERSION_MARKER: "{}"})
    decision = decide(pod("triton-"), fsx)
    [call] = gatekeeper.requests_for(NS, pods(), [decision], NOW)
    assert call.body[1] == {"op": "replace", "path": "/spec/schedulingGates",
                            "value": [{"name": "example.com/other-gate"}]}


def test_a_failure_marker_fails_a_jobs_pod_with_the_upstreams_reason():
    fsx = Fsx({f"{TRAINING_MARKER}.failed": json.dumps({"completed_at": NOW, "error": "NCCL watchdog timeout on rank 12"})})
    decision = decide(pod("eval-"), fsx)
    assert decision.action == "fail" and "NCCL watchdog timeout on rank 12" in decision.reason
    calls = gatekeeper.requests_for(NS, pods(), [decision], NOW, suffix=lambda: "abc")
    pod_event, job_event, status = calls
    # Events first (on the pod and on its Job), then the status the Job's podFailurePolicy matches.
    assert pod_event.method == job_event.method == "POST" and pod_event.path == f"/api/v1/namespaces/{NS}/events"
    assert pod_event.body["involvedObject"] == {"apiVersion": "v1", "kind": "Pod", "name": decision.pod,
                                                "namespace": NS, "uid": "5f0c8f5e-1d0b-4a57-9c55-2a1f3e0c9d11"}
    assert job_event.body["involvedObject"]["kind"] == "Job"
    assert job_event.body["involvedObject"]["name"] == "eval-7b-lora-0123456789-1a2b3c4d"
    for event in (pod_event, job_event):
        assert event.body["type"] == "Warning" and event.body["reason"] == "UpstreamFailed"
        assert "NCCL watchdog timeout on rank 12" in event.body["message"]
    assert status.path == f"/api/v1/namespaces/{NS}/pods/{decision.pod}/status"
    assert status.content_type == "application/strategic-merge-patch+json"
    assert status.body["status"]["phase"] == "Failed"
    assert "NCCL watchdog timeout on rank 12" in status.body["status"]["message"]
    [condition] = status.body["status"]["conditions"]
    assert condition["type"] == gatekeeper.CONDITION == "nemo-eks/UpstreamFailed" and condition["status"] == "True"


def test_a_failed_upstream_job_fails_the_downstream_even_without_a_marker():
    decision = decide(pod("eval-"), Fsx(), upstreams(training_failed=True))
    assert decision.action == "fail"
    assert decision.reason == ("PyTorchJob/train-7b-lora-0123456789 failed: Job train-7b-lora-0123456789 has failed "
                               "because it has reached the specified backoff limit")
    # A running upstream is not a failure.
    assert decide(pod("eval-"), Fsx(), upstreams(training_failed=False)) is None


def test_a_deployments_pod_is_held_not_failed_when_the_conversion_failed():
    # The conversion Job in the fixture failed by its backoff limit (FailureTarget and Failed).
    decision = decide(pod("triton-"), Fsx())
    assert decision.action == "hold" and "Job has reached the specified backoff limit" in decision.reason
    pod_event, replica_set_event, status = gatekeeper.requests_for(NS, pods(), [decision], NOW)
    assert replica_set_event.body["involvedObject"]["kind"] == "ReplicaSet"
    assert "phase" not in status.body["status"]  # it stays Pending and gated: the ReplicaSet does not replace it
    assert status.body["status"]["conditions"][0]["type"] == gatekeeper.CONDITION


def test_a_recorded_failure_is_not_reported_again_but_a_later_marker_still_releases():
    held = pod("triton-")
    held["status"]["conditions"].append({"type": gatekeeper.CONDITION, "status": "True", "reason": "UpstreamFailed",
                                         "message": "x", "lastProbeTime": None, "lastTransitionTime": NOW})
    assert decide(held, Fsx()) is None  # no new events on every pass
    assert decide(held, Fsx({CONVERSION_MARKER: "{}"})).action == "release"  # a re-run conversion succeeded


def test_pods_that_are_not_gated_or_not_pending_are_left_alone():
    running = pod("train-")
    assert decide(running, Fsx({TRAINING_MARKER: "{}"})) is None
    failed = pod("eval-")
    failed["status"]["phase"] = "Failed"
    assert decide(failed, Fsx({f"{TRAINING_MARKER}.failed": "{}"})) is None
    foreign = pod("eval-")
    foreign["metadata"]["annotations"] = {}
    assert decide(foreign, Fsx({TRAINING_MARKER: "{}"})) is None


def test_failure_marker_text_is_read_for_people():
    assert gatekeeper.marker_reason('{"completed_at": "x", "error": "bad data: line 3"}') == "bad data: line 3"
    assert gatekeeper.marker_reason("plain words\n") == "plain words"
    assert gatekeeper.marker_reason("") == "(no message)"
    assert len(gatekeeper.clip("x" * 5000)) == gatekeeper.MESSAGE_LIMIT


def test_metrics_report_failed_jobs_by_component():
    text = gatekeeper.metrics_text(upstreams(training_failed=True))
    assert ('nemo_pipeline_job_failed{kind="PyTorchJob",name="train-7b-lora-0123456789",component="training",'
            'run_id="7b-lora-0123456789"} 1') in text
    assert 'name="convert-7b-lora-0123456789-9f8e7d6c",component="conversion",run_id="7b-lora-0123456789"} 1' in text
    assert 'name="eval-7b-lora-0123456789-1a2b3c4d",component="evaluation",run_id="7b-lora-0123456789"} 0' in text
    assert "# TYPE nemo_pipeline_job_failed gauge" in text


# ------------------------------------------------------------------------------------------------ RBAC


class RecordingApi:
    """The API as the controller uses it, answering from the fixture and recording every call."""

    def __init__(self, training_failed: bool = False):
        self.calls: list[tuple[str, str, object, str]] = []
        self.pytorchjobs = copy.deepcopy(API["pytorchjobs"])
        if training_failed:
            self.pytorchjobs["items"][0]["status"] = copy.deepcopy(API["pytorchjob_failed_status"])

    def list(self, path: str):
        self.calls.append(("GET", path, None, ""))
        if path.endswith("/pods"):
            return copy.deepcopy(API["pods"])
        return copy.deepcopy(API["jobs"]) if path.endswith("/jobs") else copy.deepcopy(self.pytorchjobs)

    def call(self, method, path, body=None, content_type="application/json"):
        self.calls.append((method, path, body, content_type))
        return {}


VERBS = {"GET": "list", "PATCH": "patch", "POST": "create"}


def permission(method: str, path: str) -> tuple[str, str, str]:
    """(apiGroup, resource, verb) of a namespaced API path."""
    parts = path.strip("/").split("/")
    group = "" if parts[0] == "api" else parts[1]
    rest = parts[parts.index("namespaces") + 2:]
    resource = rest[0] + (f"/{rest[2]}" if len(rest) == 3 else "")
    return group, resource, VERBS[method]


def granted(role: dict) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def test_the_role_grants_exactly_the_calls_the_controller_makes():
    used: set[tuple[str, str, str]] = set()
    for training_failed, files in ((False, {TRAINING_MARKER: "{}"}), (True, {})):
        api = RecordingApi(training_failed)
        gatekeeper.sync(api, NS, gatekeeper.Health(), exists=Fsx(files).exists, read=Fsx(files).read)
        used |= {permission(method, path.split("?")[0]) for method, path, _, _ in api.calls}
        assert all(path.split("?")[0].startswith((f"/api/v1/namespaces/{NS}/", f"/apis/"))
                   and f"/namespaces/{NS}/" in path for _, path, _, _ in api.calls)
    role = manifests.role_manifest(NS)
    assert used == granted(role)
    assert role["kind"] == "Role" and role["metadata"]["namespace"] == NS  # the pipeline namespace only


def test_a_pass_releases_fails_and_holds_as_decided():
    api = RecordingApi(training_failed=True)
    health = gatekeeper.Health()
    gatekeeper.sync(api, NS, health, exists=Fsx().exists, read=Fsx().read)
    writes = [(m, p) for m, p, _, _ in api.calls if m != "GET"]
    assert ("PATCH", f"/api/v1/namespaces/{NS}/pods/eval-7b-lora-0123456789-1a2b3c4d-x7k2p/status") in writes
    assert ("PATCH", f"/api/v1/namespaces/{NS}/pods/triton-6d9f7c8b5-q2w4e/status") in writes
    assert not any(p.endswith("train-7b-lora-0123456789-master-0") for _, p in writes)
    assert health.last_sync > 0 and "nemo_pipeline_job_failed" in health.metrics


def test_gatekeeper_rbac_in_every_stack(stack_synth):
    cfg_namespace = "nemo"
    rendered = [m for m in stack_synth.manifests() if m["metadata"].get("name") == manifests.NAME]
    kinds = {m["kind"] for m in rendered}
    assert kinds == {"ServiceAccount", "Role", "RoleBinding", "Deployment"}  # no ClusterRole
    [binding] = [m for m in rendered if m["kind"] == "RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": manifests.NAME}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": manifests.NAME, "namespace": cfg_namespace}]
    [role] = [m for m in rendered if m["kind"] == "Role"]
    assert not any("*" in rule["verbs"] or "*" in rule["resources"] for rule in role["rules"])


# ------------------------------------------------------------------------------------------------ the Deployment


def test_the_controller_runs_small_pinned_and_unprivileged():
    deployment = manifests.deployment_manifest(NS)
    pod_spec = deployment["spec"]["template"]["spec"]
    [container] = pod_spec["containers"]
    assert "@sha256:" in container["image"] and ":latest" not in container["image"]
    assert pod_spec["nodeSelector"] == {"nemo-eks/node-role": "system"} and "tolerations" not in pod_spec
    assert not any("nvidia.com/gpu" in amounts for amounts in container["resources"].values())
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] != 0 and security["readOnlyRootFilesystem"]
    assert security["capabilities"] == {"drop": ["ALL"]} and not security["allowPrivilegeEscalation"]
    assert {"name": "fsx", "mountPath": "/fsx", "readOnly": True} in container["volumeMounts"]
    assert pod_spec["serviceAccountName"] == manifests.NAME
    # The API token only where it is used: an expiring projected token at the path the client reads.
    assert pod_spec["automountServiceAccountToken"] is False
    [token] = [v for v in pod_spec["volumes"] if v["name"] == "api-token"]
    assert {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}} in token["projected"]["sources"]
    assert {"name": "api-token", "mountPath": gatekeeper.SERVICE_ACCOUNT, "readOnly": True} in container["volumeMounts"]
    assert container["args"][:3] == ["/opt/nemo-eks/gatekeeper.py", "--namespace", NS]
    assert float(container["args"][4]) <= 30  # a released stage starts within a minute of its marker
    assert deployment["spec"]["replicas"] == 1


def test_a_changed_controller_script_rolls_the_controller(monkeypatch, tmp_path):
    before = manifests.deployment_manifest(NS)["spec"]["template"]["metadata"]["annotations"]
    changed = tmp_path / "gatekeeper.py"
    changed.write_text(Path(gatekeeper.__file__).read_text() + "\n# changed\n")
    monkeypatch.setattr(gatekeeper, "__file__", str(changed))
    after = manifests.deployment_manifest(NS)["spec"]["template"]["metadata"]["annotations"]
    assert before != after


def test_the_gatekeeper_is_declared_before_the_gated_stages():
    s = synth_stack("prod")
    gate = "nemo-eks-prod-pipeline-gatekeeper"
    for token, name in (("kubernetes:kubeflow.org/v1:PyTorchJob", "training"), ("kubernetes:batch/v1:Job", "evaluation"),
                        ("kubernetes:batch/v1:Job", "conversion"), ("kubernetes:apps/v1:Deployment", "triton")):
        resource = s.one(token, f"nemo-eks-prod-pipeline-{name}")
        assert gate in {s.name_of(u) for u in resource.depends_on}, name


# ------------------------------------------------------------------------------------------------ the HTTP client


@pytest.fixture
def api_server(tmp_path, monkeypatch):
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            seen.append({"method": self.command, "path": self.path, "auth": self.headers["Authorization"],
                         "type": self.headers["Content-Type"],
                         "body": json.loads(self.rfile.read(length)) if length else None})
            body = json.dumps({"kind": "PodList", "items": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PATCH = do_POST = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "token").write_text("token-1\n")
    api = gatekeeper.Api.__new__(gatekeeper.Api)
    api.base, api.account, api.context, api.timeout = f"http://127.0.0.1:{server.server_port}", str(tmp_path), None, 5
    yield api, seen, tmp_path
    server.shutdown()


def test_the_client_sends_the_current_token_and_the_patch_type(api_server):
    api, seen, account = api_server
    assert api.list(f"/api/v1/namespaces/{NS}/pods") == {"kind": "PodList", "items": []}
    (account / "token").write_text("token-2")  # the kubelet rotated the projected token
    api.call("PATCH", f"/api/v1/namespaces/{NS}/pods/p", [{"op": "remove", "path": "/spec/schedulingGates"}],
             "application/json-patch+json")
    first, second = seen
    assert first["path"] == f"/api/v1/namespaces/{NS}/pods?labelSelector=app.kubernetes.io%2Fpart-of%3Dnemo-eks"
    assert first["auth"] == "Bearer token-1" and second["auth"] == "Bearer token-2"
    assert second["type"] == "application/json-patch+json" and second["body"][0]["op"] == "remove"
