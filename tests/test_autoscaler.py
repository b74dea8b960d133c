"""The Cluster Autoscaler: what it learns about each GPU group at 0 nodes, its role, its settings, Pulumi leaving
the desired size to it, the pod annotations that decide what it may evict, and the opt-out."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from infra import autoscaler, catalog
from infra.config import ConfigError, load
from infra.gpu_nodes import FSX_AGENT_TAINT, GPU_TAINTS, NODE_GROUP_LABEL
from tests.conftest import raw_config, synth_config, synth_stack
from tests.test_stacks import capacity_block, every_gpu_type
from tools import synth

NODE_GROUP = "aws:eks/nodeGroup:NodeGroup"
ASG_TAG = "aws:autoscaling/tag:Tag"
RELEASE = "kubernetes:helm.sh/v3:Release"
ROLE_POLICY = "aws:iam/rolePolicy:RolePolicy"
ASSOCIATION = "aws:eks/podIdentityAssociation:PodIdentityAssociation"
SAFE_TO_EVICT = "cluster-autoscaler.kubernetes.io/safe-to-evict"


def asg_tags(s: synth.Synth, component: str) -> dict[str, str]:
    """The tags declared on one GPU group's Auto Scaling group, and that they all target it."""
    tags = [r.inputs for r in s.resources(ASG_TAG) if r.name.startswith(f"{component}-asg-")]
    assert {t["autoscalingGroupName"] for t in tags} == {f"<{component}-nodes.resources[0].autoscalingGroups[0].name>"}
    assert not any(t["tag"]["propagateAtLaunch"] for t in tags)
    return {t["tag"]["key"]: t["tag"]["value"] for t in tags}


def release(s: synth.Synth) -> dict:
    [found] = [r for r in s.resources(RELEASE) if r.inputs["name"] == "cluster-autoscaler"]
    return found


# ---------------------------------------------------------------------------------------------- node templates


@pytest.mark.parametrize("instance_type", catalog.GPU_INSTANCE_TYPES)
def test_every_gpu_type_tells_the_autoscaler_its_efa_interfaces(instance_type):
    s, facts = every_gpu_type(), catalog.get(instance_type)
    component = f"nemo-eks-test-{instance_type.split('.')[0]}"
    node_group = s.one(NODE_GROUP, f"{component}-nodes").inputs
    assert facts.efa_interfaces > 0
    key = "k8s.io/cluster-autoscaler/node-template/resources/vpc.amazonaws.com/efa"
    assert node_group["tags"][key] == str(facts.efa_interfaces)
    # The same count on the Auto Scaling group: the autoscaler keeps it when eks:DescribeNodegroup fails.
    assert asg_tags(s, component)[key] == str(facts.efa_interfaces)
    # Labels and taints come from eks:DescribeNodegroup: the node group itself carries them.
    assert node_group["labels"][NODE_GROUP_LABEL] == instance_type.split(".")[0]
    assert {t["key"] for t in node_group["taints"]} == {key for key, _, _ in GPU_TAINTS}


def test_gpu_nodes_announce_their_gpus_before_the_device_plugin_does():
    labels = synth_stack("prod").one(NODE_GROUP, "nemo-eks-prod-train-nodes").inputs["labels"]
    assert labels["k8s.amazonaws.com/accelerator"] == "nvidia-h100"


def test_auto_scaling_group_tags_discover_the_group_and_set_its_scale_down_delay():
    s = synth_stack("dev")
    tags = asg_tags(s, "nemo-eks-dev-train")
    assert tags == {
        "k8s.io/cluster-autoscaler/enabled": "true",
        "k8s.io/cluster-autoscaler/nemo-eks-dev": "owned",
        NODE_GROUP_LABEL: "train",
        "k8s.io/cluster-autoscaler/node-template/autoscaling-options/scaledownunneededtime": "5m",
        "k8s.io/cluster-autoscaler/node-template/resources/vpc.amazonaws.com/efa": "4",
    }
    # Every key the autoscaler discovers groups by is on the GPU group; the system group carries none of ours.
    discovery = release(s).inputs["values"]["autoDiscovery"]
    assert discovery["clusterName"] == "nemo-eks-dev" and set(discovery["tags"]) <= set(tags)
    assert not [r for r in s.resources(ASG_TAG) if "system" in r.name]


