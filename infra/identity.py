"""Least-privilege IAM roles for the pipeline's pods, bound to their service accounts with EKS Pod Identity."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pulumi
import pulumi_aws as aws

from infra.cluster import assume_role_policy
from infra.naming import name_args

POD_IDENTITY_PRINCIPAL = "pods.eks.amazonaws.com"
POD_IDENTITY_ACTIONS = ("sts:AssumeRole", "sts:TagSession")

READ_ACTIONS = ("s3:GetObject", "s3:GetObjectVersion")
WRITE_ACTIONS = ("s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts")
LIST_ACTIONS = ("s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads")


@dataclass(frozen=True)
class Workload:
    service_account: str
    reads: tuple[str, ...]  # bucket kinds (see infra.storage.BUCKETS)
    writes: tuple[str, ...]


# Who may touch which bucket. Each stage reads its input and writes only its own output.
WORKLOADS: Mapping[str, Workload] = {
    "training": Workload("nemo-training", reads=("datasets", "checkpoints"), writes=("checkpoints",)),
    "conversion": Workload("nemo-conversion", reads=("checkpoints", "models"), writes=("models",)),
    "serving": Workload("nemo-serving", reads=("models",), writes=()),
}
FSX_CSI_SERVICE_ACCOUNT = ("kube-system", "fsx-csi-controller-sa")


def s3_access_policy(workload: Workload, bucket_arns: Mapping[str, str]) -> str:
    """An IAM policy with exactly the object actions the workload needs on exactly its buckets."""
    buckets = sorted(set(workload.reads) | set(workload.writes))
    statements: list[dict[str, Any]] = [
        {"Sid": "ListBuckets", "Effect": "Allow", "Action": list(LIST_ACTIONS),
         "Resource": [bucket_arns[kind] for kind in buckets]},
        {"Sid": "ReadObjects", "Effect": "Allow", "Action": list(READ_ACTIONS),
         "Resource": [f"{bucket_arns[kind]}/*" for kind in workload.reads]},
    ]
    if workload.writes:
        statements.append({"Sid": "WriteObjects", "Effect": "Allow", "Action": list(WRITE_ACTIONS),
                           "Resource": [f"{bucket_arns[kind]}/*" for kind in workload.writes]})
    return json.dumps({"Version": "2012-10-17", "Statement": statements})


def fsx_csi_policy() -> str:
    """The CSI controller only mounts the file system we declare (static provisioning). It needs to describe
    file systems, and nothing that creates or deletes them."""
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "DescribeFileSystems", "Effect": "Allow", "Action": ["fsx:DescribeFileSystems"], "Resource": "*"}]})


@dataclass(frozen=True)
class IdentityArgs:
    cluster_name: pulumi.Input[str]
    namespace: str
    bucket_arns: Mapping[str, pulumi.Input[str]]
    tags: Mapping[str, str]


class WorkloadIdentity(pulumi.ComponentResource):
    roles: dict[str, aws.iam.Role]
    fsx_csi_role: aws.iam.Role

    def __init__(self, name: str, args: IdentityArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("nemo-eks:infra:WorkloadIdentity", name, None, opts)
        tags = dict(args.tags)
        child = pulumi.ResourceOptions(parent=self)
        trust = assume_role_policy(POD_IDENTITY_PRINCIPAL, POD_IDENTITY_ACTIONS)
        bucket_arns = pulumi.Output.all(**args.bucket_arns)

        self.roles, self.associations = {}, {}
        for workload_name, workload in WORKLOADS.items():
            role_name = f"{name}-{workload_name}"
            role = aws.iam.Role(role_name, **name_args("aws:iam/role:Role", role_name), assume_role_policy=trust, tags=tags,
                                description=f"Pod Identity role of {args.namespace}/{workload.service_account}", opts=child)
            aws.iam.RolePolicy(f"{role_name}-s3", **name_args("aws:iam/rolePolicy:RolePolicy", f"{role_name}-s3"),
                               role=role.id, policy=bucket_arns.apply(lambda arns, w=workload: s3_access_policy(w, arns)), opts=child)
            self.roles[workload_name] = role
            self.associations[workload_name] = aws.eks.PodIdentityAssociation(
                f"{name}-{workload_name}-association", cluster_name=args.cluster_name, namespace=args.namespace,
                service_account=workload.service_account, role_arn=role.arn, tags=tags, opts=child)

        self.fsx_csi_role = aws.iam.Role(f"{name}-fsx-csi", **name_args("aws:iam/role:Role", f"{name}-fsx-csi"),
                                         assume_role_policy=trust, tags=tags,
                                         description="Pod Identity role of the FSx CSI controller", opts=child)
        aws.iam.RolePolicy(f"{name}-fsx-csi-policy", **name_args("aws:iam/rolePolicy:RolePolicy", f"{name}-fsx-csi-policy"),
                           role=self.fsx_csi_role.id, policy=fsx_csi_policy(), opts=child)
        self.register_outputs({f"{k}RoleArn": r.arn for k, r in self.roles.items()})


# --------------------------------------------------------------------------------------------------
# The Cluster Autoscaler's role

CLUSTER_AUTOSCALER_SERVICE_ACCOUNT = ("kube-system", "cluster-autoscaler")
# Every call the autoscaler's AWS provider makes for our groups (github.com/kubernetes/autoscaler, tag
# cluster-autoscaler-1.34.5, cluster-autoscaler/cloudprovider/aws/): discovery by tag filters (aws_wrapper.go
# getAutoscalingGroupsByTags), failed launches that put a group in back-off (auto_scaling_groups.go
# isNodeGroupAvailable), the instance-type list at start-up (aws_util.go GenerateEC2InstanceTypes), the launch
# template's instance type (aws_wrapper.go getLaunchTemplateData) and a managed group's labels, taints and tags at 0
# nodes (aws_wrapper.go getManagedNodegroupInfo). Left out from the README's "full features" policy:
# DescribeLaunchConfigurations (launch configurations; managed groups use launch templates), DescribeImages and
# GetInstanceTypesFromInstanceRequirements (attribute-based instance types), which our groups never use.
CLUSTER_AUTOSCALER_DESCRIBE_ACTIONS = (
    "autoscaling:DescribeAutoScalingGroups",
    "autoscaling:DescribeScalingActivities",
    "ec2:DescribeInstanceTypes",
    "ec2:DescribeLaunchTemplateVersions",
    "eks:DescribeNodegroup",
)
CLUSTER_AUTOSCALER_SCALE_ACTIONS = ("autoscaling:SetDesiredCapacity", "autoscaling:TerminateInstanceInAutoScalingGroup")


def cluster_autoscaler_policy(cluster_tag: tuple[str, str], group_tag_key: str) -> str:
    """Describe calls on anything (they change nothing and take no resource ARN we could know before deploy);
    changing a group's size only where the Auto Scaling group carries this cluster's autoscaler tag
    (``cluster_tag``: key, value) and the GPU-group tag ``group_tag_key`` with any value, both put there by
    infra/autoscaler.py. Condition key autoscaling:ResourceTag/<key> (Amazon EC2 Auto Scaling User Guide, "Tags for
    security": https://docs.aws.amazon.com/autoscaling/ec2/userguide/tag-security.html); a condition on a key the
    resource lacks is false (IAM User Guide, "Condition operators")."""
    key, value = cluster_tag
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "Describe", "Effect": "Allow", "Action": list(CLUSTER_AUTOSCALER_DESCRIBE_ACTIONS), "Resource": "*"},
        {"Sid": "ScaleThisClustersGpuGroups", "Effect": "Allow", "Action": list(CLUSTER_AUTOSCALER_SCALE_ACTIONS),
         "Resource": "*", "Condition": {"StringEquals": {f"autoscaling:ResourceTag/{key}": value},
                                        "StringLike": {f"autoscaling:ResourceTag/{group_tag_key}": "*"}}},
    ]})


def cluster_autoscaler_identity(name: str, cluster: pulumi.Input[str], cluster_tag: tuple[str, str],
                                group_tag_key: str, tags: Mapping[str, str], parent: pulumi.Resource) -> tuple[aws.iam.Role, aws.eks.PodIdentityAssociation]:
    """The autoscaler's own Pod Identity role and its association with the chart's service account. The image's
    AWS SDK (aws-sdk-go 1.48.7, vendored in cloudprovider/aws/aws-sdk-go at cluster-autoscaler-1.34.5) reads the
    Pod Identity agent's credentials (AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE, aws/defaults/defaults.go)."""
    child = pulumi.ResourceOptions(parent=parent)
    namespace, service_account = CLUSTER_AUTOSCALER_SERVICE_ACCOUNT
    role = aws.iam.Role(f"{name}-role", assume_role_policy=assume_role_policy(POD_IDENTITY_PRINCIPAL, POD_IDENTITY_ACTIONS),
                        description=f"Pod Identity role of {namespace}/{service_account}", tags=dict(tags), opts=child)
    aws.iam.RolePolicy(f"{name}-policy", role=role.id, policy=cluster_autoscaler_policy(cluster_tag, group_tag_key), opts=child)
    association = aws.eks.PodIdentityAssociation(
        f"{name}-association", cluster_name=cluster, namespace=namespace, service_account=service_account,
        role_arn=role.arn, tags=dict(tags), opts=child)
    return role, association


# ------------------------------------------------------------------------------------------------------------
# CI runners: two roles, never one for both. Previews read; ups change the stack's resources.

# AWS managed policy: read access to every service's configuration, which `pulumi preview --refresh` reads.
READ_ONLY_ACCESS = "arn:aws:iam::aws:policy/ReadOnlyAccess"
# EKS access policies (docs.aws.amazon.com/eks/latest/userguide/access-policy-permissions.html): View reads most
# objects but not Secrets; ClusterAdmin is what `pulumi up` of the whole stack needs.
EKS_VIEW_POLICY = "arn:aws:eks::aws:cluster-access-policy/AmazonEKSViewPolicy"
EKS_CLUSTER_ADMIN_POLICY = "arn:aws:eks::aws:cluster-access-policy/AmazonEKSClusterAdminPolicy"
# Data and credentials that ReadOnlyAccess would also let a preview read: a pull request's code runs with this
# role, so it must not read training data, models or other secrets of the account.
PREVIEW_DENIED_READS = ("s3:GetObject", "s3:GetObjectVersion", "secretsmanager:GetSecretValue", "ssm:GetParameter",
                        "ssm:GetParameters", "ssm:GetParametersByPath", "kms:Decrypt", "dynamodb:GetItem",
                        "dynamodb:Query", "dynamodb:Scan")
# Services whose resources the stack declares (infra/*.py, pulumi-eks). Their resource ARNs carry random ids,
# so these cannot be narrowed by name.
DEPLOY_SERVICES = ("ec2:*", "eks:*", "fsx:*", "kms:*", "logs:*", "elasticloadbalancing:*", "autoscaling:*",
                   "ssm:GetParameter", "ssm:GetParameters", "sts:GetCallerIdentity", "servicequotas:Get*",
                   "servicequotas:List*")
DEPLOY_DENIED = ("iam:CreateUser", "iam:CreateAccessKey", "iam:CreateLoginProfile", "iam:UpdateLoginProfile",
                 "organizations:*", "account:*")


def ci_preview_policy() -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "NoDataReads", "Effect": "Deny", "Action": list(PREVIEW_DENIED_READS), "Resource": "*"}]})


