"""tools.preflight against a real AWS API emulator: a moto server started here on 127.0.0.1, reached through
AWS_ENDPOINT_URL as the CLI reaches AWS.

moto 5.2 serves EC2 zones and instance-type offerings (with AWS's real offering data), STS and S3. It does not
serve EC2 capacity reservations (DescribeCapacityReservations: HTTP 500, not implemented), EKS
DescribeClusterVersions / DescribeAddonVersions (HTTP 404), or EC2 quotas in Service Quotas (GetServiceQuota:
NoSuchResourceException for every ec2 code; GetAWSDefaultServiceQuota: not implemented; no way to set a value).
Those paths run against the moto server for what it does answer (the WARN a user gets when a call is refused or
missing), and with a botocore Stubber client (request and response checked against the AWS service model) only
for the answers moto cannot give: a quota value, a reservation, the EKS version list.
"""

from __future__ import annotations

import json
import urllib.request
from datetime import datetime, timedelta, timezone

import boto3
import pytest
from botocore.stub import Stubber

from infra import config
from tests.conftest import raw_config
from tools import data, preflight
from tools.preflight import FAIL, PASS, WARN, Check

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)
RID = "cr-0123456789abcdef0"


@pytest.fixture
def aws(moto_endpoint, monkeypatch, tmp_path):
    """The standard AWS environment pointed at the moto server; a fresh account for every test."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST")).close()
    for key, value in {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                       "AWS_DEFAULT_REGION": "us-east-1",
                       # moto answers an unimplemented call with HTTP 500, which botocore would retry 4 times
                       "AWS_MAX_ATTEMPTS": "1",
                       "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
                       "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    return boto3.Session()


def stack_config(groups=None, **overrides):
    """A StackConfig through the real loader; one p4d group in us-east-1a unless told otherwise."""
    raw = {"nemo-eks:gpuNodeGroups": groups or [{"name": "train", "instanceType": "p4d.24xlarge"}], **overrides}
    return config.load(raw_config(raw), "dev")


def stubbed(service):
    client = boto3.client(service, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    return client, Stubber(client)


def by_name(checks, prefix):
    found = [c for c in checks if c.name.startswith(prefix)]
    assert len(found) == 1, checks
    return found[0]


# --------------------------------------------------------------------------------------------------
# 1. zones and offerings (moto's real offering data)


def test_an_offered_instance_type_passes(aws):
    checks = preflight.check_zones_and_offerings(aws.client("ec2"), stack_config())
    assert [c.status for c in checks] == [PASS, PASS]
    assert by_name(checks, "instance offering").detail == "p4d.24xlarge is offered in us-east-1a (use1-az6)"
    assert "us-east-1a, us-east-1b, us-east-1c exist in us-east-1" in by_name(checks, "network zones").detail


def test_a_type_not_offered_in_its_zone_names_the_zones_that_offer_it(aws):
    cfg = stack_config([{"name": "train", "instanceType": "p5en.48xlarge", "availabilityZone": "us-east-1b"}])
    check = by_name(preflight.check_zones_and_offerings(aws.client("ec2"), cfg), "instance offering")
    assert check.status == FAIL
    assert check.detail == "p5en.48xlarge is not offered in us-east-1b; us-east-1 offers it in us-east-1a, us-east-1c"
    assert check.fix.startswith("set nemo-eks:gpuNodeGroups[0].availabilityZone to one of us-east-1a, us-east-1c")
    assert "nemo-eks:network.availabilityZones" in check.fix


def test_a_type_offered_nowhere_in_the_region(aws):
    # moto's snapshot of AWS's offerings has no p5e.48xlarge in us-east-1 (infra/catalog.py notes the same)
    cfg = stack_config([{"name": "train", "instanceType": "p5e.48xlarge"}])
    check = by_name(preflight.check_zones_and_offerings(aws.client("ec2"), cfg), "instance offering")
    assert check.status == FAIL and check.detail == "p5e.48xlarge is offered in no zone of us-east-1"
    assert "set nemo-eks:gpuNodeGroups[0].instanceType to one offered in us-east-1a" in check.fix
    assert "p5.48xlarge" in check.fix and "aws:region" in check.fix


def test_a_zone_that_does_not_exist(aws):
    cfg = stack_config([{"name": "train", "instanceType": "p4d.24xlarge", "availabilityZone": "us-east-1z"}],
                       **{"nemo-eks:network": {"availabilityZones": ["us-east-1a", "us-east-1z"]}})
    checks = preflight.check_zones_and_offerings(aws.client("ec2"), cfg)
    network, group = by_name(checks, "network zones"), by_name(checks, "instance offering")
    assert network.status == FAIL and network.detail.startswith("us-east-1z not among the zones of us-east-1")
    assert "nemo-eks:network.availabilityZones" in network.fix
    assert group.status == FAIL and group.detail == "zone us-east-1z does not exist in us-east-1 for this account"
    assert group.fix.startswith("set nemo-eks:gpuNodeGroups[0].availabilityZone to one of us-east-1a, us-east-1b")


# --------------------------------------------------------------------------------------------------
# 2. quotas


def test_an_unreadable_quota_warns_with_the_console_link(aws):
    # moto answers GetServiceQuota for ec2 with NoSuchResourceException, and does not implement the default
    checks = preflight.check_quotas(aws.client("service-quotas"), stack_config())
    check = by_name(checks, "quota Running On-Demand P instances (L-417A185B)")
    assert check.status == WARN
    assert "planned 192 vCPUs = gpuNodeGroups[0] (train) maxSize 2 x 96 vCPUs (p4d.24xlarge)" in check.detail
    assert "NoSuchResourceException" in check.detail
    assert "https://us-east-1.console.aws.amazon.com/servicequotas/home/services/ec2/quotas/L-417A185B" in check.fix
    assert "aws service-quotas get-service-quota --service-code ec2 --quota-code L-417A185B" in check.fix
    assert "at least 192" in check.fix


def _quota(code, value):
    return {"Quota": {"ServiceCode": "ec2", "QuotaCode": code, "QuotaName": "x", "Value": value}}


def test_a_quota_too_low_fails_with_the_increase_command():
    # stub: moto cannot hold an ec2 quota value
    client, stub = stubbed("service-quotas")
    stub.add_response("get_service_quota", _quota("L-417A185B", 96.0),
                      {"ServiceCode": "ec2", "QuotaCode": "L-417A185B"})
    with stub:
        checks = preflight.check_quotas(client, stack_config())
    check = by_name(checks, "quota Running On-Demand P")
    assert check.status == FAIL
    assert "planned 192 vCPUs" in check.detail and "quota 96 vCPUs (applied value)" in check.detail
    assert ("aws service-quotas request-service-quota-increase --service-code ec2 --quota-code L-417A185B "
            "--desired-value 192 --region us-east-1") in check.fix
    assert "nemo-eks:gpuNodeGroups[0].maxSize" in check.fix
    stub.assert_no_pending_responses()


def test_the_aws_default_is_used_when_the_account_has_no_applied_value():
    client, stub = stubbed("service-quotas")
    stub.add_client_error("get_service_quota", "NoSuchResourceException", "no applied value")
    stub.add_response("get_aws_default_service_quota", _quota("L-417A185B", 384.0),
                      {"ServiceCode": "ec2", "QuotaCode": "L-417A185B"})
    with stub:
        check = by_name(preflight.check_quotas(client, stack_config()), "quota Running On-Demand P")
    assert check.status == PASS and "quota 384 vCPUs (AWS default" in check.detail


def test_access_denied_on_the_quota_warns():
    client, stub = stubbed("service-quotas")
    stub.add_client_error("get_service_quota", "AccessDeniedException", "not allowed", http_status_code=403)
    with stub:
        check = by_name(preflight.check_quotas(client, stack_config()), "quota Running On-Demand P")
    assert check.status == WARN and "AccessDeniedException: not allowed" in check.detail
    assert "servicequotas/home/services/ec2/quotas/L-417A185B" in check.fix


def test_spot_groups_are_checked_against_the_spot_quota():
    client, stub = stubbed("service-quotas")
    stub.add_response("get_service_quota", _quota("L-7212CCBC", 64.0),
                      {"ServiceCode": "ec2", "QuotaCode": "L-7212CCBC"})
    cfg = stack_config([{"name": "train", "instanceType": "p4d.24xlarge", "capacityType": "SPOT"}])
    with stub:
        checks = preflight.check_quotas(client, cfg)
    assert by_name(checks, "quota Running On-Demand P").status == PASS  # not needed: no ON_DEMAND group
    spot = by_name(checks, "quota All P Spot Instance Requests (L-7212CCBC)")
    assert spot.status == FAIL and "planned 192 vCPUs" in spot.detail and "--quota-code L-7212CCBC" in spot.fix
    assert "capacityReservationId" not in spot.fix  # spot cannot launch into a reservation


def test_groups_in_a_reservation_are_not_counted():
    cfg = stack_config([{"name": "train", "instanceType": "p5.48xlarge", "availabilityZone": "us-east-1b",
                         "capacityReservationId": RID}, {"name": "serve", "instanceType": "p4d.24xlarge"}],
                       **{"nemo-eks:serving": {"nodeGroup": "serve"}})
    total, parts = preflight.planned_vcpus(cfg, "ON_DEMAND")
    assert total == 96 and parts == ["gpuNodeGroups[1] (serve) maxSize 1 x 96 vCPUs (p4d.24xlarge)"]
    client, stub = stubbed("service-quotas")
    stub.add_response("get_service_quota", _quota("L-417A185B", 96.0),
                      {"ServiceCode": "ec2", "QuotaCode": "L-417A185B"})
    with stub:
        assert by_name(preflight.check_quotas(client, cfg), "quota Running On-Demand P").status == PASS


# --------------------------------------------------------------------------------------------------
# 3. reservations and Capacity Blocks


def reservation(**changes):
    entry = {"CapacityReservationId": RID, "InstanceType": "p5.48xlarge", "InstancePlatform": "Linux/UNIX",
             "AvailabilityZone": "us-east-1b", "TotalInstanceCount": 4, "AvailableInstanceCount": 4,
             "State": "active", "ReservationType": "capacity-block", "InstanceMatchCriteria": "targeted",
             "StartDate": NOW - timedelta(hours=1), "EndDate": NOW + timedelta(days=7), "EndDateType": "limited"}
    return {**entry, **changes}


def block_config(capacity_type="CAPACITY_BLOCK", max_size=4):
    return stack_config([{"name": "train", "instanceType": "p5.48xlarge", "availabilityZone": "us-east-1b",
                          "capacityType": capacity_type, "capacityReservationId": RID, "maxSize": max_size}])


def judge(entry, cfg=None, hours=None):
    cfg = cfg or block_config()
    return preflight.judge_reservation(0, cfg.gpu_node_groups[0], entry, NOW, hours, cfg.autoscaling.enabled)


def test_a_matching_active_capacity_block_passes():
    check = judge(reservation())
    assert check.status == PASS, check
    assert check.detail == (f"Capacity Block {RID}: active, 4 x p5.48xlarge in us-east-1b, until 2026-11-27 12:00 "
                            "UTC; fits maxSize 4")


@pytest.mark.parametrize("changes, detail, fix", [
    ({"InstanceType": "p4d.24xlarge"}, "it is for p4d.24xlarge, the group uses p5.48xlarge",
     "set nemo-eks:gpuNodeGroups[0].instanceType to p4d.24xlarge"),
    ({"AvailabilityZone": "us-east-1c"}, "it is in us-east-1c, the group in us-east-1b",
     "set nemo-eks:gpuNodeGroups[0].availabilityZone to us-east-1c"),
    ({"TotalInstanceCount": 2, "AvailableInstanceCount": 2}, "it holds 2 instance(s), the group's maxSize is 4",
     "reserve at least 4, or set nemo-eks:gpuNodeGroups[0].maxSize to 2"),
    ({"State": "expired"}, "it is expired", "buy a new one and set nemo-eks:gpuNodeGroups[0].capacityReservationId"),
    ({"State": "cancelled"}, "it is cancelled", "capacityReservationId"),
    ({"State": "payment-failed"}, "it is payment-failed", "capacityReservationId"),
    ({"ReservationType": "default"}, "it is an On-Demand Capacity Reservation, not a Capacity Block",
     "set nemo-eks:gpuNodeGroups[0].capacityType to ON_DEMAND"),
    ({"InstancePlatform": "Windows"}, "its platform is Windows", "reserve Linux/UNIX capacity"),
])
def test_a_reservation_that_cannot_hold_the_group_fails(changes, detail, fix):
    check = judge(reservation(**changes))
    assert check.status == FAIL and detail in check.detail and fix in check.fix, check


@pytest.mark.parametrize("state", ["scheduled", "payment-pending"])
def test_a_capacity_block_not_started_yet_warns_with_its_start_date(state):
    check = judge(reservation(State=state, StartDate=datetime(2026, 12, 1, 11, 30, tzinfo=timezone.utc),
                              EndDate=datetime(2026, 12, 8, 11, 30, tzinfo=timezone.utc)))
    assert check.status == WARN
    assert f"{state}," in check.detail and "it starts 2026-12-01 11:30 UTC" in check.detail
    assert "the Cluster Autoscaler adds them once it is active" in check.fix
    without_autoscaler = preflight.judge_reservation(0, block_config().gpu_node_groups[0], reservation(State=state),
                                                     NOW, None, autoscaled=False)
    assert "keep nemo-eks:gpuNodeGroups[0].desiredSize at 0" in without_autoscaler.fix


def test_an_on_demand_group_in_a_capacity_block_fails():
    check = judge(reservation(), cfg=block_config("ON_DEMAND"))
    assert check.status == FAIL and "set nemo-eks:gpuNodeGroups[0].capacityType to CAPACITY_BLOCK" in check.fix


def test_an_on_demand_reservation_matches_an_on_demand_group():
    entry = reservation(ReservationType="default", EndDate=None, EndDateType="unlimited")
    check = judge(entry, cfg=block_config("ON_DEMAND"))
    assert check.status == PASS and check.detail.startswith(f"capacity reservation {RID}: active, 4 x p5.48xlarge")


def test_instances_already_in_the_reservation_warn():
    check = judge(reservation(AvailableInstanceCount=1))
    assert check.status == WARN and "only 1 of 4 are free now (3 in use by other instances)" in check.detail


def test_a_reservation_shorter_than_the_planned_training_warns():
    # A Capacity Block's window is judged by check_capacity_block_windows (tests/test_capacity_window.py).
    entry = reservation(ReservationType="default", EndDate=NOW + timedelta(hours=10))
    check = judge(entry, cfg=block_config("ON_DEMAND"), hours=30.0)
    assert check.status == WARN
    assert "remaining window (10.0 h) is shorter than the plan's training estimate (30.0 h)" in check.detail
    assert "remaining window" not in judge(reservation(EndDate=NOW + timedelta(hours=10)), hours=30.0).detail


def test_the_reservation_is_described_and_judged():
    # stub: moto 5.2 does not implement DescribeCapacityReservations
    client, stub = stubbed("ec2")
    stub.add_response("describe_capacity_reservations", {"CapacityReservations": [reservation()]},
                      {"CapacityReservationIds": [RID]})
    with stub:
        checks = preflight.check_reservations(client, block_config(), NOW)
    assert [c.status for c in checks] == [PASS] and checks[0].name == "reservation gpuNodeGroups[0] (train)"


def test_a_missing_reservation_fails():
    client, stub = stubbed("ec2")
    stub.add_client_error("describe_capacity_reservations", "InvalidCapacityReservationId.NotFound",
                          f"The capacity reservation ID '{RID}' does not exist")
    with stub:
        [check] = preflight.check_reservations(client, block_config(), NOW)
    assert check.status == FAIL and check.detail == f"{RID} does not exist in us-east-1 for this account"
    assert check.fix.startswith("set nemo-eks:gpuNodeGroups[0].capacityReservationId to a reservation of "
                                "p5.48xlarge in us-east-1b")


def test_a_reservation_that_cannot_be_read_warns(aws):
    # the real moto server: DescribeCapacityReservations is not implemented there (HTTP 500)
    [check] = preflight.check_reservations(aws.client("ec2"), block_config(), NOW)
    assert check.status == WARN and check.detail.startswith(f"{RID} could not be read")
    assert f"aws ec2 describe-capacity-reservations --capacity-reservation-ids {RID} --region us-east-1" in check.fix


def test_groups_without_a_reservation_have_no_reservation_check(aws):
    assert preflight.check_reservations(aws.client("ec2"), stack_config(), NOW) == []


# --------------------------------------------------------------------------------------------------
# 4. Kubernetes version (stubbed: moto has no DescribeClusterVersions or DescribeAddonVersions)


def versions(*entries):
    return {"clusterVersions": [{"clusterVersion": v, "clusterType": "eks", "status": status,
                                 "defaultVersion": v == "1.33",
                                 "endOfStandardSupportDate": datetime(2027, 3, 1, tzinfo=timezone.utc),
                                 "endOfExtendedSupportDate": datetime(2028, 3, 1, tzinfo=timezone.utc)}
                                for v, status in entries]}


SUPPORTED = versions(("1.30", "extended-support"), ("1.31", "extended-support"), ("1.32", "standard-support"),
                     ("1.33", "standard-support"), ("1.34", "standard-support"))


def kubernetes(response, version):
    client, stub = stubbed("eks")
    stub.add_response("describe_cluster_versions", response, {})
    with stub:
        # Versions newer than the autoscaler releases the config knows need its image tag named.
        cfg = stack_config(**{"nemo-eks:kubernetesVersion": version,
                              "nemo-eks:autoscaling": {"imageTag": f"v{version}.0"}})
        [check] = preflight.check_kubernetes_version(client, cfg)
    stub.assert_no_pending_responses()
    return check


def test_a_version_in_standard_support_passes():
    check = kubernetes(SUPPORTED, "1.34")
    assert check.status == PASS and check.detail == "1.34 is in standard support in us-east-1 until 2027-03-01 00:00 UTC"


def test_a_version_in_extended_support_warns():
    check = kubernetes(SUPPORTED, "1.31")
    assert check.status == WARN and "extended support in us-east-1 until 2028-03-01" in check.detail
    assert check.fix == "set nemo-eks:kubernetesVersion to 1.33"  # EKS's default version


def test_an_unsupported_version_fails_with_the_supported_ones():
    check = kubernetes(SUPPORTED, "1.36")
    assert check.status == FAIL
    assert check.detail == ("EKS does not support Kubernetes 1.36 in us-east-1; supported: 1.30 (extended-support), "
                            "1.31 (extended-support), 1.32 (standard-support), 1.33 (standard-support), "
                            "1.34 (standard-support)")
    assert check.fix == "set nemo-eks:kubernetesVersion to 1.33"


def test_a_version_listed_as_unsupported_fails():
    check = kubernetes(versions(("1.31", "unsupported"), ("1.34", "standard-support")), "1.31")
    assert check.status == FAIL and "supported: 1.34 (standard-support)" in check.detail
    assert check.fix == "set nemo-eks:kubernetesVersion to 1.34"


def test_add_on_versions_are_the_evidence_when_cluster_versions_is_denied():
    client, stub = stubbed("eks")
    stub.add_client_error("describe_cluster_versions", "AccessDeniedException", "denied", http_status_code=403)
    stub.add_response("describe_addon_versions", {"addons": [{"addonName": "vpc-cni", "addonVersions": [
        {"addonVersion": "v1.20.0-eksbuild.1", "compatibilities": [{"clusterVersion": "1.34"}]}]}]},
        {"kubernetesVersion": "1.34"})
    with stub:
        [check] = preflight.check_kubernetes_version(client, stack_config())
    assert check.status == PASS and "1 add-on(s) for Kubernetes 1.34" in check.detail
    assert "AccessDeniedException" in check.detail


def test_no_add_on_for_the_version_fails():
    client, stub = stubbed("eks")
    stub.add_client_error("describe_cluster_versions", "AccessDeniedException", "denied", http_status_code=403)
    stub.add_response("describe_addon_versions", {"addons": []}, {"kubernetesVersion": "1.35"})
    stub.add_response("describe_addon_versions", {"addons": [{"addonName": "vpc-cni", "addonVersions": [
        {"addonVersion": "v1.20.0-eksbuild.1",
         "compatibilities": [{"clusterVersion": v} for v in ("1.32", "1.33", "1.34")]}]}]}, {"addonName": "vpc-cni"})
    with stub:
        [check] = preflight.check_kubernetes_version(client, stack_config(**{"nemo-eks:kubernetesVersion": "1.35"}))
    assert check.status == FAIL and "vpc-cni supports 1.32, 1.33, 1.34" in check.detail
    assert check.fix.startswith("set nemo-eks:kubernetesVersion to 1.34")


def test_the_version_cannot_be_verified_against_moto(aws):
    [check] = preflight.check_kubernetes_version(aws.client("eks"), stack_config())
    assert check.status == WARN and check.detail.startswith("could not verify 1.34 in us-east-1")
    assert check.fix == "check it by hand: `aws eks describe-cluster-versions --region us-east-1`"


# --------------------------------------------------------------------------------------------------
# 5. dataset (moto S3; the bucket found by tools.data's tag lookup)


def datasets_bucket(s3, name="dev-datasets", stack="dev"):
    s3.create_bucket(Bucket=name)
    s3.put_bucket_tagging(Bucket=name, Tagging={"TagSet": [
        {"Key": "project", "Value": "nemo-eks"}, {"Key": "stack", "Value": stack},
        {"Key": "nemo-eks/data", "Value": "datasets"}]})
    return name


def jsonl(count, start=0, pad=0):
    return "".join(json.dumps({"input": f"question {i} " + "x" * pad, "output": f"answer {i}"}) + "\n"
                   for i in range(start, start + count))


def test_no_datasets_bucket_warns(aws):
    [check] = preflight.check_dataset(aws.client("s3"), stack_config())
    assert check.status == WARN and "no S3 bucket tagged project=nemo-eks, stack=dev" in check.detail
    assert "deploy first" in check.fix and "python -m tools.data upload FILE --stack dev" in check.fix


def test_a_missing_train_file_fails_and_names_the_datasets_there(aws):
    s3 = aws.client("s3")
    bucket = datasets_bucket(s3)
    s3.put_object(Bucket=bucket, Key="support-v2/train.jsonl", Body=jsonl(10).encode())
    [check] = preflight.check_dataset(s3, stack_config())
    assert check.status == FAIL and check.detail == "s3://dev-datasets/default/train.jsonl does not exist"
    assert "python -m tools.data upload FILE --stack dev" in check.fix
    assert "set nemo-eks:data.dataset to one of support-v2" in check.fix


def test_a_missing_train_file_only_warns_when_the_pipeline_is_off(aws):
    s3 = aws.client("s3")
    datasets_bucket(s3)
    [check] = preflight.check_dataset(s3, stack_config(**{"nemo-eks:pipeline": {"enabled": False}}))
    assert check.status == WARN and "needed once nemo-eks:pipeline.enabled is true" in check.detail


def test_invalid_data_fails_with_the_report(aws):
    s3 = aws.client("s3")
    bucket = datasets_bucket(s3)
    s3.put_object(Bucket=bucket, Key="default/train.jsonl",
                  Body=b'{"input": "a", "output": "b"}\n{"input": "a"}\n[1]\n{"input": "c", "output": "d"}\n')
    [check] = preflight.check_dataset(s3, stack_config())
    assert check.status == FAIL
    assert check.detail.startswith("invalid: s3://dev-datasets/default/train.jsonl: 2 valid example(s); "
                                   "error: missing field 'output': 1 line(s): 2; error: not a JSON object: 1 line(s): 3")
    assert "/tmp" not in check.detail  # the report names the S3 object, not the download
    assert "python -m tools.data validate FILE --stack dev" in check.fix


def test_a_validation_file_that_repeats_training_examples_fails(aws):
    s3 = aws.client("s3")
    bucket = datasets_bucket(s3)
    s3.put_object(Bucket=bucket, Key="default/train.jsonl", Body=jsonl(10).encode())
    s3.put_object(Bucket=bucket, Key="default/validation.jsonl", Body=jsonl(3, start=8).encode())
    [check] = preflight.check_dataset(s3, stack_config())
    assert check.status == FAIL and "duplicate of an earlier example: 2 line(s): 1, 2" in check.detail


def test_a_dataset_uploaded_with_tools_data_passes(aws, tmp_path):
    s3 = aws.client("s3")
    datasets_bucket(s3)
    source = tmp_path / "all.jsonl"
    source.write_text(jsonl(200))
    assert data.main(["upload", str(source), "--stack", "dev"]) == 0
    [check] = preflight.check_dataset(s3, stack_config())
    assert check.status == PASS, check
    # the split holds one global batch of the stack (training.globalBatchSize 128), as --prepare lays it out
    assert check.detail.startswith("s3://dev-datasets/default/: 72 training and 128 validation example(s) "
                                   "(validation given)")
    assert "against nemo-eks:training.seqLength 4096" in check.detail


def test_without_a_validation_file_the_split_is_derived(aws):
    s3 = aws.client("s3")
    bucket = datasets_bucket(s3)
    s3.put_object(Bucket=bucket, Key="default/train.jsonl", Body=jsonl(200).encode())
    [check] = preflight.check_dataset(s3, stack_config())
    assert check.status == PASS and "72 training and 128 validation example(s) (validation derived" in check.detail
    cfg = stack_config(**{"nemo-eks:training": {"globalBatchSize": 8}})
    [check] = preflight.check_dataset(s3, cfg)  # 5% of 200 is more than one global batch of 8
    assert check.status == PASS and "190 training and 10 validation example(s) (validation derived" in check.detail


def test_a_validation_file_smaller_than_a_global_batch_fails_as_prepare_would(aws):
    """finetune.py --prepare refuses it (NeMo would never validate): preflight must not pass it."""
    s3 = aws.client("s3")
    bucket = datasets_bucket(s3)
    s3.put_object(Bucket=bucket, Key="default/train.jsonl", Body=jsonl(200).encode())
    s3.put_object(Bucket=bucket, Key="default/validation.jsonl", Body=jsonl(19, start=1000).encode())
    [check] = preflight.check_dataset(s3, stack_config())
    assert check.status == FAIL
    assert "19 validation example(s), fewer than one global batch (nemo-eks:training.globalBatchSize = 128)" \
        in check.detail
    [check] = preflight.check_dataset(s3, stack_config(**{"nemo-eks:training": {"globalBatchSize": 16}}))
    assert check.status == PASS and "200 training and 19 validation example(s) (validation given)" in check.detail


def test_examples_longer_than_the_sequence_length_warn(aws):
    s3 = aws.client("s3")
    bucket = datasets_bucket(s3)
    s3.put_object(Bucket=bucket, Key="default/train.jsonl", Body=(jsonl(200) + jsonl(1, start=999, pad=700)).encode())
    cfg = stack_config(**{"nemo-eks:training": {"seqLength": 128}})
    [check] = preflight.check_dataset(s3, cfg)
    assert check.status == WARN
    assert "estimated length over the sequence length 128 (input will be truncated): 1 line(s)" in check.detail
    assert "nemo-eks:training.seqLength" in check.fix


def test_a_named_bucket_that_does_not_exist_warns(aws):
    [check] = preflight.check_dataset(aws.client("s3"), stack_config(), bucket="nope")
    assert check.status == WARN and check.detail.startswith("bucket nope cannot be read")


# --------------------------------------------------------------------------------------------------
# The CLI: the real stack files, the standard environment, the report and the exit status


def upload_dev_dataset(session, tmp_path):
    datasets_bucket(session.client("s3"))
    source = tmp_path / "all.jsonl"
    source.write_text(jsonl(200))  # a validation split of one global batch (128) and training examples besides
    assert data.main(["upload", str(source), "--stack", "dev"]) == 0


def test_cli_dev_passes_with_warnings_for_what_moto_cannot_answer(aws, tmp_path, capsys):
    upload_dev_dataset(aws, tmp_path)
    capsys.readouterr()
    assert preflight.main(["--stack", "dev"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "preflight for stack 'dev' in us-east-1 (region from AWS_REGION)"
    body = out[1:-1]
    assert all(line[:6] in ("PASS  ", "WARN  ", "FAIL  ") for line in body), body  # one line per check
    assert [line.split(":")[0] for line in body] == [
        "PASS  account", "PASS  region", "PASS  network zones", "PASS  instance offering gpuNodeGroups[0] (train)",
        "WARN  quota Running On-Demand P instances (L-417A185B)", "WARN  kubernetes version", "PASS  dataset default",
        "WARN  api endpoint"]  # no cluster in moto yet: how the first up will reach it
    assert all(" -- fix: " in line for line in body if line.startswith("WARN"))
    assert out[-1] == "5 passed, 3 warning(s), 0 failed: ready for `pulumi up` (read the WARN lines)"


def test_cli_json(aws, capsys):
    assert preflight.main(["--stack", "prod", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stack"] == "prod" and report["region"] == "us-east-1" and report["region_source"] == "AWS_REGION"
    assert report["ok"] is True and report["summary"] == {"PASS": 5, "WARN": 5, "FAIL": 0}
    assert set(report["checks"][0]) == {"name", "status", "detail", "fix"}
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses["reservation gpuNodeGroups[0] (train)"] == WARN  # moto cannot describe it
    assert statuses["capacity window gpuNodeGroups[0] (train)"] == WARN  # nor judge its window
    assert statuses["quota Running On-Demand P instances (L-417A185B)"] == PASS  # a Capacity Block group only
    assert statuses["dataset default"] == WARN  # no bucket: not deployed yet
    assert statuses["api endpoint"] == WARN  # no cluster yet: how the first up will reach its endpoint


def test_cli_fails_in_a_region_without_the_stack_zones(aws, monkeypatch, capsys):
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert preflight.main(["--stack", "dev", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["ok"] is False and report["region"] == "eu-west-1"
    assert checks["region"]["status"] == WARN and "unset AWS_REGION or set it to us-east-1" in checks["region"]["fix"]
    assert checks["instance offering gpuNodeGroups[0] (train)"]["status"] == FAIL
    assert "set nemo-eks:gpuNodeGroups[0].availabilityZone to one of eu-west-1c" in \
        checks["instance offering gpuNodeGroups[0] (train)"]["fix"]


def test_cli_text_exit_status_on_fail(aws, monkeypatch, capsys):
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert preflight.main(["--stack", "dev"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  network zones: us-east-1a, us-east-1b, us-east-1c not among the zones of eu-west-1" in out
    assert out.rstrip().endswith("failed: fix the FAIL lines before `pulumi up`")


def test_cli_region_defaults_to_the_stack(aws, monkeypatch, capsys):
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    assert preflight.main(["--stack", "staging", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["region"] == "us-east-1" and report["region_source"] == "the stack's aws:region"


def test_aws_region_wins_over_aws_default_region():
    cfg = stack_config()
    assert preflight.resolve_region(cfg, {"AWS_REGION": "us-west-2", "AWS_DEFAULT_REGION": "eu-west-1"}) == \
        ("us-west-2", "AWS_REGION")
    assert preflight.resolve_region(cfg, {"AWS_DEFAULT_REGION": "eu-west-1"}) == ("eu-west-1", "AWS_DEFAULT_REGION")
    assert preflight.resolve_region(cfg, {"AWS_PROFILE": "gpu"}, "us-east-2") == ("us-east-2", "profile gpu")
    assert preflight.resolve_region(cfg, {}) == ("us-east-1", "the stack's aws:region")


def test_cli_without_credentials_fails_once(aws, monkeypatch, capsys):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert preflight.main(["--stack", "dev"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("FAIL  account: the AWS credentials do not work (NoCredentialsError")
    assert "aws sts get-caller-identity" in out[1] and len(out) == 3  # nothing else is attempted


def test_cli_unknown_stack(aws, capsys):
    assert preflight.main(["--stack", "nosuch", "--json"]) == 1
    [check] = json.loads(capsys.readouterr().out)["checks"]
    assert check["status"] == FAIL and check["name"] == "stack config" and "no stack file" in check["detail"]


def test_a_check_that_raises_is_reported_not_fatal(aws, monkeypatch):
    from botocore.exceptions import EndpointConnectionError

    def unreachable(*args, **kwargs):
        raise EndpointConnectionError(endpoint_url="https://eks.us-east-1.amazonaws.com")

    monkeypatch.setattr(preflight, "check_kubernetes_version", unreachable)
    checks = preflight.run_checks(preflight.Clients(aws, "us-east-1"), stack_config(), region_source="AWS_REGION")
    check = by_name(checks, "kubernetes version")
    assert check.status == WARN and "cannot reach https://eks.us-east-1.amazonaws.com" in check.detail
    assert "AWS_ENDPOINT_URL" in check.fix and "proxy" in check.fix  # the network, not a permission
    assert preflight.exit_code(checks) == 0


def test_exit_code_and_rendering():
    checks = [Check("a", PASS, "fine", "ignored"), Check("b", WARN, "hmm", "do x"), Check("c", FAIL, "bad", "do y")]
    assert preflight.exit_code(checks) == 1 and preflight.exit_code(checks[:2]) == 0
    assert [c.render() for c in checks] == ["PASS  a: fine", "WARN  b: hmm -- fix: do x", "FAIL  c: bad -- fix: do y"]
