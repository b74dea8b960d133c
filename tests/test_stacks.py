"""Whole-stack runs under Pulumi's mock monitor: what each resource would receive, for every stack file and
for every GPU instance type of the catalog."""

from __future__ import annotations

import base64
import json

import pytest
import yaml

from infra import catalog
from infra.config import ConfigError, load
from tools import synth
from tests.conftest import raw_config, synth_config, synth_stack

LT = "aws:ec2/launchTemplate:LaunchTemplate"
NODE_GROUP = "aws:eks/nodeGroup:NodeGroup"
SG = "aws:ec2/securityGroup:SecurityGroup"
INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
EGRESS = "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule"
BUCKET = "aws:s3/bucket:Bucket"
FSX = "aws:fsx/lustreFileSystem:LustreFileSystem"
DRA = "aws:fsx/dataRepositoryAssociation:DataRepositoryAssociation"


def every_gpu_type() -> synth.Synth:
    groups = [{"name": name.split(".")[0], "instanceType": name, "maxSize": 2} for name in catalog.GPU_INSTANCE_TYPES]
    return synth_config("every-gpu-type", {"nemo-eks:gpuNodeGroups": groups})


def capacity_block() -> synth.Synth:
    return synth_config("capacity-block", {"nemo-eks:gpuNodeGroups": [
        {"name": "cb", "instanceType": "p5.48xlarge", "capacityType": "CAPACITY_BLOCK",
         "capacityReservationId": "cr-0123456789abcdef0", "maxSize": 2},
        {"name": "odcr", "instanceType": "p4de.24xlarge", "capacityReservationId": "cr-0fedcba9876543210"},
        {"name": "spot", "instanceType": "p4d.24xlarge", "capacityType": "SPOT"}]}, stack="prod")


def refs(reg: synth.Registration, s: synth.Synth) -> set[str]:
    return {s.name_of(u) for u in reg.depends_on}


# ---------------------------------------------------------------------------------------------- stacks


def test_every_stack_file_plans(stack_synth, tmp_path):
    target = synth.write(stack_synth, tmp_path)
    plan = json.loads((target / "plan.json").read_text())
    assert plan["project"] == "nemo-eks" and plan["stack"] == stack_synth.stack
    assert len(plan["resources"]) > 50
    for resource in plan["resources"]:
        assert set(resource) >= {"type", "name", "parent", "dependsOn", "inputs"}
    assert plan["outputs"]["clusterName"] == f"nemo-eks-{stack_synth.stack}"
    assert plan["outputs"]["kubeconfig"] == synth.SECRET
    assert (target / "graph.mmd").read_text().startswith("graph LR")
    assert sorted(p.name for p in (target / "helm").iterdir()) == [
        "arc.yaml", "aws-efa-k8s-device-plugin.yaml", "cluster-autoscaler.yaml", "dcgm-exporter.yaml", "kube-prometheus-stack.yaml",
        "nvidia-device-plugin.yaml", "prometheus-adapter.yaml"]
    assert len(list((target / "manifests").iterdir())) == len(stack_synth.manifests())
    triton = sorted(str(p.relative_to(target / "triton")) for p in (target / "triton").rglob("*") if p.is_file())
    assert triton == ["ensemble/config.pbtxt", "postprocessing/config.pbtxt", "preprocessing/config.pbtxt",
                      "tensorrt_llm/config.pbtxt"]  # every stack serves an engine


def test_shipped_stacks_include_dev_and_prod():
    assert {"dev", "prod"} <= set(synth.stack_names())


def test_inputs_use_engine_property_names():
    lt = every_gpu_type().resources(LT)[0]
    assert "networkInterfaces" in lt.inputs and "network_interfaces" not in lt.inputs


