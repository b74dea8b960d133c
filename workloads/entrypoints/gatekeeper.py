"""Release a pipeline pod's scheduling gate once its input exists on FSx; fail it when its upstream failed.

    python3 /opt/nemo-eks/gatekeeper.py --namespace NS [--interval-seconds 15] [--port 9402] [--once]

A GPU pod that waits for an upstream stage must hold no GPU while it waits. Such a pod is created with the
scheduling gate ``nemo-eks/input-ready`` (``spec.schedulingGates``, GA in Kubernetes 1.30: a gated pod is not
scheduled, so it holds no node, and the node autoscaler does not count it as pending;
https://kubernetes.io/docs/concepts/scheduling-eviction/pod-scheduling-readiness/) and annotations naming its
input: the completion marker it needs, the failure marker that stage writes instead, and the upstream
PyTorchJob or Job. Every ``--interval-seconds`` this controller lists the namespace's gated pods and, for each:

- the marker exists: it removes the gate (the scheduler places the pod);
- the failure marker exists, or the upstream object has a ``Failed=True`` condition: it records the upstream's
  reason in a Warning Event (on the pod and on its owner) and in the pod condition ``nemo-eks/UpstreamFailed``;
  a pod of a Job (``on-upstream-failure: fail``) also goes to phase Failed with the reason as its status
  message, which the Job's ``podFailurePolicy`` turns into a failed Job at once. A pod of a Deployment
  (``hold``) stays gated and holds nothing: the old pods keep serving;
- otherwise it waits.

It is level-triggered and keeps no state: every decision comes from what the API and FSx show now, and a
decision already taken shows in the pod (no gate, or the condition), so a restart loses nothing. It also
serves ``nemo_pipeline_job_failed`` (1 for each of the namespace's pipeline PyTorchJobs and Jobs that failed
for good) on ``--port`` for the alerts. Stdlib only: it runs in a small pinned Python image, and it talks to
the API server with its service account's token over HTTPS.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Mapping, Sequence

GATE = "nemo-eks/input-ready"
WAIT_FOR = "nemo-eks/wait-for"  # annotation: the completion marker the pod's stage reads
FAILURE_MARKER = "nemo-eks/failure-marker"  # annotation: what the upstream stage writes when it fails
UPSTREAM = "nemo-eks/upstream"  # annotation: "<Kind>/<name>" of the upstream PyTorchJob or Job
ON_FAILURE = "nemo-eks/on-upstream-failure"  # annotation: "fail" (pods of a Job) or "hold" (pods of a Deployment)
ON_FAILURE_MODES = ("fail", "hold")
CONDITION = "nemo-eks/UpstreamFailed"  # a qualified name: custom pod condition types must be one
REASON = "UpstreamFailed"
COMPONENT = "nemo-eks-gatekeeper"
SELECTOR = "app.kubernetes.io/part-of=nemo-eks"
MESSAGE_LIMIT = 1024  # events and conditions are for people: the full report stays on FSx
DEFAULT_INTERVAL_SECONDS = 15.0  # a released stage starts well within a minute of its marker
DEFAULT_PORT = 9402
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
JOB_FAILED = "nemo_pipeline_job_failed"
METRICS = (JOB_FAILED,)  # what /metrics serves (workloads/observability.py alerts on it)
UPSTREAM_PATHS = {"PyTorchJob": "/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs",
                  "Job": "/apis/batch/v1/namespaces/{ns}/jobs"}


# ------------------------------------------------------------------------------------------------ decisions


@dataclass(frozen=True)
class Decision:
    """What to do with one gated pod: ``release``, ``fail`` (a Job's pod), ``hold`` (a Deployment's pod)."""

    action: str
    pod: str
    reason: str = ""


def is_gated(pod: Mapping[str, Any]) -> bool:
    return any(g.get("name") == GATE for g in pod.get("spec", {}).get("schedulingGates") or [])


def _annotations(pod: Mapping[str, Any]) -> Mapping[str, str]:
    return pod.get("metadata", {}).get("annotations") or {}


def has_condition(pod: Mapping[str, Any], condition_type: str = CONDITION) -> bool:
    return any(c.get("type") == condition_type and c.get("status") == "True"
               for c in pod.get("status", {}).get("conditions") or [])


def failed_condition(obj: Mapping[str, Any] | None) -> str | None:
    """The reason of a PyTorchJob's or Job's ``Failed=True`` condition (both APIs use that type), else None."""
    for condition in (obj or {}).get("status", {}).get("conditions") or []:
        if condition.get("type") == "Failed" and condition.get("status") == "True":
            return condition.get("message") or condition.get("reason") or "failed"
    return None


def marker_reason(text: str) -> str:
    """The human part of a failure marker (layout.write_marker writes JSON; an error, a reason or a message)."""
    try:
        document = json.loads(text)
    except ValueError:
        return text.strip() or "(no message)"
    if isinstance(document, dict):
        for key in ("error", "reason", "message"):
            if document.get(key):
                return str(document[key])
    return json.dumps(document, sort_keys=True)


def clip(text: str) -> str:
    return text if len(text) <= MESSAGE_LIMIT else text[:MESSAGE_LIMIT - 3] + "..."


def decide(pod: Mapping[str, Any], exists: Callable[[str], bool], read: Callable[[str], str],
           upstreams: Mapping[str, Mapping[str, Any]]) -> Decision | None:
    """The decision for one pod, from the pod, FSx (``exists``/``read``) and the upstream objects by
    ``<Kind>/<name>``; None when there is nothing to do (not ours, not pending, already decided, waiting)."""
    name = pod["metadata"]["name"]
    annotations = _annotations(pod)
    if not is_gated(pod) or pod.get("status", {}).get("phase", "Pending") != "Pending" or WAIT_FOR not in annotations:
        return None
    if exists(annotations[WAIT_FOR]):
        marker = annotations[WAIT_FOR]
        return Decision("release", name, clip(f"{marker}: {' '.join(read(marker).split())}"))
    if has_condition(pod):
        return None  # the failure is already recorded; a held pod stays as it is
    mode = annotations.get(ON_FAILURE, "fail")
    action = mode if mode in ON_FAILURE_MODES else "fail"
    failure_marker = annotations.get(FAILURE_MARKER)
    if failure_marker and exists(failure_marker):
        return Decision(action, name, clip(f"{failure_marker}: {marker_reason(read(failure_marker))}"))
    upstream = annotations.get(UPSTREAM)
    if upstream:
        reason = failed_condition(upstreams.get(upstream))
        if reason is not None:
            return Decision(action, name, clip(f"{upstream} failed: {reason}"))
    return None


def decide_all(pods: Iterable[Mapping[str, Any]], exists: Callable[[str], bool], read: Callable[[str], str],
               upstreams: Mapping[str, Mapping[str, Any]]) -> list[Decision]:
    decisions = (decide(pod, exists, read, upstreams) for pod in pods)
    return sorted((d for d in decisions if d is not None), key=lambda d: d.pod)


def upstream_index(pytorchjobs: Mapping[str, Any], jobs: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """``<Kind>/<name>`` -> object, from the two list responses (a list's items carry no kind of their own)."""
    index: dict[str, Mapping[str, Any]] = {}
    for kind, listing in (("PyTorchJob", pytorchjobs), ("Job", jobs)):
        for item in listing.get("items") or []:
            index[f"{kind}/{item['metadata']['name']}"] = item
    return index


# ------------------------------------------------------------------------------------------------ requests


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    body: Any
    content_type: str = "application/json"


def release_request(namespace: str, pod: Mapping[str, Any]) -> Request:
    """Remove our gate (gates can only be removed after creation). The resourceVersion test makes a patch
    from a stale view fail instead of overwriting a newer pod; the next pass decides again."""
    remaining = [g for g in pod["spec"].get("schedulingGates") or [] if g.get("name") != GATE]
    patch: list[dict[str, Any]] = [{"op": "test", "path": "/metadata/resourceVersion",
                                    "value": pod["metadata"]["resourceVersion"]}]
    patch.append({"op": "replace", "path": "/spec/schedulingGates", "value": remaining} if remaining
                 else {"op": "remove", "path": "/spec/schedulingGates"})
    return Request("PATCH", f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}", patch,
                   "application/json-patch+json")


