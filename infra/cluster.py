"""The EKS control plane, the node IAM role, the CPU system node group and our own Kubernetes provider."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping, Sequence

import pulumi
import pulumi_aws as aws
import pulumi_eks as eks
import pulumi_kubernetes as k8s

from infra.config import ClusterConfig, SystemNodesConfig
from infra.gpu_nodes import NODE_ROLE_LABEL
from infra.naming import fixed_name, name_args

CLUSTER_ADMIN_POLICY = "arn:aws:eks::aws:cluster-access-policy/AmazonEKSClusterAdminPolicy"
NODE_MANAGED_POLICIES = (
    "arn:aws:iam::aws:policy/AmazonEKSWorkerNodePolicy",
    "arn:aws:iam::aws:policy/AmazonEC2ContainerRegistryPullOnly",
    "arn:aws:iam::aws:policy/AmazonEKS_CNI_Policy",
    "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore",  # shell on a GPU node through SSM, no SSH keys
)
SYSTEM_AMI_TYPE = "AL2023_x86_64_STANDARD"


def assume_role_policy(service: str, actions: Sequence[str] = ("sts:AssumeRole",)) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": service}, "Action": list(actions)}]})


def access_entries(admin_principal_arns: Sequence[str]) -> dict[str, eks.AccessEntryArgs]:
    return {
        f"admin-{index}": eks.AccessEntryArgs(
            principal_arn=arn,
            access_policies={"cluster-admin": eks.AccessPolicyAssociationArgs(
                policy_arn=CLUSTER_ADMIN_POLICY,
                access_scope=aws.eks.AccessPolicyAssociationAccessScopeArgs(type="cluster"))})
        for index, arn in enumerate(admin_principal_arns)
    }


@dataclass(frozen=True)
class ClusterArgs:
    config: ClusterConfig
    system_nodes: SystemNodesConfig
    cluster_name: str
    vpc_id: pulumi.Input[str]
    private_subnet_ids: Sequence[pulumi.Input[str]]
    public_subnet_ids: Sequence[pulumi.Input[str]]
    tags: Mapping[str, str]


class Cluster(pulumi.ComponentResource):
    name: pulumi.Output[str]
    node_role: aws.iam.Role
    node_security_group_id: pulumi.Output[str]
    provider: k8s.Provider
    system_nodes: aws.eks.NodeGroup
    coredns: aws.eks.Addon

    def __init__(self, name: str, args: ClusterArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("nemo-eks:infra:Cluster", name, None, opts)
        cfg, tags = args.config, dict(args.tags)
        child = pulumi.ResourceOptions(parent=self)
        name = args.cluster_name  # children carry the cluster's name, not the component's

        secrets_key = aws.kms.Key(f"{name}-secrets", description=f"Envelope encryption of Kubernetes secrets in {args.cluster_name}",
                                  enable_key_rotation=True, deletion_window_in_days=30, tags=tags, opts=child)
        aws.kms.Alias(f"{name}-secrets-alias", name=fixed_name("aws:kms/alias:Alias", f"alias/{args.cluster_name}-secrets"),
                      target_key_id=secrets_key.key_id, opts=child)

        # One role for every managed node group: they run the same kubelet, CNI and image pulls. Workloads
        # never use it; they get their own roles through Pod Identity.
        self.node_role = aws.iam.Role(f"{name}-node", **name_args("aws:iam/role:Role", f"{name}-node"),
                                      assume_role_policy=assume_role_policy("ec2.amazonaws.com"),
                                      description=f"Nodes of {args.cluster_name}", tags=tags, opts=child)
        attachments = [
            aws.iam.RolePolicyAttachment(f"{name}-node-{arn.rsplit('/', 1)[1]}", role=self.node_role.name, policy_arn=arn, opts=child)
            for arn in NODE_MANAGED_POLICIES
        ]

        self.cluster = eks.Cluster(
            f"{name}-eks",
            name=args.cluster_name,
            version=cfg.kubernetes_version,
            vpc_id=args.vpc_id,
            private_subnet_ids=list(args.private_subnet_ids),
            public_subnet_ids=list(args.public_subnet_ids),
            endpoint_private_access=True,
            endpoint_public_access=cfg.public_endpoint,
            public_access_cidrs=list(cfg.public_access_cidrs) or None,
            authentication_mode=eks.AuthenticationMode.API,
            access_entries=access_entries(cfg.admin_principal_arns),
            enabled_cluster_log_types=list(cfg.log_types),
            encryption_config_key_arn=secrets_key.arn,
            skip_default_node_group=True,
            # Without pulumi-eks's self-managed-node security groups, node_security_group_id is the security
            # group EKS itself creates: the one managed nodes carry, which lets them reach the control plane.
            skip_default_security_groups=True,
            # CoreDNS is declared below, after the system nodes exist: as a pulumi-eks child it would be
            # created before any node could run it and wait for a healthy status that cannot come.
            coredns_addon_options=eks.CoreDnsAddonOptionsArgs(enabled=False),
            # The VPC CNI enforces NetworkPolicies (the pipeline namespace's, workloads/network_policy.py) only
            # with its network policy agent on. pulumi-eks manages the CNI as the EKS add-on `vpc-cni` and turns
            # this flag into its configuration value {"enableNetworkPolicy": "true"} (pulumi/pulumi-eks
            # nodejs/eks/addons/cni-addon.ts mergeConfigurationValues), the setting the EKS user guide gives
            # (latest/ug/networking/cni-network-policy-configure.adoc, step 4; needs VPC CNI >= 1.14).
            vpc_cni_options=eks.VpcCniOptionsArgs(enable_network_policy=True),
            create_oidc_provider=False,  # workloads use EKS Pod Identity
            tags=tags,
            opts=child)
        # A plain string output that resolves once the cluster exists, so that what uses it waits for it.
        self.name = self.cluster.urn.apply(lambda _: args.cluster_name)
        self.node_security_group_id = self.cluster.node_security_group_id

        self.system_nodes = aws.eks.NodeGroup(
            f"{name}-system",
            **name_args("aws:eks/nodeGroup:NodeGroup", f"{name}-system"),
            cluster_name=self.name,
            node_role_arn=self.node_role.arn,
            subnet_ids=list(args.private_subnet_ids),
            instance_types=[args.system_nodes.instance_type],
            ami_type=SYSTEM_AMI_TYPE,
            capacity_type="ON_DEMAND",
            disk_size=50,
            scaling_config={"min_size": args.system_nodes.min_size, "desired_size": args.system_nodes.desired_size,
                            "max_size": args.system_nodes.max_size},
            labels={NODE_ROLE_LABEL: "system"},
            update_config={"max_unavailable": 1},
            tags=tags,
            opts=pulumi.ResourceOptions(parent=self, depends_on=attachments))

        self.coredns = aws.eks.Addon(f"{name}-coredns", cluster_name=self.name, addon_name="coredns",
                                     resolve_conflicts_on_create="OVERWRITE", resolve_conflicts_on_update="OVERWRITE",
                                     tags=tags, opts=pulumi.ResourceOptions(parent=self, depends_on=[self.system_nodes]))

        # Our own provider, not pulumi-eks's: a stable cluster_identifier keeps a changed or unknown kubeconfig
        # (every PR preview of a new stack) from showing every Kubernetes object as a replacement.
        self.provider = k8s.Provider(f"{name}-k8s", kubeconfig=self.cluster.kubeconfig_json,
                                     cluster_identifier=args.cluster_name, opts=child)
        self.node_role_arn = self.node_role.arn
        self.register_outputs({"name": self.name, "nodeRoleArn": self.node_role.arn,
                               "nodeSecurityGroupId": self.node_security_group_id})