def test_unknown_values_are_readable_placeholders():
    ng = synth_stack("dev").one(NODE_GROUP, "nemo-eks-dev-train-nodes")
    assert ng.inputs["nodeRoleArn"] == "<nemo-eks-dev-node.arn>"
    assert ng.inputs["launchTemplate"]["id"] == "<nemo-eks-dev-train-lt.id>"


# ---------------------------------------------------------------------------------------------- EFA


@pytest.mark.parametrize("instance_type", catalog.GPU_INSTANCE_TYPES)
def test_launch_template_has_one_efa_interface_per_network_card(instance_type):
    s = every_gpu_type()
    short = instance_type.split(".")[0]
    lt = s.one(LT, f"nemo-eks-test-{short}-lt")
    interfaces = lt.inputs["networkInterfaces"]
    instance = catalog.get(instance_type)
    assert len(interfaces) == instance.efa_interfaces == instance.network_cards
    assert [i["networkCardIndex"] for i in interfaces] == list(range(instance.network_cards))
    assert interfaces[0]["deviceIndex"] == 0 and interfaces[0]["interfaceType"] == "efa"
    for interface in interfaces[1:]:
        assert interface["deviceIndex"] == 1 and interface["interfaceType"] == "efa-only"
    efa_sg = f"<nemo-eks-test-{short}-efa.id>"
    for interface in interfaces:
        assert interface["securityGroups"] == ["<nemo-eks-test-eks.nodeSecurityGroupId>", efa_sg]
        assert "subnetId" not in interface  # a managed node group passes the subnets itself
    assert lt.inputs["instanceType"] == instance_type
    assert "vpcSecurityGroupIds" not in lt.inputs


def test_efa_interface_counts_expected_by_instance_family():
    counts = {name: len(every_gpu_type().one(LT, f"nemo-eks-test-{name.split('.')[0]}-lt").inputs["networkInterfaces"])
              for name in catalog.GPU_INSTANCE_TYPES}
    assert counts == {"p4d.24xlarge": 4, "p4de.24xlarge": 4, "p5.48xlarge": 32, "p5e.48xlarge": 32, "p5en.48xlarge": 16}


@pytest.mark.parametrize("instance_type", catalog.GPU_INSTANCE_TYPES)
def test_efa_security_group_allows_all_traffic_to_and_from_itself(instance_type):
    s = every_gpu_type()
    short = instance_type.split(".")[0]
    sg_id = f"<nemo-eks-test-{short}-efa.id>"
    rules = [r for r in s.resources(INGRESS) + s.resources(EGRESS) if r.inputs["securityGroupId"] == sg_id]
    assert sorted(r.type for r in rules) == [EGRESS, INGRESS]
    for rule in rules:
        assert rule.inputs["ipProtocol"] == "-1"
        assert rule.inputs["referencedSecurityGroupId"] == sg_id
        assert "fromPort" not in rule.inputs and "cidrIpv4" not in rule.inputs


def test_gpu_launch_template_details():
    lt = synth_stack("dev").one(LT, "nemo-eks-dev-train-lt")
    assert lt.inputs["metadataOptions"]["httpTokens"] == "required"
    assert lt.inputs["metadataOptions"]["httpPutResponseHopLimit"] == 1  # pods cannot reach the node role
    [root] = lt.inputs["blockDeviceMappings"]
    assert root["deviceName"] == "/dev/xvda"
    assert root["ebs"] == {"deleteOnTermination": "true", "encrypted": "true", "volumeSize": 200, "volumeType": "gp3"}
    user_data = base64.b64decode(lt.inputs["userData"]).decode()
    assert "Content-Type: application/node.eks.aws" in user_data
    node_config = yaml.safe_load(user_data.split("application/node.eks.aws\n\n", 1)[1].split("--//--")[0])
    assert node_config["kind"] == "NodeConfig"
    assert node_config["spec"]["instance"]["localStorage"]["strategy"] == "RAID0"
    assert lt.inputs["placement"]["groupName"] == "<nemo-eks-dev-train-pg.name>"


