"""Stack config: typed defaults, and every bad value rejected with the key, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import json

import pytest

from infra import catalog
from infra.config import KEYS, ConfigError, StackFileError, load, read_stack_file, valid_fsx_capacity
from tests.conftest import raw_config


def test_defaults_of_a_minimal_config():
    cfg = load(raw_config(), "dev")
    assert cfg.region == "us-east-1"
    assert cfg.prefix == "nemo-eks-dev"
    assert cfg.network.availability_zones == ("us-east-1a", "us-east-1b", "us-east-1c")
    assert cfg.network.nat_gateways == "single" and not cfg.network.uses_existing_vpc
    assert cfg.cluster.public_endpoint is False and cfg.cluster.log_types[0] == "api"
    assert cfg.system_nodes.instance_type == catalog.SYSTEM_INSTANCE_TYPE
    group = cfg.gpu_node_groups[0]
    # 7B LoRA: one training node plus one node for the serving replicas (2 x 1 GPU): a new run never waits.
    assert (group.min_size, group.desired_size, group.max_size) == (0, 0, 2)
    assert group.availability_zone == "us-east-1a" and group.capacity_type == "ON_DEMAND"
    assert group.uses_placement_group
    assert cfg.storage.fsx_availability_zone == "us-east-1a"
    assert cfg.storage.protect is False
    assert cfg.tags["stack"] == "dev" and cfg.tags["project"] == "nemo-eks"


def test_config_objects_are_frozen():
    cfg = load(raw_config(), "dev")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.stack = "prod"  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.tags["x"] = "y"  # type: ignore[index]


@pytest.mark.parametrize("stack,protected", [("dev", False), ("staging", False), ("prod", True), ("prod-405b", True)])
def test_storage_is_protected_by_default_on_prod_stacks(stack, protected):
    assert load(raw_config(), stack).storage.protect is protected


def test_protection_can_be_set_explicitly():
    assert load(raw_config({"nemo-eks:storage": {"protect": True}}), "dev").storage.protect is True
    assert load(raw_config({"nemo-eks:storage": {"protect": "false"}}), "prod").storage.protect is False


def test_top_level_integers_and_booleans_arrive_as_strings():
    cfg = load(raw_config({"nemo-eks:cluster": json.dumps({"publicEndpoint": "true", "publicAccessCidrs": ["10.1.0.0/16"]}),
                           "nemo-eks:gpuNodeGroups": [{"name": "a", "instanceType": "p5.48xlarge", "maxSize": "2"}]}), "dev")
    assert cfg.cluster.public_endpoint is True
    assert cfg.gpu_node_groups[0].max_size == 2


def test_capacity_block_group():
    cfg = load(raw_config({"nemo-eks:gpuNodeGroups": [{
        "name": "cb", "instanceType": "p5.48xlarge", "capacityType": "CAPACITY_BLOCK",
        "capacityReservationId": "cr-0123456789abcdef0", "maxSize": 2, "availabilityZone": "us-east-1b"}]}), "prod")
    group = cfg.gpu_node_groups[0]
    assert group.uses_reservation and not group.uses_placement_group
    assert cfg.storage.fsx_availability_zone == "us-east-1b"


def test_existing_vpc():
    cfg = load(raw_config({"nemo-eks:network": {
        "existingVpcId": "vpc-0abc", "existingPrivateSubnetIds": {"us-east-1a": "subnet-1", "us-east-1b": "subnet-2"},
        "existingPublicSubnetIds": {"us-east-1a": "subnet-3"}}}), "dev")
    assert cfg.network.uses_existing_vpc
    assert cfg.network.availability_zones == ("us-east-1a", "us-east-1b")


def test_fsx_capacity_steps():
    assert [c for c in range(0, 10000, 100) if valid_fsx_capacity(c)] == [1200, 2400, 4800, 7200, 9600]


# key, value, the key named in the message, a fragment of what is allowed
BAD_VALUES = [
    ({"aws:region": ""}, "aws:region", "region"),
    ({"nemo-eks:kubernetesVersion": "1.29"}, "nemo-eks:kubernetesVersion", "1.31 or newer"),
    ({"nemo-eks:kubernetesVersion": "latest"}, "nemo-eks:kubernetesVersion", "1.31 or newer"),
    ({"nemo-eks:namespace": "Nemo_NS"}, "nemo-eks:namespace", "DNS-1123"),
    ({"nemo-eks:gpuNodeGroups": []}, "nemo-eks:gpuNodeGroups", "non-empty list"),
    ({"nemo-eks:gpuNodeGroups": [{"name": "a", "instanceType": "p3.16xlarge"}]},
     "nemo-eks:gpuNodeGroups[0].instanceType", "p4d.24xlarge"),
    ({"nemo-eks:gpuNodeGroups": [{"name": "a", "instanceType": "p5.48xlarge", "maxSize": 0}]},
     "nemo-eks:gpuNodeGroups[0].maxSize", ">= 1"),
    ({"nemo-eks:gpuNodeGroups": [{"name": "a", "instanceType": "p5.48xlarge", "desiredSize": 3, "maxSize": 2}]},
     "nemo-eks:gpuNodeGroups[0].desiredSize", "0..2"),
    ({"nemo-eks:gpuNodeGroups": [{"name": "a", "instanceType": "p5.48xlarge", "capacityType": "CAPACITY_BLOCK"}]},
     "nemo-eks:gpuNodeGroups[0].capacityReservationId", "reservation id"),
    ({"nemo-eks:gpuNodeGroups": [{"name": "a", "instanceType": "p5.48xlarge", "capacityType": "SPOT",
                                  "capacityReservationId": "cr-0123456789abcdef0"}]},
     "nemo-eks:gpuNodeGroups[0].capacityReservationId", "unset when capacityType is SPOT"),
    ({"nemo-eks:gpuNodeGroups": [{"name": "a", "instanceType": "p5.48xlarge", "capacityType": "spot"}]},
     "nemo-eks:gpuNodeGroups[0].capacityType", "ON_DEMAND, SPOT, CAPACITY_BLOCK"),
    ({"nemo-eks:gpuNodeGroups": [{"name": "a", "instanceType": "p5.48xlarge", "availabilityZone": "us-west-2a"}]},
     "nemo-eks:gpuNodeGroups[0].availabilityZone", "us-east-1a"),
    ({"nemo-eks:gpuNodeGroups": [{"name": "a", "instanceType": "p5.48xlarge"}, {"name": "a", "instanceType": "p4d.24xlarge"}]},
     "nemo-eks:gpuNodeGroups[1].name", "no other group"),
    ({"nemo-eks:gpuNodeGroups": [{"name": "a", "instanceType": "p5.48xlarge", "instancetype": "x"}]},
     "nemo-eks:gpuNodeGroups[0].instancetype", "known keys"),
    ({"nemo-eks:storage": {"fsxStorageCapacityGib": 3000}}, "nemo-eks:storage.fsxStorageCapacityGib", "1200, 2400"),
    ({"nemo-eks:storage": {"fsxThroughputPerTib": 200}}, "nemo-eks:storage.fsxThroughputPerTib", "125, 250, 500, 1000"),
    ({"nemo-eks:network": {"vpcCidr": "10.0.0.0/24"}}, "nemo-eks:network.vpcCidr", "/16 to /20"),
    ({"nemo-eks:network": {"natGateways": "two"}}, "nemo-eks:network.natGateways", "single, perAz"),
    ({"nemo-eks:network": {"availabilityZones": ["us-east-1a"]}}, "nemo-eks:network.availabilityZones", "2 or 3"),
    ({"nemo-eks:network": {"existingVpcId": "vpc-1", "existingPrivateSubnetIds": {"us-east-1a": "subnet-1"}}},
     "nemo-eks:network.existingPrivateSubnetIds", "at least 2 zones"),
    ({"nemo-eks:cluster": {"publicEndpoint": True}}, "nemo-eks:cluster.publicAccessCidrs", "at least one CIDR"),
    ({"nemo-eks:cluster": {"adminPrincipalArns": ["admin"]}}, "nemo-eks:cluster.adminPrincipalArns", "ARN"),
    ({"nemo-eks:cluster": {"adminPrincipalArns": ["arn:aws:sts::111122223333:assumed-role/admin/me"]}},
     "nemo-eks:cluster.adminPrincipalArns", "not assumed-role session ARNs"),
    ({"nemo-eks:cluster": {"adminPrincipalArns": ["arn:aws:iam::111122223333:role/a", "arn:aws:iam::111122223333:role/a"]}},
     "nemo-eks:cluster.adminPrincipalArns", "each principal once"),
    ({"nemo-eks:cluster": {"logTypes": ["api", "audits"]}}, "nemo-eks:cluster.logTypes", "controllerManager"),
    ({"nemo-eks:cluster": "not json"}, "nemo-eks:cluster", "object"),
    ({"nemo-eks:systemNodes": {"minSize": 0}}, "nemo-eks:systemNodes.minSize", ">= 1"),
    ({"nemo-eks:systemNodes": {"instanceType": "p5.48xlarge"}}, "nemo-eks:systemNodes.instanceType", "m7i.2xlarge"),
    ({"nemo-eks:addons": {"nvidiaDevicePluginVersion": "latest"}}, "nemo-eks:addons.nvidiaDevicePluginVersion", "pinned version"),
    ({"nemo-eks:gpuNodeGroup": []}, "nemo-eks:gpuNodeGroup", "known keys"),
]


@pytest.mark.parametrize("overrides,key,allowed", BAD_VALUES, ids=[k for _, k, _ in BAD_VALUES])
def test_bad_values_name_the_key_the_value_and_what_is_allowed(overrides, key, allowed):
    with pytest.raises(ConfigError) as caught:
        load(raw_config(overrides), "dev")
    message = str(caught.value)
    assert message.startswith(f"stack config '{key}': ")
    assert "allowed: " in message and allowed in message


@pytest.mark.parametrize("stack", ["Prod", "prod_1", "a-very-long-stack-name-over-24", "-dev"])
def test_stack_names_that_would_break_aws_names_are_rejected(stack):
    with pytest.raises(ConfigError, match="stack config 'stack name'"):
        load(raw_config(), stack)


def test_misspelt_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="Did you mean 'gpuNodeGroups'"):
        load(raw_config({"nemo-eks:gpuNodeGroup": []}), "dev")


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"'nemo-eks:gpuNodeGroups'.*required"):
        load({k: v for k, v in raw_config().items() if k != "nemo-eks:gpuNodeGroups"}, "dev")


def test_fsx_capacity_error_names_the_nearest_valid_capacity():
    with pytest.raises(ConfigError, match="nearest valid capacity is 4800"):
        load(raw_config({"nemo-eks:storage": {"fsxStorageCapacityGib": 3000}}), "dev")


BAD_BY_TYPE = {"string": ["not", "a string"], "integer": "many", "number": "lots", "boolean": "maybe",
               "list<string>": "not-a-list", "map<string,string>": ["not", "a map"], "list<object>": "not-a-list"}


@pytest.mark.parametrize("key", [k for k in KEYS if k.path != "aws:region"], ids=lambda k: k.path)
def test_every_documented_key_is_read_and_checked(key):
    """A wrong-typed value for each key of the table fails naming exactly that key: every documented key is
    read (an unread one would be reported as unknown) and type-checked."""
    bad = BAD_BY_TYPE[key.type]
    group = {"name": "train", "instanceType": "p4d.24xlarge"}
    if key.path.startswith("gpuNodeGroups[]."):
        overrides = {"nemo-eks:gpuNodeGroups": [{**group, key.path.split(".", 1)[1]: bad}]}
        expected = f"nemo-eks:gpuNodeGroups[0].{key.path.split('.', 1)[1]}"
    elif "." in key.path:
        section, name = key.path.split(".", 1)
        overrides = {f"nemo-eks:{section}": {name: bad}}
        expected = f"nemo-eks:{key.path}"
    else:
        overrides = {f"nemo-eks:{key.path}": bad if isinstance(bad, str) else json.dumps(bad)}
        expected = f"nemo-eks:{key.path}"
    with pytest.raises(ConfigError) as caught:
        load(raw_config(overrides), "dev")
    assert caught.value.key == expected


# --------------------------------------------------------------------------------------------------
# Namespaces, numbers and the stack-file reader


@pytest.mark.parametrize("key", ["aws:profile", "pulumi:disable-default-providers"])
def test_keys_of_the_namespaces_the_program_reads_are_accepted(key):
    load(raw_config({key: "x"}), "dev")


@pytest.mark.parametrize("key, hint", [("kubernetes:context", "would be ignored"), ("eks:x", "would be ignored"),
                                       ("nemoeks:training", "Did you mean 'nemo-eks:training'?"),
                                       ("awz:region", "Did you mean 'aws:region'?")])
def test_keys_of_other_namespaces_are_rejected(key, hint):
    with pytest.raises(ConfigError) as caught:
        load(raw_config({key: "x"}), "dev")
    assert caught.value.key == key and hint in str(caught.value)


def test_a_negative_gate_threshold_is_still_allowed():
    cfg = load(raw_config({"nemo-eks:evaluation": {"minLossImprovementPercent": -5}}), "dev")
    assert cfg.pipeline.evaluation.min_loss_improvement_percent == -5.0


@pytest.mark.parametrize("value", ["Infinity", "NaN", "-Infinity"])
def test_non_finite_numbers_are_rejected_whatever_their_spelling(value):
    with pytest.raises(ConfigError, match="finite"):
        load(raw_config({"nemo-eks:monitoring": f'{{"tritonFailureRatio": {value}}}'}), "dev")


def test_a_public_access_cidr_with_host_bits_names_the_network():
    with pytest.raises(ConfigError, match="network address is 203.0.113.0/24"):
        load(raw_config({"nemo-eks:cluster": {"publicEndpoint": True, "publicAccessCidrs": ["203.0.113.7/24"]}}), "dev")


def test_a_version_that_lost_its_zero_says_to_quote_it():
    # what `pulumi up` hands over for an unquoted 1.40 when the stack file itself is not at hand
    with pytest.raises(ConfigError, match='quote it, "1.40"'):
        load(raw_config({"nemo-eks:kubernetesVersion": "1.4"}), "dev")


def test_the_stack_file_reader_gives_what_the_cli_gives(tmp_path):
    path = tmp_path / "Pulumi.x.yaml"
    path.write_text("secretsprovider: passphrase\nconfig:\n  aws:region: us-east-1\n  training:\n    epochs: 2\n"
                    "  nemo-eks:pipeline:\n    enabled: false\n  nemo-eks:hfToken:\n    secure: AAAB\n"
                    "  nemo-eks:namespace: ml\n")
    raw, secrets = read_stack_file(path)
    assert raw == {"aws:region": "us-east-1", "nemo-eks:training": '{"epochs": 2}',
                   "nemo-eks:pipeline": '{"enabled": false}', "nemo-eks:hfToken": "[secret]", "nemo-eks:namespace": "ml"}
    assert secrets == ["nemo-eks:hfToken"]


@pytest.mark.parametrize("text, message", [
    ("config:\n  nemo-eks:gpuNodeGroups:\n    - name: a\n      name: b\n", "x.yaml:4:7: key 'name' is written twice"),
    ("config:\n  nemo-eks:images:\n    nemo: 26.10\n", "x.yaml:3:11: nemo-eks:images.nemo: 26.10 is read by YAML as"),
    ("config: [1\n", "x.yaml:2:1: not valid YAML"),
    ("config: []\n", "x.yaml:1:9: `config:` is a list, not a mapping"),
    ("", None),
    ("config:\n", None),
])
def test_the_stack_file_reader_rejects_what_yaml_would_take_silently(tmp_path, text, message):
    path = tmp_path / "x.yaml"
    path.write_text(text)
    if message is None:
        assert read_stack_file(path) == ({}, [])
        return
    with pytest.raises(StackFileError) as caught:
        read_stack_file(path, "x.yaml")
    assert str(caught.value).startswith(message)
