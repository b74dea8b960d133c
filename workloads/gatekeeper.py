"""The gatekeeper's manifests: the controller (workloads/entrypoints/gatekeeper.py) that releases a pipeline pod's
scheduling gate once its input exists on FSx, and fails (or holds) it when its upstream failed.

It runs on the system nodes, without a GPU, as a non-root user with a read-only root file system, in a small
Python image pinned by digest; its code is the entrypoints ConfigMap every pipeline pod mounts. Its Role grants
exactly the calls it makes, in the pipeline namespace only.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from infra.gpu_nodes import NODE_ROLE_LABEL
from workloads import pods
from workloads.entrypoints import gatekeeper
from workloads.entrypoints.layout import ENTRYPOINTS_DIR, FSX_MOUNT

NAME = "nemo-gatekeeper"
# The Docker official image python:3.12.7-slim-bookworm (stdlib only: the controller needs nothing else), by
# its multi-architecture digest as published on Docker Hub (https://hub.docker.com/_/python).
IMAGE = ("docker.io/library/python:3.12.7-slim-bookworm"
         "@sha256:032c52613401895aa3d418a4c563d2d05f993bc3ecc065c8f4e2280978acd249")
TOKEN_SECONDS = 3600  # the projected token's lifetime; the kubelet renews it at 80 %
NOBODY = 65534  # the image's `nobody` user: no write access anywhere it does not need
METRICS_PORT = gatekeeper.DEFAULT_PORT

# Every call the controller makes, and nothing else (see entrypoints/gatekeeper.py: sync, requests_for).
RULES: tuple[dict[str, Any], ...] = (
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "patch"]},  # find gated pods, remove the gate
    {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch"]},  # the UpstreamFailed condition / Failed
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},  # the upstream's reason, for people
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["list"]},  # has the evaluation/conversion failed?
    {"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"], "verbs": ["list"]},  # has training failed?
)


def labels() -> dict[str, str]:
    return pods.labels("gatekeeper", **{"app.kubernetes.io/name": NAME})


def script_digest() -> str:
    """Rolls the controller when its code changes: a ConfigMap update alone does not restart a running pod."""
    return hashlib.sha256(Path(gatekeeper.__file__).read_bytes()).hexdigest()[:16]


def service_account_manifest(namespace: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": NAME, "namespace": namespace, "labels": labels()}}


def role_manifest(namespace: str) -> dict[str, Any]:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": NAME, "namespace": namespace, "labels": labels()},
            "rules": [dict(rule) for rule in RULES]}


def role_binding_manifest(namespace: str) -> dict[str, Any]:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": NAME, "namespace": namespace, "labels": labels()},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME},
            "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": namespace}]}


def deployment_manifest(namespace: str) -> dict[str, Any]:
    selector = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/part-of": pods.PART_OF}
    interval = gatekeeper.DEFAULT_INTERVAL_SECONDS
    container = {
        "name": "gatekeeper",
        "image": IMAGE,
        "command": ["python3"],
        "args": [f"{ENTRYPOINTS_DIR}/gatekeeper.py", "--namespace", namespace,
                 "--interval-seconds", f"{interval:g}", "--port", str(METRICS_PORT)],
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}],
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT}],
        # /healthz fails after about four passes without a successful sync: a restart loses nothing.
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "initialDelaySeconds": 60,
                          "periodSeconds": 30, "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 15},
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"cpu": "500m", "memory": "256Mi"}},
        "volumeMounts": [{"name": "fsx", "mountPath": str(FSX_MOUNT), "readOnly": True},
                         {"name": "entrypoints", "mountPath": str(ENTRYPOINTS_DIR), "readOnly": True},
                         {"name": "api-token", "mountPath": gatekeeper.SERVICE_ACCOUNT, "readOnly": True}],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                            "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                            "runAsUser": NOBODY, "runAsGroup": NOBODY},
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": NAME, "namespace": namespace, "labels": labels()},
        "spec": {
            "replicas": 1,
            # One controller at a time keeps the log readable; two would still agree (every action is idempotent).
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": {**labels(), **selector},
                             "annotations": {"nemo-eks/script-sha256": script_digest()}},
                "spec": {
                    "serviceAccountName": NAME,
                    # It calls the API, so it gets a token, but only in this container and explicitly: a
                    # projected, expiring service account token and the cluster's CA, where the client
                    # libraries look (https://kubernetes.io/docs/tasks/configure-pod-container/
                    # configure-service-account/#launch-a-pod-using-service-account-token-projection; every
                    # namespace has the kube-root-ca.crt ConfigMap). The kubelet renews the token; the
                    # controller reads it on every call.
                    "automountServiceAccountToken": False,
                    "nodeSelector": {NODE_ROLE_LABEL: "system"},
                    "securityContext": {"runAsNonRoot": True, "runAsUser": NOBODY, "runAsGroup": NOBODY,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "terminationGracePeriodSeconds": 5,
                    "containers": [container],
                    "volumes": [{"name": "fsx", "persistentVolumeClaim": {"claimName": pods.FSX_CLAIM_NAME,
                                                                          "readOnly": True}},
                                {"name": "entrypoints", "configMap": {"name": pods.ENTRYPOINTS_CONFIGMAP,
                                                                      "defaultMode": 0o444}},
                                {"name": "api-token", "projected": {"defaultMode": 0o444, "sources": [
                                    {"serviceAccountToken": {"path": "token", "expirationSeconds": TOKEN_SECONDS}},
                                    {"configMap": {"name": "kube-root-ca.crt",
                                                   "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]}}],
                },
            },
        },
    }


def manifests(namespace: str) -> dict[str, dict[str, Any]]:
    return {"gatekeeper_service_account": service_account_manifest(namespace),
            "gatekeeper_role": role_manifest(namespace),
            "gatekeeper_role_binding": role_binding_manifest(namespace),
            "gatekeeper": deployment_manifest(namespace)}
