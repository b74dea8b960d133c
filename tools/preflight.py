"""Preflight: can this AWS account and region run the stack? Run it before the first ``pulumi up``.

    python -m tools.preflight --stack NAME [--json] [--bucket NAME]

One line per check, PASS / WARN / FAIL, what was checked and, for WARN and FAIL, the fix; exit status 1 when any
check FAILs, else 0. The checks:

- the account: the credentials work (STS GetCallerIdentity), and the region checked is the stack's ``aws:region``
  (a WARN when the environment points elsewhere);
- each zone the stack uses exists in the region, and each GPU node group's instance type is offered in its zone;
- the "Running On-Demand P instances" vCPU quota (L-417A185B) covers the ON_DEMAND groups that do not launch into a
  reservation, at their maxSize (the plan's number unless set), and "All P Spot Instance Requests"
  (L-7212CCBC) the SPOT groups;
- a group's capacity reservation or Capacity Block exists, is active, and matches its instance type, zone, count
  and capacity type (and, for the training group, lasts as long as the plan's training estimate);
- a Capacity Block's window covers what runs on its group: the planned training from the later of now and the
  block's start, and no Triton serving (it would stop at the block's end);
- EKS supports the stack's Kubernetes version in the region;
- the dataset the stack trains on (``s3://<datasets bucket>/<data.dataset>/train.jsonl`` and the optional
  ``validation.jsonl``) exists and passes the same validation as ``python -m tools.data validate``;
- this machine reaches the cluster's API endpoint (a TCP connection; a WARN before the cluster exists, saying how
  the first ``pulumi up`` will reach it).

Region and credentials come from the standard AWS environment (AWS_REGION, AWS_DEFAULT_REGION, AWS_PROFILE,
AWS_ENDPOINT_URL, ...); with no region there, the stack's ``aws:region`` is used. A check whose API call is not
allowed (or not available) becomes a WARN that says how to check by hand; it never passes silently.

Each check is a function of the boto3 client(s) it needs and the typed ``StackConfig`` that returns ``Check``s;
``run_checks`` runs them all, ``main`` is the CLI around it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Mapping, Sequence

from infra import catalog
from workloads.entrypoints import dataset

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
STATUSES = (PASS, WARN, FAIL)
PROJECT = "nemo-eks"


@dataclass(frozen=True)
class Check:
    """The outcome of one check. ``fix`` is what to do about a WARN or FAIL (empty for PASS)."""

    name: str
    status: str
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def render(self) -> str:
        line = f"{self.status}  {self.name}: {self.detail}"
        return line + (f" -- fix: {self.fix}" if self.fix and self.status != PASS else "")


@dataclass(frozen=True)
class Quota:
    code: str
    name: str
    capacity_type: str  # the groups it covers


ON_DEMAND_P = Quota("L-417A185B", "Running On-Demand P instances", "ON_DEMAND")
SPOT_P = Quota("L-7212CCBC", "All P Spot Instance Requests", "SPOT")
QUOTAS_BY_FAMILY: Mapping[str, tuple[Quota, ...]] = {"p": (ON_DEMAND_P, SPOT_P)}

# DescribeCapacityReservations states. Waiting: the capacity is bought or being provisioned but cannot launch yet.
RESERVATION_READY = ("active",)
RESERVATION_WAITING = ("scheduled", "payment-pending", "pending", "assessing", "delayed")
RESERVATION_DEAD = ("expired", "cancelled", "failed", "payment-failed", "unsupported")
LINUX_PLATFORM = "Linux/UNIX"  # the AL2023 NVIDIA AMI


def group_key(index: int, name: str) -> str:
    return f"{PROJECT}:gpuNodeGroups[{index}].{name}"


def _group_label(index: int, group) -> str:
    return f"gpuNodeGroups[{index}] ({group.name})"


def _error_code(error: Exception) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")) or type(error).__name__


# Every AWS call is bounded, so that a report from a network where AWS cannot be reached (a firewall that drops
# packets, a proxy or endpoint that accepts and never answers) comes back in about 25 s instead of after botocore's
# 60 s connect and read timeouts (botocore/endpoint.py DEFAULT_TIMEOUT) times its attempts. Each call may take
# CONNECT_TIMEOUT_S + READ_TIMEOUT_S per attempt; the first call (STS) stops the report when it cannot reach AWS.
# Retry settings: botocore.config.Config ``retries`` (``total_max_attempts`` counts the first call; "standard"
# mode retries transient errors, timeouts included, with jittered backoff of at most a second or two here).
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 10
MAX_ATTEMPTS = 2


def client_config(environ: Mapping[str, str] | None = None):
    """The botocore client configuration of every preflight call. AWS_MAX_ATTEMPTS may lower the attempts (the
    tests' emulator answers unimplemented calls with HTTP 500), never raise them past the bound."""
    from botocore.config import Config

    environ = os.environ if environ is None else environ
    try:
        attempts = min(MAX_ATTEMPTS, max(1, int(environ.get("AWS_MAX_ATTEMPTS", MAX_ATTEMPTS))))
    except ValueError:
        attempts = MAX_ATTEMPTS
    return Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                  retries={"mode": "standard", "total_max_attempts": attempts})


