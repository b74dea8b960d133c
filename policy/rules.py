"""The nemo-eks guardrails: pulumi-policy policies that stop a costly mistake before it reaches AWS.

Importing this module has no side effects: it builds policy objects and nothing else. ``policy/__main__.py``
hands ``POLICIES`` to a ``PolicyPack`` (which starts the analyzer's gRPC server and never returns), and the
tests call each policy's ``validate`` directly.

What the engine hands a policy
  * A resource policy sees one resource's inputs (after the provider's check), under the engine's camelCase
    property names: ``networkInterfaces``, ``instanceType``, ``ipProtocol``.
  * A stack policy sees every resource of the stack, children of remote components included, with its outputs
    (planned outputs during preview) and ``property_dependencies``: for each property, the resources its
    value came from. That is how a rule resource is joined to its security group during a preview, when the
    group's id is not known yet; once deployed, the ids are known and a join by value works as well.
  * Values not known yet during a preview raise ``UnknownValueError`` when read. ``plain()`` turns them into
    ``UNKNOWN``; a check that needs such a value skips the resource (a resource policy reports
    ``not_applicable``), and the same check runs again with real values when ``pulumi up`` analyzes the stack.

Facts about instance types (EFA interfaces per type) come from ``infra.catalog``, never from a copy here.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from pulumi_policy import (
    EnforcementLevel,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)

try:  # pulumi_policy.proxy is where 1.21 defines these; it is not part of the package's __all__.
    from pulumi_policy.proxy import UnknownValueError
    from pulumi_policy.proxy import (UNKNOWN_ARCHIVE_VALUE, UNKNOWN_ARRAY_VALUE, UNKNOWN_ASSET_VALUE,
                                     UNKNOWN_BOOLEAN_VALUE, UNKNOWN_NUMBER_VALUE, UNKNOWN_OBJECT_VALUE,
                                     UNKNOWN_STRING_VALUE)
    _SENTINELS = frozenset({UNKNOWN_ARCHIVE_VALUE, UNKNOWN_ARRAY_VALUE, UNKNOWN_ASSET_VALUE, UNKNOWN_BOOLEAN_VALUE,
                            UNKNOWN_NUMBER_VALUE, UNKNOWN_OBJECT_VALUE, UNKNOWN_STRING_VALUE})
except ImportError:  # pragma: no cover - a future layout of the SDK
    class UnknownValueError(Exception):  # type: ignore[no-redef]
        pass
    _SENTINELS = frozenset({"04da6b54-80e4-46f7-96ec-b56ff0331ba9"})

from infra import catalog

# ----------------------------------------------------------------------------------------------------------
# Type tokens and names

LAUNCH_TEMPLATE = "aws:ec2/launchTemplate:LaunchTemplate"
SECURITY_GROUP = "aws:ec2/securityGroup:SecurityGroup"
INGRESS_RULE = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
EGRESS_RULE = "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule"
LEGACY_RULE = "aws:ec2/securityGroupRule:SecurityGroupRule"  # what pulumi-eks uses for its own groups
LUSTRE = "aws:fsx/lustreFileSystem:LustreFileSystem"
BUCKET = "aws:s3/bucket:Bucket"
BUCKET_V2 = "aws:s3/bucketV2:BucketV2"  # the deprecated alias of Bucket
BUCKET_ENCRYPTION = ("aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration",
                     "aws:s3/bucketServerSideEncryptionConfigurationV2:BucketServerSideEncryptionConfigurationV2")
BUCKET_PUBLIC_ACCESS_BLOCK = "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock"
BUCKET_POLICY = "aws:s3/bucketPolicy:BucketPolicy"
NODE_GROUP = "aws:eks/nodeGroup:NodeGroup"
CONFIG_MAP = "kubernetes:core/v1:ConfigMap"
DEPLOYMENT = "kubernetes:apps/v1:Deployment"
HELM_RELEASE = "kubernetes:helm.sh/v3:Release"
HELM_CHART_V4 = "kubernetes:helm.sh/v4:Chart"

GPU_RESOURCE = "nvidia.com/gpu"
EFA_RESOURCE = "vpc.amazonaws.com/efa"
NODE_GROUP_LABEL = "nemo-eks/node-group"  # the label every GPU node group carries and GPU pods select
RUN_CONFIG_VOLUME = "run-config"  # the pipeline's volume carrying the run's run.json
FORK_SAFE = "RDMAV_FORK_SAFE"

# Kinds whose pod template sits at spec.template; CronJob one level deeper; Kubeflow jobs under *ReplicaSpecs.
_TEMPLATE_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "ReplicationController", "Job"})
_CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")


# ----------------------------------------------------------------------------------------------------------
# Reading engine values


class _Unknown:
    """A value the engine does not know yet (during preview)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Any = _Unknown()


def plain(value: Any) -> Any:
    """A plain copy of engine property values (dicts, lists, ints, floats, strings, bools) in which every value
    not known yet is ``UNKNOWN``. Works on the SDK's unknown-checking proxies (Mapping/Sequence, not dict/list)
    and on plain values alike; integral floats (the wire has only floats) become ints."""
    if isinstance(value, str):
        return UNKNOWN if value in _SENTINELS else value
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, Mapping):
        result = {}
        for key in list(value):
            try:
                item = value[key]
            except UnknownValueError:
                result[key] = UNKNOWN
                continue
            result[key] = plain(item)
        return result
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        items = []
        for index in range(len(value)):
            try:
                item = value[index]
            except UnknownValueError:
                items.append(UNKNOWN)
                continue
            items.append(plain(item))
        return items
    return value


def is_unknown(value: Any) -> bool:
    return value is UNKNOWN


def get(value: Any, *path: str | int, default: Any = None) -> Any:
    """``value[path[0]][path[1]]...``; ``default`` when a step is missing, ``UNKNOWN`` when a step is unknown."""
    for step in path:
        if value is UNKNOWN:
            return UNKNOWN
        if isinstance(step, int):
            if not isinstance(value, list) or not -len(value) <= step < len(value):
                return default
            value = value[step]
        else:
            if not isinstance(value, dict) or step not in value:
                return default
            value = value[step]
    return value