def ci_deploy_policy(prefix: str, own_role_arn: str) -> str:
    """What `pulumi up` of one stack needs, narrowed where names allow: IAM and S3 only on the stack's own
    resources (every name starts with the stack prefix). It is still a broad infrastructure role."""
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "StackServices", "Effect": "Allow", "Action": list(DEPLOY_SERVICES), "Resource": "*"},
        {"Sid": "StackRoles", "Effect": "Allow", "Action": "iam:*",
         "Resource": [f"arn:aws:iam::*:role/{prefix}-*", f"arn:aws:iam::*:instance-profile/{prefix}-*",
                      f"arn:aws:iam::*:policy/{prefix}-*"]},
        {"Sid": "ReadIam", "Effect": "Allow", "Action": ["iam:Get*", "iam:List*", "iam:CreateServiceLinkedRole"],
         "Resource": "*"},
        {"Sid": "StackBuckets", "Effect": "Allow", "Action": "s3:*",
         "Resource": [f"arn:aws:s3:::{prefix}-*", f"arn:aws:s3:::{prefix}-*/*"]},
        {"Sid": "ListBuckets", "Effect": "Allow", "Action": "s3:ListAllMyBuckets", "Resource": "*"},
        {"Sid": "NoNewCredentials", "Effect": "Deny", "Action": list(DEPLOY_DENIED), "Resource": "*"},
        # A CI run must not widen its own permissions: the deploy role changes only from a workstation.
        {"Sid": "NotItself", "Effect": "Deny", "NotAction": ["iam:Get*", "iam:List*"], "Resource": own_role_arn},
    ]})


