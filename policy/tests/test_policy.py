"""The policy pack (policy/): every policy against every stack file, as the engine would hand the stack to it,
and a mutated copy per rule that must fail.

How the engine's view is rebuilt without an engine
  * Resources come from ``tools.synth`` (the whole program under Pulumi's mock monitor), plus the objects of the
    vendored manifests applied through ``yaml.v2.ConfigFile``: the engine shows policies those children too.
  * Properties travel the same path as in the analyzer: a protobuf Struct (numbers become floats), then
    pulumi-policy's own ``deserialize_properties`` and ``unknown_checking_proxy``, so the policies read the same
    Mapping/Sequence proxies they get from ``pulumi preview``.
  * Property dependencies are recorded from the monitor's RegisterResource requests (what the engine passes as
    ``property_dependencies``). Three views of each stack are checked: "preview" (inputs, property dependencies,
    no ids: a fresh stack's first preview, when the ids are unknown), "deployed" (ids in the outputs, no
    dependencies: joins by value) and "unknown" (every value computed by AWS is unknown, strings built from one
    as well).
  * Resource policies are called as ``policy.validate(ResourceValidationArgs(...), report)``; stack policies as
    ``policy.validate(StackValidationArgs([PolicyResource(...)]), report)``, the way the SDK's own tests do.
  * One test starts the pack the way the engine does (``python -u -m pulumi.policy <engine> policy``) and talks
    to its gRPC analyzer.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import runpy
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from google.protobuf import json_format, struct_pb2

# pulumi-policy pins protobuf~=5.29, which the dev virtualenv's tritonclient[grpc] (protobuf >= 6.30) rules out:
# These tests run in a virtualenv of their own (policy/requirements-test.txt; `make test` builds .venv-policy):
# pulumi-policy's protobuf pin cannot live beside the program's test dependencies.
import pulumi_policy  # noqa: E402
from pulumi_policy import (
    EnforcementLevel,
    PolicyCustomTimeouts,
    PolicyResource,
    PolicyResourceOptions,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)
from pulumi_policy.deserialize import deserialize_properties
from pulumi_policy.policy import _NotApplicableError
from pulumi_policy.proxy import UNKNOWN_STRING_VALUE, unknown_checking_proxy

from infra import catalog
from policy import rules
from tools import synth

ROOT = Path(__file__).resolve().parents[2]
POLICY_DIR = ROOT / "policy"
STACKS = synth.stack_names()
PLACEHOLDER = re.compile(r"<[^<>\s]+\.[A-Za-z0-9_]+>")  # what synth writes for a value AWS computes


# ----------------------------------------------------------------------------------------------------------
# The stack as the engine sees it


@dataclass
class Resource:
    type: str
    name: str
    urn: str
    props: dict
    parent: str | None = None
    dependencies: list[str] = field(default_factory=list)
    property_dependencies: dict[str, list[str]] = field(default_factory=dict)
    custom: bool = True
    protect: bool = False


_property_dependencies: dict[str, dict[str, list[str]]] = {}
_stacks: dict[str, list[Resource]] = {}


def _recording_make_mocks(original: Callable):
    """synth's mocks, with a monitor that also keeps each registration's property dependencies."""
    def make_mocks():
        plan_mocks, recording_monitor = original()

        class Monitor(recording_monitor):
            def RegisterResource(self, request):
                response = super().RegisterResource(request)
                _property_dependencies[response.urn] = {
                    key: list(deps.urns) for key, deps in request.propertyDependencies.items()}
                return response

        return plan_mocks, Monitor
    return make_mocks


def _token(api_version: str, kind: str) -> str:
    group_version = api_version if "/" in api_version else f"core/{api_version}"
    return f"kubernetes:{group_version}:{kind}"


def stack_resources(stack: str) -> list[Resource]:
    """A fresh copy of the stack's resources (preview view)."""
    if stack not in _stacks:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(synth, "_make_mocks", _recording_make_mocks(synth._make_mocks))
            s = synth.synthesize(stack)
        resources = [Resource(r.type, r.name, r.urn, r.inputs, r.parent, list(r.depends_on),
                              _property_dependencies.get(r.urn, {}), r.custom, r.protect) for r in s.registrations]
        for config_file in s.resources("kubernetes:yaml/v2:ConfigFile"):
            for doc in yaml.safe_load_all((ROOT / config_file.inputs["file"]).read_text()):
                if not doc:
                    continue
                token = _token(doc["apiVersion"], doc["kind"])
                meta = doc.get("metadata") or {}
                name = f"{meta.get('namespace', '')}/{meta['name']}".lstrip("/")
                urn = f"{config_file.urn.rsplit('::', 1)[0]}${token}::{config_file.name}:{name}"
                resources.append(Resource(token, f"{config_file.name}:{name}", urn, doc, config_file.urn))
        _stacks[stack] = resources
    return copy.deepcopy(_stacks[stack])


def deployed(resources: list[Resource]) -> list[Resource]:
    """After `pulumi up`: outputs carry each resource's id; joins must work by value (no dependencies)."""
    return [replace(r, props={**r.props, "id": f"<{r.name}.id>"} if r.custom and not r.type.startswith(
        ("kubernetes:", "pulumi:")) else r.props, dependencies=[], property_dependencies={}) for r in resources]