def test_placement_group_only_without_reservations():
    s = capacity_block()
    placement_groups = {r.name for r in s.resources("aws:ec2/placementGroup:PlacementGroup")}
    assert placement_groups == {"nemo-eks-prod-spot-pg"}
    for group in ("cb", "odcr"):
        assert "placement" not in s.one(LT, f"nemo-eks-prod-{group}-lt").inputs
    pg = s.one("aws:ec2/placementGroup:PlacementGroup", "nemo-eks-prod-spot-pg")
    assert pg.inputs["strategy"] == "cluster"


def test_capacity_block_and_reservations():
    s = capacity_block()
    cb_lt = s.one(LT, "nemo-eks-prod-cb-lt").inputs
    assert cb_lt["instanceMarketOptions"] == {"marketType": "capacity-block"}
    assert cb_lt["capacityReservationSpecification"]["capacityReservationTarget"]["capacityReservationId"] == "cr-0123456789abcdef0"
    assert s.one(NODE_GROUP, "nemo-eks-prod-cb-nodes").inputs["capacityType"] == "CAPACITY_BLOCK"
    odcr_lt = s.one(LT, "nemo-eks-prod-odcr-lt").inputs
    assert "instanceMarketOptions" not in odcr_lt
    assert odcr_lt["capacityReservationSpecification"]["capacityReservationTarget"]["capacityReservationId"] == "cr-0fedcba9876543210"
    spot = s.one(NODE_GROUP, "nemo-eks-prod-spot-nodes").inputs
    assert spot["capacityType"] == "SPOT"
    assert "capacityReservationSpecification" not in s.one(LT, "nemo-eks-prod-spot-lt").inputs


def test_gpu_node_group():
    s = synth_stack("dev")
    ng = s.one(NODE_GROUP, "nemo-eks-dev-train-nodes")
    assert ng.inputs["amiType"] == "AL2023_x86_64_NVIDIA"
    assert ng.inputs["scalingConfig"] == {"minSize": 0, "desiredSize": 0, "maxSize": 1}
    assert ng.inputs["capacityType"] == "ON_DEMAND"
    assert "instanceTypes" not in ng.inputs  # the launch template carries it (required for Capacity Blocks)
    assert sorted((t["key"], t.get("value"), t["effect"]) for t in ng.inputs["taints"]) == [
        ("fsx.csi.aws.com/agent-not-ready", None, "NO_EXECUTE"), ("nvidia.com/gpu", "true", "NO_SCHEDULE")]
    assert ng.inputs["labels"]["vpc.amazonaws.com/efa.present"] == "true"
    assert ng.inputs["labels"]["nvidia.com/gpu.present"] == "true"
    assert ng.inputs["subnetIds"] == ["<nemo-eks-dev-private-us-east-1a.id>"]
    # A GPU node needs the cluster's CNI (EFA-only interfaces need VPC CNI >= 1.18.5, EKS node-efa guide)
    # before it joins.
    assert {"nemo-eks-dev-eks", "nemo-eks-dev-node"} <= refs(ng, s)


def test_gpu_group_in_its_zone_subnet():
    s = synth_stack("prod")
    ng = s.one(NODE_GROUP, "nemo-eks-prod-train-nodes")
    assert ng.inputs["subnetIds"] == ["<nemo-eks-prod-private-us-east-1b.id>"]


# ---------------------------------------------------------------------------------------------- cluster


