"""The in-cluster CI runners: config rules, the runner pods' scheduling and security context, the role split,
the guard against self-replacement and the workflow routing."""

from __future__ import annotations

import json

import pytest
import yaml

from infra import runners
from infra.config import ConfigError, load
from infra.identity import (EKS_CLUSTER_ADMIN_POLICY, EKS_VIEW_POLICY, READ_ONLY_ACCESS, ci_deploy_policy,
                            ci_preview_policy)
from tests.conftest import raw_config, synth_config, synth_stack
from tools import synth

REPO = "https://github.com/acme/nemo-eks"
APP = {"nemo-eks:githubAppId": "12345", "nemo-eks:githubAppInstallationId": "67890",
       "nemo-eks:githubAppPrivateKey": "-----BEGIN RSA PRIVATE KEY-----\nabc\n-----END RSA PRIVATE KEY-----"}
RUNNERS = {"nemo-eks:ciRunners": {"enabled": True, "githubConfigUrl": REPO}}
RELEASE = "kubernetes:helm.sh/v3:Release"
NODE_GROUP = "aws:eks/nodeGroup:NodeGroup"


def with_app() -> synth.Synth:
    return synth_config("ci-runners-app", {**RUNNERS, **APP}, stack="staging", secret_keys=list(APP))


def releases(s: synth.Synth) -> dict[str, synth.Registration]:
    return {r.inputs["name"]: r for r in s.resources(RELEASE) if "actions-runner-controller-charts" in r.inputs["chart"]}


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("cidr", ["203.0.113.0/24", "198.51.100.7/32", "192.0.2.128/25", "0.0.0.0/0", "192.0.0.0/8"])
def test_public_access_cidrs_refuse_what_admits_no_real_client_or_everyone(cidr):
    with pytest.raises(ConfigError) as error:
        load(raw_config({"nemo-eks:cluster": {"publicEndpoint": True, "publicAccessCidrs": ["100.24.1.7/32", cidr]}}), "test")
    assert error.value.key == "nemo-eks:cluster.publicAccessCidrs" and error.value.value == cidr
    assert "workstation" in str(error.value) and "ciRunners" in str(error.value)  # says what to put there


def test_public_access_cidrs_accept_a_real_address():
    cfg = load(raw_config({"nemo-eks:cluster": {"publicEndpoint": True, "publicAccessCidrs": ["100.24.1.7/32"]}}), "test")
    assert cfg.cluster.public_access_cidrs == ("100.24.1.7/32",)


def test_shipped_stacks_keep_the_endpoint_private_and_use_the_runners():
    for stack in synth.stack_names():
        cfg = load(*synth.read_stack_config(stack)[:1], stack, secret_keys=synth.read_stack_config(stack)[1])
        assert not cfg.cluster.public_endpoint, stack
        assert cfg.ci_runners.enabled and cfg.ci_runners.github_config_url.startswith("https://github.com/"), stack


@pytest.mark.parametrize("overrides,secret_keys,key,fragment", [
    ({"nemo-eks:ciRunners": {"enabled": True}}, [], "nemo-eks:ciRunners.githubConfigUrl", "required while enabled"),
    ({"nemo-eks:ciRunners": {"enabled": True, "githubConfigUrl": "https://github.com/acme"}}, [],
     "nemo-eks:ciRunners.githubConfigUrl", "organisation URL"),
    ({**RUNNERS, **APP}, [], "nemo-eks:githubAppId", "Plain text"),
    ({**RUNNERS, "nemo-eks:githubAppId": "1"}, ["nemo-eks:githubAppId"], "nemo-eks:githubAppInstallationId", "all of"),
    ({"nemo-eks:ciRunners": {**RUNNERS["nemo-eks:ciRunners"], "scaleSetChartVersion": "0.13.1"}}, [],
     "nemo-eks:ciRunners.scaleSetChartVersion", "controller's chart version"),
    ({"nemo-eks:ciRunners": {**RUNNERS["nemo-eks:ciRunners"], "runnerImage": "ghcr.io/actions/actions-runner:latest"}}, [],
     "nemo-eks:ciRunners.runnerImage", "not 'latest'"),
    ({"nemo-eks:ciRunners": {**RUNNERS["nemo-eks:ciRunners"], "instanceType": "p4d.24xlarge"}}, [],
     "nemo-eks:ciRunners.instanceType", "m7i"),
])
def test_ci_runner_config_errors(overrides, secret_keys, key, fragment):
    with pytest.raises(ConfigError) as error:
        load(raw_config(overrides), "test", secret_keys=secret_keys)
    assert error.value.key == key and fragment in str(error.value)
    assert "BEGIN RSA" not in str(error.value)  # a credential is never echoed