def first_preview(resources: list[Resource]) -> list[Resource]:
    """A fresh stack's first preview: every value AWS computes is unknown, and so is any string built from one."""
    def unknown(value: Any) -> Any:
        if isinstance(value, str):
            return UNKNOWN_STRING_VALUE if PLACEHOLDER.search(value) or value == "<unknown until deploy>" else value
        if isinstance(value, dict):
            return {k: unknown(v) for k, v in value.items()}
        if isinstance(value, list):
            return [unknown(v) for v in value]
        return value
    return [replace(r, props=unknown(r.props)) for r in resources]


def engine_props(props: dict) -> Any:
    """The analyzer's path: Struct on the wire, deserialize_properties, unknown_checking_proxy."""
    def sentinel(value: Any) -> Any:
        if value == "<unknown until deploy>":
            return UNKNOWN_STRING_VALUE
        if isinstance(value, dict):
            return {k: sentinel(v) for k, v in value.items()}
        if isinstance(value, list):
            return [sentinel(v) for v in value]
        return value
    struct = struct_pb2.Struct()
    struct.update(sentinel(props))
    return unknown_checking_proxy(deserialize_properties(json_format.MessageToDict(struct)))


OPTIONS = PolicyResourceOptions(False, [], None, [], PolicyCustomTimeouts(0, 0, 0), [])
PROTECTED = PolicyResourceOptions(True, [], None, [], PolicyCustomTimeouts(0, 0, 0), [])


def run_resource_policy(policy: ResourceValidationPolicy, resource: Resource) -> tuple[list[str], str | None]:
    """(violations, not-applicable reason)."""
    violations: list[str] = []
    args = ResourceValidationArgs(resource.type, engine_props(resource.props), resource.urn, resource.name,
                                  PROTECTED if resource.protect else OPTIONS, None)
    try:
        assert policy.validate(args, lambda message, urn=None: violations.append(message)) is None
    except _NotApplicableError as reason:
        return violations, reason.reason or "not applicable"
    return violations, None


def policy_resources(resources: list[Resource]) -> list[PolicyResource]:
    """PolicyResources linked to each other the way the analyzer links them (parent, dependencies)."""
    built = {r.urn: PolicyResource(r.type, engine_props(r.props), r.urn, r.name, OPTIONS, None, None, [], {})
             for r in resources}
    for r in resources:
        p = built[r.urn]
        p.parent = built.get(r.parent) if r.parent else None
        p.dependencies = [built[u] for u in r.dependencies if u in built]
        p.property_dependencies = {k: [built[u] for u in urns if u in built] for k, urns in r.property_dependencies.items()}
    return list(built.values())


def run_stack_policy(policy: StackValidationPolicy, resources: list[Resource]) -> tuple[list[tuple[str, str | None]], str | None]:
    violations: list[tuple[str, str | None]] = []
    args = StackValidationArgs(policy_resources(resources))
    try:
        assert policy.validate(args, lambda message, urn=None: violations.append((message, urn))) is None
    except _NotApplicableError as reason:
        return violations, reason.reason or "not applicable"
    return violations, None


def violations_of(policy, resources: list[Resource]) -> list[str]:
    """Every violation message of one policy over the stack, prefixed with the resource's name."""
    if isinstance(policy, StackValidationPolicy):
        found, _ = run_stack_policy(policy, resources)
        names = {r.urn: r.name for r in resources}
        return [f"{names.get(urn, 'stack')}: {message}" for message, urn in found]
    messages = []
    for resource in resources:
        found, _ = run_resource_policy(policy, resource)
        messages.extend(f"{resource.name}: {m}" for m in found)
    return messages


# ----------------------------------------------------------------------------------------------------------
# Finding and changing resources in a copy of a stack


def one(resources: list[Resource], type_token: str, name_contains: str = "") -> Resource:
    matches = [r for r in resources if r.type == type_token and name_contains in r.name]
    assert len(matches) == 1, f"{len(matches)} {type_token} matching {name_contains!r}: {[m.name for m in matches]}"
    return matches[0]


def drop(resources: list[Resource], victim: Resource) -> list[Resource]:
    return [r for r in resources if r.urn != victim.urn]


def pod_specs(resource: Resource) -> list[dict]:
    return [t.spec for t in rules.pod_templates(resource.type, resource.props)]


def containers(resource: Resource, list_name: str = "containers") -> list[dict]:
    return [c for spec in pod_specs(resource) for c in spec.get(list_name, [])]


def set_resource(container: dict, resource: str, value: Any) -> None:
    for side in ("requests", "limits"):
        container["resources"][side][resource] = value


PYTORCHJOB = "kubernetes:kubeflow.org/v1:PyTorchJob"
JOB = "kubernetes:batch/v1:Job"
DEPLOYMENT = "kubernetes:apps/v1:Deployment"
CONFIG_MAP = "kubernetes:core/v1:ConfigMap"


def triton(resources: list[Resource]) -> Resource:
    return one(resources, DEPLOYMENT, "pipeline-triton")


def serving_config(resources: list[Resource]) -> Resource:
    return one(resources, CONFIG_MAP, "serving-config")


# ----------------------------------------------------------------------------------------------------------
# The pack


RESOURCE_POLICIES = [p for p in rules.POLICIES if isinstance(p, ResourceValidationPolicy)]
STACK_POLICIES = [p for p in rules.POLICIES if isinstance(p, StackValidationPolicy)]