def test_scale_down_delay_comes_from_the_group_config():
    group = {"name": "train", "instanceType": "p4d.24xlarge", "scaleDownAfterMinutes": 42}
    s = synth_config("scale-down-42", {"nemo-eks:gpuNodeGroups": [group]})
    assert asg_tags(s, "nemo-eks-test-train")[autoscaler.SCALE_DOWN_UNNEEDED_TAG] == "42m"


def test_scale_down_delay_is_short_on_dev_and_longer_on_prod():
    assert load(raw_config(), "dev").gpu_node_groups[0].scale_down_after_minutes == 5
    assert load(raw_config(), "prod").gpu_node_groups[0].scale_down_after_minutes == 15


def test_the_fsx_taint_is_a_start_up_taint_of_the_autoscaler():
    values = release(synth_stack("dev")).inputs["values"]
    assert values["extraArgs"]["startup-taint"] == FSX_AGENT_TAINT == "fsx.csi.aws.com/agent-not-ready"
    # It is the GPU groups' NoExecute taint that only the FSx agent removes.
    assert (FSX_AGENT_TAINT, None, "NO_EXECUTE") in GPU_TAINTS


def test_chart_and_image_are_pinned_and_run_on_the_system_nodes():
    r = release(synth_stack("prod")).inputs
    assert r["chart"] == "cluster-autoscaler" and r["version"] == "9.59.0"
    assert r["repositoryOpts"] == {"repo": "https://kubernetes.github.io/autoscaler"}
    assert r["namespace"] == "kube-system"
    values = r["values"]
    assert values["image"] == {"tag": "v1.34.5"} and values["cloudProvider"] == "aws"
    assert values["awsRegion"] == "us-east-1"
    assert values["nodeSelector"] == {"nemo-eks/node-role": "system"}
    assert values["rbac"]["serviceAccount"] == {"create": True, "name": "cluster-autoscaler"}
    assert values["serviceMonitor"]["enabled"] is True


# ---------------------------------------------------------------------------------------------- identity


def test_its_role_may_only_scale_this_clusters_gpu_groups():
    s = synth_stack("dev")
    [policy_reg] = [r for r in s.resources(ROLE_POLICY) if r.name.startswith("nemo-eks-dev-autoscaler")]
    statements = {st["Sid"]: st for st in json.loads(policy_reg.inputs["policy"])["Statement"]}
    assert set(statements) == {"Describe", "ScaleThisClustersGpuGroups"}
    describe, scale = statements["Describe"], statements["ScaleThisClustersGpuGroups"]
    assert all(re.fullmatch(r"(autoscaling|ec2|eks):Describe\w+", action) for action in describe["Action"])
    assert "eks:DescribeNodegroup" in describe["Action"] and "ec2:DescribeInstanceTypes" in describe["Action"]
    assert "Condition" not in describe
    assert scale["Action"] == ["autoscaling:SetDesiredCapacity", "autoscaling:TerminateInstanceInAutoScalingGroup"]
    assert scale["Condition"] == {
        "StringEquals": {"autoscaling:ResourceTag/k8s.io/cluster-autoscaler/nemo-eks-dev": "owned"},
        "StringLike": {f"autoscaling:ResourceTag/{NODE_GROUP_LABEL}": "*"}}
    # The tag the condition asks for is the one the GPU groups carry.
    assert asg_tags(s, "nemo-eks-dev-train")["k8s.io/cluster-autoscaler/nemo-eks-dev"] == "owned"
    [association] = [r.inputs for r in s.resources(ASSOCIATION) if r.inputs["namespace"] == "kube-system"]
    assert association["serviceAccount"] == "cluster-autoscaler"
    assert association["roleArn"] == "<nemo-eks-dev-autoscaler-role.arn>"
    trust = json.loads(s.one("aws:iam/role:Role", "nemo-eks-dev-autoscaler-role").inputs["assumeRolePolicy"])
    assert trust["Statement"][0]["Principal"] == {"Service": "pods.eks.amazonaws.com"}