# ---------------------------------------------------------------------------------------------- pods


def test_runner_pods_run_unprivileged_on_their_own_nodes_without_gpu():
    s = with_app()
    deploy = releases(s)["nemo-eks-staging-deploy"].inputs
    assert deploy["chart"] == "oci://ghcr.io/actions/actions-runner-controller-charts/gha-runner-scale-set"
    assert deploy["version"] == "0.14.2"
    values = deploy["values"]
    assert "containerMode" not in values  # no dind sidecar, no pods created through the API
    spec = values["template"]["spec"]
    assert spec["nodeSelector"] == {"nemo-eks/node-role": "ci-runners"}
    assert spec["tolerations"] == [{"key": "nemo-eks/ci-runners", "operator": "Equal", "value": "true", "effect": "NoSchedule"}]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 1001
    [container] = spec["containers"]
    assert container["name"] == "runner" and container["image"] == "ghcr.io/actions/actions-runner:2.334.0"
    context = container["securityContext"]
    assert context["privileged"] is False and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert not any("gpu" in name for part in container["resources"].values() for name in part)
    listener = values["listenerTemplate"]["spec"]
    assert listener["nodeSelector"] == spec["nodeSelector"] and listener["tolerations"] == spec["tolerations"]
    controller = releases(s)["arc"].inputs
    assert controller["values"]["nodeSelector"] == spec["nodeSelector"]
    assert controller["values"]["securityContext"]["privileged"] is False
    assert values["controllerServiceAccount"] == {"namespace": "arc-systems", "name": controller["values"]["serviceAccount"]["name"]}
    nodes = s.one(NODE_GROUP, "nemo-eks-staging-ci-nodes").inputs
    assert nodes["labels"] == {"nemo-eks/node-role": "ci-runners"}
    assert nodes["taints"] == [{"key": "nemo-eks/ci-runners", "value": "true", "effect": "NO_SCHEDULE"}]
    assert nodes["amiType"] == "AL2023_x86_64_STANDARD" and nodes["instanceTypes"] == ["m7i.xlarge"]
    namespaces = {m["metadata"]["name"]: m for m in s.manifests() if m["kind"] == "Namespace"}
    for name in ("arc-systems", "ci-preview", "ci-deploy"):
        assert namespaces[name]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "baseline"


def test_the_scale_set_names_are_the_workflows_runs_on_labels():
    s = with_app()
    names = {r.inputs["values"]["runnerScaleSetName"] for r in releases(s).values() if "runnerScaleSetName" in r.inputs["values"]}
    assert names == {"nemo-eks-staging-preview", "nemo-eks-staging-deploy"}
    assert s.outputs["ciRunsOn"] == {"preview": "nemo-eks-staging-preview", "deploy": "nemo-eks-staging-deploy"}
    workflows = synth.ROOT / ".github" / "workflows"
    preview = yaml.safe_load((workflows / "pull-request.yml").read_text())["jobs"]["preview"]
    up = yaml.safe_load((workflows / "up.yml").read_text())["jobs"]["up"]
    operate = yaml.safe_load((workflows / "operate.yml").read_text())["jobs"]
    destroy, preflight = operate["destroy"], operate["preflight"]
    for stack in synth.stack_names():
        prefix = f"nemo-eks-{stack}"
        assert preview["runs-on"].replace("${{ matrix.stack }}", stack) == runners.runs_on_label(prefix, "preview")
        assert up["runs-on"].replace("${{ inputs.stack }}", stack) == runners.runs_on_label(prefix, "deploy")
        assert destroy["runs-on"].replace("${{ inputs.stack }}", stack) == runners.runs_on_label(prefix, "deploy")
        assert preflight["runs-on"].replace("${{ inputs.stack }}", stack) == runners.runs_on_label(prefix, "preview")
    # Each kind of run keeps its one-at-a-time group and its environment.
    assert preview["concurrency"]["group"] == up["concurrency"]["group"].replace("inputs", "matrix")
    assert up["environment"] == "${{ inputs.stack }}"
    for job in (preview, up, destroy):  # credentials come from the runner's Pod Identity, not a role to assume
        assert not any(step.get("uses", "").startswith("aws-actions/configure-aws-credentials") for step in job["steps"])
        assert any("eks get-token" in step.get("name", "") for step in job["steps"])


# ---------------------------------------------------------------------------------------------- secrets