def test_every_rule_is_a_mandatory_policy_with_a_unique_name():
    names = [p.name for p in rules.POLICIES]
    assert len(names) == len(set(names)) == 12
    assert all(p.enforcement_level == EnforcementLevel.MANDATORY for p in rules.POLICIES)
    assert {p.name for p in STACK_POLICIES} == {
        "efa-security-group-self-traffic", "fsx-lustre-security-group-ports", "s3-bucket-encrypted-private-tls-only",
        "gpu-pod-efa-request-matches-node", "triton-gpus-match-engine-world-size",
        "efa-node-group-tells-autoscaler-its-interfaces"}
    assert all(p.description and p.remediation_steps for p in rules.POLICIES)


def test_main_builds_the_pack_from_the_rules(monkeypatch):
    built = {}

    class FakePolicyPack:  # the real one starts a gRPC server and never returns
        def __init__(self, **kwargs):
            built.update(kwargs)

    monkeypatch.setattr(pulumi_policy, "PolicyPack", FakePolicyPack)
    runpy.run_path(str(POLICY_DIR), run_name="__main__")
    assert re.fullmatch(r"[a-zA-Z0-9-_.]{1,100}", built["name"])
    assert built["enforcement_level"] == EnforcementLevel.MANDATORY
    assert [p.name for p in built["policies"]] == [p.name for p in rules.POLICIES]


def test_pack_project_files():
    project = yaml.safe_load((POLICY_DIR / "PulumiPolicy.yaml").read_text())
    assert project["runtime"]["name"] == "python"
    assert project["runtime"]["options"]["virtualenv"] == "venv"
    assert (POLICY_DIR / ".gitignore").read_text().split() == ["venv/"]
    requirements = [line.split("#")[0].strip() for line in (POLICY_DIR / "requirements.txt").read_text().splitlines()]
    assert "pulumi-policy>=1.21,<2" in requirements
    # The pack reads instance facts from the catalog; it keeps no copy of them.
    source = (POLICY_DIR / "rules.py").read_text()
    assert "from infra import catalog" in source
    assert not re.search(r"\b(32|16)\b", source.replace("[0-9a-fA-F]{32,}", ""))


# ----------------------------------------------------------------------------------------------------------
# Every stack file passes every policy


@pytest.fixture(params=STACKS)
def stack(request) -> str:
    return request.param


@pytest.mark.parametrize("view", ["preview", "deployed", "first-preview"])
def test_every_stack_passes_every_policy(stack, view):
    resources = {"preview": stack_resources, "deployed": lambda s: deployed(stack_resources(s)),
                 "first-preview": lambda s: first_preview(stack_resources(s))}[view](stack)
    problems = [f"{p.name}: {m}" for p in rules.POLICIES for m in violations_of(p, resources)]
    assert problems == []
    skipped = {p.name: run_stack_policy(p, resources)[1] for p in STACK_POLICIES}
    if view != "first-preview":  # with every value known, no stack policy may skip anything
        assert skipped == {p.name: None for p in STACK_POLICIES}
    else:  # joins go through property dependencies; only the policy JSON, built from the bucket ARN, waits for AWS
        assert {name for name, reason in skipped.items() if reason} == {"s3-bucket-encrypted-private-tls-only"}
        assert all(part.endswith(": bucket policy not known yet")
                   for part in skipped["s3-bucket-encrypted-private-tls-only"].split("; "))


def test_the_policies_inspect_what_the_stacks_declare(stack):
    """Guard against passing by not looking: each check finds its resources in every stack file."""
    resources = stack_resources(stack)
    plain = [(r.type, rules.plain(engine_props(r.props))) for r in resources]
    applied = {check.__name__: sum(check(t, p) is not None for t, p in plain)
               for check in (rules.check_efa_launch_template, rules.check_pinned_images, rules.check_dev_shm,
                             rules.check_fork_safe)}
    count = lambda *types: sum(r.type in types for r in resources)  # noqa: E731
    assert applied["check_efa_launch_template"] == count(rules.LAUNCH_TEMPLATE) >= 1
    workloads = count(PYTORCHJOB, JOB, DEPLOYMENT)  # training, conversion (and evaluation) Jobs, Triton, the operator
    assert workloads >= 4 and count(rules.HELM_RELEASE) >= 2  # the device plugins, and whatever else the stack installs
    assert applied["check_pinned_images"] == workloads + count(rules.HELM_RELEASE)
    assert applied["check_dev_shm"] == workloads
    assert applied["check_fork_safe"] == sum(r.type.startswith("kubernetes:") for r in resources) + count(rules.LAUNCH_TEMPLATE)
    view = rules.StackView(policy_resources(resources))
    lt = one(resources, rules.LAUNCH_TEMPLATE)
    groups, _ = view.refs(view.by_urn[lt.urn], "networkInterfaces", (rules.SECURITY_GROUP,))
    assert [g.name for g in groups] == [n for n in (r.name for r in resources) if n.endswith("-train-efa")]
    efa_pods = [(r.name, t.where) for r, t in rules._workloads(view)
                if rules.pod_count(t, rules.EFA_RESOURCE) not in (0, rules.UNKNOWN)]
    roles = one(resources, PYTORCHJOB).props["spec"]["pytorchReplicaSpecs"]  # Master, and Worker when multi-node
    assert {where for _, where in efa_pods} == {f"spec.pytorchReplicaSpecs.{role}.template" for role in roles}
    assert len([1 for r, t in rules._workloads(view) if rules.is_triton(r, t)]) == 1