def test_the_autoscaler_starts_after_its_credentials_can_exist():
    s = synth_stack("dev")
    deps = {s.name_of(u) for u in release(s).depends_on}
    assert {"nemo-eks-dev-autoscaler-association", "nemo-eks-dev-addons-pod-identity-agent", "nemo-eks-dev-system",
            "nemo-eks-dev-monitoring-kube-prometheus-stack"} <= deps


# ---------------------------------------------------------------------------------------------- Pulumi vs. the autoscaler


def test_pulumi_ignores_the_desired_size_and_shows_it_in_the_plan(tmp_path):
    s = synth_stack("dev")
    assert s.one(NODE_GROUP, "nemo-eks-dev-train-nodes").options["ignoreChanges"] == ["scalingConfig.desiredSize"]
    # The system group's size stays Pulumi's.
    assert "ignoreChanges" not in s.one(NODE_GROUP, "nemo-eks-dev-system").options
    plan = json.loads((synth.write(s, tmp_path) / "plan.json").read_text())
    [entry] = [r for r in plan["resources"] if r["name"] == "nemo-eks-dev-train-nodes"]
    assert entry["options"]["ignoreChanges"] == ["scalingConfig.desiredSize"]
    # min and max stay Pulumi's: they are still declared from the plan.
    assert entry["inputs"]["scalingConfig"] == {"minSize": 0, "desiredSize": 0, "maxSize": 1}


def test_opting_out_keeps_the_declared_sizes():
    s = synth_config("no-autoscaler", {"nemo-eks:autoscaling": {"enabled": False},
                                       "nemo-eks:gpuNodeGroups": [{"name": "train", "instanceType": "p4d.24xlarge",
                                                                   "desiredSize": 1}]})
    ng = s.one(NODE_GROUP, "nemo-eks-test-train-nodes")
    assert "ignoreChanges" not in ng.options and ng.inputs["scalingConfig"]["desiredSize"] == 1
    assert not s.resources(ASG_TAG) and not s.resources("nemo-eks:infra:ClusterAutoscaler")
    assert "cluster-autoscaler" not in {r.inputs["name"] for r in s.resources(RELEASE)}
    assert not any(k.startswith("k8s.io/cluster-autoscaler/") for k in ng.inputs["tags"])


def test_no_service_monitor_without_a_metrics_stack():
    s = synth_config("autoscaler-no-monitoring", {"nemo-eks:monitoring": {"stack": "none"}})
    values = release(s).inputs["values"]
    assert "serviceMonitor" not in values
    assert "nemo-eks-test-monitoring-kube-prometheus-stack" not in {s.name_of(u) for u in release(s).depends_on}


# ---------------------------------------------------------------------------------------------- reserved capacity


def test_groups_in_reserved_capacity_come_first():
    s = capacity_block()
    text = release(s).inputs["values"]["expanderPriorities"]
    priorities = yaml.safe_load(text)
    assert set(priorities) == {autoscaler.RESERVED_PRIORITY, autoscaler.DEFAULT_PRIORITY}
    assert priorities[autoscaler.DEFAULT_PRIORITY] == [".*"]
    reserved = priorities[autoscaler.RESERVED_PRIORITY]
    names = {g: f"<nemo-eks-prod-{g}-nodes.resources[0].autoscalingGroups[0].name>" for g in ("cb", "odcr", "spot")}
    # Each expression matches exactly one reservation-backed group's Auto Scaling group, and never the spot group.
    for group in ("cb", "odcr"):
        assert sum(bool(re.fullmatch(expr, names[group])) for expr in reserved) == 1
    assert not any(re.fullmatch(expr, names["spot"]) for expr in reserved)
    assert release(s).inputs["values"]["extraArgs"]["expander"] == "priority,least-waste"


