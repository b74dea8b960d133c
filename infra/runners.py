"""CI runners inside the cluster: Actions Runner Controller (ARC) and two runner scale sets per stack, one for
pull-request previews and one for `pulumi up`, so that both reach the private API endpoint.

Sources (actions/actions-runner-controller, tag gha-runner-scale-set-0.14.2):
- charts/gha-runner-scale-set/values.yaml: githubConfigUrl, githubConfigSecret (a GitHub App's github_app_id,
  github_app_installation_id, github_app_private_key, or the name of a Secret holding them), runnerScaleSetName,
  minRunners/maxRunners, template (the runner PodSpec), listenerTemplate, controllerServiceAccount, containerMode.
- charts/gha-runner-scale-set-controller/values.yaml: serviceAccount, nodeSelector, tolerations,
  podSecurityContext, securityContext, flags.
- Makefile: RUNNER_VERSION ?= 2.334.0 (the runner release this chart version is tested with).
- docs.github.com, "Using ARC runners in a workflow": `runs-on` names the scale set (its runnerScaleSetName).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pulumi
import pulumi_aws as aws
import pulumi_kubernetes as k8s

from infra.config import CiRunnersConfig
from infra.gpu_nodes import NODE_ROLE_LABEL
from infra.identity import CiRunnerIdentity, ci_runner_roles

CHART_REPOSITORY = "oci://ghcr.io/actions/actions-runner-controller-charts"
CONTROLLER_CHART = f"{CHART_REPOSITORY}/gha-runner-scale-set-controller"
SCALE_SET_CHART = f"{CHART_REPOSITORY}/gha-runner-scale-set"
CONTROLLER_NAMESPACE = "arc-systems"
CONTROLLER_RELEASE = "arc"
# Named, so that the scale sets can bind to it without the chart's install-time lookup (values.yaml,
# controllerServiceAccount), which a client-side render in a preview cannot do.
CONTROLLER_SERVICE_ACCOUNT = "arc-controller"
GITHUB_APP_SECRET = "github-app"
RUNNER_NODE_ROLE = "ci-runners"
RUNNER_TAINT_KEY = "nemo-eks/ci-runners"
RUNNER_AMI_TYPE = "AL2023_x86_64_STANDARD"
# The actions/runner image runs as user `runner` (uid 1001) in group `docker` (gid 123), images/Dockerfile of
# actions/runner; a numeric user lets the kubelet enforce runAsNonRoot.
RUNNER_UID, RUNNER_GID = 1001, 123
PURPOSES = ("preview", "deploy")


@dataclass(frozen=True)
class ScaleSet:
    purpose: str  # preview: read-mostly role; deploy: the role that changes the stack
    name: str  # runnerScaleSetName: the `runs-on` label of the workflows
    namespace: str
    service_account: str


def scale_sets(prefix: str) -> tuple[ScaleSet, ...]:
    """Each purpose in a namespace of its own: a preview runner cannot mount the deploy service account."""
    return tuple(ScaleSet(purpose, runs_on_label(prefix, purpose), f"ci-{purpose}", f"ci-{purpose}-runner")
                 for purpose in PURPOSES)


def runs_on_label(prefix: str, purpose: str) -> str:
    """The label a workflow puts in `runs-on` for this stack and purpose, e.g. nemo-eks-prod-deploy."""
    return f"{prefix}-{purpose}"


def runner_tolerations() -> list[dict[str, Any]]:
    return [{"key": RUNNER_TAINT_KEY, "operator": "Equal", "value": "true", "effect": "NoSchedule"}]


def runner_node_selector() -> dict[str, str]:
    return {NODE_ROLE_LABEL: RUNNER_NODE_ROLE}


def restricted_container_security_context() -> dict[str, Any]:
    """The Pod Security Standards' restricted profile for a container: no privilege, no new privileges."""
    return {"privileged": False, "allowPrivilegeEscalation": False, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def controller_values() -> dict[str, Any]:
    return {
        "serviceAccount": {"create": True, "name": CONTROLLER_SERVICE_ACCOUNT},
        "nodeSelector": runner_node_selector(),
        "tolerations": runner_tolerations(),
        # The image is distroless `nonroot` (USER 65532:65532, Dockerfile of the same tag).
        "podSecurityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "securityContext": {**restricted_container_security_context(), "readOnlyRootFilesystem": True},
        "flags": {"logLevel": "info", "logFormat": "json"},
    }


def scale_set_values(scale_set: ScaleSet, config: CiRunnersConfig) -> dict[str, Any]:
    """One runner scale set. No containerMode: the runner runs the steps in its own container, so there is no
    privileged docker-in-docker sidecar (dind) and no pods created through the Kubernetes API (kubernetes
    mode); pulumi, python and the AWS CLI need no container engine."""
    return {
        "githubConfigUrl": config.github_config_url,
        "githubConfigSecret": GITHUB_APP_SECRET,  # the name of the Secret declared beside it, from Pulumi secrets
        "runnerScaleSetName": scale_set.name,
        "minRunners": 0,
        "maxRunners": config.max_runners,
        "controllerServiceAccount": {"namespace": CONTROLLER_NAMESPACE, "name": CONTROLLER_SERVICE_ACCOUNT},
        "listenerTemplate": {"spec": {
            "nodeSelector": runner_node_selector(), "tolerations": runner_tolerations(),
            "containers": [{"name": "listener", "securityContext": restricted_container_security_context()}]}},
        "template": {"spec": {
            "serviceAccountName": scale_set.service_account,  # its Pod Identity role
            "nodeSelector": runner_node_selector(),
            "tolerations": runner_tolerations(),
            "securityContext": {"runAsNonRoot": True, "runAsUser": RUNNER_UID, "runAsGroup": RUNNER_GID,
                                "fsGroup": RUNNER_GID, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "runner", "image": config.runner_image, "command": ["/home/runner/run.sh"],
                "securityContext": restricted_container_security_context(),
                # No GPU: requests and limits name CPU and memory only.
                "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
            }],
        }},
    }