# ----------------------------------------------------------------------------------------------------------
# Each rule fails on a mutated copy


def mutate_lt(change: Callable[[dict], None], stack: str = "prod") -> list[Resource]:
    resources = stack_resources(stack)
    change(one(resources, rules.LAUNCH_TEMPLATE).props)
    return resources


def _set_interface(index: int, **values) -> Callable[[dict], None]:
    return lambda props: props["networkInterfaces"][index].update(values)


@pytest.mark.parametrize("change, expected", [
    (lambda p: p["networkInterfaces"].pop(), "p5.48xlarge has 32 EFA interfaces (infra/catalog.py) but the launch template declares 31"),
    (_set_interface(1, deviceIndex=0), "network card 1: device index 0"),
    (_set_interface(0, interfaceType="efa-only"), "network card 0: device index 0, interface type 'efa-only'"),
    (_set_interface(5, interfaceType="interface"), "declares 31"),
    (_set_interface(3, networkCardIndex=2), "network card 2 has 2 EFA interfaces"),
    (lambda p: p.update(instanceType="p5en.48xlarge"), "p5en.48xlarge has 16 EFA interfaces"),
    (lambda p: p.update(instanceType="m7i.2xlarge"), "m7i.2xlarge has no EFA support"),
    (lambda p: p.update(instanceType="p6-b200.48xlarge"), "is not in infra/catalog.py"),
    (lambda p: p.pop("instanceType"), "must set instanceType"),
])
def test_efa_launch_template_fails(change, expected):
    found = violations_of(rules.efa_launch_template, mutate_lt(change))
    assert any(expected in m for m in found), found


def test_efa_launch_template_passes_for_every_catalog_gpu_type():
    from infra.gpu_nodes import efa_network_interfaces
    for name in catalog.GPU_INSTANCE_TYPES:
        interfaces = [{"networkCardIndex": i["network_card_index"], "deviceIndex": i["device_index"],
                       "interfaceType": i["interface_type"]} for i in efa_network_interfaces(catalog.get(name), [])]
        assert rules.check_efa_launch_template(rules.LAUNCH_TEMPLATE, {"instanceType": name, "networkInterfaces": interfaces}) == []
    # A launch template without EFA interfaces on a type without EFA is none of this rule's business.
    assert rules.check_efa_launch_template(rules.LAUNCH_TEMPLATE, {"instanceType": "m7i.2xlarge"}) is None


def efa_rule(resources: list[Resource], direction: str) -> Resource:
    token = rules.INGRESS_RULE if direction == "in" else rules.EGRESS_RULE
    return one(resources, token, f"train-efa-{direction}")


@pytest.mark.parametrize("view", ["preview", "deployed"])
@pytest.mark.parametrize("change, expected", [
    (lambda rs: drop(rs, efa_rule(rs, "out")), "has no egress rule"),
    (lambda rs: drop(rs, efa_rule(rs, "in")), "has no ingress rule"),
    (lambda rs: [efa_rule(rs, "in").props.update(ipProtocol="tcp", fromPort=0, toPort=65535), rs][1], "has no ingress rule"),
    (lambda rs: [efa_rule(rs, "out").props.update(referencedSecurityGroupId=None, cidrIpv4="10.0.0.0/8"),
                 efa_rule(rs, "out").property_dependencies.pop("referencedSecurityGroupId"), rs][2], "has no egress rule"),
])
def test_efa_security_group_fails(change, expected, view):
    resources = change(stack_resources("prod"))
    found = violations_of(rules.efa_security_group, deployed(resources) if view == "deployed" else resources)
    assert any(expected in m and "train-efa" in m for m in found), found


def test_efa_security_group_accepts_inline_and_legacy_rules():
    resources = stack_resources("dev")
    group = one(resources, rules.SECURITY_GROUP, "train-efa")
    without_rules = drop(drop(resources, efa_rule(resources, "in")), efa_rule(resources, "out"))
    inline = copy.deepcopy(without_rules)
    one(inline, rules.SECURITY_GROUP, "train-efa").props.update(
        ingress=[{"protocol": "-1", "fromPort": 0, "toPort": 0, "self": True}],
        egress=[{"protocol": "-1", "fromPort": 0, "toPort": 0, "self": True}])
    assert violations_of(rules.efa_security_group, inline) == []
    legacy = copy.deepcopy(without_rules)
    for kind in ("ingress", "egress"):
        legacy.append(Resource(rules.LEGACY_RULE, f"efa-{kind}", f"urn:legacy-{kind}",
                               {"type": kind, "protocol": "-1", "fromPort": 0, "toPort": 0, "self": True,
                                "securityGroupId": f"<{group.name}.id>"},
                               property_dependencies={"securityGroupId": [group.urn]}))
    assert violations_of(rules.efa_security_group, legacy) == []
    assert violations_of(rules.efa_security_group, legacy[:-1])  # ingress only


def fsx_rules(resources: list[Resource], *names: str) -> list[Resource]:
    return [one(resources, rules.INGRESS_RULE, f"storage-{n}") for n in names]


def _narrow(resources: list[Resource]) -> list[Resource]:
    fsx_rules(resources, "fsx-1018-nodes")[0].props["toPort"] = 1020
    return resources