def failure_status_request(namespace: str, pod_name: str, decision: Decision, now: str) -> Request:
    """The pod's status: our condition (both modes) and, for a Job's pod, phase Failed with the reason as the
    status message. The control plane does the same for a pod no kubelet will ever run: the pod garbage
    collector patches such pods to Failed with a condition (kubernetes pkg/controller/podgc/gc_controller.go,
    markFailedAndDeletePodWithCondition), and the Job controller then applies the Job's podFailurePolicy."""
    condition = {"type": CONDITION, "status": "True", "reason": REASON, "message": decision.reason,
                 "lastTransitionTime": now}
    status: dict[str, Any] = {"conditions": [condition]}
    if decision.action == "fail":
        status.update({"phase": "Failed", "reason": REASON, "message": decision.reason})
    return Request("PATCH", f"/api/v1/namespaces/{namespace}/pods/{pod_name}/status", {"status": status},
                   "application/strategic-merge-patch+json")


def event_requests(namespace: str, pod: Mapping[str, Any], decision: Decision, now: str,
                   suffix: Callable[[], str] = lambda: uuid.uuid4().hex[:12]) -> list[Request]:
    """A Warning Event with the upstream's reason on the pod and on its controller (the Job, or the
    Deployment's ReplicaSet), where ``kubectl describe`` shows it."""
    meta = pod["metadata"]
    targets = [{"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "namespace": namespace, "uid": meta.get("uid")}]
    for owner in meta.get("ownerReferences") or []:
        if owner.get("controller"):
            targets.append({"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["name"],
                            "namespace": namespace, "uid": owner.get("uid")})
    verb = "stopped" if decision.action == "fail" else "held (gated)"
    message = clip(f"{meta['name']} {verb}: {decision.reason}")
    return [Request("POST", f"/api/v1/namespaces/{namespace}/events", {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": f"{target['name']}.{suffix()}", "namespace": namespace},
        "involvedObject": {k: v for k, v in target.items() if v is not None},
        "reason": REASON, "message": message, "type": "Warning", "count": 1,
        "firstTimestamp": now, "lastTimestamp": now, "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT, "reportingInstance": os.environ.get("HOSTNAME", COMPONENT),
    }) for target in targets]


def requests_for(namespace: str, pods: Sequence[Mapping[str, Any]], decisions: Sequence[Decision], now: str,
                 suffix: Callable[[], str] = lambda: uuid.uuid4().hex[:12]) -> list[Request]:
    """The API calls that carry out the decisions, in order. Events go before the status patch: should the
    controller stop between the two, the next pass sends the event again rather than never."""
    by_name = {pod["metadata"]["name"]: pod for pod in pods}
    calls: list[Request] = []
    for decision in decisions:
        pod = by_name[decision.pod]
        if decision.action == "release":
            calls.append(release_request(namespace, pod))
        else:
            calls.extend(event_requests(namespace, pod, decision, now, suffix))
            calls.append(failure_status_request(namespace, decision.pod, decision, now))
    return calls


# ------------------------------------------------------------------------------------------------ metrics


def metrics_text(upstreams: Mapping[str, Mapping[str, Any]]) -> str:
    """Prometheus text: 1 for every pipeline PyTorchJob or Job that failed for good, 0 for the others."""
    lines = [f"# HELP {JOB_FAILED} 1 while a pipeline PyTorchJob or Job has failed for good.",
             f"# TYPE {JOB_FAILED} gauge"]
    for key in sorted(upstreams):
        obj = upstreams[key]
        kind, name = key.split("/", 1)
        labels = obj.get("metadata", {}).get("labels") or {}
        component = labels.get("app.kubernetes.io/component", "")
        run_id = labels.get("nemo-eks/run-id", "")
        value = 1 if failed_condition(obj) is not None else 0
        lines.append(f'{JOB_FAILED}{{kind="{kind}",name="{name}",component="{component}",'
                     f'run_id="{run_id}"}} {value}')
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ the API


class Api:
    """The API server, in-cluster: its address from the environment, the service account's CA and token (read
    on every call: the kubelet rotates bound tokens)."""

    def __init__(self, account: str = SERVICE_ACCOUNT, timeout: float = 30.0):
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        self.base = f"https://{host}:{port}" if ":" not in host else f"https://[{host}]:{port}"
        self.account = account
        self.context = ssl.create_default_context(cafile=f"{account}/ca.crt")
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        with open(f"{self.account}/token", encoding="utf-8") as handle:
            token = handle.read().strip()
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method, headers={
            "Authorization": f"Bearer {token}", "Accept": "application/json", "Content-Type": content_type})
        with urllib.request.urlopen(request, context=self.context, timeout=self.timeout) as response:
            return json.loads(response.read() or b"{}")

    def list(self, path: str) -> Any:
        return self.call("GET", f"{path}?{urllib.parse.urlencode({'labelSelector': SELECTOR})}")


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError:
        return ""


@dataclass
class Health:
    last_sync: float = 0.0
    metrics: str = ""


def sync(api: Api, namespace: str, health: Health, exists: Callable[[str], bool] = os.path.exists,
         read: Callable[[str], str] = _read, out=sys.stdout) -> None:
    """One pass: list, decide, act, then publish the metrics and the time of this successful pass."""
    pods = api.list(f"/api/v1/namespaces/{namespace}/pods").get("items") or []
    upstreams = upstream_index(api.list(UPSTREAM_PATHS["PyTorchJob"].format(ns=namespace)),
                               api.list(UPSTREAM_PATHS["Job"].format(ns=namespace)))
    decisions = decide_all(pods, exists, read, upstreams)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for call in requests_for(namespace, pods, decisions, now):
        try:
            api.call(call.method, call.path, call.body, call.content_type)
        except urllib.error.HTTPError as error:
            # 409/422: the pod changed since it was listed (or is gone); the next pass decides again.
            print(f"{call.method} {call.path}: HTTP {error.code} {error.read()[:300]!r}", file=out, flush=True)
    for decision in decisions:
        print(f"{decision.action} {namespace}/{decision.pod}" + (f": {decision.reason}" if decision.reason else ""),
              file=out, flush=True)
    health.metrics = metrics_text(upstreams)
    health.last_sync = time.monotonic()


def serve(health: Health, port: int, stale_after: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            if self.path == "/metrics":
                body, code = health.metrics.encode(), 200
            elif self.path == "/healthz":
                fresh = health.last_sync and time.monotonic() - health.last_sync < stale_after
                body, code = (b"ok\n", 200) if fresh else (b"no successful sync lately\n", 503)
            else:
                body, code = b"not found\n", 404
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--interval-seconds", type=float, default=DEFAULT_INTERVAL_SECONDS)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--once", action="store_true", help="one pass, then exit (for a manual check)")
    args = parser.parse_args(argv)
    api, health = Api(), Health()
    if args.once:
        sync(api, args.namespace, health)
        print(health.metrics, end="")
        return 0
    # Unhealthy after about four missed passes: the kubelet restarts the container, which loses nothing.
    serve(health, args.port, stale_after=max(60.0, 4 * args.interval_seconds))
    while True:
        try:
            sync(api, args.namespace, health)
        except (OSError, ValueError) as error:  # the API unreachable, a bad response: try again next pass
            print(f"sync failed: {error}", file=sys.stderr, flush=True)
        time.sleep(args.interval_seconds)


if __name__ == "__main__":
    sys.exit(main())