def unreachable_endpoint(error: Exception) -> str | None:
    """The endpoint (or proxy) an error says could not be reached or did not answer; None for other errors."""
    from botocore.exceptions import ConnectionClosedError, ConnectionError, ReadTimeoutError

    if not isinstance(error, (ConnectionError, ReadTimeoutError, ConnectionClosedError)):
        return None
    kwargs = getattr(error, "kwargs", {}) or {}
    return str(kwargs.get("endpoint_url") or kwargs.get("proxy_url") or "the AWS endpoint")


def _unreachable_text(error: Exception, endpoint: str) -> str:
    from botocore.exceptions import ReadTimeoutError

    how = (f"no answer within {READ_TIMEOUT_S} s" if isinstance(error, ReadTimeoutError)
           else f"no connection within {CONNECT_TIMEOUT_S} s, or refused")
    return f"cannot reach {endpoint} ({how})"


UNREACHABLE_FIX = ("check the network path to AWS: a firewall, a proxy (HTTPS_PROXY, NO_PROXY) or AWS_ENDPOINT_URL; "
                   "`aws sts get-caller-identity` goes the same way")


def _error_text(error: Exception) -> str:
    endpoint = unreachable_endpoint(error)
    if endpoint is not None:
        return _unreachable_text(error, endpoint)
    response = getattr(error, "response", None) or {}
    message = " ".join((response.get("Error", {}).get("Message") or str(error)).split())
    if type(error).__name__ == "ResponseParserError":
        return "the endpoint's answer is not an AWS response: it may not implement this call"
    if "<html" in message.lower() or "<!doctype" in message.lower():
        # an endpoint that does not implement the call (an emulator, a proxy) answers with a web page
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        return f"HTTP {status} with a web page instead of an AWS answer: the endpoint may not implement this call"
    return f"{_error_code(error)}: {message[:200]}"


def _when(moment: datetime | None) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if moment else "an unknown date"


def _duration(hours: float) -> str:
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} h"


def _client_errors() -> tuple[type[Exception], ...]:
    """What an AWS call can raise: API errors, transport and credential errors, and unparseable answers
    (ResponseParserError is not a BotoCoreError)."""
    from botocore.exceptions import BotoCoreError, ClientError
    from botocore.parsers import ResponseParserError

    return (BotoCoreError, ClientError, ResponseParserError)


# --------------------------------------------------------------------------------------------------
# 1. Zones and instance-type offerings


def check_zones_and_offerings(ec2, cfg) -> list[Check]:
    """The network's zones exist in the region, and each GPU group's instance type is offered in its zone."""
    region = ec2.meta.region_name
    zones = {z["ZoneName"]: z for z in ec2.describe_availability_zones()["AvailabilityZones"]}
    offered: dict[str, set[str]] = {}
    paginator = ec2.get_paginator("describe_instance_type_offerings")
    for page in paginator.paginate(LocationType="availability-zone",
                                   Filters=[{"Name": "instance-type", "Values": list(catalog.GPU_INSTANCE_TYPES)}]):
        for offering in page["InstanceTypeOfferings"]:
            offered.setdefault(offering["InstanceType"], set()).add(offering["Location"])
    checks = []

    network_zones = cfg.network.availability_zones
    missing = [z for z in network_zones if z not in zones]
    key = (f"{PROJECT}:network.existingPrivateSubnetIds" if cfg.network.uses_existing_vpc
           else f"{PROJECT}:network.availabilityZones")
    if missing:
        checks.append(Check("network zones", FAIL,
                            f"{', '.join(missing)} not among the zones of {region} in this account "
                            f"({', '.join(sorted(zones)) or 'none'})",
                            f"set {key} to zones of {region}, e.g. {', '.join(sorted(zones)[:3])}"))
    else:
        checks.append(Check("network zones", PASS, f"{', '.join(network_zones)} exist in {region}"))

    for index, group in enumerate(cfg.gpu_node_groups):
        name = f"instance offering {_group_label(index, group)}"
        zone, itype = group.availability_zone, group.instance_type
        here = sorted(offered.get(itype, ()))
        zone_key = group_key(index, "availabilityZone")
        also = f" (and keep it in {key})"
        if zone not in zones:
            fix = (f"set {zone_key} to one of {', '.join(here)}{also}" if here
                   else f"{itype} is offered in no zone of {region}: choose another region (aws:region) or "
                        f"instance type ({group_key(index, 'instanceType')})")
            checks.append(Check(name, FAIL, f"zone {zone} does not exist in {region} for this account", fix))
            continue
        if itype in offered and zone in offered[itype]:
            state = zones[zone].get("State", "available")
            detail = f"{itype} is offered in {zone} ({zones[zone].get('ZoneId', '?')})"
            if state != "available":
                checks.append(Check(name, WARN, f"{detail}, but the zone's state is {state!r}",
                                    f"wait for the zone, or set {zone_key} to another zone offering {itype}"))
            else:
                checks.append(Check(name, PASS, detail))
            continue
        if here:
            fix = f"set {zone_key} to one of {', '.join(here)}{also}"
            if group.uses_reservation:
                fix += f"; the reservation {group.capacity_reservation_id} must be in that zone too"
            detail = f"{itype} is not offered in {zone}; {region} offers it in {', '.join(here)}"
        else:
            alternatives = sorted(t for t, where in offered.items() if zone in where)
            fix = (f"set {group_key(index, 'instanceType')} to one offered in {zone} "
                   f"({', '.join(alternatives) or 'none of the catalog types'}), or choose a region that offers "
                   f"{itype} (aws:region)")
            detail = f"{itype} is offered in no zone of {region}"
        checks.append(Check(name, FAIL, detail, fix))
    return checks