@pytest.mark.parametrize("view", ["preview", "deployed"])
@pytest.mark.parametrize("change, expected", [
    (lambda rs: [r for r in rs if r not in fsx_rules(rs, "fsx-988-nodes", "fsx-988-self")], "does not open TCP 988 from itself"),
    (lambda rs: [r for r in rs if r not in fsx_rules(rs, "fsx-988-nodes")], "does not open TCP 988 from the clients"),
    (_narrow, "does not open TCP 1021-1023 from the clients"),
    (lambda rs: [r for r in rs if r not in fsx_rules(rs, "fsx-1018-self")], "does not open TCP 1018-1023 from itself"),
    (lambda rs: [[r.props.update(ipProtocol="udp") for r in fsx_rules(rs, "fsx-988-self", "fsx-988-nodes")], rs][1],
     "does not open TCP 988 from itself"),
])
def test_fsx_security_group_fails(change, expected, view):
    resources = change(stack_resources("prod"))
    found = violations_of(rules.fsx_ports, deployed(resources) if view == "deployed" else resources)
    assert any(expected in m for m in found), found


def test_fsx_security_group_accepts_all_traffic_rules():
    resources = stack_resources("staging")
    for r in fsx_rules(resources, "fsx-988-self", "fsx-988-nodes", "fsx-1018-self", "fsx-1018-nodes"):
        r.props.update(ipProtocol="-1", fromPort=None, toPort=None)
    assert violations_of(rules.fsx_ports, resources) == []


def bucket_part(resources: list[Resource], suffix: str) -> Resource:
    return next(r for r in resources if r.name.endswith(f"storage-checkpoints{suffix}"))


def _policy(resources: list[Resource], change: Callable[[dict], None]) -> list[Resource]:
    p = bucket_part(resources, "-policy")
    document = json.loads(p.props["policy"])
    change(document["Statement"][0])
    p.props["policy"] = json.dumps(document)
    return resources


@pytest.mark.parametrize("view", ["preview", "deployed"])
@pytest.mark.parametrize("change, expected", [
    (lambda rs: drop(rs, bucket_part(rs, "-encryption")), "has no default encryption"),
    (lambda rs: [bucket_part(rs, "-encryption").props["rules"][0]["applyServerSideEncryptionByDefault"].update(sseAlgorithm="none"), rs][1],
     "has no default encryption"),
    (lambda rs: drop(rs, bucket_part(rs, "-public-access")), "has no public access block"),
    (lambda rs: [bucket_part(rs, "-public-access").props.update(restrictPublicBuckets=False), rs][1],
     "leaves restrictPublicBuckets off"),
    (lambda rs: [bucket_part(rs, "-public-access").props.pop("ignorePublicAcls"), rs][1], "leaves ignorePublicAcls off"),
    (lambda rs: drop(rs, bucket_part(rs, "-policy")), "(it has no bucket policy)"),
    (lambda rs: _policy(rs, lambda s: s["Condition"]["Bool"].update({"aws:SecureTransport": "true"})), "accepts plain HTTP"),
    (lambda rs: _policy(rs, lambda s: s.update(Effect="Allow")), "accepts plain HTTP"),
    (lambda rs: _policy(rs, lambda s: s.update(Resource=s["Resource"][:1])), "accepts plain HTTP"),
    (lambda rs: _policy(rs, lambda s: s.update(Action="s3:GetObject")), "accepts plain HTTP"),
])
def test_s3_bucket_fails(change, expected, view):
    resources = change(stack_resources("prod"))
    found = violations_of(rules.s3_buckets, deployed(resources) if view == "deployed" else resources)
    assert found and all("storage-checkpoints" in m for m in found), found
    assert any(expected in m for m in found), found


@pytest.mark.parametrize("image, ok", [
    ("nvcr.io/nvidia/nemo:26.02", True),
    ("nvcr.io/nvidia/nemo@sha256:" + "a" * 64, True),
    ("registry.local:5000/team/trainer:1.4.2", True),
    ("nvcr.io/nvidia/nemo:latest", False),
    ("nvcr.io/nvidia/nemo", False),
    ("registry.local:5000/team/trainer", False),
    ("nvcr.io/nvidia/nemo:", False),
    ("", False),
])
def test_image_reference(image, ok):
    assert (rules.image_problem(image) is None) == ok


@pytest.mark.parametrize("change, expected", [
    (lambda rs: containers(one(rs, PYTORCHJOB), "initContainers")[0].update(image="nvcr.io/nvidia/nemo:latest"),
     "uses the mutable tag 'latest'"),
    (lambda rs: containers(one(rs, JOB, "conversion"))[0].update(image="nvcr.io/nvidia/tritonserver"), "has no tag"),
    (lambda rs: containers(triton(rs))[0].pop("image"), "has no image"),
    (lambda rs: containers(one(rs, DEPLOYMENT, "training-operator"))[0].update(
        image="ghcr.io/kubeflow/training-v1/training-operator:latest"), "mutable tag"),
    (lambda rs: one(rs, rules.HELM_RELEASE, "efa-device-plugin").props.pop("version"), "pin an exact chart version"),
    (lambda rs: one(rs, rules.HELM_RELEASE, "nvidia-device-plugin").props.update(version="^0.20"), "pin an exact chart version"),
    (lambda rs: one(rs, rules.HELM_RELEASE, "nvidia-device-plugin").props["values"].update(image={"tag": "latest"}),
     "values.image.tag is 'latest'"),
])
def test_pinned_images_fails(change, expected):
    resources = stack_resources("dev")
    change(resources)
    found = violations_of(rules.pinned_images, resources)
    assert len(found) == 1 and expected in found[0], found