def github_app_secret_data(app_id: Any, installation_id: Any, private_key: Any) -> dict[str, Any]:
    """The keys ARC reads from a pre-defined GitHub App secret (values.yaml, variation C)."""
    return {"github_app_id": app_id, "github_app_installation_id": installation_id, "github_app_private_key": private_key}


def namespace_manifest(name: str) -> dict[str, Any]:
    # Pod Security admission refuses privileged pods here whatever a chart or a later edit asks for (baseline),
    # and reports anything short of the restricted profile the values above aim at.
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "nemo-eks",
                                                  "pod-security.kubernetes.io/enforce": "baseline",
                                                  "pod-security.kubernetes.io/warn": "restricted",
                                                  "pod-security.kubernetes.io/audit": "restricted"}}}


# Resource options that keep an update from cutting off the runner that runs it: a protected resource cannot be
# deleted, and so not replaced, in any update (pulumi.com/docs/iac/concepts/resources/options/protect/ and
# /docs/iac/operations/stack-management/protecting-against-undesired-changes/: "any deployment that would delete
# it (including a replacement) fails"). policy/rules.py refuses a plan where these resources lose it.
GUARDED = pulumi.ResourceOptions(protect=True)


@dataclass(frozen=True)
class CiRunnersArgs:
    config: CiRunnersConfig
    prefix: str
    cluster_name: pulumi.Input[str]
    node_role_arn: pulumi.Input[str]
    subnet_ids: Sequence[pulumi.Input[str]]
    provider: k8s.Provider
    tags: Mapping[str, str]
    depends_on: Sequence[pulumi.Resource] = ()  # what nodes need before they join (the cluster's add-ons)


