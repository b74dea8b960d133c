"""GPU node groups on EFA, declared with pulumi-aws so that every detail shows in ``pulumi preview``.

pulumi-eks's ManagedNodeGroup builds the EFA launch template inside its plugin (invisible to previews, tests
and policies) and cannot combine EFA with a capacity reservation or a Capacity Block, so we build it here.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import pulumi
import pulumi_aws as aws

from infra.catalog import InstanceType
from infra.config import GpuNodeGroupConfig
from infra.naming import name_args

NODE_GROUP_LABEL = "nemo-eks/node-group"
NODE_ROLE_LABEL = "nemo-eks/node-role"
GPU_PRESENT_LABEL = "nvidia.com/gpu.present"  # also what the NVIDIA device plugin chart's default affinity selects
EFA_PRESENT_LABEL = "vpc.amazonaws.com/efa.present"  # what the EFA device plugin is scheduled on
# The Cluster Autoscaler's AWS GPU label (cloudprovider/aws/aws_cloud_provider.go GPULabel, cluster-autoscaler-1.34.5).
# A node carrying it without allocatable GPUs yet counts as not ready (processors/customresources/gpu_processor.go),
# so the autoscaler waits for the device plugin instead of adding another node for the same pending pod; the value
# only names the GPU in its metrics.
ACCELERATOR_LABEL = "k8s.amazonaws.com/accelerator"

# The taints every GPU node carries, in EKS API spelling, with the Kubernetes effect pods must tolerate.
# nvidia.com/gpu keeps everything that does not ask for GPUs off the most expensive nodes; the FSx taint keeps
# pods off a new node until the FSx CSI node agent is ready to mount Lustre (the agent removes it:
# aws-fsx-csi-driver docs/install.md, "Configure node startup taint").
GPU_TAINT = "nvidia.com/gpu"
FSX_AGENT_TAINT = "fsx.csi.aws.com/agent-not-ready"  # a start-up taint: node autoscalers must be told (infra/autoscaler.py)
GPU_TAINTS: tuple[tuple[str, str | None, str], ...] = (
    (GPU_TAINT, "true", "NO_SCHEDULE"),
    (FSX_AGENT_TAINT, None, "NO_EXECUTE"),
)
_K8S_EFFECT = {"NO_SCHEDULE": "NoSchedule", "NO_EXECUTE": "NoExecute", "PREFER_NO_SCHEDULE": "PreferNoSchedule"}

EKS_GPU_AMI_TYPE = "AL2023_x86_64_NVIDIA"  # driver, container toolkit, fabric manager and EFA come with the AMI
ROOT_DEVICE_NAME = "/dev/xvda"  # AL2023 EKS AMIs


def _tolerations(keys: Sequence[str]) -> list[dict[str, str]]:
    return [{"key": key, "operator": "Exists", "effect": _K8S_EFFECT[effect]} for key, _, effect in GPU_TAINTS
            if key in keys]


def workload_tolerations() -> list[dict[str, str]]:
    """For training, evaluation, conversion and serving pods: the GPU taint only. They mount FSx, so they must
    wait until the FSx node agent has cleared its start-up taint; tolerating it would defeat it."""
    return _tolerations([GPU_TAINT])


def node_agent_tolerations() -> list[dict[str, str]]:
    """For the DaemonSets a GPU node needs before the FSx agent is ready (device plugins, the DCGM exporter):
    every GPU taint, start-up taint included, so that a new node advertises its GPUs and EFA at once."""
    return _tolerations([key for key, _, _ in GPU_TAINTS])


def node_labels(group: GpuNodeGroupConfig) -> dict[str, str]:
    labels = {NODE_ROLE_LABEL: "gpu", NODE_GROUP_LABEL: group.name, GPU_PRESENT_LABEL: "true",
              ACCELERATOR_LABEL: f"nvidia-{group.instance.gpu_model.lower()}"}
    if group.instance.efa:
        labels[EFA_PRESENT_LABEL] = "true"
    return labels


def efa_network_interfaces(instance: InstanceType, security_group_ids: Sequence[pulumi.Input[str]]) -> list[dict[str, Any]]:
    """One EFA interface per network card. Card 0 is the primary (``efa``: EFA plus an IP address); every other
    card gets device index 1 and ``efa-only``, which takes no VPC address, so a p5's 32 interfaces do not
    exhaust the subnet (efa-only needs VPC CNI >= 1.18.5: EKS user guide, node-efa, "EFA and EFA-only network
    interfaces"). Security groups go on each interface because a launch template with interfaces may not set
    them at the top level."""
    interfaces = []
    for card in range(instance.network_cards):
        interfaces.append({
            "network_card_index": card,
            "device_index": 0 if card == 0 else 1,
            "interface_type": "efa" if card == 0 else "efa-only",
            "delete_on_termination": "true",
            "security_groups": list(security_group_ids),
        })
    return interfaces


NODEADM_RAID0 = """apiVersion: node.eks.aws/v1alpha1
kind: NodeConfig
spec:
  instance:
    localStorage:
      strategy: RAID0
"""


def nodeadm_user_data() -> str:
    """MIME user data that EKS merges with its own: nodeadm stripes the instance-store NVMe into one RAID0
    and puts containerd and kubelet state on it (tens of GB of NGC images, fast local scratch)."""
    return "\n".join([
        "MIME-Version: 1.0",
        'Content-Type: multipart/mixed; boundary="//"',
        "",
        "--//",
        "Content-Type: application/node.eks.aws",
        "",
        NODEADM_RAID0,
        "--//--",
        "",
    ])


def launch_template_market_args(group: GpuNodeGroupConfig) -> dict[str, Any]:
    """Launch-template arguments that aim the group at reserved capacity, if any."""
    args: dict[str, Any] = {}
    if group.capacity_reservation_id:
        args["capacity_reservation_specification"] = {
            "capacity_reservation_target": {"capacity_reservation_id": group.capacity_reservation_id}}
    if group.capacity_type == "CAPACITY_BLOCK":
        args["instance_market_options"] = {"market_type": "capacity-block"}
    return args


@dataclass(frozen=True)
class GpuNodeGroupArgs:
    config: GpuNodeGroupConfig
    prefix: str
    cluster_name: pulumi.Input[str]
    cluster_security_group_id: pulumi.Input[str]
    node_role_arn: pulumi.Input[str]
    vpc_id: pulumi.Input[str]
    subnet_id: pulumi.Input[str]  # the private subnet of the group's zone
    tags: Mapping[str, str]
    depends_on: Sequence[pulumi.Resource] = ()
    # With a node autoscaler, the desired size is Pulumi's only at creation; the tags tell the autoscaler what a
    # node of the group offers while the group is at 0 (node group: read through eks:DescribeNodegroup; Auto
    # Scaling group: read from the group itself, which EKS does not copy node-group tags to).
    autoscaled: bool = False
    node_group_tags: Mapping[str, str] = field(default_factory=dict)
    autoscaling_group_tags: Mapping[str, str] = field(default_factory=dict)


class GpuNodeGroup(pulumi.ComponentResource):
    node_group: aws.eks.NodeGroup
    efa_security_group: aws.ec2.SecurityGroup
    launch_template: aws.ec2.LaunchTemplate
    placement_group: aws.ec2.PlacementGroup | None

    def __init__(self, name: str, args: GpuNodeGroupArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("nemo-eks:infra:GpuNodeGroup", name, None, opts)
        group, tags = args.config, dict(args.tags)
        instance = group.instance
        child = pulumi.ResourceOptions(parent=self)

        # EFA traffic is OS-bypass between the group's own instances: it must be allowed to and from the group
        # itself, in BOTH directions. A missing egress rule is the classic silent NCCL failure.
        self.efa_security_group = aws.ec2.SecurityGroup(
            f"{name}-efa", **name_args("aws:ec2/securityGroup:SecurityGroup", f"{name}-efa"), vpc_id=args.vpc_id,
            description=f"EFA traffic within GPU node group {group.name}", tags={**tags, "Name": f"{name}-efa"}, opts=child)
        sg_id = self.efa_security_group.id
        aws.vpc.SecurityGroupIngressRule(f"{name}-efa-in", security_group_id=sg_id, referenced_security_group_id=sg_id,
                                         ip_protocol="-1", description="EFA from the group itself", opts=child)
        aws.vpc.SecurityGroupEgressRule(f"{name}-efa-out", security_group_id=sg_id, referenced_security_group_id=sg_id,
                                        ip_protocol="-1", description="EFA to the group itself", opts=child)

        self.placement_group = None
        placement = None
        # No placement group with reserved capacity: a Capacity Block or reservation already places its
        # instances close together, and a forced group can make the reservation unusable.
        if group.uses_placement_group:
            self.placement_group = aws.ec2.PlacementGroup(
                f"{name}-pg", **name_args("aws:ec2/placementGroup:PlacementGroup", f"{name}-pg"), strategy="cluster",
                tags=tags, opts=child)
            placement = {"group_name": self.placement_group.name}

        self.launch_template = aws.ec2.LaunchTemplate(
            f"{name}-lt",
            **name_args("aws:ec2/launchTemplate:LaunchTemplate", f"{name}-lt"),
            # The instance type lives in the launch template, not the node group: EKS requires that for
            # Capacity Blocks, and one layout for every capacity type keeps the groups alike.
            instance_type=instance.name,
            description=f"{instance.name} with {instance.network_cards} EFA interfaces for GPU node group {group.name}",
            network_interfaces=efa_network_interfaces(instance, [args.cluster_security_group_id, sg_id]),
            metadata_options={
                "http_endpoint": "enabled",
                "http_tokens": "required",  # IMDSv2 only
                # One hop: only host-network processes (kubelet, VPC CNI, the EFA and FSx node plugins) reach
                # the instance metadata; pods cannot borrow the node role and use Pod Identity instead.
                "http_put_response_hop_limit": 1,
            },
            block_device_mappings=[{
                "device_name": ROOT_DEVICE_NAME,
                "ebs": {"volume_size": group.root_volume_gib, "volume_type": "gp3", "encrypted": "true",
                        "delete_on_termination": "true"},
            }],
            user_data=base64.b64encode(nodeadm_user_data().encode()).decode(),
            placement=placement,
            tag_specifications=[{"resource_type": "instance", "tags": {**tags, "Name": f"{name}"}}],
            update_default_version=True,
            tags=tags,
            **launch_template_market_args(group),
            opts=child)

        self.node_group = aws.eks.NodeGroup(
            f"{name}-nodes",
            # EKS takes at most 63 characters, fewer than the longest stack and group names make.
            **name_args("aws:eks/nodeGroup:NodeGroup", f"{name}-nodes"),
            cluster_name=args.cluster_name,
            node_role_arn=args.node_role_arn,
            subnet_ids=[args.subnet_id],  # one zone: EFA and the placement group do not span zones
            ami_type=EKS_GPU_AMI_TYPE,
            release_version=group.ami_release_version,
            capacity_type=group.capacity_type,
            scaling_config={"min_size": group.min_size, "desired_size": group.desired_size, "max_size": group.max_size},
            launch_template={"id": self.launch_template.id,
                             "version": self.launch_template.latest_version.apply(str)},
            labels=node_labels(group),
            taints=[{"key": k, "value": v, "effect": e} if v else {"key": k, "effect": e} for k, v, e in GPU_TAINTS],
            update_config={"max_unavailable": 1},
            tags={**tags, NODE_GROUP_LABEL: group.name, **args.node_group_tags},
            opts=pulumi.ResourceOptions(
                parent=self, depends_on=list(args.depends_on),
                # The autoscaler owns the size once the group exists: without this every `pulumi up` would set it
                # back to the stack file's and terminate the nodes of a running job. The engine property path is
                # the one pulumi_aws's NodeGroup docstring gives (eks/node_group.py, "ignore_changes=
                # ["scalingConfig.desiredSize"]"); the Python SDK passes it through untranslated.
                ignore_changes=["scalingConfig.desiredSize"] if args.autoscaled else None))
        # EKS creates one Auto Scaling group per managed node group (its name is in resources[0].autoscalingGroups)
        # and does not copy node-group tags to it (AWS::EKS::Nodegroup Tags: "Node group tags do not propagate to
        # any other resources associated with the node group").
        self.autoscaling_group_name = self.node_group.resources.apply(lambda r: r[0].autoscaling_groups[0].name)
        for key, value in sorted(args.autoscaling_group_tags.items()):
            aws.autoscaling.Tag(f"{name}-asg-{_tag_slug(key)}", autoscaling_group_name=self.autoscaling_group_name,
                                # Only for the autoscaler: instances get the launch template's tags.
                                tag={"key": key, "value": value, "propagate_at_launch": False}, opts=child)
        self.register_outputs({"nodeGroupName": self.node_group.node_group_name,
                               "launchTemplateId": self.launch_template.id})


def _tag_slug(key: str) -> str:
    """A resource-name part for an Auto Scaling group tag: its last path segment, which is unique among ours."""
    return key.rstrip("/").rsplit("/", 1)[-1].replace(".", "-")