def test_pinned_images_accepts_digests():
    resources = stack_resources("dev")
    for c in containers(triton(resources)) + containers(triton(resources), "initContainers"):
        c["image"] = "nvcr.io/nvidia/tritonserver@sha256:" + "0" * 64
    assert violations_of(rules.pinned_images, resources) == []


@pytest.mark.parametrize("change, expected", [
    (lambda rs: containers(triton(rs))[0]["env"].append({"name": "RDMAV_FORK_SAFE", "value": "1"}),
     "sets the environment variable RDMAV_FORK_SAFE"),
    (lambda rs: containers(one(rs, PYTORCHJOB), "initContainers")[0].setdefault("env", []).append(
        {"name": "RDMAV_FORK_SAFE", "valueFrom": {"configMapKeyRef": {"name": "x", "key": "y"}}}), "RDMAV_FORK_SAFE"),
    (lambda rs: containers(one(rs, PYTORCHJOB))[0]["command"].__setitem__(
        2, "export RDMAV_FORK_SAFE=1 && " + containers(one(rs, PYTORCHJOB))[0]["command"][2]), "export RDMAV_FORK_SAFE=1"),
    (lambda rs: one(rs, CONFIG_MAP, "entrypoints").props["data"].update(
        {"finetune.py": "import os\nos.environ['RDMAV_FORK_SAFE'] = '1'\n"}), "os.environ['RDMAV_FORK_SAFE'] = '1'"),
    (lambda rs: one(rs, CONFIG_MAP, "training-config").props["data"].update(RDMAV_FORK_SAFE="1"), "data.RDMAV_FORK_SAFE"),
    (lambda rs: one(rs, rules.HELM_RELEASE, "efa-device-plugin").props["values"].update(
        env=[{"name": "RDMAV_FORK_SAFE", "value": "1"}]), "values.env[0]"),
    (lambda rs: one(rs, rules.LAUNCH_TEMPLATE).props.update(userData=base64.b64encode(
        b"#!/bin/bash\necho 'RDMAV_FORK_SAFE=1' >> /etc/environment\n").decode()), "userData sets RDMAV_FORK_SAFE"),
])
def test_no_fork_safe_fails(change, expected):
    resources = stack_resources("staging")
    change(resources)
    found = violations_of(rules.no_fork_safe, resources)
    assert found and any(expected in m for m in found), found


@pytest.mark.parametrize("text", [
    "# never set RDMAV_FORK_SAFE with current EFA\n",
    "unset RDMAV_FORK_SAFE\n",
    "os.environ.pop('RDMAV_FORK_SAFE', None)\n",
    "assert 'RDMAV_FORK_SAFE' not in os.environ\n",
])
def test_no_fork_safe_allows_mentions_that_do_not_set_it(text):
    resources = stack_resources("staging")
    one(resources, CONFIG_MAP, "entrypoints").props["data"]["finetune.py"] += text
    assert violations_of(rules.no_fork_safe, resources) == []


def shm_volume(resource: Resource) -> dict:
    return next(v for spec in pod_specs(resource) for v in spec["volumes"] if v["name"] == "dshm")


@pytest.mark.parametrize("change, expected", [
    (lambda rs: shm_volume(triton(rs))["emptyDir"].pop("medium"), "is not memory-backed"),
    (lambda rs: shm_volume(one(rs, JOB, "conversion"))["emptyDir"].pop("sizeLimit"), "has no sizeLimit"),
    (lambda rs: shm_volume(one(rs, PYTORCHJOB)).update(emptyDir={"medium": "Memory", "sizeLimit": "0"}), "has no sizeLimit"),
    (lambda rs: shm_volume(triton(rs)).update(emptyDir=None, hostPath={"path": "/dev/shm"}), "which is not an emptyDir"),
    (lambda rs: containers(triton(rs))[0].update(volumeMounts=[m for m in containers(triton(rs))[0]["volumeMounts"]
                                                                if m["mountPath"] != "/dev/shm"]), "does not mount /dev/shm"),
])
def test_dev_shm_fails(change, expected):
    resources = stack_resources("prod")
    change(resources)
    found = violations_of(rules.dev_shm, resources)
    assert found and all(expected in m for m in found), found


def test_dev_shm_is_only_for_gpu_containers():
    resources = stack_resources("prod")
    exports = containers(one(resources, JOB, "conversion"), "initContainers")  # the export step has no GPU
    assert exports
    for c in exports:
        c["volumeMounts"] = [m for m in c["volumeMounts"] if m["mountPath"] != "/dev/shm"]
    assert violations_of(rules.dev_shm, resources) == []