def test_github_app_credentials_only_as_secrets():
    s = with_app()
    secrets = [r for r in s.resources("kubernetes:core/v1:Secret") if r.inputs["metadata"]["name"] == "github-app"]
    assert sorted(r.inputs["metadata"]["namespace"] for r in secrets) == ["ci-deploy", "ci-preview"]
    for secret in secrets:
        assert secret.inputs["stringData"] == synth.SECRET  # the whole map travels as a Pulumi secret
    for release in releases(s).values():
        text = json.dumps(release.inputs)
        assert "BEGIN RSA" not in text and "12345" not in text
        if release.inputs["name"] != "arc":
            assert release.inputs["values"]["githubConfigSecret"] == "github-app"  # a name, never the values
            assert release.inputs["values"]["githubConfigUrl"] == REPO


def test_without_a_github_app_the_platform_is_built_but_no_scale_set():
    s = synth_stack("dev")
    assert set(releases(s)) == {"arc"}
    assert not [r for r in s.resources("kubernetes:core/v1:Secret") if r.inputs["metadata"]["name"] == "github-app"]
    accounts = {r.inputs["metadata"]["name"] for r in s.resources("kubernetes:core/v1:ServiceAccount")}
    assert {"ci-preview-runner", "ci-deploy-runner"} <= accounts  # the roles are bound before the App exists


# ---------------------------------------------------------------------------------------------- roles


def test_preview_and_deploy_get_different_roles_and_cluster_access():
    s = with_app()
    associations = {r.inputs["serviceAccount"]: r.inputs for r in s.resources("aws:eks/podIdentityAssociation:PodIdentityAssociation")
                    if r.inputs["serviceAccount"].startswith("ci-")}
    assert associations["ci-preview-runner"]["namespace"] == "ci-preview"
    assert associations["ci-deploy-runner"]["namespace"] == "ci-deploy"
    assert associations["ci-preview-runner"]["roleArn"] == "<nemo-eks-staging-ci-role-preview.arn>"
    assert associations["ci-deploy-runner"]["roleArn"] == "<nemo-eks-staging-ci-role-deploy.arn>"
    access = {r.inputs["principalArn"]: r.inputs["policyArn"] for r in s.resources("aws:eks/accessPolicyAssociation:AccessPolicyAssociation")}
    assert access["<nemo-eks-staging-ci-role-preview.arn>"] == EKS_VIEW_POLICY
    assert access["<nemo-eks-staging-ci-role-deploy.arn>"] == EKS_CLUSTER_ADMIN_POLICY
    attachments = {r.inputs["role"]: r.inputs["policyArn"] for r in s.resources("aws:iam/rolePolicyAttachment:RolePolicyAttachment")
                   if "ci-role" in r.name}
    assert attachments == {"<nemo-eks-staging-ci-role-preview.name>": READ_ONLY_ACCESS}  # nothing broad on deploy


def test_preview_policy_denies_data_reads():
    [deny] = json.loads(ci_preview_policy())["Statement"]
    assert deny["Effect"] == "Deny" and {"s3:GetObject", "secretsmanager:GetSecretValue", "kms:Decrypt"} <= set(deny["Action"])


def test_deploy_policy_is_scoped_to_the_stack_and_cannot_widen_itself():
    own = "arn:aws:iam::111122223333:role/nemo-eks-prod-ci-role-deploy-1a2b3c"
    statements = {st["Sid"]: st for st in json.loads(ci_deploy_policy("nemo-eks-prod", own))["Statement"]}
    assert all(arn.split(":")[-1].split("/", 1)[1].startswith("nemo-eks-prod-") for arn in statements["StackRoles"]["Resource"])
    assert statements["StackBuckets"]["Resource"] == ["arn:aws:s3:::nemo-eks-prod-*", "arn:aws:s3:::nemo-eks-prod-*/*"]
    assert statements["NotItself"] == {"Sid": "NotItself", "Effect": "Deny", "NotAction": ["iam:Get*", "iam:List*"], "Resource": own}
    assert "iam:CreateAccessKey" in statements["NoNewCredentials"]["Action"]
    assert not any(st["Action"] == "*" or st["Action"] == ["*"] for st in statements.values() if "Action" in st)


# ---------------------------------------------------------------------------------------------- self-replacement


def test_runner_nodes_and_releases_are_protected_and_nothing_else_of_the_platform_is():
    s = with_app()
    guarded = {r.name for r in s.registrations if r.protect}
    assert {"nemo-eks-staging-ci-nodes", "nemo-eks-staging-ci-controller", "nemo-eks-staging-ci-preview",
            "nemo-eks-staging-ci-deploy"} <= guarded
    # The protection is on exactly what a running job stands on, not inherited by the rest of the component.
    assert not any(r.protect for r in s.registrations if r.name.startswith("nemo-eks-staging-ci-role"))
    deploy = releases(s)["nemo-eks-staging-deploy"]
    assert {"nemo-eks-staging-ci-controller", "nemo-eks-staging-ci-github-app-deploy"} <= {s.name_of(u) for u in deploy.depends_on}
