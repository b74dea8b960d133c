"""Every AWS name fits its API's limit for the longest stack and group names the config accepts, and the names
of stacks that already fit do not change."""

from __future__ import annotations

import importlib
import inspect

import pytest

from infra import naming
from tools import synth
from tests.conftest import synth_config

LONGEST_STACK = "staging-eu-west-1-team42"  # the stack-name pattern allows 24 characters
# Two 20-character groups that differ only at the end: their shortened names must still differ.
LONGEST_GROUPS = ["gpu-training-pool-01", "gpu-training-pool-02"]


def longest_names() -> synth.Synth:
    return synth_config("longest-names", {"nemo-eks:gpuNodeGroups": [
        {"name": LONGEST_GROUPS[0], "instanceType": "p5.48xlarge"},
        {"name": LONGEST_GROUPS[1], "instanceType": "p4d.24xlarge", "maxSize": 1}]}, stack=LONGEST_STACK)


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(part.title() for part in rest)


def is_named_type(type_token: str) -> bool:
    """Whether the SDK lets the resource be named (a name argument, or a name prefix)."""
    module, cls = synth._type_registry()[type_token]
    args = getattr(importlib.import_module(module), f"{cls}Args")
    params = inspect.signature(args.__init__).parameters
    return "name" in params or any(p.endswith("_prefix") for p in params)


def longest_possible_name(registration: synth.Registration) -> int:
    spec = naming.LIMITS[registration.type]
    inputs = registration.inputs
    if _camel(spec.name_arg) in inputs:
        return len(inputs[_camel(spec.name_arg)])
    if spec.prefix_arg and _camel(spec.prefix_arg) in inputs:
        return len(inputs[_camel(spec.prefix_arg)]) + naming.PREFIX_SUFFIX
    return len(registration.name) + naming.AUTONAME_SUFFIX  # Pulumi's auto-name


def test_the_config_accepts_the_longest_names():
    s = longest_names()
    assert len(LONGEST_STACK) == 24 and all(len(g) == 20 for g in LONGEST_GROUPS)
    assert s.stack == LONGEST_STACK


def test_every_named_aws_resource_is_in_the_limit_table():
    s = longest_names()
    named = {r.type for r in s.registrations if r.type.startswith("aws:") and is_named_type(r.type)}
    assert named <= set(naming.LIMITS), sorted(named - set(naming.LIMITS))


def test_every_name_fits_its_api_limit_with_the_longest_names():
    s = longest_names()
    checked = 0
    for registration in s.registrations:
        if registration.type not in naming.LIMITS:
            continue
        limit = naming.LIMITS[registration.type].limit
        assert longest_possible_name(registration) <= limit, (registration.type, registration.name, registration.inputs)
        checked += 1
    assert checked >= 20


def test_long_node_group_names_get_a_prefix_that_fits_and_stays_unique():
    s = longest_names()
    prefixes = []
    for group in LONGEST_GROUPS:
        node_group = s.one("aws:eks/nodeGroup:NodeGroup", f"nemo-eks-{LONGEST_STACK}-{group}-nodes")
        prefix = node_group.inputs["nodeGroupNamePrefix"]
        assert "nodeGroupName" not in node_group.inputs
        assert len(prefix) + naming.PREFIX_SUFFIX <= 63 and prefix.endswith("-")
        assert prefix.startswith("nemo-eks-") and prefix.endswith(f"{group[-2:]}-nodes-")
        prefixes.append(prefix)
    assert prefixes[0] != prefixes[1]
    # the same config gives the same prefix: no change, so no replacement, on the next preview
    assert naming.name_args("aws:eks/nodeGroup:NodeGroup", f"nemo-eks-{LONGEST_STACK}-{LONGEST_GROUPS[0]}-nodes") == {
        "node_group_name_prefix": prefixes[0]}


def test_tags_fit_aws_tag_limits_with_the_longest_names():
    for registration in longest_names().registrations:
        tags = registration.inputs.get("tags") if registration.type.startswith("aws:") else None
        for key, value in (tags or {}).items():
            assert len(key) <= naming.TAG_KEY_LIMIT and len(value) <= naming.TAG_VALUE_LIMIT, (registration.name, key)


def test_cluster_name_and_kms_alias_fit():
    s = longest_names()
    cluster = s.one("eks:index:Cluster", f"nemo-eks-{LONGEST_STACK}-eks")
    assert len(cluster.inputs["name"]) <= naming.LIMITS["eks:index:Cluster"].limit
    alias = s.one("aws:kms/alias:Alias", f"nemo-eks-{LONGEST_STACK}-secrets-alias")
    assert alias.inputs["name"] == f"alias/nemo-eks-{LONGEST_STACK}-secrets"


def test_shipped_stacks_keep_their_auto_names(stack_synth):
    """Names that already fit are left to Pulumi as before: switching them would replace deployed resources."""
    for registration in stack_synth.registrations:
        spec = naming.LIMITS.get(registration.type)
        if spec is None or registration.type == "eks:index:Cluster" or registration.type == "aws:kms/alias:Alias":
            continue
        passed = {_camel(spec.name_arg), _camel(spec.prefix_arg or "")} & set(registration.inputs)
        assert not passed, (registration.name, passed)


@pytest.mark.parametrize("name,limit", [("a" * 70, 63), ("nemo-eks-x-" + "b" * 60, 37), ("short", 63)])
def test_fit_keeps_short_names_and_cuts_long_ones_with_a_hash(name, limit):
    fitted = naming.fit(name, limit)
    assert len(fitted) <= limit
    if len(name) <= limit:
        assert fitted == name
    else:
        assert fitted != naming.fit(name[:20] + "z" + name[21:], limit)  # a change in the middle still shows
        assert fitted[:5] == name[:5] and fitted[-5:] == name[-5:]


def test_prefix_for_a_type_without_one_is_a_fixed_name():
    args = naming.name_args("aws:ec2/placementGroup:PlacementGroup", "p" * 300)
    assert list(args) == ["name"] and len(args["name"]) == 255