class CiRunners(pulumi.ComponentResource):
    node_group: aws.eks.NodeGroup
    controller: k8s.helm.v3.Release
    scale_sets: dict[str, k8s.helm.v3.Release]
    roles: dict[str, aws.iam.Role]

    def __init__(self, name: str, args: CiRunnersArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("nemo-eks:infra:CiRunners", name, None, opts)
        cfg, tags = args.config, dict(args.tags)
        guarded = pulumi.ResourceOptions.merge(GUARDED, pulumi.ResourceOptions(parent=self))
        sets = scale_sets(args.prefix)

        # A node group of their own: the system group's rolling updates (a new AMI, a new instance type) never
        # drain the node a running `pulumi up` is on. Fixed size, so nothing scales it in under a job. Its taint
        # keeps other pods off; the eks-pod-identity-agent DaemonSet tolerates taints since v1.2.0-eksbuild.1
        # (aws/amazon-vpc-cni-k8s#2780, aws/containers-roadmap#2261), as the tainted GPU nodes already rely on.
        self.node_group = aws.eks.NodeGroup(
            f"{name}-nodes", cluster_name=args.cluster_name, node_role_arn=args.node_role_arn,
            subnet_ids=list(args.subnet_ids), instance_types=[cfg.instance_type], ami_type=RUNNER_AMI_TYPE,
            capacity_type="ON_DEMAND", disk_size=50,
            scaling_config={"min_size": cfg.nodes, "desired_size": cfg.nodes, "max_size": cfg.nodes},
            labels=runner_node_selector(),
            taints=[{"key": RUNNER_TAINT_KEY, "value": "true", "effect": "NO_SCHEDULE"}],
            update_config={"max_unavailable": 1}, tags=tags,
            opts=pulumi.ResourceOptions.merge(guarded, pulumi.ResourceOptions(depends_on=list(args.depends_on))))

        self.roles = ci_runner_roles(
            f"{name}-role", args.prefix, args.cluster_name,
            [CiRunnerIdentity(s.purpose, s.namespace, s.service_account) for s in sets], tags, parent=self)

        k8s_child = pulumi.ResourceOptions(parent=self, provider=args.provider)
        namespaces = {}
        for namespace in (CONTROLLER_NAMESPACE, *(s.namespace for s in sets)):
            manifest = namespace_manifest(namespace)
            namespaces[namespace] = k8s.core.v1.Namespace(f"{name}-ns-{namespace}", metadata=manifest["metadata"],
                                                          opts=k8s_child)

        self.controller = k8s.helm.v3.Release(
            f"{name}-controller", name=CONTROLLER_RELEASE, chart=CONTROLLER_CHART,
            version=cfg.controller_chart_version, namespace=CONTROLLER_NAMESPACE, values=controller_values(),
            opts=pulumi.ResourceOptions.merge(guarded, pulumi.ResourceOptions(
                provider=args.provider, depends_on=[self.node_group, namespaces[CONTROLLER_NAMESPACE]])))

        self.scale_sets = {}
        for scale_set in sets:
            in_namespace = pulumi.ResourceOptions(parent=self, provider=args.provider,
                                                  depends_on=[namespaces[scale_set.namespace]])
            account = k8s.core.v1.ServiceAccount(
                f"{name}-sa-{scale_set.purpose}",
                metadata={"name": scale_set.service_account, "namespace": scale_set.namespace,
                          "labels": {"app.kubernetes.io/part-of": "nemo-eks", "app.kubernetes.io/component": f"ci-{scale_set.purpose}"}},
                opts=in_namespace)
            app = cfg.github_app
            if app is None:
                continue  # bootstrap: no GitHub App yet, so no scale set can register (docs/delivery.md)
            secret = k8s.core.v1.Secret(
                f"{name}-github-app-{scale_set.purpose}",
                metadata={"name": GITHUB_APP_SECRET, "namespace": scale_set.namespace},
                string_data={key: pulumi.Output.secret(value) for key, value in github_app_secret_data(
                    app.app_id, app.installation_id, app.private_key).items()},
                opts=in_namespace)
            self.scale_sets[scale_set.purpose] = k8s.helm.v3.Release(
                f"{name}-{scale_set.purpose}", name=scale_set.name, chart=SCALE_SET_CHART,
                version=cfg.scale_set_chart_version, namespace=scale_set.namespace,
                values=scale_set_values(scale_set, cfg),
                # The controller must be there to own the scale set; its Pod Identity role must exist before a
                # runner starts, or the first job runs without AWS credentials.
                opts=pulumi.ResourceOptions.merge(guarded, pulumi.ResourceOptions(
                    provider=args.provider, depends_on=[self.controller, secret, account, self.roles[scale_set.purpose]])))

        self.register_outputs({"runsOn": {s.purpose: s.name for s in sets}})
