"""The stack configuration as typed, frozen objects, and ALL of its validation.

Every key the program reads is declared once in ``KEYS`` (name, type, default, allowed values, meaning).
The loader reads values through that table, the README's configuration table is generated from it
(``python -m tools.configdoc``), and a key that is not in it is rejected as a likely typo. A bad value
raises ``ConfigError`` naming the key, the value and what is allowed, before any resource is declared.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

from infra import catalog

PROJECT = "nemo-eks"
REQUIRED = object()  # sentinel default: the key must be set


class ConfigError(ValueError):
    """A stack-config value that cannot work. The message is written for the person editing the stack file."""

    def __init__(self, key: str, value: Any, allowed: str, hint: str = ""):
        self.key, self.value, self.allowed = key, value, allowed
        shown = json.dumps(value) if not isinstance(value, str) else repr(value)
        message = f"stack config '{key}': {shown} is not valid; allowed: {allowed}"
        super().__init__(message + (f". {hint}" if hint else ""))


@dataclass(frozen=True)
class Key:
    """One documented configuration key. ``path`` uses ``[]`` for list items, e.g. ``gpuNodeGroups[].name``."""

    path: str
    type: str
    default: Any
    allowed: str
    description: str

    @property
    def qualified(self) -> str:
        return self.path if ":" in self.path.split(".")[0] else f"{PROJECT}:{self.path}"


LOG_TYPES = ("api", "audit", "authenticator", "controllerManager", "scheduler")
CAPACITY_TYPES = ("ON_DEMAND", "SPOT", "CAPACITY_BLOCK")
NAT_MODES = ("single", "perAz")
FSX_THROUGHPUTS_MB_PER_TIB = (125, 250, 500, 1000)  # PERSISTENT_2 SSD, FSx Lustre guide "Throughput capacity"
MIN_KUBERNETES_MINOR = 31

KEYS: tuple[Key, ...] = (
    Key("aws:region", "string", REQUIRED, "an AWS region name, e.g. us-east-1", "Region of every resource (the AWS provider's own key)."),
    Key("kubernetesVersion", "string", "1.34", f"1.{MIN_KUBERNETES_MINOR} or newer, as `1.NN`", "EKS control-plane version; GPU nodes follow it."),
    Key("namespace", "string", "nemo", "a DNS-1123 label", "Namespace of the pipeline's workloads, service accounts and FSx claim."),
    Key("tags", "map<string,string>", {}, "string keys and values", "Extra tags on every AWS resource (the project and stack tags are always set)."),
    Key("network.vpcCidr", "string", "10.0.0.0/16", "an IPv4 CIDR from /16 to /20", "CIDR of the new VPC; private subnets get a quarter each, public subnets a sixteenth."),
    Key("network.availabilityZones", "list<string>", "<region>a, b, c", "2 or 3 zone names of the region", "Zones of the new VPC's subnets."),
    Key("network.natGateways", "string", "single", "single, perAz", "One NAT gateway for the VPC, or one per zone (survives the loss of a zone)."),
    Key("network.existingVpcId", "string", None, "vpc-…", "Use this VPC instead of creating one; then both subnet maps below are required."),
    Key("network.existingPrivateSubnetIds", "map<string,string>", None, "zone name -> subnet-…", "Private subnets of the existing VPC, by zone: nodes, FSx."),
    Key("network.existingPublicSubnetIds", "map<string,string>", None, "zone name -> subnet-…", "Public subnets of the existing VPC, by zone: internet-facing load balancers."),
    Key("cluster.adminPrincipalArns", "list<string>", [], "IAM role or user ARNs", "Principals given cluster-admin through EKS access entries (the identity running `pulumi up` is admin too)."),
    Key("cluster.publicEndpoint", "boolean", False, "true, false", "Also expose the Kubernetes API publicly (the private endpoint is always on)."),
    Key("cluster.publicAccessCidrs", "list<string>", [], "IPv4 CIDRs; required when publicEndpoint is true", "Who may reach the public endpoint."),
    Key("cluster.logTypes", "list<string>", list(LOG_TYPES), ", ".join(LOG_TYPES), "Control-plane log types sent to CloudWatch."),
    Key("systemNodes.instanceType", "string", catalog.SYSTEM_INSTANCE_TYPE, ", ".join(catalog.SYSTEM_INSTANCE_TYPES), "CPU node type for add-ons and operators."),
    Key("systemNodes.minSize", "integer", 2, ">= 1", "Smallest size of the system node group."),
    Key("systemNodes.desiredSize", "integer", 2, "minSize..maxSize", "Size of the system node group."),
    Key("systemNodes.maxSize", "integer", 4, ">= desiredSize", "Largest size of the system node group."),
    Key("gpuNodeGroups", "list<object>", REQUIRED, "at least one group", "GPU node groups, one managed node group each."),
    Key("gpuNodeGroups[].name", "string", REQUIRED, "lower-case letters, digits, '-'; at most 20; unique", "Short name of the group, used in resource names and the node label."),
    Key("gpuNodeGroups[].instanceType", "string", REQUIRED, ", ".join(catalog.GPU_INSTANCE_TYPES), "GPU instance type."),
    Key("gpuNodeGroups[].availabilityZone", "string", "first zone", "one of the network's zones", "The group's one zone (EFA and the cluster placement group need one zone)."),
    Key("gpuNodeGroups[].minSize", "integer", 0, ">= 0", "Smallest size; 0 lets the group cost nothing while idle."),
    Key("gpuNodeGroups[].desiredSize", "integer", 0, "minSize..maxSize", "Size of the group now."),
    Key("gpuNodeGroups[].maxSize", "integer", 1, ">= 1 and >= desiredSize", "Largest size of the group."),
    Key("gpuNodeGroups[].capacityType", "string", "ON_DEMAND", ", ".join(CAPACITY_TYPES), "How the instances are bought."),
    Key("gpuNodeGroups[].capacityReservationId", "string", None, "cr-…; required for CAPACITY_BLOCK, optional for ON_DEMAND, not for SPOT", "Capacity Block or On-Demand Capacity Reservation to launch into (no placement group is then created)."),
    Key("gpuNodeGroups[].rootVolumeGib", "integer", 200, "50..16384", "Root EBS volume (gp3, encrypted); images and pod data use the RAID0 of the instance-store NVMe."),
    Key("gpuNodeGroups[].amiReleaseVersion", "string", None, "an EKS AL2023 NVIDIA AMI release, e.g. 1.34.1-20251120", "Pin the node AMI release; unset follows the latest for the Kubernetes version."),
    Key("storage.fsxStorageCapacityGib", "integer", 1200, "1200, 2400, then multiples of 2400", "FSx for Lustre PERSISTENT_2 capacity."),
    Key("storage.fsxThroughputPerTib", "integer", 250, ", ".join(map(str, FSX_THROUGHPUTS_MB_PER_TIB)), "FSx throughput per TiB of capacity (MB/s/TiB)."),
    Key("storage.fsxAvailabilityZone", "string", "first GPU group's zone", "one of the network's zones", "Zone of the file system; put it next to the GPU nodes."),
    Key("storage.noncurrentVersionDays", "integer", 30, "1..3650", "Days old versions of checkpoints and models are kept in S3."),
    Key("storage.abortIncompleteUploadDays", "integer", 7, "1..365", "Days before unfinished multipart uploads are removed."),
    Key("storage.protect", "boolean", "true for prod stacks", "true, false", "Protect buckets and the file system from deletion and retain them when the stack is destroyed."),
    Key("addons.nvidiaDevicePluginVersion", "string", "0.20.0", "a chart version of nvidia-device-plugin", "NVIDIA device plugin Helm chart version."),
    Key("addons.efaDevicePluginVersion", "string", "v0.5.31", "a chart version of aws-efa-k8s-device-plugin", "AWS EFA device plugin Helm chart version."),
    Key("addons.podIdentityAgentVersion", "string", None, "an EKS add-on version", "eks-pod-identity-agent add-on version; unset takes EKS's default for the cluster version."),
    Key("addons.fsxCsiDriverVersion", "string", None, "an EKS add-on version", "aws-fsx-csi-driver add-on version; unset takes EKS's default for the cluster version."),
)
_KEYS_BY_PATH = MappingProxyType({k.path: k for k in KEYS})


# --------------------------------------------------------------------------------------------------
# Typed configuration


@dataclass(frozen=True)
class NetworkConfig:
    vpc_cidr: str
    availability_zones: tuple[str, ...]
    nat_gateways: str
    existing_vpc_id: str | None
    existing_private_subnet_ids: Mapping[str, str]
    existing_public_subnet_ids: Mapping[str, str]

    @property
    def uses_existing_vpc(self) -> bool:
        return self.existing_vpc_id is not None


@dataclass(frozen=True)
class ClusterConfig:
    kubernetes_version: str
    admin_principal_arns: tuple[str, ...]
    public_endpoint: bool
    public_access_cidrs: tuple[str, ...]
    log_types: tuple[str, ...]


@dataclass(frozen=True)
class SystemNodesConfig:
    instance_type: str
    min_size: int
    desired_size: int
    max_size: int


@dataclass(frozen=True)
class GpuNodeGroupConfig:
    name: str
    instance_type: str
    availability_zone: str
    min_size: int
    desired_size: int
    max_size: int
    capacity_type: str
    capacity_reservation_id: str | None
    root_volume_gib: int
    ami_release_version: str | None

    @property
    def instance(self) -> catalog.InstanceType:
        return catalog.get(self.instance_type)

    @property
    def uses_reservation(self) -> bool:
        return self.capacity_reservation_id is not None

    @property
    def uses_placement_group(self) -> bool:
        # A forced cluster placement group can make reserved capacity unusable (the reservation was not
        # made in that group); with a reservation, AWS already decides the placement.
        return not self.uses_reservation


@dataclass(frozen=True)
class StorageConfig:
    fsx_storage_capacity_gib: int
    fsx_throughput_per_tib: int
    fsx_availability_zone: str
    noncurrent_version_days: int
    abort_incomplete_upload_days: int
    protect: bool


@dataclass(frozen=True)
class AddonsConfig:
    nvidia_device_plugin_version: str
    efa_device_plugin_version: str
    pod_identity_agent_version: str | None
    fsx_csi_driver_version: str | None


@dataclass(frozen=True)
class StackConfig:
    project: str
    stack: str
    region: str
    namespace: str
    tags: Mapping[str, str]
    network: NetworkConfig
    cluster: ClusterConfig
    system_nodes: SystemNodesConfig
    gpu_node_groups: tuple[GpuNodeGroupConfig, ...]
    storage: StorageConfig
    addons: AddonsConfig

    @property
    def prefix(self) -> str:
        """Stem of every resource name: two stacks of the project never collide."""
        return f"{self.project}-{self.stack}"

    @property
    def is_prod(self) -> bool:
        return is_prod_stack(self.stack)


def is_prod_stack(stack: str) -> bool:
    return stack == "prod" or stack.startswith("prod-")


# --------------------------------------------------------------------------------------------------
# Reading raw values through the key table


@dataclass
class _Section:
    """A mapping being read, with the key path that locates it for error messages."""

    data: Mapping[str, Any]
    display: str  # e.g. "nemo-eks:gpuNodeGroups[1]"
    spec_prefix: str  # e.g. "gpuNodeGroups[]."
    read: set[str] = field(default_factory=set)

    def _spec(self, name: str) -> Key:
        return _KEYS_BY_PATH[self.spec_prefix + name]

    def where(self, name: str) -> str:
        return f"{self.display}.{name}" if self.display else self._spec(name).qualified

    def raw(self, name: str) -> Any:
        self.read.add(name)
        return self.data.get(name)

    def get(self, name: str, default: Any = None, *, convert: Callable[[str, Any], Any] | None = None) -> Any:
        spec = self._spec(name)
        value = self.raw(name)
        if value is None:
            if spec.default is REQUIRED:
                raise ConfigError(self.where(name), None, spec.allowed, "This key is required")
            return default if default is not None else spec.default
        return (convert or _CONVERTERS[spec.type])(self.where(name), value, spec)

    def finish(self) -> None:
        """Reject keys the table does not know: a misspelt key would otherwise be silently ignored."""
        unknown = sorted(set(self.data) - self.read)
        if unknown:
            known = sorted(p[len(self.spec_prefix):] for p in _KEYS_BY_PATH if p.startswith(self.spec_prefix)
                           and "." not in p[len(self.spec_prefix):] and "[" not in p[len(self.spec_prefix):])
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f"Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{self.display or PROJECT}.{unknown[0]}".replace(f"{PROJECT}.", f"{PROJECT}:"),
                              unknown[0], "known keys: " + ", ".join(known), hint)


def _as_string(where: str, value: Any, spec: Key) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(where, value, spec.allowed)
    return str(value)


def _as_integer(where: str, value: Any, spec: Key) -> int:
    if isinstance(value, bool):
        raise ConfigError(where, value, spec.allowed)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    raise ConfigError(where, value, f"a whole number; {spec.allowed}")


def _as_boolean(where: str, value: Any, spec: Key) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(where, value, "true, false")


def _decode_json(where: str, value: Any, spec: Key) -> Any:
    # Pulumi hands structured values to the program as JSON strings.
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(where, value, f"a {spec.type}") from None
    return value


def _as_string_list(where: str, value: Any, spec: Key) -> tuple[str, ...]:
    value = _decode_json(where, value, spec)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(where, value, f"a list of strings; {spec.allowed}")
    return tuple(value)


def _as_string_map(where: str, value: Any, spec: Key) -> Mapping[str, str]:
    value = _decode_json(where, value, spec)
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(where, value, f"a map of strings; {spec.allowed}")
    return MappingProxyType(dict(value))


def _as_object_list(where: str, value: Any, spec: Key) -> list[Mapping[str, Any]]:
    value = _decode_json(where, value, spec)
    if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
        raise ConfigError(where, value, f"a non-empty list of objects; {spec.allowed}")
    return value


_CONVERTERS: Mapping[str, Callable[[str, Any, Key], Any]] = {
    "string": _as_string,
    "integer": _as_integer,
    "boolean": _as_boolean,
    "list<string>": _as_string_list,
    "map<string,string>": _as_string_map,
    "list<object>": _as_object_list,
}


def _section(root: _Section, name: str) -> _Section:
    value = root.raw(name)
    where = root.where(name) if root.display else f"{PROJECT}:{name}"
    data = _decode_json(where, value, Key(name, "object", None, "", "")) if value is not None else {}
    if not isinstance(data, dict):
        raise ConfigError(where, data, "an object with the keys listed in the README")
    return _Section(data, where, f"{name}.")


def _check(condition: bool, where: str, value: Any, allowed: str, hint: str = "") -> None:
    if not condition:
        raise ConfigError(where, value, allowed, hint)


def _in(where: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        close = difflib.get_close_matches(value, list(allowed), n=1)
        raise ConfigError(where, value, ", ".join(allowed), f"Did you mean '{close[0]}'?" if close else "")
    return value


# --------------------------------------------------------------------------------------------------
# Loading

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_REGION = re.compile(r"[a-z]{2}(-gov|-iso[a-z]*)?-[a-z]+-\d")
_RESERVATION = re.compile(r"cr-[0-9a-f]{8,17}")
_ARN = re.compile(r"arn:aws[a-z-]*:(iam|sts)::\d{12}:\S+")


def load(raw: Mapping[str, Any], stack: str, project: str = PROJECT) -> StackConfig:
    """Build the typed config from raw key/value pairs (``nemo-eks:foo`` and ``aws:region`` keys)."""
    root = _Section({k.split(":", 1)[1]: v for k, v in raw.items() if k.startswith(f"{PROJECT}:")}, "", "")
    region = _as_string("aws:region", raw.get("aws:region") or "", _KEYS_BY_PATH["aws:region"])
    _check(bool(_REGION.fullmatch(region)), "aws:region", region or None, _KEYS_BY_PATH["aws:region"].allowed,
           "Set it with `pulumi config set aws:region us-east-1`")

    version = root.get("kubernetesVersion")
    match = re.fullmatch(r"1\.(\d+)", version)
    _check(bool(match) and int(match.group(1)) >= MIN_KUBERNETES_MINOR, root.where("kubernetesVersion"), version,
           _KEYS_BY_PATH["kubernetesVersion"].allowed)

    namespace = root.get("namespace")
    _check(bool(_DNS_LABEL.fullmatch(namespace)) and len(namespace) <= 63, root.where("namespace"), namespace,
           "a DNS-1123 label: lower-case letters, digits and '-', at most 63")

    network = _load_network(_section(root, "network"), region)
    cluster = _load_cluster(_section(root, "cluster"), version)
    system_nodes = _load_system_nodes(_section(root, "systemNodes"))
    groups = _load_gpu_node_groups(root, network)
    storage = _load_storage(_section(root, "storage"), network, groups, stack)
    addons = _load_addons(_section(root, "addons"))
    tags = root.get("tags")
    root.finish()
    return StackConfig(
        project=project, stack=stack, region=region, namespace=namespace,
        tags=MappingProxyType({**tags, "project": project, "stack": stack, "managed-by": "pulumi"}),
        network=network, cluster=cluster, system_nodes=system_nodes, gpu_node_groups=groups,
        storage=storage, addons=addons,
    )


def _load_network(s: _Section, region: str) -> NetworkConfig:
    cidr = s.get("vpcCidr")
    try:
        net = ipaddress.IPv4Network(cidr)
    except ValueError:
        raise ConfigError(s.where("vpcCidr"), cidr, _KEYS_BY_PATH["network.vpcCidr"].allowed) from None
    _check(16 <= net.prefixlen <= 20, s.where("vpcCidr"), cidr, _KEYS_BY_PATH["network.vpcCidr"].allowed)

    existing_vpc = s.get("existingVpcId")
    private = s.get("existingPrivateSubnetIds", {})
    public = s.get("existingPublicSubnetIds", {})
    if existing_vpc is not None:
        _check(existing_vpc.startswith("vpc-"), s.where("existingVpcId"), existing_vpc, "vpc-…")
        _check(len(private) >= 2, s.where("existingPrivateSubnetIds"), dict(private),
               "subnets in at least 2 zones, as {zone: subnet-id}", "EKS needs subnets in two zones")
        for where, subnets in ((s.where("existingPrivateSubnetIds"), private), (s.where("existingPublicSubnetIds"), public)):
            for zone, subnet in subnets.items():
                _check(subnet.startswith("subnet-") and zone.startswith(region), f"{where}.{zone}", subnet,
                       f"a subnet-… id under a zone name of {region}")
        zones = tuple(private)
    else:
        _check(not private and not public, s.where("existingPrivateSubnetIds"), dict(private) or dict(public),
               "only together with network.existingVpcId")
        zones = s.get("availabilityZones", (f"{region}a", f"{region}b", f"{region}c"))
        _check(2 <= len(zones) <= 3 and len(set(zones)) == len(zones), s.where("availabilityZones"), list(zones),
               "2 or 3 distinct zones")
        for zone in zones:
            _check(bool(re.fullmatch(re.escape(region) + r"[a-z]", zone)), s.where("availabilityZones"), zone,
                   f"zone names of {region}, e.g. {region}a")
    nat = _in(s.where("natGateways"), s.get("natGateways"), NAT_MODES)
    s.finish()
    return NetworkConfig(vpc_cidr=cidr, availability_zones=tuple(zones), nat_gateways=nat,
                         existing_vpc_id=existing_vpc, existing_private_subnet_ids=private,
                         existing_public_subnet_ids=public)


def _load_cluster(s: _Section, version: str) -> ClusterConfig:
    admins = s.get("adminPrincipalArns")
    for arn in admins:
        _check(bool(_ARN.fullmatch(arn)), s.where("adminPrincipalArns"), arn, "IAM role or user ARNs, arn:aws:iam::<account>:role/<name>")
    public = s.get("publicEndpoint")
    cidrs = s.get("publicAccessCidrs")
    for cidr in cidrs:
        try:
            ipaddress.IPv4Network(cidr)
        except ValueError:
            raise ConfigError(s.where("publicAccessCidrs"), cidr, "IPv4 CIDRs such as 203.0.113.0/24") from None
    _check(not public or bool(cidrs), s.where("publicAccessCidrs"), list(cidrs),
           "at least one CIDR when cluster.publicEndpoint is true",
           "An open public endpoint must be asked for explicitly, e.g. [\"0.0.0.0/0\"]")
    _check(public or not cidrs, s.where("publicAccessCidrs"), list(cidrs), "empty while cluster.publicEndpoint is false")
    log_types = s.get("logTypes")
    for log_type in log_types:
        _in(s.where("logTypes"), log_type, LOG_TYPES)
    s.finish()
    return ClusterConfig(kubernetes_version=version, admin_principal_arns=tuple(admins), public_endpoint=public,
                         public_access_cidrs=tuple(cidrs), log_types=tuple(log_types))


def _check_sizes(s: _Section, min_size: int, desired: int, max_size: int, min_floor: int) -> None:
    _check(min_size >= min_floor, s.where("minSize"), min_size, f">= {min_floor}")
    _check(max_size >= max(1, min_size), s.where("maxSize"), max_size, f">= 1 and >= minSize ({min_size})")
    _check(min_size <= desired <= max_size, s.where("desiredSize"), desired, f"{min_size}..{max_size} (minSize..maxSize)")


def _load_system_nodes(s: _Section) -> SystemNodesConfig:
    instance_type = _in(s.where("instanceType"), s.get("instanceType"), catalog.SYSTEM_INSTANCE_TYPES)
    sizes = s.get("minSize"), s.get("desiredSize"), s.get("maxSize")
    _check_sizes(s, *sizes, min_floor=1)
    s.finish()
    return SystemNodesConfig(instance_type, *sizes)


def _load_gpu_node_groups(root: _Section, network: NetworkConfig) -> tuple[GpuNodeGroupConfig, ...]:
    entries = root.get("gpuNodeGroups")
    groups: list[GpuNodeGroupConfig] = []
    for index, entry in enumerate(entries):
        s = _Section(entry, f"{PROJECT}:gpuNodeGroups[{index}]", "gpuNodeGroups[].")
        name = s.get("name")
        _check(bool(_DNS_LABEL.fullmatch(name)) and len(name) <= 20, s.where("name"), name,
               _KEYS_BY_PATH["gpuNodeGroups[].name"].allowed)
        _check(name not in {g.name for g in groups}, s.where("name"), name, "a name no other group has")
        instance_type = _in(s.where("instanceType"), s.get("instanceType"), catalog.GPU_INSTANCE_TYPES)
        zone = _in(s.where("availabilityZone"), s.get("availabilityZone", network.availability_zones[0]),
                   network.availability_zones)
        sizes = s.get("minSize"), s.get("desiredSize"), s.get("maxSize")
        _check_sizes(s, *sizes, min_floor=0)
        capacity_type = _in(s.where("capacityType"), s.get("capacityType"), CAPACITY_TYPES)
        reservation = s.get("capacityReservationId")
        if reservation is not None:
            _check(bool(_RESERVATION.fullmatch(reservation)), s.where("capacityReservationId"), reservation,
                   "a reservation id such as cr-0123456789abcdef0")
        _check(capacity_type != "CAPACITY_BLOCK" or reservation is not None, s.where("capacityReservationId"), None,
               "the Capacity Block's reservation id when capacityType is CAPACITY_BLOCK")
        _check(capacity_type != "SPOT" or reservation is None, s.where("capacityReservationId"), reservation,
               "unset when capacityType is SPOT (reservations are On-Demand or Capacity Blocks)")
        root_volume = s.get("rootVolumeGib")
        _check(50 <= root_volume <= 16384, s.where("rootVolumeGib"), root_volume, "50..16384")
        release = s.get("amiReleaseVersion")
        s.finish()
        groups.append(GpuNodeGroupConfig(name, instance_type, zone, *sizes, capacity_type, reservation,
                                         root_volume, release))
    return tuple(groups)


def valid_fsx_capacity(gib: int) -> bool:
    """PERSISTENT_2 SSD: 1200 GiB, 2400 GiB, then increments of 2400 GiB."""
    return gib == 1200 or (gib >= 2400 and gib % 2400 == 0)


def _load_storage(s: _Section, network: NetworkConfig, groups: Sequence[GpuNodeGroupConfig], stack: str) -> StorageConfig:
    capacity = s.get("fsxStorageCapacityGib")
    if not valid_fsx_capacity(capacity):
        nearest = 1200 if capacity < 1800 else max(2400, -(-capacity // 2400) * 2400)
        raise ConfigError(s.where("fsxStorageCapacityGib"), capacity, _KEYS_BY_PATH["storage.fsxStorageCapacityGib"].allowed,
                          f"The nearest valid capacity is {nearest}")
    throughput = s.get("fsxThroughputPerTib")
    _check(throughput in FSX_THROUGHPUTS_MB_PER_TIB, s.where("fsxThroughputPerTib"), throughput,
           ", ".join(map(str, FSX_THROUGHPUTS_MB_PER_TIB)) + " (PERSISTENT_2)")
    zone = _in(s.where("fsxAvailabilityZone"), s.get("fsxAvailabilityZone", groups[0].availability_zone),
               network.availability_zones)
    noncurrent = s.get("noncurrentVersionDays")
    _check(1 <= noncurrent <= 3650, s.where("noncurrentVersionDays"), noncurrent, "1..3650")
    abort_days = s.get("abortIncompleteUploadDays")
    _check(1 <= abort_days <= 365, s.where("abortIncompleteUploadDays"), abort_days, "1..365")
    protect = s.get("protect", is_prod_stack(stack))
    s.finish()
    return StorageConfig(capacity, throughput, zone, noncurrent, abort_days, protect)


def _load_addons(s: _Section) -> AddonsConfig:
    versions = {name: s.get(name) for name in ("nvidiaDevicePluginVersion", "efaDevicePluginVersion",
                                                 "podIdentityAgentVersion", "fsxCsiDriverVersion")}
    for name, version in versions.items():
        _check(version is None or bool(re.fullmatch(r"v?\d+\.\d+\.\d+([-+.][0-9A-Za-z.-]+)?", version)),
               s.where(name), version, "a pinned version such as 0.17.4 or v1.2.0-eksbuild.1 (no ranges, no 'latest')")
    s.finish()
    return AddonsConfig(versions["nvidiaDevicePluginVersion"], versions["efaDevicePluginVersion"],
                        versions["podIdentityAgentVersion"], versions["fsxCsiDriverVersion"])


def from_pulumi() -> StackConfig:
    """Load the running stack's config. Called once, by ``__main__``; nothing else reads ``pulumi.Config``."""
    import pulumi
    from pulumi.runtime import config as runtime_config

    # The language host hands the program the whole config map; reading it whole lets us reject unknown keys.
    raw = {**runtime_config.get_config_env(), **runtime_config.CONFIG.get()}
    return load(raw, pulumi.get_stack(), pulumi.get_project())