def strings_in(value: Any) -> Iterator[str]:
    """Every string anywhere in ``value``."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)


def contains_unknown(value: Any) -> bool:
    if value is UNKNOWN:
        return True
    if isinstance(value, dict):
        return any(contains_unknown(v) for v in value.values())
    if isinstance(value, list):
        return any(contains_unknown(v) for v in value)
    return False


def as_int(value: Any) -> int | None:
    """An integer count from a number or a numeric string ("8", 8, 8.0); None if it is not one."""
    if isinstance(value, bool) or value is None or value is UNKNOWN:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        return int(value)
    return None


def _kind(resource_type: str, props: dict) -> str:
    kind = props.get("kind")
    return kind if isinstance(kind, str) else resource_type.rsplit(":", 1)[-1]


# ----------------------------------------------------------------------------------------------------------
# Kubernetes pod templates


@dataclass
class PodTemplate:
    where: str  # e.g. "spec.template" or "spec.pytorchReplicaSpecs.Worker.template"
    metadata: dict
    spec: dict
    unknown: bool = False  # the template, or a container in it, is not known yet (during preview)

    def containers(self) -> Iterator[tuple[str, dict]]:
        """(list name, container) for init, regular and ephemeral containers."""
        for list_name in _CONTAINER_LISTS:
            items = self.spec.get(list_name)
            if isinstance(items, list):
                for container in items:
                    if isinstance(container, dict):
                        yield list_name, container

    def label(self, container: dict) -> str:
        name = container.get("name")
        return f"container {name if isinstance(name, str) else '?'} ({self.where})"


def pod_templates(resource_type: str, props: dict) -> list[PodTemplate] | None:
    """The pod templates of a Kubernetes workload; None if the resource has none; templates that are unknown
    (during preview) are left out."""
    if not resource_type.startswith("kubernetes:"):
        return None
    kind = _kind(resource_type, props)
    spec = props.get("spec")
    found: list[tuple[str, Any]] = []
    if kind == "Pod":
        found.append(("spec", {"metadata": props.get("metadata"), "spec": spec}))
    elif kind in _TEMPLATE_KINDS:
        found.append(("spec.template", get(spec, "template")))
    elif kind == "CronJob":
        found.append(("spec.jobTemplate.spec.template", get(spec, "jobTemplate", "spec", "template")))
    elif isinstance(spec, dict):
        # Kubeflow jobs: PyTorchJob (pytorchReplicaSpecs), TFJob, MPIJob, XGBoostJob, PaddleJob, JAXJob.
        for key, replica_specs in spec.items():
            if key.endswith("ReplicaSpecs") and isinstance(replica_specs, dict):
                for role, replica in replica_specs.items():
                    found.append((f"spec.{key}.{role}.template", get(replica, "template")))
    if not found:
        return None
    templates = []
    for where, template in found:
        pod_spec = get(template, "spec")
        if template is UNKNOWN or pod_spec is UNKNOWN:
            templates.append(PodTemplate(where, {}, {}, unknown=True))
        elif isinstance(pod_spec, dict):
            metadata = template.get("metadata")
            lists = [pod_spec.get(name) for name in _CONTAINER_LISTS]
            unknown = any(v is UNKNOWN or (isinstance(v, list) and any(c is UNKNOWN for c in v)) for v in lists)
            templates.append(PodTemplate(where, metadata if isinstance(metadata, dict) else {}, pod_spec, unknown))
    return templates


def resource_amount(container: dict, resource: str) -> tuple[Any, Any]:
    """(requests, limits) of an extended resource in a container; None where not set, UNKNOWN where unknown."""
    resources = container.get("resources")
    if resources is UNKNOWN:
        return UNKNOWN, UNKNOWN
    return get(resources, "requests", resource), get(resources, "limits", resource)


def container_count(container: dict, resource: str) -> int | Any:
    """What a container gets of an extended resource (requests default to limits); UNKNOWN if not known."""
    requests, limits = resource_amount(container, resource)
    if requests is UNKNOWN or limits is UNKNOWN:
        return UNKNOWN
    for value in (requests, limits):
        if value is not None:
            count = as_int(value)
            return count if count is not None else 0
    return 0


def pod_count(template: PodTemplate, resource: str) -> int | Any:
    """What a pod gets of an extended resource: the sum over its containers, or the largest init container."""
    regular, init = 0, 0
    for list_name, container in template.containers():
        count = container_count(container, resource)
        if count is UNKNOWN:
            return UNKNOWN
        if list_name == "initContainers":
            init = max(init, count)
        elif list_name == "containers":
            regular += count
    return max(regular, init)


# ----------------------------------------------------------------------------------------------------------
# Stack view: resources and the joins between them


@dataclass
class Res:
    type: str
    name: str
    urn: str
    props: dict
    property_dependencies: dict[str, set[str]] = field(default_factory=dict)


class StackView:
    """The stack's resources with plain props, and joins by property dependency or by value."""

    def __init__(self, resources: Iterable[Any]):
        self.resources: list[Res] = []
        for r in resources:
            deps = {key: {d.urn for d in (value or [])} for key, value in (getattr(r, "property_dependencies", None) or {}).items()}
            self.resources.append(Res(r.resource_type, r.name, r.urn, plain(r.props), deps))
        self.by_urn = {r.urn: r for r in self.resources}

    def of_type(self, *types: str) -> list[Res]:
        return [r for r in self.resources if r.type in types]

    def refs(self, res: Res, prop: str, types: Sequence[str], keys: Sequence[str] = ("id",)) -> tuple[list[Res], bool]:
        """The resources of ``types`` that ``res``'s property ``prop`` refers to, and whether part of that property
        is unknown (so the list may be incomplete). A reference is a property dependency on the resource, or a
        string in the property equal to one of the resource's ``keys`` (its id, once deployed)."""
        value = res.props.get(prop)
        targets = {urn for urn in res.property_dependencies.get(prop, ()) if urn in self.by_urn
                   and self.by_urn[urn].type in types}
        wanted = set(strings_in(value))
        if wanted:
            for other in self.of_type(*types):
                if any(isinstance(other.props.get(k), str) and other.props.get(k) in wanted for k in keys):
                    targets.add(other.urn)
        found = [self.by_urn[urn] for urn in sorted(targets)]
        return found, contains_unknown(value)

    def referring(self, target: Res, types: Sequence[str], prop: str, keys: Sequence[str] = ("id",)) -> list[Res]:
        """The resources of ``types`` whose property ``prop`` refers to ``target``."""
        return [r for r in self.of_type(*types) if target in self.refs(r, prop, (target.type,), keys)[0]]


# ----------------------------------------------------------------------------------------------------------
# Security group rules


@dataclass
class Rule:
    urn: str
    direction: str  # "ingress" | "egress"
    group: str  # urn of the group the rule belongs to
    protocol: str | Any  # "all", "tcp", "udp", "icmp", a number as a string, or UNKNOWN
    from_port: int | None
    to_port: int | None
    peer_groups: set[str]  # urns of referenced groups
    other_peer: bool  # a CIDR, prefix list or a group not declared in this stack
    unknown: bool  # a field that matters is not known yet

    def covers_port(self, port: int) -> bool:
        if self.protocol == "all":
            return True
        if self.protocol != "tcp" or self.from_port is None or self.to_port is None:
            return False
        return self.from_port <= port <= self.to_port


def _protocol(value: Any) -> Any:
    if value is UNKNOWN:
        return UNKNOWN
    text = str(value).strip().lower()
    return {"-1": "all", "all": "all", "6": "tcp", "17": "udp", "1": "icmp"}.get(text, text)


def _port(value: Any) -> int | None:
    return as_int(value)


def _peer(stack: StackView, rule: Res, prop: str) -> tuple[set[str], bool, bool]:
    """The groups of this stack a rule's peer property names; whether it names a group from elsewhere (a known id
    that is no group of this stack, or a value coming from another resource, e.g. the node security group of the
    eks.Cluster component); whether the peer is unknown."""
    value = rule.props.get(prop)
    peers, unknown = stack.refs(rule, prop, (SECURITY_GROUP,))
    urns = {g.urn for g in peers}
    if urns:
        return urns, False, False
    foreign = isinstance(value, str) or any(urn not in urns for urn in rule.property_dependencies.get(prop, ()))
    return urns, foreign, unknown and not foreign