def test_cluster_settings():
    s = synth_stack("prod")
    cluster = s.one("eks:index:Cluster", "nemo-eks-prod-eks").inputs
    assert cluster["name"] == "nemo-eks-prod" and cluster["version"] == "1.34"
    assert cluster["authenticationMode"] == "API"
    assert cluster["endpointPrivateAccess"] is True and cluster["endpointPublicAccess"] is False
    assert "publicAccessCidrs" not in cluster
    assert cluster["enabledClusterLogTypes"] == ["api", "audit", "authenticator", "controllerManager", "scheduler"]
    assert cluster["encryptionConfigKeyArn"] == "<nemo-eks-prod-secrets.arn>"
    assert cluster["skipDefaultNodeGroup"] is True
    assert cluster["corednsAddonOptions"]["enabled"] is False  # declared by us, after the system nodes
    [entry] = cluster["accessEntries"].values()
    assert entry["principalArn"] == "arn:aws:iam::111122223333:role/platform-admins"
    [policy] = entry["accessPolicies"].values()
    assert policy["policyArn"].endswith("AmazonEKSClusterAdminPolicy") and policy["accessScope"]["type"] == "cluster"
    key = s.one("aws:kms/key:Key", "nemo-eks-prod-secrets").inputs
    assert key["enableKeyRotation"] is True


def test_public_endpoint_with_allow_list():
    cluster = synth_config("public-endpoint", {"nemo-eks:cluster": {
        "publicEndpoint": True, "publicAccessCidrs": ["100.24.1.7/32"]}}).one("eks:index:Cluster", "nemo-eks-test-eks").inputs
    assert cluster["endpointPublicAccess"] is True
    assert cluster["publicAccessCidrs"] == ["100.24.1.7/32"]


def test_coredns_and_system_nodes():
    s = synth_stack("dev")
    coredns = s.one("aws:eks/addon:Addon", "nemo-eks-dev-coredns")
    assert coredns.inputs["addonName"] == "coredns"
    assert "nemo-eks-dev-system" in refs(coredns, s)
    system = s.one(NODE_GROUP, "nemo-eks-dev-system").inputs
    assert system["instanceTypes"] == [catalog.SYSTEM_INSTANCE_TYPE]
    assert system["amiType"] == "AL2023_x86_64_STANDARD" and "taints" not in system


def test_kubernetes_provider_has_a_stable_cluster_identifier():
    provider = synth_stack("dev").one("pulumi:providers:kubernetes", "nemo-eks-dev-k8s").inputs
    assert provider["clusterIdentifier"] == "nemo-eks-dev"


# ---------------------------------------------------------------------------------------------- network


def test_new_vpc_over_three_zones():
    s = synth_stack("dev")
    subnets = s.resources("aws:ec2/subnet:Subnet")
    assert len(subnets) == 6
    public = [r for r in subnets if r.inputs.get("mapPublicIpOnLaunch")]
    private = [r for r in subnets if not r.inputs.get("mapPublicIpOnLaunch")]
    assert all(r.inputs["tags"]["kubernetes.io/role/elb"] == "1" for r in public)
    assert all(r.inputs["tags"]["kubernetes.io/role/internal-elb"] == "1" for r in private)
    assert len(s.resources("aws:ec2/natGateway:NatGateway")) == 1
    endpoint = s.one("aws:ec2/vpcEndpoint:VpcEndpoint", "nemo-eks-dev-s3").inputs
    assert endpoint["serviceName"] == "com.amazonaws.us-east-1.s3" and endpoint["vpcEndpointType"] == "Gateway"
    assert len(endpoint["routeTableIds"]) == 3


def test_nat_per_zone_in_prod():
    assert len(synth_stack("prod").resources("aws:ec2/natGateway:NatGateway")) == 3


def test_existing_vpc_declares_no_network():
    s = synth_config("existing-vpc", {"nemo-eks:network": {
        "existingVpcId": "vpc-0abc", "existingPrivateSubnetIds": {"us-east-1a": "subnet-a", "us-east-1b": "subnet-b"},
        "existingPublicSubnetIds": {"us-east-1a": "subnet-c", "us-east-1b": "subnet-d"}}})
    assert not s.resources("aws:ec2/vpc:Vpc") and not s.resources("aws:ec2/subnet:Subnet")
    cluster = s.one("eks:index:Cluster", "nemo-eks-test-eks").inputs
    assert cluster["vpcId"] == "vpc-0abc" and cluster["privateSubnetIds"] == ["subnet-a", "subnet-b"]
    assert s.one(NODE_GROUP, "nemo-eks-test-train-nodes").inputs["subnetIds"] == ["subnet-a"]
    assert s.one(FSX, "nemo-eks-test-storage-lustre").inputs["subnetIds"] == "subnet-a"