# --------------------------------------------------------------------------------------------------
# 2. vCPU quotas


class QuotaUnavailable(Exception):
    pass


def read_quota(quotas, code: str) -> tuple[float, str]:
    """The quota's applied value; the AWS default when the account has no applied value (GetServiceQuota
    answers NoSuchResourceException then). Raises QuotaUnavailable when neither can be read."""
    errors = _client_errors()
    try:
        quota = quotas.get_service_quota(ServiceCode="ec2", QuotaCode=code)["Quota"]
        source = "applied value"
    except errors as error:
        if _error_code(error) != "NoSuchResourceException":
            raise QuotaUnavailable(_error_text(error)) from None
        try:
            quota = quotas.get_aws_default_service_quota(ServiceCode="ec2", QuotaCode=code)["Quota"]
            source = "AWS default; no applied value in this account"
        except errors as default_error:
            raise QuotaUnavailable(f"{_error_text(error)}; default: {_error_text(default_error)}") from None
    if quota.get("Value") is None:
        reason = quota.get("ErrorReason", {})
        raise QuotaUnavailable(f"{reason.get('ErrorCode', 'no value')}: {reason.get('ErrorMessage', '')}".strip())
    return float(quota["Value"]), source


def planned_vcpus(cfg, capacity_type: str, family: str = "p") -> tuple[int, list[str]]:
    """vCPUs of one instance family the stack may run at once outside reservations for a capacity type: each
    group's maxSize (the plan's training plus serving nodes on the group, unless set) x the type's vCPUs."""
    total, parts = 0, []
    for index, group in enumerate(cfg.gpu_node_groups):
        if (group.capacity_type != capacity_type or group.uses_reservation
                or not group.instance_type.startswith(family)):
            continue
        vcpus = catalog.get(group.instance_type).vcpus
        total += group.max_size * vcpus
        parts.append(f"gpuNodeGroups[{index}] ({group.name}) maxSize {group.max_size} x {vcpus} vCPUs "
                     f"({group.instance_type})")
    return total, parts


def _quota_links(region: str, code: str) -> str:
    return (f"https://{region}.console.aws.amazon.com/servicequotas/home/services/ec2/quotas/{code} or "
            f"`aws service-quotas get-service-quota --service-code ec2 --quota-code {code} --region {region}`")


def check_quotas(quotas, cfg) -> list[Check]:
    region = quotas.meta.region_name
    checks = []
    # Every GPU type in the catalog is a P type; a type of another family would need its own quota codes here.
    unknown = sorted({g.instance_type for g in cfg.gpu_node_groups if g.instance_type[0] not in QUOTAS_BY_FAMILY})
    if unknown:
        checks.append(Check("quota", WARN, f"no vCPU quota code known for {', '.join(unknown)}",
                            f"check the family's vCPU quota by hand in the Service Quotas console ({region})"))
    for quota in QUOTAS_BY_FAMILY["p"]:
        name = f"quota {quota.name} ({quota.code})"
        planned, parts = planned_vcpus(cfg, quota.capacity_type)
        if not parts:
            if quota is ON_DEMAND_P:  # the spot line only appears for stacks that use spot
                checks.append(Check(name, PASS, "not needed: no ON_DEMAND GPU group outside a capacity reservation "
                                                "or Capacity Block (instances in reserved capacity are not counted here)"))
            continue
        used = f"planned {planned} vCPUs = " + " + ".join(parts)
        try:
            value, source = read_quota(quotas, quota.code)
        except QuotaUnavailable as error:
            checks.append(Check(name, WARN, f"{used}; the quota could not be read ({error})",
                                f"check that it is at least {planned} at {_quota_links(region, quota.code)}"))
            continue
        detail = f"{used}; quota {value:g} vCPUs ({source}) in {region}"
        if planned <= value:
            checks.append(Check(name, PASS, detail + "; P instances already running in the region share it"))
        else:
            other = ("lower the groups' maxSize (" + ", ".join(
                group_key(i, "maxSize") for i, g in enumerate(cfg.gpu_node_groups)
                if g.capacity_type == quota.capacity_type and not g.uses_reservation) + ") if the plan allows")
            if quota is ON_DEMAND_P:
                other += ", or launch into a reservation (capacityReservationId)"
            checks.append(Check(
                name, FAIL, detail,
                f"request at least {planned}: `aws service-quotas request-service-quota-increase --service-code ec2 "
                f"--quota-code {quota.code} --desired-value {planned} --region {region}` "
                f"(https://{region}.console.aws.amazon.com/servicequotas/home/services/ec2/quotas/{quota.code}); "
                f"or {other}"))
    return checks


# --------------------------------------------------------------------------------------------------
# 3. Capacity reservations and Capacity Blocks