def pytorchjob_containers(resources: list[Resource], role: str) -> list[dict]:
    job = one(resources, PYTORCHJOB)
    return job.props["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]["containers"]


def _selector(resources: list[Resource], value: str | None) -> None:
    spec = one(resources, PYTORCHJOB).props["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    if value is None:
        spec.pop("nodeSelector")
    else:
        spec["nodeSelector"] = {"nemo-eks/node-group": value}


@pytest.mark.parametrize("view", ["preview", "deployed"])
@pytest.mark.parametrize("stack_name, change, expected", [
    ("prod", lambda rs: set_resource(pytorchjob_containers(rs, "Worker")[0], rules.EFA_RESOURCE, 16),
     "Worker.template) requests and limits vpc.amazonaws.com/efa: 16, but its node group nemo-eks-prod-train-nodes runs p5.48xlarge with 32"),
    ("dev", lambda rs: set_resource(pytorchjob_containers(rs, "Master")[0], rules.EFA_RESOURCE, 32),
     "runs p4d.24xlarge with 4 EFA interfaces"),
    ("prod", lambda rs: pytorchjob_containers(rs, "Worker")[0]["resources"]["limits"].update({rules.EFA_RESOURCE: 31}),
     "limits vpc.amazonaws.com/efa: 31"),
    ("prod", lambda rs: _selector(rs, None), "is not pinned to a GPU node group"),
    ("prod", lambda rs: _selector(rs, "serve"), "selects nemo-eks/node-group=serve, but no node group"),
    ("prod", lambda rs: one(rs, rules.LAUNCH_TEMPLATE).props.update(instanceType="p5en.48xlarge"), "runs p5en.48xlarge with 16"),
])
def test_efa_request_fails(stack_name, change, expected, view):
    resources = stack_resources(stack_name)
    change(resources)
    found = violations_of(rules.efa_requests, deployed(resources) if view == "deployed" else resources)
    assert any(expected in m for m in found), found


def test_efa_request_falls_back_to_the_node_group_instance_types():
    resources = stack_resources("dev")
    group = one(resources, rules.NODE_GROUP, "train")
    group.props.pop("launchTemplate")
    group.property_dependencies.pop("launchTemplate", None)
    group.props["instanceTypes"] = ["p4de.24xlarge"]
    assert violations_of(rules.efa_requests, resources) == []
    group.props["instanceTypes"] = ["p5.48xlarge"]
    assert any("runs p5.48xlarge with 32" in m for m in violations_of(rules.efa_requests, resources))


def _run_json(resources: list[Resource], change: Callable[[dict], None]) -> None:
    cm = serving_config(resources)
    document = json.loads(cm.props["data"]["run.json"])
    change(document["serving"])
    cm.props["data"]["run.json"] = json.dumps(document)


@pytest.mark.parametrize("change, expected", [
    (lambda rs: set_resource(containers(triton(rs))[0], rules.GPU_RESOURCE, 4), "requests 4 GPU(s) per pod, but the engine"),
    (lambda rs: _run_json(rs, lambda s: s.update(world_size=8, tp=8)), "requests 2 GPU(s) per pod, but the engine it serves"),
    (lambda rs: _run_json(rs, lambda s: s.update(world_size=4)), "serving.world_size 4 is not tp x pp"),
    (lambda rs: _run_json(rs, lambda s: s.pop("world_size")), "has no run.json with serving.world_size"),
    (lambda rs: next(v for v in pod_specs(triton(rs))[0]["volumes"] if v["name"] == "run-config")["configMap"].update(
        name="serve-other"), "mounts ConfigMap nemo/serve-other, which this stack does not declare"),
    (lambda rs: pod_specs(triton(rs))[0].update(volumes=[v for v in pod_specs(triton(rs))[0]["volumes"]
                                                         if v["name"] != "run-config"]), "mounts no ConfigMap"),
])
def test_triton_gpus_fail(change, expected):
    resources = stack_resources("prod")
    change(resources)
    found = violations_of(rules.triton_gpus, resources)
    assert any(expected in m for m in found), found


def test_triton_gpus_follow_the_engine():
    resources = stack_resources("prod")
    set_resource(containers(triton(resources))[0], rules.GPU_RESOURCE, 4)
    _run_json(resources, lambda s: s.update(world_size=4, tp=4, pp=1))
    assert violations_of(rules.triton_gpus, resources) == []


# ----------------------------------------------------------------------------------------------------------
# Values not known during preview


def test_unknown_values_make_resource_policies_not_applicable():
    lt = one(stack_resources("prod"), rules.LAUNCH_TEMPLATE)
    lt.props["instanceType"] = "<unknown until deploy>"
    assert run_resource_policy(rules.efa_launch_template, lt) == ([], "instanceType (not known until the resource "
                                                                      "is deployed; checked again then)")
    job = one(stack_resources("prod"), JOB, "conversion")
    containers(job)[0]["image"] = "<unknown until deploy>"
    violations, reason = run_resource_policy(rules.pinned_images, job)
    assert violations == [] and "container image" in reason
    containers(job, "initContainers")[0]["image"] = "busybox"
    violations, reason = run_resource_policy(rules.pinned_images, job)
    assert len(violations) == 1 and "busybox" in violations[0] and reason is None
    deployment = triton(stack_resources("prod"))
    deployment.props["spec"]["template"] = "<unknown until deploy>"
    for policy in (rules.pinned_images, rules.dev_shm):
        assert run_resource_policy(policy, deployment)[0] == [] and run_resource_policy(policy, deployment)[1]


def test_unknown_values_make_stack_policies_skip_not_fail():
    resources = stack_resources("prod")
    bucket_part(resources, "-policy").props["policy"] = "<unknown until deploy>"
    set_resource(pytorchjob_containers(resources, "Worker")[0], rules.EFA_RESOURCE, "<unknown until deploy>")
    assert run_stack_policy(rules.s3_buckets, resources) == ([], "nemo-eks-prod-storage-checkpoints: bucket policy not known yet")
    violations, reason = run_stack_policy(rules.efa_requests, resources)
    assert violations == [] and "EFA request not known yet" in reason


def test_plain_reads_proxies_and_unknowns():
    props = engine_props({"a": [1, {"b": "<unknown until deploy>"}], "c": "<unknown until deploy>", "d": 2.5})
    assert rules.plain(props) == {"a": [1, {"b": rules.UNKNOWN}], "c": rules.UNKNOWN, "d": 2.5}
    assert isinstance(rules.plain(props)["a"][0], int)


# ----------------------------------------------------------------------------------------------------------
# The pack as the engine runs it


def _analyzer_resource(resource: Resource):
    from pulumi.runtime.proto import analyzer_pb2

    properties = struct_pb2.Struct()
    properties.update(resource.props)
    return analyzer_pb2.AnalyzerResource(
        type=resource.type, properties=properties, urn=resource.urn, name=resource.name, parent=resource.parent or "",
        dependencies=resource.dependencies,
        propertyDependencies={k: analyzer_pb2.AnalyzerPropertyDependencies(urns=v)
                              for k, v in resource.property_dependencies.items()})


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory):
    """The pack started as the engine starts it (`python -u -m pulumi.policy <engine> <pack dir>`), from another
    directory; yields a gRPC Analyzer stub."""
    import grpc
    from pulumi.runtime.proto import analyzer_pb2_grpc

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = subprocess.Popen([sys.executable, "-u", "-m", "pulumi.policy", "127.0.0.1:1", str(POLICY_DIR)],
                               cwd=tmp_path_factory.mktemp("engine"), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        port = process.stdout.readline().decode().strip()
        assert port.isdigit(), process.stderr.read().decode() if process.poll() is not None else port
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        yield analyzer_pb2_grpc.AnalyzerStub(channel)
        channel.close()
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_engine_sees_the_pack(analyzer):
    from google.protobuf import empty_pb2
    from pulumi.runtime.proto import analyzer_pb2

    info = analyzer.GetAnalyzerInfo(empty_pb2.Empty())
    assert info.name == "nemo-eks-guardrails"
    assert {p.name: p.enforcementLevel for p in info.policies} == {p.name: analyzer_pb2.MANDATORY for p in rules.POLICIES}
    stack_types = {p.name for p in info.policies if p.policy_type == analyzer_pb2.POLICY_TYPE_STACK}
    assert stack_types == {p.name for p in STACK_POLICIES}


def test_engine_analyzes_a_stack_and_a_resource(analyzer):
    from pulumi.runtime.proto import analyzer_pb2

    resources = stack_resources("prod")
    response = analyzer.AnalyzeStack(analyzer_pb2.AnalyzeStackRequest(resources=[_analyzer_resource(r) for r in resources]))
    assert list(response.diagnostics) == []
    drop_egress = drop(resources, efa_rule(resources, "out"))
    response = analyzer.AnalyzeStack(analyzer_pb2.AnalyzeStackRequest(resources=[_analyzer_resource(r) for r in drop_egress]))
    assert [(d.policyName, d.enforcementLevel, d.urn) for d in response.diagnostics] == [
        ("efa-security-group-self-traffic", analyzer_pb2.MANDATORY, one(resources, rules.SECURITY_GROUP, "train-efa").urn)]

    lt = one(resources, rules.LAUNCH_TEMPLATE)
    lt.props["networkInterfaces"].pop()
    request = _analyzer_resource(lt)
    response = analyzer.Analyze(analyzer_pb2.AnalyzeRequest(type=request.type, properties=request.properties,
                                                            urn=request.urn, name=request.name))
    assert [d.policyName for d in response.diagnostics] == ["efa-launch-template-interfaces"]
    assert "declares 31" in response.diagnostics[0].message
    lt.props["instanceType"] = UNKNOWN_STRING_VALUE
    request = _analyzer_resource(lt)
    response = analyzer.Analyze(analyzer_pb2.AnalyzeRequest(type=request.type, properties=request.properties,
                                                            urn=request.urn, name=request.name))
    assert list(response.diagnostics) == []
    assert [n.policy_name for n in response.not_applicable] == ["efa-launch-template-interfaces"]


# ----------------------------------------------------------------------------------------------------------
# The CI runners' guard


def test_runner_guard_constants_agree_with_the_program():
    from infra import runners

    assert rules.RUNNER_NODE_ROLE == (runners.NODE_ROLE_LABEL, runners.RUNNER_NODE_ROLE)
    assert rules.ARC_CHART_REPOSITORY == runners.CHART_REPOSITORY + "/"


def test_runner_guard_refuses_an_unprotected_runner_node_group_or_arc_release(stack):
    resources = stack_resources(stack)
    guarded = [r for r in resources if rules.check_runner_guard(r.type, r.props, True) is not None]
    assert {r.type for r in guarded} == {rules.NODE_GROUP, rules.HELM_RELEASE}  # it finds what the stack declares
    assert violations_of(rules.runner_guard, resources) == []
    for victim in guarded:
        victim.protect = False
        [message] = violations_of(rules.runner_guard, resources)
        assert message.startswith(f"{victim.name}: ") and "not protected" in message
        victim.protect = True
    # Other node groups and releases are not its business.
    gpu_group = next(r for r in resources if r.type == rules.NODE_GROUP and r not in guarded)
    assert rules.check_runner_guard(gpu_group.type, gpu_group.props, False) is None