# ---------------------------------------------------------------------------------------------- storage


@pytest.mark.parametrize("stack,protected", [("dev", False), ("prod", True)])
def test_buckets_are_private_encrypted_tls_only(stack, protected):
    s = synth_stack(stack)
    buckets = s.resources(BUCKET)
    assert sorted(b.name.rsplit("-", 1)[1] for b in buckets) == ["checkpoints", "datasets", "models"]
    for bucket in buckets:
        assert bucket.protect is protected and bucket.retain_on_delete is protected
        assert bucket.inputs["forceDestroy"] is (not protected)
        bucket_id = f"<{bucket.name}.id>"
        def attached(type_token):
            [one] = [r for r in s.resources(type_token) if r.inputs["bucket"] == bucket_id]
            return one.inputs
        block = attached("aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock")
        assert all(block[k] is True for k in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets"))
        sse = attached("aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration")
        assert sse["rules"][0]["applyServerSideEncryptionByDefault"]["sseAlgorithm"] == "AES256"
        policy = json.loads(attached("aws:s3/bucketPolicy:BucketPolicy")["policy"])
        [deny] = policy["Statement"]
        assert deny["Effect"] == "Deny" and deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
        assert deny["Resource"] == [f"<{bucket.name}.arn>", f"<{bucket.name}.arn>/*"]
        rules = {r["id"]: r for r in attached("aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration")["rules"]}
        assert rules["abort-incomplete-uploads"]["abortIncompleteMultipartUpload"]["daysAfterInitiation"] == 7
        versioned = [r for r in s.resources("aws:s3/bucketVersioning:BucketVersioning") if r.inputs["bucket"] == bucket_id]
        if bucket.name.endswith("datasets"):
            assert not versioned and "expire-old-versions" not in rules
        else:
            assert versioned[0].inputs["versioningConfiguration"]["status"] == "Enabled"
            assert rules["expire-old-versions"]["noncurrentVersionExpiration"]["noncurrentDays"] == 30


def test_fsx_file_system():
    s = synth_stack("prod")
    fs = s.one(FSX, "nemo-eks-prod-storage-lustre")
    assert fs.inputs["deploymentType"] == "PERSISTENT_2" and fs.inputs["storageType"] == "SSD"
    assert fs.inputs["storageCapacity"] == 4800 and fs.inputs["perUnitStorageThroughput"] == 500
    assert fs.inputs["dataCompressionType"] == "LZ4"
    assert fs.inputs["subnetIds"] == "<nemo-eks-prod-private-us-east-1b.id>"  # a string in pulumi-aws 7
    assert fs.protect and fs.retain_on_delete
    assert not synth_stack("dev").one(FSX, "nemo-eks-dev-storage-lustre").protect
    # declared at creation: a PERSISTENT_2 file system made without one can never raise its metadata performance
    assert fs.inputs["metadataConfiguration"] == {"mode": "AUTOMATIC"}


def test_fsx_metadata_iops_from_config():
    s = synth_config("fsx-metadata", {"nemo-eks:storage": {"fsxMetadataMode": "USER_PROVISIONED",
                                                           "fsxMetadataIops": 24000}})
    fs = s.one(FSX, "nemo-eks-test-storage-lustre")
    assert fs.inputs["metadataConfiguration"] == {"mode": "USER_PROVISIONED", "iops": 24000}


@pytest.mark.parametrize("storage,key,allowed", [
    ({"fsxMetadataMode": "USER_PROVISIONED"}, "fsxMetadataIops", "12000..192000 in steps of 12000"),
    ({"fsxMetadataMode": "USER_PROVISIONED", "fsxMetadataIops": 13000}, "fsxMetadataIops", "1500, 3000, 6000"),
    ({"fsxMetadataMode": "USER_PROVISIONED", "fsxMetadataIops": 204000}, "fsxMetadataIops", "192000"),
    ({"fsxMetadataIops": 3000}, "fsxMetadataIops", "unless storage.fsxMetadataMode is USER_PROVISIONED"),
    ({"fsxMetadataMode": "automatic"}, "fsxMetadataMode", "AUTOMATIC, USER_PROVISIONED"),
])
def test_fsx_metadata_settings_fsx_would_reject_fail_in_config(storage, key, allowed):
    with pytest.raises(ConfigError) as caught:
        load(raw_config({"nemo-eks:storage": storage}), "dev")
    assert caught.value.key == f"nemo-eks:storage.{key}" and allowed in caught.value.allowed


def test_fsx_security_group_opens_lustre_ports_to_nodes_and_itself():
    s = synth_stack("dev")
    sg_id = "<nemo-eks-dev-storage-fsx.id>"
    ingress = {(r.inputs["fromPort"], r.inputs["toPort"], r.inputs["referencedSecurityGroupId"], r.inputs["ipProtocol"])
               for r in s.resources(INGRESS) if r.inputs["securityGroupId"] == sg_id}
    nodes = "<nemo-eks-dev-eks.nodeSecurityGroupId>"
    assert ingress == {(988, 988, nodes, "tcp"), (1018, 1023, nodes, "tcp"), (988, 988, sg_id, "tcp"), (1018, 1023, sg_id, "tcp")}
    fs = s.one(FSX, "nemo-eks-dev-storage-lustre")
    assert fs.inputs["securityGroupIds"] == [sg_id]
    # The rules are checked when the file system is created: it must wait for them.
    assert {r.name for r in s.resources(INGRESS) if r.inputs["securityGroupId"] == sg_id} <= refs(fs, s)


def test_nodes_accept_lustre_from_the_file_servers():
    s = synth_stack("dev")
    nodes, fsx = "<nemo-eks-dev-eks.nodeSecurityGroupId>", "<nemo-eks-dev-storage-fsx.id>"
    ingress = {(r.inputs["fromPort"], r.inputs["toPort"]) for r in s.resources(INGRESS)
               if r.inputs["securityGroupId"] == nodes and r.inputs.get("referencedSecurityGroupId") == fsx}
    assert ingress == {(988, 988), (1018, 1023)}


def test_data_repository_associations_are_created_one_at_a_time():
    s = synth_stack("dev")
    links = {r.inputs["fileSystemPath"]: r for r in s.resources(DRA)}
    assert "nemo-eks-dev-storage-datasets-link" in refs(links["/checkpoints"], s)
    assert "nemo-eks-dev-storage-checkpoints-link" in refs(links["/models"], s)


def test_resource_names_are_unique(stack_synth):
    names = [r.name for r in stack_synth.registrations]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_fsx_linked_to_each_bucket_both_ways():
    s = synth_stack("dev")
    associations = {r.inputs["fileSystemPath"]: r.inputs for r in s.resources(DRA)}
    assert set(associations) == {"/datasets", "/checkpoints", "/models"}
    for path, dra in associations.items():
        assert dra["dataRepositoryPath"] == f"s3://<nemo-eks-dev-storage{path.replace('/', '-')}.bucket>"
        assert dra["fileSystemId"] == "<nemo-eks-dev-storage-lustre.id>"
        assert dra["s3"]["autoImportPolicy"]["events"] == ["NEW", "CHANGED", "DELETED"]
        assert dra["s3"]["autoExportPolicy"]["events"] == ["NEW", "CHANGED", "DELETED"]


# ---------------------------------------------------------------------------------------------- identity


def test_pod_identity_roles_are_least_privilege():
    s = synth_stack("dev")
    policies = {r.name.rsplit("-", 2)[-2]: json.loads(r.inputs["policy"])
                for r in s.resources("aws:iam/rolePolicy:RolePolicy") if r.name.endswith("-s3")}
    arn = "<nemo-eks-dev-storage-{}.arn>".format

    def resources(policy, sid):
        return {st["Sid"]: st["Resource"] for st in policy["Statement"]}.get(sid, [])

    assert resources(policies["training"], "WriteObjects") == [f"{arn('checkpoints')}/*"]
    assert set(resources(policies["training"], "ReadObjects")) == {f"{arn('datasets')}/*", f"{arn('checkpoints')}/*"}
    assert resources(policies["conversion"], "WriteObjects") == [f"{arn('models')}/*"]
    assert resources(policies["serving"], "WriteObjects") == []
    assert resources(policies["serving"], "ReadObjects") == [f"{arn('models')}/*"]
    for policy in policies.values():
        for statement in policy["Statement"]:
            assert "*" not in statement["Resource"] and "s3:*" not in statement["Action"]
    trust = json.loads(s.one("aws:iam/role:Role", "nemo-eks-dev-identity-training").inputs["assumeRolePolicy"])
    assert trust["Statement"][0]["Principal"] == {"Service": "pods.eks.amazonaws.com"}
    assert trust["Statement"][0]["Action"] == ["sts:AssumeRole", "sts:TagSession"]
    associations = {r.inputs["serviceAccount"]: r.inputs for r in s.resources("aws:eks/podIdentityAssociation:PodIdentityAssociation")
                    if r.inputs["namespace"] == "nemo"}  # the autoscaler's and CI runners' roles: test_autoscaler, test_runners
    assert set(associations) == {"nemo-training", "nemo-conversion", "nemo-serving"}
    assert all(a["namespace"] == "nemo" and a["clusterName"] == "nemo-eks-dev" for a in associations.values())


# ---------------------------------------------------------------------------------------------- add-ons


def test_eks_addons():
    s = synth_stack("dev")
    addons = {r.inputs["addonName"]: r for r in s.resources("aws:eks/addon:Addon")}
    assert set(addons) == {"coredns", "eks-pod-identity-agent", "aws-fsx-csi-driver"}
    fsx = addons["aws-fsx-csi-driver"]
    assert fsx.inputs["podIdentityAssociations"] == [
        {"roleArn": "<nemo-eks-dev-identity-fsx-csi.arn>", "serviceAccount": "fsx-csi-controller-sa"}]
    assert addons["eks-pod-identity-agent"].name in refs(fsx, s)


def test_device_plugins_pinned_and_scheduled_on_gpu_nodes_only():
    s = synth_stack("dev")
    releases = {r.inputs["chart"]: r.inputs for r in s.resources("kubernetes:helm.sh/v3:Release")}
    nvidia, efa = releases["nvidia-device-plugin"], releases["aws-efa-k8s-device-plugin"]
    assert nvidia["version"] == "0.20.0" and nvidia["repositoryOpts"]["repo"] == "https://nvidia.github.io/k8s-device-plugin"
    assert efa["version"] == "v0.5.30" and efa["repositoryOpts"]["repo"] == "https://aws.github.io/eks-charts"
    assert nvidia["values"]["nodeSelector"] == {"nemo-eks/node-role": "gpu"}
    assert efa["values"]["nodeSelector"] == {"vpc.amazonaws.com/efa.present": "true"}
    for values in (nvidia["values"], efa["values"]):
        tolerated = {(t["key"], t.get("effect")) for t in values["tolerations"]}
        assert {("nvidia.com/gpu", "NoSchedule"), ("fsx.csi.aws.com/agent-not-ready", "NoExecute")} <= tolerated


PUBLISHED_CHARTS = yaml.safe_load((synth.ROOT / "tests" / "data" / "helm_chart_versions.yaml").read_text())


def test_every_pinned_chart_version_is_published(stack_synth):
    """A pin to a version the chart repository never published fails only at `pulumi up`, on the cluster."""
    releases = stack_synth.resources("kubernetes:helm.sh/v3:Release")
    assert len(releases) >= 5
    for release in releases:
        inputs = release.inputs
        if "repositoryOpts" in inputs:
            repository, chart = inputs["repositoryOpts"]["repo"], inputs["chart"]
        else:  # an OCI chart: oci://<registry>/<path>/<chart>
            repository, _, chart = inputs["chart"].rpartition("/")
        published = PUBLISHED_CHARTS[repository]["charts"][chart]
        assert inputs["version"] in published, (chart, inputs["version"], published[:3])


def test_fsx_volume_and_claim():
    s = synth_stack("dev")
    by_kind = {m["kind"]: m for m in s.manifests() if m["kind"] in ("PersistentVolume", "PersistentVolumeClaim")}
    pv, pvc = by_kind["PersistentVolume"], by_kind["PersistentVolumeClaim"]
    assert pv["spec"]["csi"] == {"driver": "fsx.csi.aws.com", "volumeHandle": "<nemo-eks-dev-storage-lustre.id>",
                                 "volumeAttributes": {"dnsname": "<nemo-eks-dev-storage-lustre.dnsName>",
                                                      "mountname": "<nemo-eks-dev-storage-lustre.mountName>"}}
    assert pv["spec"]["accessModes"] == ["ReadWriteMany"] and pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"] and pvc["metadata"]["namespace"] == "nemo"
    # A fixed nominal size: a static claim cannot be resized, and Lustre ignores the number.
    assert pvc["spec"]["resources"]["requests"]["storage"] == pv["spec"]["capacity"]["storage"] == "1200Gi"
    assert pvc["spec"]["storageClassName"] == ""
    prod = {m["kind"]: m for m in synth_stack("prod").manifests()}
    assert prod["PersistentVolumeClaim"]["spec"]["resources"]["requests"]["storage"] == "1200Gi"
    claim = s.one("kubernetes:core/v1:PersistentVolumeClaim", "nemo-eks-dev-addons-fsx-claim")
    assert {"nemo-eks-dev-addons-fsx-volume", "nemo-eks-dev-addons-namespace"} <= refs(claim, s)


def test_training_operator_from_pinned_manifests():
    s = synth_stack("dev")
    operator = s.one("kubernetes:yaml/v2:ConfigFile", "nemo-eks-dev-addons-training-operator")
    assert operator.inputs["file"] == "infra/vendor/training-operator-v1.9.3.yaml"  # relative: same on every machine
    objects = {(m["kind"], m["metadata"]["name"]) for m in s.manifests()}
    assert ("CustomResourceDefinition", "pytorchjobs.kubeflow.org") in objects
    [deployment] = [m for m in s.manifests() if m["kind"] == "Deployment" and m["metadata"]["name"] == "training-operator"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert ":" in container["image"] and not container["image"].endswith(":latest")
    assert "--enable-scheme=pytorchjob" in container["args"]


def test_every_kubernetes_object_has_explicit_name():
    for manifest in synth_stack("dev").manifests():
        assert manifest["metadata"]["name"] and not manifest["metadata"]["name"].startswith("<")


def test_vendored_crd_is_the_schema_we_validate_against():
    import pathlib
    root = pathlib.Path(synth.ROOT)
    vendored = [d for d in yaml.safe_load_all((root / "infra/vendor/training-operator-v1.9.3.yaml").read_text())
                if d and d["kind"] == "CustomResourceDefinition"]
    assert [d["metadata"]["name"] for d in vendored] == ["pytorchjobs.kubeflow.org"]
    assert vendored[0] == yaml.safe_load((root / "schemas/kubeflow.org_pytorchjobs.yaml").read_text())