def security_group_rules(stack: StackView, group: Res) -> list[Rule]:
    """Every ingress and egress rule of ``group``: separate rule resources (aws.vpc.SecurityGroup*Rule and the
    legacy aws.ec2.SecurityGroupRule) and rules inline on the group."""
    rules: list[Rule] = []
    for rule_type, direction in ((INGRESS_RULE, "ingress"), (EGRESS_RULE, "egress")):
        for r in stack.referring(group, (rule_type,), "securityGroupId"):
            p = r.props
            peers, foreign, peer_unknown = _peer(stack, r, "referencedSecurityGroupId")
            other = foreign or any(isinstance(p.get(k), str) for k in ("cidrIpv4", "cidrIpv6", "prefixListId"))
            rules.append(Rule(r.urn, direction, group.urn, _protocol(p.get("ipProtocol")), _port(p.get("fromPort")),
                              _port(p.get("toPort")), peers, other, peer_unknown or p.get("ipProtocol") is UNKNOWN))
    for r in stack.referring(group, (LEGACY_RULE,), "securityGroupId"):
        p = r.props
        direction = p.get("type")
        if direction not in ("ingress", "egress"):
            continue
        peer_urns, foreign, peer_unknown = _peer(stack, r, "sourceSecurityGroupId")
        if p.get("self") is True:
            peer_urns.add(group.urn)
        other = foreign or bool(p.get("cidrBlocks")) or bool(p.get("ipv6CidrBlocks")) or bool(p.get("prefixListIds"))
        rules.append(Rule(r.urn, direction, group.urn, _protocol(p.get("protocol")), _port(p.get("fromPort")),
                          _port(p.get("toPort")), peer_urns, other,
                          peer_unknown or p.get("self") is UNKNOWN or p.get("protocol") is UNKNOWN))
    for direction in ("ingress", "egress"):
        inline = group.props.get(direction)
        if inline is UNKNOWN:
            rules.append(Rule(group.urn, direction, group.urn, UNKNOWN, None, None, set(), False, True))
            continue
        for entry in inline if isinstance(inline, list) else []:
            if not isinstance(entry, dict):
                continue
            peer_urns = {group.urn} if entry.get("self") is True else set()
            ids = set(strings_in(entry.get("securityGroups")))
            for other_group in stack.of_type(SECURITY_GROUP):
                if isinstance(other_group.props.get("id"), str) and other_group.props["id"] in ids:
                    peer_urns.add(other_group.urn)
            other = bool(entry.get("cidrBlocks")) or bool(entry.get("ipv6CidrBlocks")) or bool(entry.get("prefixListIds"))
            rules.append(Rule(group.urn, direction, group.urn, _protocol(entry.get("protocol")),
                              _port(entry.get("fromPort")), _port(entry.get("toPort")), peer_urns, other,
                              contains_unknown(entry)))
    return rules


# ----------------------------------------------------------------------------------------------------------
# Policy plumbing