def judge_reservation(index: int, group, reservation: Mapping[str, Any], now: datetime,
                      training_hours: float | None = None, autoscaled: bool = False) -> Check:
    """Whether a DescribeCapacityReservations entry can hold this group. Pure: tested on describe results."""
    rid = reservation.get("CapacityReservationId", group.capacity_reservation_id)
    kind = "Capacity Block" if reservation.get("ReservationType") == "capacity-block" else "capacity reservation"
    name = f"reservation {_group_label(index, group)}"
    state = reservation.get("State", "unknown")
    total = int(reservation.get("TotalInstanceCount", 0))
    available = int(reservation.get("AvailableInstanceCount", total))
    start, end = reservation.get("StartDate"), reservation.get("EndDate")
    summary = (f"{kind} {rid}: {state}, {total} x {reservation.get('InstanceType')} in "
               f"{reservation.get('AvailabilityZone')}")
    if end is not None:
        summary += f", until {_when(end)}"
    fails: list[tuple[str, str]] = []  # (problem, fix)
    warns: list[tuple[str, str]] = []

    if state in RESERVATION_DEAD:
        fails.append((f"it is {state}", f"buy a new one and set {group_key(index, 'capacityReservationId')} to its id"))
    elif state in RESERVATION_WAITING:
        when = f"starts {_when(start)}" if start else "is not active yet"
        warns.append((f"it {when}", "no node can launch before then; the Cluster Autoscaler adds them once it is "
                                    "active, and the pipeline's pods wait until then" if autoscaled else
                                    f"no node can launch before then: keep {group_key(index, 'desiredSize')} at 0 "
                                    f"until it is active, then raise it"))
    elif state not in RESERVATION_READY:
        warns.append((f"unknown state {state!r}", "check it in the EC2 console (Capacity Reservations)"))

    if reservation.get("InstanceType") != group.instance_type:
        fails.append((f"it is for {reservation.get('InstanceType')}, the group uses {group.instance_type}",
                      f"set {group_key(index, 'instanceType')} to {reservation.get('InstanceType')} or name a "
                      f"{group.instance_type} reservation"))
    if reservation.get("AvailabilityZone") != group.availability_zone:
        fails.append((f"it is in {reservation.get('AvailabilityZone')}, the group in {group.availability_zone}",
                      f"set {group_key(index, 'availabilityZone')} to {reservation.get('AvailabilityZone')} (it must "
                      f"be one of {PROJECT}:network.availabilityZones)"))
    if total < group.max_size:
        fails.append((f"it holds {total} instance(s), the group's maxSize is {group.max_size}",
                      f"reserve at least {group.max_size}, or set {group_key(index, 'maxSize')} to {total} if the "
                      f"plan fits (the config check says)"))
    elif available < group.max_size and state in RESERVATION_READY:
        warns.append((f"only {available} of {total} are free now ({total - available} in use by other instances)",
                      f"stop the other instances in {rid} before scaling the group up"))
    platform = reservation.get("InstancePlatform")
    if platform and platform != LINUX_PLATFORM:
        fails.append((f"its platform is {platform}", f"reserve {LINUX_PLATFORM} capacity (the nodes run AL2023)"))
    is_block = reservation.get("ReservationType") == "capacity-block"
    if group.capacity_type == "CAPACITY_BLOCK" and not is_block:
        fails.append(("it is an On-Demand Capacity Reservation, not a Capacity Block",
                      f"set {group_key(index, 'capacityType')} to ON_DEMAND"))
    if group.capacity_type != "CAPACITY_BLOCK" and is_block:
        fails.append(("it is a Capacity Block", f"set {group_key(index, 'capacityType')} to CAPACITY_BLOCK"))

    # A Capacity Block's window against the run: check_capacity_block_windows.
    if end is not None and training_hours and not is_block and state in RESERVATION_READY + RESERVATION_WAITING:
        begins = max(now, start) if start else now
        window = (end - begins).total_seconds() / 3600
        if window < training_hours:
            warns.append((f"its remaining window ({_duration(max(window, 0))}) is shorter than the plan's training "
                          f"estimate ({_duration(training_hours)})",
                          "extend the Capacity Block or buy a longer one; a cut-off run resumes from its last "
                          "checkpoint"))

    problems = fails or warns
    if not problems:
        return Check(name, PASS, summary + f"; fits maxSize {group.max_size}")
    return Check(name, FAIL if fails else WARN, summary + "; " + "; ".join(p for p, _ in problems),
                 "; ".join(f for _, f in problems))


def check_reservations(ec2, cfg, now: datetime | None = None) -> list[Check]:
    now = now or datetime.now(timezone.utc)
    region = ec2.meta.region_name
    checks = []
    for index, group in enumerate(cfg.gpu_node_groups):
        if not group.uses_reservation:
            continue
        rid, name = group.capacity_reservation_id, f"reservation {_group_label(index, group)}"
        by_hand = f"`aws ec2 describe-capacity-reservations --capacity-reservation-ids {rid} --region {region}`"
        try:
            found = ec2.describe_capacity_reservations(CapacityReservationIds=[rid])["CapacityReservations"]
        except _client_errors() as error:
            if _error_code(error).startswith("InvalidCapacityReservationId"):
                found = []
            else:
                checks.append(Check(name, WARN, f"{rid} could not be read ({_error_text(error)})",
                                    f"check it by hand: {by_hand}"))
                continue
        if not found:
            checks.append(Check(name, FAIL, f"{rid} does not exist in {region} for this account",
                                f"set {group_key(index, 'capacityReservationId')} to a reservation of "
                                f"{group.instance_type} in {group.availability_zone} "
                                f"(`aws ec2 describe-capacity-reservations --region {region}` lists them)"))
            continue
        hours = cfg.sizing.hours if group.name == cfg.training_node_group else None
        checks.append(judge_reservation(index, group, found[0], now, hours, cfg.autoscaling.enabled))
    return checks