def test_without_reservations_every_group_has_the_same_priority():
    assert yaml.safe_load(autoscaler.expander_priorities(load(raw_config(), "dev").gpu_node_groups,
                                                         {"train": "eks-train-1"})) == {10: [".*"]}


# ---------------------------------------------------------------------------------------------- what may be evicted


def test_training_pods_are_never_evicted_to_consolidate():
    job = next(m for m in synth_stack("prod").manifests() if m["kind"] == "PyTorchJob")
    templates = [spec["template"] for spec in job["spec"]["pytorchReplicaSpecs"].values()]
    assert len(templates) >= 2  # master and workers
    for template in templates:
        assert template["metadata"]["annotations"][SAFE_TO_EVICT] == "false"


def test_triton_pods_may_move_within_their_budget():
    manifests = synth_stack("dev").manifests()
    deployment = next(m for m in manifests if m["kind"] == "Deployment" and m["metadata"]["name"] == "triton")
    pod = deployment["spec"]["template"]
    assert SAFE_TO_EVICT not in (pod["metadata"].get("annotations") or {})
    # The autoscaler's drain blocks on hostPath and on disk-backed emptyDir only (utils/drain/drain.go
    # isLocalVolume): Triton's /dev/shm is memory-backed, so it does not pin the node.
    for volume in pod["spec"]["volumes"]:
        assert "hostPath" not in volume
        if "emptyDir" in volume:
            assert volume["emptyDir"]["medium"] == "Memory"
    budget = next(m for m in manifests if m["kind"] == "PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("settings, version, allowed", [
    ({"imageTag": "v1.33.6"}, "1.34", "the autoscaler's minor must be the cluster's"),
    ({"imageTag": "1.34.5"}, "1.34", "a release tag v1.34.<patch>"),
    ({"imageTag": "latest"}, "1.34", "a release tag v1.34.<patch>"),
    ({}, "1.36", "a Cluster Autoscaler release v1.36.<patch>"),
    ({"chartVersion": "latest"}, "1.34", "a pinned chart version"),
])
def test_bad_autoscaler_settings_name_the_key(settings, version, allowed):
    with pytest.raises(ConfigError) as caught:
        load(raw_config({"nemo-eks:kubernetesVersion": version, "nemo-eks:autoscaling": settings}), "dev")
    assert caught.value.key.startswith("nemo-eks:autoscaling.") and allowed in caught.value.allowed


def test_the_image_follows_the_cluster_minor():
    assert load(raw_config({"nemo-eks:kubernetesVersion": "1.33"}), "dev").autoscaling.image_tag == "v1.33.6"
    cfg = load(raw_config({"nemo-eks:kubernetesVersion": "1.36", "nemo-eks:autoscaling": {"imageTag": "v1.36.0"}}),
               "dev")
    assert cfg.autoscaling.image_tag == "v1.36.0"


@pytest.mark.parametrize("minutes", [0, 1441])
def test_scale_down_minutes_out_of_range(minutes):
    group = {"name": "train", "instanceType": "p4d.24xlarge", "scaleDownAfterMinutes": minutes}
    with pytest.raises(ConfigError) as caught:
        load(raw_config({"nemo-eks:gpuNodeGroups": [group]}), "dev")
    assert caught.value.key == "nemo-eks:gpuNodeGroups[0].scaleDownAfterMinutes"


def test_old_stack_files_with_a_desired_size_stay_valid():
    # desiredSize is now the size at creation: a stack file that raised it by hand still loads and plans.
    group = {"name": "train", "instanceType": "p4d.24xlarge", "desiredSize": 1, "maxSize": 2}
    cfg = load(raw_config({"nemo-eks:gpuNodeGroups": [group]}), "dev")
    assert cfg.gpu_node_groups[0].desired_size == 1 and cfg.autoscaling.enabled