def _resource_policy(name: str, description: str, check: Callable[[str, dict], list[str] | None],
                     remediation: str) -> ResourceValidationPolicy:
    """A mandatory resource policy around ``check(resource_type, props) -> messages``; ``check`` returns None
    when the resource is not one it inspects and raises _Skip when a value it needs is unknown."""

    def validate(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
        try:
            messages = check(args.resource_type, plain(args.props))
        except _Skip as skip:
            args.not_applicable(f"{skip} (not known until the resource is deployed; checked again then)")
            return
        for message in messages or ():
            report_violation(message, None)

    return ResourceValidationPolicy(name=name, description=description, validate=validate,
                                    enforcement_level=EnforcementLevel.MANDATORY, remediation_steps=remediation)


def _stack_policy(name: str, description: str, check: Callable[[StackView], tuple[list[tuple[str, str | None]], list[str]]],
                  remediation: str) -> StackValidationPolicy:
    """A mandatory stack policy around ``check(stack) -> (violations as (message, urn), skipped reasons)``."""

    def validate(args: StackValidationArgs, report_violation: ReportViolation) -> None:
        violations, skipped = check(StackView(args.resources))
        for message, urn in violations:
            report_violation(message, urn)
        if not violations and skipped:
            args.not_applicable("; ".join(skipped))

    return StackValidationPolicy(name=name, description=description, validate=validate,
                                 enforcement_level=EnforcementLevel.MANDATORY, remediation_steps=remediation)


class _Skip(Exception):
    """A value the check needs is not known yet."""


# ----------------------------------------------------------------------------------------------------------
# 1. EFA interfaces of a launch template

EFA_TYPES = ("efa", "efa-only")


def check_efa_launch_template(resource_type: str, props: dict) -> list[str] | None:
    if resource_type != LAUNCH_TEMPLATE:
        return None
    interfaces = props.get("networkInterfaces")
    instance_type = props.get("instanceType")
    if interfaces is UNKNOWN:
        raise _Skip("networkInterfaces")
    interfaces = [i for i in interfaces or [] if i is not None]
    if any(i is UNKNOWN or get(i, "interfaceType") is UNKNOWN for i in interfaces):
        raise _Skip("an interface type")
    efa = [i for i in interfaces if get(i, "interfaceType") in EFA_TYPES]
    if instance_type is UNKNOWN:
        raise _Skip("instanceType")
    if instance_type is None:
        if efa:
            return ["a launch template with EFA interfaces must set instanceType, so that the interfaces can be "
                    "checked against the instance type's EFA count in infra/catalog.py"]
        return None
    facts = catalog.INSTANCE_TYPES.get(instance_type)
    if facts is None:
        if efa:
            return [f"instance type {instance_type!r} is not in infra/catalog.py, so its {len(efa)} EFA interfaces "
                    f"cannot be checked; add the type to the catalog (known: {', '.join(catalog.INSTANCE_TYPES)})"]
        return None
    if not facts.efa:
        if efa:
            return [f"{instance_type} has no EFA support (infra/catalog.py) but the launch template declares "
                    f"{len(efa)} EFA interfaces"]
        return None
    messages = []
    expected = facts.efa_interfaces
    if len(efa) != expected:
        messages.append(f"{instance_type} has {expected} EFA interfaces (infra/catalog.py) but the launch template "
                        f"declares {len(efa)}; declare one per network card, cards 0..{expected - 1}")
    cards: dict[int, list[dict]] = {}
    for interface in efa:
        card, device = get(interface, "networkCardIndex", default=0), get(interface, "deviceIndex")
        if card is UNKNOWN or device is UNKNOWN:
            raise _Skip("a network card or device index")
        cards.setdefault(as_int(card) if as_int(card) is not None else -1, []).append(interface)
    for card, on_card in sorted(cards.items()):
        if len(on_card) > 1:
            messages.append(f"network card {card} has {len(on_card)} EFA interfaces; one per card")
    wrong_cards = sorted(c for c in cards if not 0 <= c < expected)
    if wrong_cards:
        messages.append(f"network card indexes {wrong_cards} are outside 0..{expected - 1} for {instance_type}")
    for card, on_card in sorted(cards.items()):
        for interface in on_card:
            device, kind = as_int(get(interface, "deviceIndex")), get(interface, "interfaceType")
            want_device, want_kind = (0, "efa") if card == 0 else (1, "efa-only")
            if device != want_device or kind != want_kind:
                messages.append(
                    f"network card {card}: device index {device}, interface type {kind!r}; the layout is card 0 "
                    f"device 0 'efa' (the primary, with an IP address) and every other card device 1 'efa-only'")
    if 0 not in cards and efa:
        messages.append("no EFA interface on network card 0: card 0 device 0 must be the primary 'efa' interface")
    return messages


efa_launch_template = _resource_policy(
    "efa-launch-template-interfaces",
    "An EFA launch template declares exactly the instance type's EFA interfaces (infra/catalog.py), one per "
    "network card: card 0 device 0 'efa', every other card device 1 'efa-only'.",
    check_efa_launch_template,
    "Build networkInterfaces with infra.gpu_nodes.efa_network_interfaces for the node group's instance type.")


# ----------------------------------------------------------------------------------------------------------
# 2. EFA security group: all traffic to and from itself


def _self_all(rules: list[Rule], group: Res, direction: str) -> bool:
    return any(r.direction == direction and r.protocol == "all" and group.urn in r.peer_groups for r in rules)


def check_efa_security_groups(stack: StackView) -> tuple[list[tuple[str, str | None]], list[str]]:
    violations, skipped = [], []
    for lt in stack.of_type(LAUNCH_TEMPLATE):
        interfaces = lt.props.get("networkInterfaces")
        if not isinstance(interfaces, list) or not any(get(i, "interfaceType") in EFA_TYPES for i in interfaces):
            continue
        groups, unknown = stack.refs(lt, "networkInterfaces", (SECURITY_GROUP,))
        more, more_unknown = stack.refs(lt, "vpcSecurityGroupIds", (SECURITY_GROUP,))
        groups = list({g.urn: g for g in [*groups, *more]}.values())
        if not groups:
            if unknown or more_unknown:
                skipped.append(f"{lt.name}: its security groups are not known yet")
            else:
                violations.append((f"launch template {lt.name}: none of the security groups on its EFA interfaces is "
                                   f"declared in this stack, so none is known to allow EFA traffic between the nodes; "
                                   f"attach a group with all traffic to and from itself", lt.urn))
            continue
        rules = {g.urn: security_group_rules(stack, g) for g in groups}
        if any(_self_all(rules[g.urn], g, "ingress") and _self_all(rules[g.urn], g, "egress") for g in groups):
            continue
        if any(r.unknown for g in groups for r in rules[g.urn]):
            skipped.append(f"{lt.name}: a rule of its security groups is not known yet")
            continue
        for g in groups:
            missing = [d for d in ("ingress", "egress") if not _self_all(rules[g.urn], g, d)]
            violations.append((
                f"security group {g.name} on the EFA interfaces of launch template {lt.name} has no {' and no '.join(missing)} "
                f"rule for all traffic (protocol -1) referencing the group itself; EFA needs both: an inbound and an "
                f"outbound rule, all protocols, to and from the same group (a CIDR egress rule does not count)", g.urn))
    return violations, skipped


efa_security_group = _stack_policy(
    "efa-security-group-self-traffic",
    "The EFA interfaces of a launch template carry a security group that allows all traffic (protocol -1) to and "
    "from itself: an ingress AND an egress rule referencing the group.",
    check_efa_security_groups,
    "Add aws.vpc.SecurityGroupIngressRule and aws.vpc.SecurityGroupEgressRule with ip_protocol='-1' and "
    "referenced_security_group_id set to the group's own id (infra/gpu_nodes.py).")


# ----------------------------------------------------------------------------------------------------------
# 3. FSx for Lustre security group: TCP 988 and 1018-1023

LUSTRE_PORTS = (988, *range(1018, 1024))


def _port_text(ports: Iterable[int]) -> str:
    ports = sorted(ports)
    spans, start, prev = [], None, None
    for port in ports:
        if start is None:
            start = prev = port
        elif port == prev + 1:
            prev = port
        else:
            spans.append((start, prev))
            start = prev = port
    if start is not None:
        spans.append((start, prev))
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def check_fsx_ports(stack: StackView) -> tuple[list[tuple[str, str | None]], list[str]]:
    violations, skipped = [], []
    attached_to_nodes = {g.urn for lt in stack.of_type(LAUNCH_TEMPLATE)
                         for prop in ("networkInterfaces", "vpcSecurityGroupIds")
                         for g in stack.refs(lt, prop, (SECURITY_GROUP,))[0]}
    for fs in stack.of_type(LUSTRE):
        groups, unknown = stack.refs(fs, "securityGroupIds", (SECURITY_GROUP,))
        if not groups:
            if unknown:
                skipped.append(f"{fs.name}: its security groups are not known yet")
            else:
                violations.append((f"FSx for Lustre {fs.name} has no security group declared in this stack; Lustre "
                                   f"needs TCP 988 and 1018-1023 from its own group and from the clients", fs.urn))
            continue
        own = {g.urn for g in groups}
        ingress = [r for g in groups for r in security_group_rules(stack, g) if r.direction == "ingress"]
        from_self = {p for p in LUSTRE_PORTS if any(r.covers_port(p) and r.peer_groups & own for r in ingress)}
        from_clients = {p for p in LUSTRE_PORTS if any(
            r.covers_port(p) and (r.other_peer or r.peer_groups - own or (r.peer_groups & own & attached_to_nodes))
            for r in ingress)}
        missing_self = set(LUSTRE_PORTS) - from_self
        missing_clients = set(LUSTRE_PORTS) - from_clients
        if (missing_self or missing_clients) and any(r.unknown for r in ingress):
            skipped.append(f"{fs.name}: a rule of its security groups is not known yet")
            continue
        names = ", ".join(g.name for g in groups)
        if missing_self:
            violations.append((f"FSx for Lustre {fs.name}: security group {names} does not open TCP "
                               f"{_port_text(missing_self)} from itself (the file servers talk to each other on "
                               f"988 and 1018-1023)", fs.urn))
        if missing_clients:
            violations.append((f"FSx for Lustre {fs.name}: security group {names} does not open TCP "
                               f"{_port_text(missing_clients)} from the clients (the nodes' security group or "
                               f"CIDR); the mount hangs without them, and FSx fixes its groups at creation", fs.urn))
    return violations, skipped


fsx_ports = _stack_policy(
    "fsx-lustre-security-group-ports",
    "The security group of an FSx for Lustre file system opens TCP 988 and 1018-1023 from itself and from the "
    "clients.",
    check_fsx_ports,
    "Add ingress rules for TCP 988 and TCP 1018-1023 from the file system's own group and from the node security "
    "group (infra/storage.py) before the file system is created: FSx does not pick up new groups later.")


# ----------------------------------------------------------------------------------------------------------
# 4. S3 buckets: encrypted, not public, TLS only

SSE_ALGORITHMS = ("AES256", "aws:kms", "aws:kms:dsse")
PUBLIC_ACCESS_FLAGS = ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")
_BUCKET_KEYS = ("id", "bucket")  # a bucket's id is its name; configuration resources name it in `bucket`


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _encrypted(rules: Any) -> bool:
    return any(get(rule, "applyServerSideEncryptionByDefault", "sseAlgorithm") in SSE_ALGORITHMS
               for rule in _as_list(rules) if isinstance(rule, dict))


def _denies_insecure_transport(document: Any) -> bool:
    """A statement: Deny, to everyone, every S3 action, on the bucket and its objects, when aws:SecureTransport
    is false."""
    if isinstance(document, str):
        try:
            document = json.loads(document)
        except ValueError:
            return False
    statements = get(document, "Statement")
    for statement in _as_list(statements):
        if not isinstance(statement, dict) or statement.get("Effect") != "Deny":
            continue
        principal = statement.get("Principal")
        if not (principal == "*" or (isinstance(principal, dict) and "*" in _as_list(principal.get("AWS")))):
            continue
        if not {"s3:*", "*"} & set(_as_list(statement.get("Action"))):
            continue
        resources = [r for r in _as_list(statement.get("Resource")) if isinstance(r, str)]
        if "*" not in resources and not (any(r.endswith("/*") for r in resources)
                                         and any(not r.endswith("/*") for r in resources)):
            continue
        condition = get(statement, "Condition", "Bool", "aws:SecureTransport")
        if any(str(v).lower() == "false" for v in _as_list(condition) if v is not None):
            return True
    return False


def check_s3_buckets(stack: StackView) -> tuple[list[tuple[str, str | None]], list[str]]:
    violations, skipped = [], []
    for bucket in stack.of_type(BUCKET, BUCKET_V2):
        # Encryption: a BucketServerSideEncryptionConfiguration, or the (deprecated) inline configuration.
        configs = stack.referring(bucket, BUCKET_ENCRYPTION, "bucket", _BUCKET_KEYS)
        rules = [c.props.get("rules") for c in configs]
        inline = get(bucket.props, "serverSideEncryptionConfiguration", "rules")
        if any(contains_unknown(r) for r in [*rules, inline]) and not any(_encrypted(r) for r in [*rules, inline]):
            skipped.append(f"{bucket.name}: encryption not known yet")
        elif not any(_encrypted(r) for r in [*rules, inline]):
            violations.append((f"S3 bucket {bucket.name} has no default encryption: add an "
                               f"aws.s3.BucketServerSideEncryptionConfiguration with sse_algorithm one of "
                               f"{', '.join(SSE_ALGORITHMS)}", bucket.urn))
        # Not public: a public access block with all four flags.
        blocks = stack.referring(bucket, (BUCKET_PUBLIC_ACCESS_BLOCK,), "bucket", _BUCKET_KEYS)
        complete = [b for b in blocks if all(b.props.get(f) is True for f in PUBLIC_ACCESS_FLAGS)]
        if not complete:
            if any(b.props.get(f) is UNKNOWN for b in blocks for f in PUBLIC_ACCESS_FLAGS):
                skipped.append(f"{bucket.name}: public access block not known yet")
            elif not blocks:
                violations.append((f"S3 bucket {bucket.name} has no public access block: add an "
                                   f"aws.s3.BucketPublicAccessBlock with {', '.join(PUBLIC_ACCESS_FLAGS)} all true",
                                   bucket.urn))
            else:
                off = sorted({f for b in blocks for f in PUBLIC_ACCESS_FLAGS if b.props.get(f) is not True})
                violations.append((f"S3 bucket {bucket.name}: its public access block leaves {', '.join(off)} "
                                   f"off; all four flags must be true", bucket.urn))
        # TLS only: a bucket policy denying requests without aws:SecureTransport.
        policies = [p.props.get("policy") for p in stack.referring(bucket, (BUCKET_POLICY,), "bucket", _BUCKET_KEYS)]
        if bucket.props.get("policy") is not None:
            policies.append(bucket.props.get("policy"))
        if any(_denies_insecure_transport(p) for p in policies if not contains_unknown(p)):
            continue
        if any(contains_unknown(p) for p in policies):
            skipped.append(f"{bucket.name}: bucket policy not known yet")
            continue
        violations.append((
            f"S3 bucket {bucket.name} accepts plain HTTP: its bucket policy needs a statement with Effect Deny, "
            f"Principal *, Action s3:*, Resource the bucket and bucket/*, and Condition Bool aws:SecureTransport "
            f"'false'" + ("" if policies else " (it has no bucket policy)"), bucket.urn))
    return violations, skipped


s3_buckets = _stack_policy(
    "s3-bucket-encrypted-private-tls-only",
    "Every S3 bucket has default encryption, a public access block with all four flags, and a bucket policy "
    "that denies requests without TLS (aws:SecureTransport false).",
    check_s3_buckets,
    "Declare the bucket through infra/storage.py, which adds the encryption configuration, public access block "
    "and TLS-only policy for every bucket.")


# ----------------------------------------------------------------------------------------------------------
# 5. Container images with a pinned tag

_MUTABLE_TAGS = frozenset({"latest"})
_CHART_VERSION = re.compile(r"^v?\d+(\.\d+){0,2}([-+][0-9A-Za-z.\-+]+)?$")


def image_problem(image: Any) -> str | None:
    """Why an image reference is not pinned, or None: a digest pins it; otherwise it needs a tag that is not
    'latest'. A registry port (host:5000/repo) is not a tag."""
    if not isinstance(image, str) or not image.strip():
        return "has no image"
    if "@" in image:
        digest = image.split("@", 1)[1]
        return None if re.fullmatch(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[0-9a-fA-F]{32,}", digest) else \
            f"image {image!r} has a malformed digest"
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"image {image!r} has no tag (it means :latest)"
    tag = last.split(":", 1)[1]
    if not tag:
        return f"image {image!r} has an empty tag"
    if tag.lower() in _MUTABLE_TAGS:
        return f"image {image!r} uses the mutable tag {tag!r}"
    return None


def _helm_value_images(values: Any, path: str = "values") -> Iterator[tuple[str, Any]]:
    """(path, image) for every `image:` in Helm values: a string, or a mapping with repository/tag/digest."""
    if isinstance(values, dict):
        for key, value in values.items():
            here = f"{path}.{key}"
            if key == "image":
                yield here, value
            else:
                yield from _helm_value_images(value, here)
    elif isinstance(values, list):
        for index, value in enumerate(values):
            yield from _helm_value_images(value, f"{path}[{index}]")


def check_pinned_images(resource_type: str, props: dict) -> list[str] | None:
    if resource_type in (HELM_RELEASE, HELM_CHART_V4):
        messages = []
        version = props.get("version")
        if version is UNKNOWN:
            raise _Skip("chart version")
        if not isinstance(version, str) or not _CHART_VERSION.match(version.strip()):
            messages.append(f"Helm chart {props.get('chart')!r} has version {version!r}: pin an exact chart version "
                            f"(without one Helm installs whatever is newest)")
        for where, image in _helm_value_images(props.get("values")):
            if image is UNKNOWN or contains_unknown(image):
                continue
            if isinstance(image, str):
                problem = image_problem(image)
                if problem:
                    messages.append(f"{where}: {problem}")
            elif isinstance(image, dict):
                tag, digest = image.get("tag"), image.get("digest")
                if isinstance(tag, str) and tag.lower() in _MUTABLE_TAGS and not digest:
                    messages.append(f"{where}.tag is {tag!r}; leave it unset (the chart's appVersion) or pin a tag")
        return messages
    templates = pod_templates(resource_type, props)
    if templates is None:
        return None
    messages, unknown = [], False
    for template in templates:
        unknown = unknown or template.unknown
        for _, container in template.containers():
            image = container.get("image")
            if image is UNKNOWN:
                unknown = True
                continue
            problem = image_problem(image)
            if problem:
                messages.append(f"{template.label(container)}: {problem}; pin a tag (not latest) or a digest")
    if unknown and not messages:
        raise _Skip("a container image")
    return messages


pinned_images = _resource_policy(
    "container-images-pinned",
    "Every container and init container of a workload (Pod, Deployment, StatefulSet, DaemonSet, Job, CronJob, "
    "PyTorchJob, ...) names its image with a tag other than 'latest' or a digest; every Helm chart has an exact "
    "version.",
    check_pinned_images,
    "Use the pinned images of infra/images.py; pin Helm chart versions in the stack config (addons.*Version).")


# ----------------------------------------------------------------------------------------------------------
# 6. No RDMAV_FORK_SAFE anywhere

_FORK_SAFE_SETS = (
    re.compile(rf"\b{FORK_SAFE}\s*="),  # shell, env files, ENV X=1, kwargs
    re.compile(rf"[\"']{FORK_SAFE}[\"']\s*(\]\s*=(?!=)|[:,])"),  # os.environ["X"] = ..., {"X": ...}, setdefault("X", ...)
    re.compile(rf"^\s*-?\s*{FORK_SAFE}\s*:"),  # YAML key
    re.compile(rf"\bENV\s+{FORK_SAFE}\b"),  # Dockerfile ENV X 1
)
_FORK_SAFE_UNSETS = re.compile(
    rf"unset\s+{FORK_SAFE}|(pop|unsetenv)\(\s*[\"']{FORK_SAFE}[\"']|del\s+os\.environ\[\s*[\"']{FORK_SAFE}[\"']")


def sets_fork_safe(text: str) -> str | None:
    """The first line of ``text`` (not a comment) that sets RDMAV_FORK_SAFE, or None."""
    if FORK_SAFE not in text:
        return None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "//")) or FORK_SAFE not in stripped:
            continue
        if _FORK_SAFE_UNSETS.search(stripped):
            continue
        if any(p.search(line) for p in _FORK_SAFE_SETS):
            return stripped
    return None


