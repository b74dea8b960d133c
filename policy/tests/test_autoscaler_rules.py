"""The policy pack's Cluster Autoscaler rules: every EFA node group tells the autoscaler its EFA interfaces, and
every training pod template is never evicted to consolidate. Each against the shipped stacks (they pass) and
mutated copies (they fail), through the engine views of test_policy.py."""

from __future__ import annotations

import pytest

from infra import catalog
from policy import rules
from policy.tests.test_policy import (PYTORCHJOB, deployed, first_preview, one, run_resource_policy, run_stack_policy,
                                      stack_resources, violations_of)

TAG = rules.EFA_TEMPLATE_TAG


def node_group(resources):
    return one(resources, rules.NODE_GROUP, "train-nodes")


@pytest.mark.parametrize("view", [lambda rs: rs, deployed, first_preview], ids=["preview", "deployed", "first-preview"])
@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_shipped_stacks_tag_their_efa_groups(stack, view):
    resources = view(stack_resources(stack))
    assert run_stack_policy(rules.efa_node_template, resources) == ([], None)
    # It looked: the group is an EFA group with the tag.
    assert node_group(stack_resources(stack)).props["tags"][TAG] in {str(catalog.get(t).efa_interfaces)
                                                                     for t in catalog.GPU_INSTANCE_TYPES}


@pytest.mark.parametrize("view", [lambda rs: rs, deployed], ids=["preview", "deployed"])
def test_a_missing_efa_tag_fails(view):
    resources = stack_resources("prod")
    node_group(resources).props["tags"].pop(TAG)
    found = violations_of(rules.efa_node_template, view(resources))
    assert any("has no tag" in m and "p5.48xlarge, 32 EFA interfaces" in m for m in found), found


def test_a_wrong_efa_count_fails():
    resources = stack_resources("dev")
    node_group(resources).props["tags"][TAG] = "32"
    found = violations_of(rules.efa_node_template, resources)
    assert any("p4d.24xlarge has 4 EFA interfaces" in m for m in found), found


def test_the_tag_is_not_required_without_the_autoscaler():
    resources = stack_resources("dev")
    node_group(resources).props["tags"].pop(TAG)
    without = [r for r in resources if not (r.type == rules.HELM_RELEASE
                                            and r.props.get("chart") == rules.CLUSTER_AUTOSCALER_CHART)]
    assert len(without) == len(resources) - 1
    assert violations_of(rules.efa_node_template, without) == []


def test_a_group_without_efa_interfaces_needs_no_tag():
    resources = stack_resources("dev")
    node_group(resources).props["tags"].pop(TAG)
    template = one(resources, rules.LAUNCH_TEMPLATE)
    for nic in template.props["networkInterfaces"]:
        nic["interfaceType"] = "interface"
    assert violations_of(rules.efa_node_template, resources) == []


def job_templates(resources):
    return [spec["template"] for spec in one(resources, PYTORCHJOB).props["spec"]["pytorchReplicaSpecs"].values()]


def test_shipped_training_jobs_are_not_evictable():
    resources = stack_resources("prod")
    job = one(resources, PYTORCHJOB)
    assert len(job_templates(resources)) == 2
    assert run_resource_policy(rules.training_not_evictable, job) == ([], None)
    # Other workloads are not its business.
    assert rules.check_training_not_evictable("kubernetes:apps/v1:Deployment",
                                              one(resources, "kubernetes:apps/v1:Deployment", "triton").props) is None


@pytest.mark.parametrize("change, expected", [
    (lambda t: t["metadata"].pop("annotations"), "is not set"),
    (lambda t: t["metadata"]["annotations"].update({rules.SAFE_TO_EVICT: "true"}), "is 'true'"),
])
def test_an_evictable_training_pod_fails(change, expected):
    resources = stack_resources("prod")
    change(job_templates(resources)[-1])
    found, _ = run_resource_policy(rules.training_not_evictable, one(resources, PYTORCHJOB))
    assert len(found) == 1 and expected in found[0] and "Worker" in found[0], found