@dataclass(frozen=True)
class CiRunnerIdentity:
    purpose: str  # preview or deploy
    namespace: str
    service_account: str


def ci_runner_roles(name: str, prefix: str, cluster_name: pulumi.Input[str], runners: Sequence[CiRunnerIdentity],
                    tags: Mapping[str, str], parent: pulumi.Resource) -> dict[str, aws.iam.Role]:
    """One Pod Identity role per scale set, with the EKS access it needs to reach the API."""
    child = pulumi.ResourceOptions(parent=parent)
    trust = assume_role_policy(POD_IDENTITY_PRINCIPAL, POD_IDENTITY_ACTIONS)
    roles: dict[str, aws.iam.Role] = {}
    for runner in runners:
        role_name = f"{name}-{runner.purpose}"
        role = aws.iam.Role(role_name, assume_role_policy=trust, tags=dict(tags),
                            description=f"CI {runner.purpose} runners: {runner.namespace}/{runner.service_account}",
                            opts=child)
        if runner.purpose == "deploy":
            aws.iam.RolePolicy(f"{role_name}-policy", role=role.id,
                               policy=role.arn.apply(lambda arn: ci_deploy_policy(prefix, arn)), opts=child)
            access_policy = EKS_CLUSTER_ADMIN_POLICY
        else:
            aws.iam.RolePolicyAttachment(f"{role_name}-read-only", role=role.name, policy_arn=READ_ONLY_ACCESS, opts=child)
            aws.iam.RolePolicy(f"{role_name}-no-data", role=role.id, policy=ci_preview_policy(), opts=child)
            access_policy = EKS_VIEW_POLICY
        entry = aws.eks.AccessEntry(f"{role_name}-access", cluster_name=cluster_name, principal_arn=role.arn,
                                    tags=dict(tags), opts=child)
        aws.eks.AccessPolicyAssociation(
            f"{role_name}-access-policy", cluster_name=cluster_name, principal_arn=role.arn, policy_arn=access_policy,
            access_scope={"type": "cluster"}, opts=pulumi.ResourceOptions(parent=parent, depends_on=[entry]))
        aws.eks.PodIdentityAssociation(f"{role_name}-association", cluster_name=cluster_name,
                                       namespace=runner.namespace, service_account=runner.service_account,
                                       role_arn=role.arn, tags=dict(tags), opts=child)
        roles[runner.purpose] = role
    return roles