def _fork_safe_findings(value: Any, path: str) -> Iterator[str]:
    if isinstance(value, dict):
        if value.get("name") == FORK_SAFE:
            yield f"{path} sets the environment variable {FORK_SAFE}"
        for key, item in value.items():
            if key == FORK_SAFE:
                yield f"{path}.{key} sets {FORK_SAFE}"
                continue
            yield from _fork_safe_findings(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _fork_safe_findings(item, f"{path}[{index}]")
    elif isinstance(value, str):
        line = sets_fork_safe(value)
        if line:
            yield f"{path} sets {FORK_SAFE}: {line[:160]!r}"


def check_fork_safe(resource_type: str, props: dict) -> list[str] | None:
    if resource_type == LAUNCH_TEMPLATE:
        user_data = props.get("userData")
        if not isinstance(user_data, str):
            return []
        try:
            text = base64.b64decode(user_data, validate=True).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            text = user_data
        line = sets_fork_safe(text)
        return [f"userData sets {FORK_SAFE} on the node: {line[:160]!r}"] if line else []
    if not resource_type.startswith("kubernetes:"):
        return None
    findings = list(dict.fromkeys(_fork_safe_findings(props, "")))
    return [f"{f.lstrip('.')}; never set {FORK_SAFE} with current EFA/libfabric (it forces the slow fork-safe "
            f"path and conflicts with FI_EFA_USE_HUGE_PAGE=0)" for f in findings]


no_fork_safe = _resource_policy(
    "no-rdmav-fork-safe",
    f"No {FORK_SAFE} anywhere: not in a container's env, a ConfigMap, a script shipped to a pod, Helm values or a "
    f"node's user data.",
    check_fork_safe,
    f"Remove {FORK_SAFE}; the NCCL/EFA environment is workloads/pods.py NCCL_EFA_ENV.")


# ----------------------------------------------------------------------------------------------------------
# 7. /dev/shm for GPU pods: a memory emptyDir with a size limit


def _positive_quantity(value: Any) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value > 0
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([EPTGMK]i?|[mkEPTGM]|e\d+)?\s*", value)
        return bool(match) and float(match.group(1)) > 0
    return False


def check_dev_shm(resource_type: str, props: dict) -> list[str] | None:
    templates = pod_templates(resource_type, props)
    if templates is None:
        return None
    messages, unknown = [], False
    for template in templates:
        unknown = unknown or template.unknown
        volumes = template.spec.get("volumes")
        if volumes is UNKNOWN:
            unknown = True
            continue
        by_name = {v.get("name"): v for v in volumes or [] if isinstance(v, dict)}
        for list_name, container in template.containers():
            gpus = container_count(container, GPU_RESOURCE)
            if gpus is UNKNOWN:
                unknown = True
                continue
            if not gpus:
                continue
            mounts = container.get("volumeMounts")
            if mounts is UNKNOWN:
                unknown = True
                continue
            shm = [m for m in mounts or [] if isinstance(m, dict)
                   and isinstance(m.get("mountPath"), str) and m["mountPath"].rstrip("/") == "/dev/shm"]
            where = template.label(container)
            if not shm:
                messages.append(f"{where} requests {gpus} GPU(s) but does not mount /dev/shm (the default is 64 MiB, "
                                f"too small for NCCL and data loaders); mount a memory emptyDir with a sizeLimit")
                continue
            volume = by_name.get(shm[0].get("name"))
            empty_dir = get(volume, "emptyDir")
            if empty_dir is UNKNOWN or contains_unknown(empty_dir):
                unknown = True
                continue
            if not isinstance(empty_dir, dict):
                messages.append(f"{where}: /dev/shm comes from volume {shm[0].get('name')!r}, which is not an emptyDir; "
                                f"use emptyDir with medium Memory and a sizeLimit")
                continue
            if empty_dir.get("medium") != "Memory":
                messages.append(f"{where}: /dev/shm volume {shm[0].get('name')!r} is not memory-backed "
                                f"(emptyDir.medium {empty_dir.get('medium')!r}); set medium: Memory")
            if not _positive_quantity(empty_dir.get("sizeLimit")):
                messages.append(f"{where}: /dev/shm volume {shm[0].get('name')!r} has no sizeLimit; a memory emptyDir "
                                f"without one can take the node's memory")
    if unknown and not messages:
        raise _Skip("a GPU request, a volume or a mount")
    return messages


dev_shm = _resource_policy(
    "gpu-pod-dev-shm",
    "Every container that requests nvidia.com/gpu mounts /dev/shm from an emptyDir with medium Memory and a "
    "sizeLimit.",
    check_dev_shm,
    "Use workloads/pods.py's shared volumes: the dshm emptyDir (medium Memory, sizeLimit from the pod's share).")


# ----------------------------------------------------------------------------------------------------------
# 8. A pod's EFA request equals its node's EFA interfaces


def _workloads(stack: StackView) -> Iterator[tuple[Res, PodTemplate]]:
    for res in stack.resources:
        for template in pod_templates(res.type, res.props) or []:
            yield res, template


def node_group_instance_types(stack: StackView, group: Res) -> tuple[list[str], bool]:
    """The instance types a node group launches: its launch template's instanceType, else its instanceTypes;
    and whether that is unknown."""
    templates, unknown = stack.refs(group, "launchTemplate", (LAUNCH_TEMPLATE,), ("id", "name"))
    from_templates = [t.props.get("instanceType") for t in templates]
    if any(v is UNKNOWN for v in from_templates):
        return [], True
    types = [v for v in from_templates if isinstance(v, str)]
    if types:
        return types, False
    listed = group.props.get("instanceTypes")
    if listed is UNKNOWN or contains_unknown(listed):
        return [], True
    types = [v for v in listed or [] if isinstance(v, str)]
    return types, unknown and not types


def check_efa_requests(stack: StackView) -> tuple[list[tuple[str, str | None]], list[str]]:
    violations, skipped = [], []
    groups_by_label: dict[str, list[Res]] = {}
    for group in stack.of_type(NODE_GROUP):
        label = get(group.props, "labels", NODE_GROUP_LABEL)
        if isinstance(label, str):
            groups_by_label.setdefault(label, []).append(group)
    for res, template in _workloads(stack):
        if template.unknown:
            skipped.append(f"{res.name} ({template.where}): pod template not known yet")
            continue
        containers = [c for _, c in template.containers()]
        amounts = [resource_amount(c, EFA_RESOURCE) for c in containers]
        if not any(a is not None for pair in amounts for a in pair):
            continue  # the pod does not ask for EFA
        what = f"{res.name} ({template.where})"
        if any(a is UNKNOWN for pair in amounts for a in pair):
            skipped.append(f"{what}: EFA request not known yet")
            continue
        requests = sum(as_int(r if r is not None else l) or 0 for r, l in amounts)
        limits = sum(as_int(l if l is not None else r) or 0 for r, l in amounts)
        selector = get(template.spec, "nodeSelector", NODE_GROUP_LABEL)
        if selector is UNKNOWN:
            skipped.append(f"{what}: nodeSelector not known yet")
            continue
        if not isinstance(selector, str):
            violations.append((f"{what} requests {requests} EFA interfaces but is not pinned to a GPU node group: set "
                               f"nodeSelector {NODE_GROUP_LABEL}: <group>, so its request can match the node's "
                               f"interfaces", res.urn))
            continue
        groups = groups_by_label.get(selector)
        if not groups:
            violations.append((f"{what} selects {NODE_GROUP_LABEL}={selector}, but no node group in this stack "
                               f"carries that label (groups: {', '.join(sorted(groups_by_label)) or 'none'})", res.urn))
            continue
        for group in groups:
            types, unknown = node_group_instance_types(stack, group)
            if unknown:
                skipped.append(f"{what}: instance type of node group {group.name} not known yet")
                continue
            if not types:
                violations.append((f"node group {group.name} ({NODE_GROUP_LABEL}={selector}) names no instance type in "
                                   f"its launch template or instanceTypes, so {what}'s EFA request cannot be "
                                   f"checked", group.urn))
                continue
            for instance_type in types:
                facts = catalog.INSTANCE_TYPES.get(instance_type)
                if facts is None:
                    violations.append((f"{what} runs on node group {group.name} of instance type {instance_type!r}, "
                                       f"which is not in infra/catalog.py", res.urn))
                    continue
                wrong = [(label, amount) for label, amount in (("requests", requests), ("limits", limits))
                         if amount != facts.efa_interfaces]
                if wrong:
                    asked = (f"requests and limits {EFA_RESOURCE}: {requests}" if len(wrong) == 2 and requests == limits
                             else ", ".join(f"{label} {EFA_RESOURCE}: {amount}" for label, amount in wrong))
                    violations.append((
                        f"{what} {asked}, but its node group {group.name} runs {instance_type} with "
                        f"{facts.efa_interfaces} EFA interfaces (infra/catalog.py); one training pod per node takes "
                        f"all of them, in requests and limits", res.urn))
    return violations, skipped


efa_requests = _stack_policy(
    "gpu-pod-efa-request-matches-node",
    f"A pod that requests {EFA_RESOURCE} is pinned (nodeSelector {NODE_GROUP_LABEL}) to a node group of this "
    f"stack, and requests and limits exactly the EFA interfaces of that group's instance type (infra/catalog.py).",
    check_efa_requests,
    "Size the pod with workloads/pods.py pod_share(instance, gpus, efa=True) for the node group it selects.")


# ----------------------------------------------------------------------------------------------------------
# 9. Triton's GPU request equals the engine's TP x PP


def is_triton(res: Res, template: PodTemplate) -> bool:
    if res.type != DEPLOYMENT:
        return False
    if get(template.metadata, "labels", "app.kubernetes.io/name") == "triton":
        return True
    return any(isinstance(c.get("image"), str) and c["image"].split("@")[0].rsplit("/", 1)[-1].split(":")[0]
               == "tritonserver" for _, c in template.containers())


def check_triton_gpus(stack: StackView) -> tuple[list[tuple[str, str | None]], list[str]]:
    violations, skipped = [], []
    config_maps: dict[tuple[str, str], Res] = {}
    for cm in stack.of_type(CONFIG_MAP):
        name, namespace = get(cm.props, "metadata", "name"), get(cm.props, "metadata", "namespace")
        if isinstance(name, str):
            config_maps[(namespace if isinstance(namespace, str) else "default", name)] = cm
    for res, template in _workloads(stack):
        if res.type == DEPLOYMENT and template.unknown:
            skipped.append(f"{res.name}: pod template not known yet")
            continue
        if not is_triton(res, template):
            continue
        namespace = get(res.props, "metadata", "namespace")
        namespace = namespace if isinstance(namespace, str) else "default"
        gpus = pod_count(template, GPU_RESOURCE)
        volume = next((v for v in template.spec.get("volumes") or [] if isinstance(v, dict)
                       and v.get("name") == RUN_CONFIG_VOLUME), None)
        cm_name = get(volume, "configMap", "name")
        if gpus is UNKNOWN or cm_name is UNKNOWN:
            skipped.append(f"{res.name}: GPU request or run-config volume not known yet")
            continue
        if not isinstance(cm_name, str):
            violations.append((f"Triton Deployment {res.name} mounts no ConfigMap as volume {RUN_CONFIG_VOLUME!r}, so "
                               f"its GPU request cannot be checked against the engine's world size", res.urn))
            continue
        cm = config_maps.get((namespace, cm_name))
        if cm is None:
            violations.append((f"Triton Deployment {res.name} mounts ConfigMap {namespace}/{cm_name}, which this stack "
                               f"does not declare", res.urn))
            continue
        text = get(cm.props, "data", "run.json")
        if text is UNKNOWN:
            skipped.append(f"{res.name}: run.json of {cm_name} not known yet")
            continue
        try:
            serving = json.loads(text).get("serving") if isinstance(text, str) else None
        except (ValueError, AttributeError):
            serving = None
        world_size = as_int(get(serving, "world_size"))
        if not isinstance(serving, dict) or world_size is None:
            violations.append((f"ConfigMap {namespace}/{cm_name} mounted by Triton Deployment {res.name} has no "
                               f"run.json with serving.world_size", cm.urn))
            continue
        tp, pp = as_int(serving.get("tp")), as_int(serving.get("pp"))
        if tp is not None and pp is not None and tp * pp != world_size:
            violations.append((f"ConfigMap {namespace}/{cm_name}: serving.world_size {world_size} is not tp x pp = "
                               f"{tp} x {pp} = {tp * pp}", cm.urn))
        if gpus != world_size:
            shape = f" = TP {tp} x PP {pp}" if tp is not None and pp is not None else ""
            violations.append((
                f"Triton Deployment {res.name} requests {gpus} GPU(s) per pod, but the engine it serves "
                f"(ConfigMap {cm_name}, run.json serving) has world size {world_size}{shape}; TensorRT-LLM needs "
                f"exactly one GPU per rank", res.urn))
    return violations, skipped


triton_gpus = _stack_policy(
    "triton-gpus-match-engine-world-size",
    f"The Triton Deployment requests as many nvidia.com/gpu as the engine's world size (TP x PP) in run.json of "
    f"the ConfigMap it mounts as volume {RUN_CONFIG_VOLUME!r}.",
    check_triton_gpus,
    "Size the Triton pod from the plan's serving shape (workloads/serving.py); do not edit either side alone.")


# ----------------------------------------------------------------------------------------------------------
# 10. Every EFA node group tells the Cluster Autoscaler its EFA interfaces

CLUSTER_AUTOSCALER_CHART = "cluster-autoscaler"
# Read through eks:DescribeNodegroup while a managed group is at 0 nodes; without it the autoscaler's template node
# offers no vpc.amazonaws.com/efa and no training pod fits it (kubernetes/autoscaler, cluster-autoscaler-1.34.5,
# cloudprovider/aws/aws_manager.go buildNodeFromTemplate).
EFA_TEMPLATE_TAG = "k8s.io/cluster-autoscaler/node-template/resources/" + EFA_RESOURCE


def _has_cluster_autoscaler(stack: StackView) -> bool:
    return any(get(r.props, "chart") == CLUSTER_AUTOSCALER_CHART for r in stack.of_type(HELM_RELEASE, HELM_CHART_V4))


def check_efa_node_template_tags(stack: StackView) -> tuple[list[tuple[str, str | None]], list[str]]:
    violations: list[tuple[str, str | None]] = []
    skipped: list[str] = []
    if not _has_cluster_autoscaler(stack):
        return violations, skipped  # sizes are fixed: nothing reads the tag
    for group in stack.of_type(NODE_GROUP):
        templates, unknown = stack.refs(group, "launchTemplate", (LAUNCH_TEMPLATE,), ("id", "name"))
        if unknown and not templates:
            skipped.append(f"{group.name}: launch template not known yet")
            continue
        types = [get(nic, "interfaceType") for t in templates for nic in _as_list(get(t.props, "networkInterfaces"))]
        if any(v is UNKNOWN for v in types) or any(get(t.props, "networkInterfaces") is UNKNOWN for t in templates):
            skipped.append(f"{group.name}: network interfaces not known yet")
            continue
        if not any(v in EFA_TYPES for v in types):
            continue
        instance_types, types_unknown = node_group_instance_types(stack, group)
        value = get(group.props, "tags", EFA_TEMPLATE_TAG)
        if types_unknown or value is UNKNOWN:
            skipped.append(f"{group.name}: instance type or tags not known yet")
            continue
        for instance_type in instance_types:
            facts = catalog.INSTANCE_TYPES.get(instance_type)
            if facts is None:
                violations.append((f"EFA node group {group.name} runs {instance_type!r}, which is not in "
                                   f"infra/catalog.py", group.urn))
            elif value is None:
                violations.append((
                    f"EFA node group {group.name} ({instance_type}, {facts.efa_interfaces} EFA interfaces) has no tag "
                    f"{EFA_TEMPLATE_TAG}: at 0 nodes the Cluster Autoscaler cannot know its nodes offer "
                    f"{EFA_RESOURCE} and never adds one for a training pod", group.urn))
            elif as_int(value) != facts.efa_interfaces:
                violations.append((f"EFA node group {group.name} tags {EFA_TEMPLATE_TAG}={value}, but {instance_type} "
                                   f"has {facts.efa_interfaces} EFA interfaces (infra/catalog.py)", group.urn))
    return violations, skipped


efa_node_template = _stack_policy(
    "efa-node-group-tells-autoscaler-its-interfaces",
    f"With the Cluster Autoscaler in the stack, every node group whose launch template has EFA interfaces carries the "
    f"tag {EFA_TEMPLATE_TAG} with its instance type's EFA interface count (infra/catalog.py).",
    check_efa_node_template_tags,
    "Tag the node group with infra/autoscaler.py node_group_tags(group), which reads the count from the catalog.")


# ----------------------------------------------------------------------------------------------------------
# 11. Training pods are never evicted to consolidate nodes

SAFE_TO_EVICT = "cluster-autoscaler.kubernetes.io/safe-to-evict"  # "false" blocks the autoscaler's drain


def check_training_not_evictable(resource_type: str, props: dict) -> list[str] | None:
    templates = [t for t in pod_templates(resource_type, props) or [] if "ReplicaSpecs." in t.where]
    if not templates:
        return None  # not a Kubeflow training job
    messages = []
    for template in templates:
        if template.unknown and not template.metadata:
            raise _Skip(f"{template.where}: pod template")
        value = get(template.metadata, "annotations", SAFE_TO_EVICT)
        if value is UNKNOWN:
            raise _Skip(f"{template.where}: annotations")
        if value != "false":
            shown = "is not set" if value is None else f"is {value!r}"
            messages.append(f"training pod template {template.where}: annotation {SAFE_TO_EVICT} {shown}; it must be "
                            f"\"false\", or the Cluster Autoscaler may evict one rank to consolidate nodes and every "
                            f"rank restarts from the last checkpoint")
    return messages


training_not_evictable = _resource_policy(
    "training-pods-not-evictable",
    f"Every pod template of a Kubeflow training job carries the annotation {SAFE_TO_EVICT}: \"false\".",
    check_training_not_evictable,
    "Build the job with workloads/training.py, which annotates every replica's pod template.")


# ----------------------------------------------------------------------------------------------------------
# 12. The CI runners' nodes and releases cannot be replaced by the update that runs on them

# Must agree with infra/runners.py (RUNNER_NODE_ROLE, CHART_REPOSITORY); policy/tests check that they do.
RUNNER_NODE_ROLE = ("nemo-eks/node-role", "ci-runners")
ARC_CHART_REPOSITORY = "oci://ghcr.io/actions/actions-runner-controller-charts/"


def check_runner_guard(resource_type: str, props: dict, protected: bool) -> list[str] | None:
    """The engine refuses to delete, and so to replace, a protected resource (pulumi.com/docs/iac/concepts/
    resources/options/protect/), but it allows a replacement in the update that drops the flag (pulumi/pulumi
    #8873). This rule refuses that update, so the runner running `pulumi up` never loses its node or controller."""
    if resource_type == NODE_GROUP:
        labels = get(props, "labels", default={}) or {}
        if is_unknown(labels) or labels.get(RUNNER_NODE_ROLE[0]) != RUNNER_NODE_ROLE[1]:
            return None
        what = "the CI runners' node group"
    elif resource_type == HELM_RELEASE:
        chart = get(props, "chart", default="")
        if not isinstance(chart, str) or not chart.startswith(ARC_CHART_REPOSITORY):
            return None
        what = f"Actions Runner Controller release {get(props, 'name', default='?')} ({chart.rsplit('/', 1)[1]})"
    else:
        return None
    return [] if protected else [f"{what} is not protected: an update could replace it while a CI job runs on it"]


def _runner_guard_validate(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    for message in check_runner_guard(args.resource_type, plain(args.props), bool(args.opts.protect)) or ():
        report_violation(message, None)


runner_guard = ResourceValidationPolicy(
    name="ci-runners-protected",
    description="The CI runners' node group and the Actions Runner Controller releases carry `protect`, so no "
                "update replaces or deletes what the runner running it stands on.",
    validate=_runner_guard_validate, enforcement_level=EnforcementLevel.MANDATORY,
    remediation_steps="Keep protect=True on them (infra/runners.py). To change or remove them, run that update from a "
                      "workstation (docs/delivery.md, 'Changing the runners'), after `pulumi state unprotect`.")


# ----------------------------------------------------------------------------------------------------------

POLICIES: list = [
    efa_launch_template,
    efa_security_group,
    fsx_ports,
    s3_buckets,
    pinned_images,
    no_fork_safe,
    dev_shm,
    efa_requests,
    triton_gpus,
    efa_node_template,
    training_not_evictable,
    runner_guard,
]