def judge_capacity_block_window(index: int, group, block: Mapping[str, Any], now: datetime, cfg) -> Check:
    """Whether a Capacity Block's window covers what the stack runs on its group. Nodes exist only inside the
    window: the group can grow only once the block is active (the autoscaler's scale-ups fail until then), and
    EC2 takes the instances back when it ends. `pulumi up` creates the pipeline's pods at once, so the planned run
    starts at the later of now and the block's start. Pure: tested on describe results."""
    name = f"capacity window {_group_label(index, group)}"
    start, end = block.get("StartDate"), block.get("EndDate")
    rid = block.get("CapacityReservationId", group.capacity_reservation_id)
    if end is None:
        return Check(name, WARN, f"Capacity Block {rid} reports no end date", "check it in the EC2 console")
    begins = max(now, start) if start else now
    details = [f"Capacity Block {rid} runs {_when(start)} to {_when(end)}"]
    if begins > now:
        details.append(f"the group can only grow from {_when(begins)}: until then the pipeline's GPU pods wait "
                       f"(alert NemoGpuPodPending after {cfg.pipeline.monitoring.pending_gpu_pod_minutes} min)")
    warns: list[tuple[str, str]] = []
    if group.name == cfg.training_node_group:
        hours = cfg.sizing.hours
        if hours is None:
            warns.append(("the plan has no training estimate, so whether the block covers the run is unknown",
                          f"set {PROJECT}:training.datasetTokens for an estimate"))
        elif (finish := begins + timedelta(hours=hours)) > end:
            warns.append((f"the planned training ({_duration(hours)} from {_when(begins)}) would end {_when(finish)}, "
                          f"after the block: its nodes go at {_when(end)} and none can be added then",
                          f"extend the block or buy one that covers the run; or shorten it ({PROJECT}:training.maxSteps, "
                          f"training.epochs); a cut-off run resumes from its last checkpoint on new capacity"))
        else:
            details.append(f"the planned training ({_duration(hours)}) ends by {_when(finish)}")
    if group.name == cfg.serving_node_group:
        warns.append((f"Triton serves from this group: it stops at {_when(end)}, when the block's nodes go",
                      f"serve from an ON_DEMAND group ({PROJECT}:serving.nodeGroup) or buy the next block in time"))
    detail = "; ".join(details + [w for w, _ in warns])
    return Check(name, WARN if warns else PASS, detail, "; ".join(f for _, f in warns))


def check_capacity_block_windows(ec2, cfg, now: datetime | None = None) -> list[Check]:
    now = now or datetime.now(timezone.utc)
    checks = []
    for index, group in enumerate(cfg.gpu_node_groups):
        if group.capacity_type != "CAPACITY_BLOCK":
            continue
        try:
            found = ec2.describe_capacity_reservations(
                CapacityReservationIds=[group.capacity_reservation_id])["CapacityReservations"]
        except _client_errors() as error:
            found, reason = [], _error_text(error)
        else:
            reason = "not found"
        if not found:
            checks.append(Check(f"capacity window {_group_label(index, group)}", WARN,
                                f"{group.capacity_reservation_id} could not be read ({reason})",
                                "see the reservation line; check the block's start and end by hand"))
            continue
        checks.append(judge_capacity_block_window(index, group, found[0], now, cfg))
    return checks


# --------------------------------------------------------------------------------------------------
# 4. Kubernetes version


def _status(entry: Mapping[str, Any]) -> str:
    return str(entry.get("versionStatus") or entry.get("status") or "").lower().replace("_", "-")


def _minor(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        return (0,)


def _suggest(versions: Iterable[str], default: str | None = None) -> str:
    from infra.config import MIN_KUBERNETES_MINOR  # the config's own floor: suggest only what it accepts

    usable = sorted((v for v in versions if _minor(v)[1:2] >= (MIN_KUBERNETES_MINOR,)), key=_minor)
    if default in usable:
        return default
    return usable[-1] if usable else ""


def check_kubernetes_version(eks, cfg) -> list[Check]:
    """DescribeClusterVersions when allowed; else add-on versions published for the version are the evidence."""
    version, region = cfg.cluster.kubernetes_version, eks.meta.region_name
    key = f"{PROJECT}:kubernetesVersion"
    name = "kubernetes version"
    try:
        entries = [e for page in eks.get_paginator("describe_cluster_versions").paginate()
                   for e in page.get("clusterVersions", [])]
    except _client_errors() as error:
        return _kubernetes_from_addons(eks, version, region, error)
    supported = {e["clusterVersion"]: e for e in entries if _status(e) != "unsupported"}
    standard = sorted((v for v, e in supported.items() if _status(e) == "standard-support"), key=_minor)
    default = next((e["clusterVersion"] for e in entries if e.get("defaultVersion")), None)
    listed = ", ".join(f"{v} ({_status(supported[v])})" for v in sorted(supported, key=_minor))
    entry = supported.get(version)
    if entry is None:
        suggestion = _suggest(standard, default)
        return [Check(name, FAIL, f"EKS does not support Kubernetes {version} in {region}; supported: {listed or 'none'}",
                      f"set {key} to {suggestion or 'a supported version'}")]
    if _status(entry) == "extended-support":
        until = _when(entry.get("endOfExtendedSupportDate"))
        return [Check(name, WARN, f"{version} is in extended support in {region} until {until}: the cluster costs "
                                  f"more per hour than in standard support",
                      f"set {key} to {_suggest(standard, default) or 'a version in standard support'}")]
    until = entry.get("endOfStandardSupportDate")
    return [Check(name, PASS, f"{version} is in standard support in {region}"
                  + (f" until {_when(until)}" if until else ""))]


def _kubernetes_from_addons(eks, version: str, region: str, denied: Exception) -> list[Check]:
    name, key = "kubernetes version", f"{PROJECT}:kubernetesVersion"
    by_hand = f"`aws eks describe-cluster-versions --region {region}`"
    why = f"DescribeClusterVersions failed ({_error_text(denied)})"
    try:
        addons = [a for page in eks.get_paginator("describe_addon_versions").paginate(kubernetesVersion=version)
                  for a in page.get("addons", [])]
    except _client_errors() as error:
        return [Check(name, WARN, f"could not verify {version} in {region}: {why}; DescribeAddonVersions failed "
                                  f"({_error_text(error)})", f"check it by hand: {by_hand}")]
    if addons:
        return [Check(name, PASS, f"EKS publishes {len(addons)} add-on(s) for Kubernetes {version} in {region} "
                                  f"(evidence from DescribeAddonVersions; {why})")]
    known: set[str] = set()
    try:
        for page in eks.get_paginator("describe_addon_versions").paginate(addonName="vpc-cni"):
            for addon in page.get("addons", []):
                for addon_version in addon.get("addonVersions", []):
                    known.update(c["clusterVersion"] for c in addon_version.get("compatibilities", [])
                                 if c.get("clusterVersion"))
    except _client_errors():
        pass
    listed = ", ".join(sorted(known, key=_minor))
    return [Check(name, FAIL, f"EKS publishes no add-on for Kubernetes {version} in {region}"
                              + (f"; vpc-cni supports {listed}" if listed else "") + f" ({why})",
                  f"set {key} to {_suggest(known) or 'a supported version'} (confirm with {by_hand})")]


# --------------------------------------------------------------------------------------------------
# 5. Dataset

REPORT_LINES = 6  # of the validation report, in a FAIL


API_PORT = 443
ENDPOINT_TIMEOUT_SECONDS = 5.0
REACH_FIXES = ("run from inside the VPC (the stack's CI runners, an SSM port forward through a node, a VPN into the "
               "VPC), or set cluster.publicEndpoint with cluster.publicAccessCidrs: [\"<your address>/32\"] for the "
               "bootstrap only (docs/delivery.md, 'Bootstrap')")


def tcp_connect(host: str, port: int, timeout: float = ENDPOINT_TIMEOUT_SECONDS) -> str:
    """Open and close a TCP connection; return the address reached. Raises OSError when it cannot."""
    import socket

    with socket.create_connection((host, port), timeout=timeout) as connection:
        return connection.getpeername()[0]


def check_api_endpoint(eks, cfg, connect: Callable[[str, int], str] = tcp_connect) -> list[Check]:
    """`pulumi preview` and `up` declare Kubernetes objects: the machine running them must reach the cluster's API
    endpoint (a TCP connection to it; authentication is EKS access entries' business)."""
    from urllib.parse import urlsplit

    name, cluster_name = "api endpoint", cfg.prefix
    public = "a public endpoint for " + ", ".join(cfg.cluster.public_access_cidrs) if cfg.cluster.public_endpoint \
        else "a private endpoint only"
    try:
        cluster = eks.describe_cluster(name=cluster_name)["cluster"]
    except _client_errors() as error:
        if _error_code(error) != "ResourceNotFoundException":
            raise
        return [Check(name, WARN, f"cluster {cluster_name} does not exist yet; the stack asks for {public}: the first "
                                  f"`pulumi up` creates it and then must reach it from here to declare the Kubernetes "
                                  f"objects", REACH_FIXES)]
    endpoint = urlsplit(cluster.get("endpoint") or "")
    if not endpoint.hostname:
        return [Check(name, WARN, f"cluster {cluster_name} has no endpoint yet (status {cluster.get('status')})",
                      "run preflight again once the cluster is ACTIVE")]
    vpc = cluster.get("resourcesVpcConfig", {})
    try:
        address = connect(endpoint.hostname, endpoint.port or API_PORT)
    except OSError as error:
        live = ("public for " + ", ".join(vpc.get("publicAccessCidrs", []))) if vpc.get("endpointPublicAccess") \
            else "private only"
        return [Check(name, FAIL, f"cannot reach {endpoint.hostname}:{endpoint.port or API_PORT} of {cluster_name} "
                                  f"(endpoint {live}; {error.__class__.__name__}: {error})", REACH_FIXES)]
    return [Check(name, PASS, f"reached {endpoint.hostname}:{endpoint.port or API_PORT} ({address}) of {cluster_name}")]


def check_dataset(s3, cfg, bucket: str | None = None) -> list[Check]:
    """The stack's dataset objects exist and pass the validation ``tools.data validate`` runs."""
    from tools import data

    dataset_name, stack = cfg.pipeline.dataset, cfg.stack
    seq_length, global_batch_size = cfg.sizing.request.seq_length, cfg.sizing.request.global_batch_size
    check = f"dataset {dataset_name}"
    upload = f"`python -m tools.data upload FILE --stack {stack}`"
    if bucket is None:
        try:
            bucket = data.find_datasets_bucket(s3, stack)
        except data.CliError as error:
            return [Check(check, WARN, str(error),
                          f"deploy first (`pulumi up` creates the datasets bucket; nemo-eks:pipeline.enabled false "
                          f"deploys the platform only), then upload with {upload}; or pass --bucket NAME")]
    try:
        s3.head_bucket(Bucket=bucket)
    except _client_errors() as error:
        return [Check(check, WARN, f"bucket {bucket} cannot be read ({_error_text(error)})",
                      f"deploy first or upload with {upload}; check the bucket name and s3:ListBucket permission")]
    prefix = f"s3://{bucket}/{dataset_name}/"
    with tempfile.TemporaryDirectory() as tmp:
        local_dir = os.path.join(tmp, dataset_name)
        os.makedirs(local_dir)
        paths = {}
        for filename in (dataset.TRAIN_FILE, dataset.VALIDATION_FILE):
            local = os.path.join(local_dir, filename)
            try:
                s3.download_file(bucket, f"{dataset_name}/{filename}", local)
                paths[filename] = local
            except _client_errors() as error:
                if _error_code(error) not in ("404", "NoSuchKey"):
                    return [Check(check, WARN, f"{prefix}{filename} cannot be read ({_error_text(error)})",
                                  "check s3:GetObject on the datasets bucket")]
        if dataset.TRAIN_FILE not in paths:
            present = sorted(p["Prefix"].rstrip("/") for p in s3.list_objects_v2(
                Bucket=bucket, Delimiter="/").get("CommonPrefixes", []))
            fix = f"upload it with {upload} (data.dataset: {dataset_name})"
            if present:
                fix += f", or set {PROJECT}:data.dataset to one of {', '.join(present)}"
            status = FAIL if cfg.pipeline.enabled else WARN  # the platform alone does not read it
            return [Check(check, status, f"{prefix}{dataset.TRAIN_FILE} does not exist"
                          + ("" if cfg.pipeline.enabled else " (needed once nemo-eks:pipeline.enabled is true)"), fix)]
        size = sum(os.path.getsize(p) for p in paths.values())
        try:
            # the same checks as finetune.py --prepare, one global batch of validation examples included
            train, validation, reports = dataset.load_dataset(paths[dataset.TRAIN_FILE],
                                                              paths.get(dataset.VALIDATION_FILE), seq_length,
                                                              global_batch_size)
        except dataset.DatasetError as error:
            lines = str(error).replace(f"{tmp}/", f"s3://{bucket}/").splitlines()
            shown = "; ".join(line.strip() for line in lines[:REPORT_LINES])
            more = f" (+{len(lines) - REPORT_LINES} more report lines)" if len(lines) > REPORT_LINES else ""
            return [Check(check, FAIL, f"invalid: {shown}{more}",
                          f"fix the file (`python -m tools.data validate FILE --stack {stack}` shows every line) and "
                          f"upload it again with {upload}")]
    split = "given" if dataset.VALIDATION_FILE in paths else "derived from train.jsonl"
    longest = max(r.max_tokens_estimate for r in reports)
    detail = (f"{prefix}: {len(train)} training and {len(validation)} validation example(s) (validation {split}), "
              f"{size / 1e6:.1f} MB; longest ~{longest} tokens (estimate) against "
              f"{PROJECT}:training.seqLength {seq_length}")
    warnings = [f"{problem}: {len(lines)} line(s)" for r in reports for problem, lines in r.warnings.items()]
    if warnings:
        return [Check(check, WARN, detail + "; " + "; ".join(warnings),
                      f"clean the file and upload it again, or raise {PROJECT}:training.seqLength for long examples")]
    return [Check(check, PASS, detail)]


# --------------------------------------------------------------------------------------------------
# Running them


def resolve_region(cfg, environ: Mapping[str, str] | None = None, profile_region: str | None = None) -> tuple[str, str]:
    """(region, where it came from): AWS_REGION, then AWS_DEFAULT_REGION (botocore reads only the latter), then
    the profile's region, then the stack's aws:region."""
    environ = os.environ if environ is None else environ
    for variable in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if environ.get(variable):
            return environ[variable], variable
    if profile_region:
        return profile_region, f"profile {environ.get('AWS_PROFILE', 'default')}"
    return cfg.region, "the stack's aws:region"


@dataclass
class Clients:
    """boto3 clients for one region, made on first use. Tests may put a stubbed client in ``overrides``."""

    session: Any
    region: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def __call__(self, service: str):
        if service not in self.overrides:
            self.overrides[service] = self.session.client(service, region_name=self.region, config=client_config())
        return self.overrides[service]


def check_account(sts, cfg, region: str, source: str) -> list[Check]:
    """Credentials work, and the region checked is the one the stack deploys into."""
    identity = sts.get_caller_identity()
    checks = [Check("account", PASS, f"{identity['Account']} as {identity['Arn']}")]
    if region == cfg.region:
        checks.append(Check("region", PASS, f"{region} (from {source}) is the stack's aws:region"))
    else:
        checks.append(Check("region", WARN, f"checking {region} (from {source}), but the stack deploys into "
                                            f"{cfg.region} (aws:region): the results are for {region}",
                            f"unset {source} or set it to {cfg.region}"))
    return checks


def run_checks(clients: Clients, cfg, *, bucket: str | None = None, now: datetime | None = None,
               region_source: str = "") -> list[Check]:
    errors = _client_errors()
    try:
        checks = check_account(clients("sts"), cfg, clients.region, region_source or "the environment")
    except errors as error:
        endpoint = unreachable_endpoint(error)
        if endpoint is not None:  # the network, not the credentials: and nothing else can be checked either
            return [Check("account", FAIL, f"{_unreachable_text(error, endpoint)}; nothing else was checked",
                          UNREACHABLE_FIX)]
        return [Check("account", FAIL, f"the AWS credentials do not work ({_error_text(error)})",
                      "set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (e.g. `aws sso login`), "
                      "and check with `aws sts get-caller-identity`")]
    steps: Sequence[tuple[str, str, str, Callable[[], list[Check]]]] = (
        ("instance offerings", "ec2", "ec2:DescribeAvailabilityZones, ec2:DescribeInstanceTypeOfferings",
         lambda: check_zones_and_offerings(clients("ec2"), cfg)),
        ("quotas", "service-quotas", "servicequotas:GetServiceQuota, servicequotas:GetAWSDefaultServiceQuota",
         lambda: check_quotas(clients("service-quotas"), cfg)),
        ("reservations", "ec2", "ec2:DescribeCapacityReservations",
         lambda: check_reservations(clients("ec2"), cfg, now)),
        ("capacity block windows", "ec2", "ec2:DescribeCapacityReservations",
         lambda: check_capacity_block_windows(clients("ec2"), cfg, now)),
        ("kubernetes version", "eks", "eks:DescribeClusterVersions or eks:DescribeAddonVersions",
         lambda: check_kubernetes_version(clients("eks"), cfg)),
        ("dataset", "s3", "s3:ListAllMyBuckets, s3:GetBucketTagging, s3:ListBucket, s3:GetObject",
         lambda: check_dataset(clients("s3"), cfg, bucket)),
        ("api endpoint", "eks", "eks:DescribeCluster", lambda: check_api_endpoint(clients("eks"), cfg)),
    )
    unreachable: set[str] = set()  # an endpoint that did not answer once is not waited for again
    for name, service, permissions, step in steps:
        endpoint = getattr(getattr(clients(service), "meta", None), "endpoint_url", None)
        if endpoint in unreachable:
            checks.append(Check(name, WARN, f"not checked: cannot reach {endpoint}", UNREACHABLE_FIX))
            continue
        try:
            checks.extend(step())
        except errors as error:  # a check that cannot run is reported, never skipped silently
            if unreachable_endpoint(error) is not None:
                unreachable.add(endpoint)
                checks.append(Check(name, WARN, f"could not check ({_error_text(error)})", UNREACHABLE_FIX))
                continue
            checks.append(Check(name, WARN, f"could not check ({_error_text(error)})",
                                f"allow {permissions} for this identity and run preflight again"))
    return checks


def summary(checks: Sequence[Check]) -> dict[str, int]:
    return {status: sum(c.status == status for c in checks) for status in STATUSES}


def exit_code(checks: Sequence[Check]) -> int:
    return 1 if any(c.status == FAIL for c in checks) else 0


def load_stack(stack: str):
    """The stack file's typed config, as `pulumi up` would build it (secrets stay placeholders)."""
    from infra import config
    from tools import synth

    raw, secret_keys = synth.read_stack_config(stack)
    return config.load(raw, synth.stack_file(stack)[0], secret_keys=secret_keys)


def render_text(stack: str, region: str, source: str, checks: Sequence[Check]) -> str:
    counts = summary(checks)
    lines = [f"preflight for stack {stack!r} in {region} (region from {source})"]
    lines += [c.render() for c in checks]
    verdict = ("fix the FAIL lines before `pulumi up`" if counts[FAIL]
               else "ready for `pulumi up`" + (" (read the WARN lines)" if counts[WARN] else ""))
    lines.append(f"{counts[PASS]} passed, {counts[WARN]} warning(s), {counts[FAIL]} failed: {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.preflight", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack", required=True, help="stack name (stacks/Pulumi.<stack>.yaml) or stack file path")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--bucket", help="datasets bucket (default: found by the stack's tags)")
    args = parser.parse_args(argv)

    from infra.config import ConfigError
    from tools.synth import StackFileError, display_path, stack_file

    region, source, checks = "", "", []
    try:
        cfg = load_stack(args.stack)
    except (StackFileError, ConfigError) as error:
        checks = [Check("stack config", FAIL, str(error), f"fix {display_path(stack_file(args.stack)[1])} "
                                                          f"(`python -m tools.synth {args.stack}` shows the same error)")]
    else:
        import boto3

        session = boto3.Session()
        region, source = resolve_region(cfg, profile_region=session.region_name)
        checks = run_checks(Clients(session, region), cfg, bucket=args.bucket, region_source=source)
    if args.json:
        print(json.dumps({"stack": args.stack, "region": region, "region_source": source,
                          "ok": exit_code(checks) == 0, "summary": summary(checks),
                          "checks": [c.to_dict() for c in checks]}, indent=2))
    else:
        print(render_text(args.stack, region or "?", source or "-", checks))
    return exit_code(checks)


if __name__ == "__main__":
    sys.exit(main())
