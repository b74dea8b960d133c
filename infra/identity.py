"""Least-privilege IAM roles for the pipeline's pods, bound to their service accounts with EKS Pod Identity."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

import pulumi
import pulumi_aws as aws

from infra.cluster import assume_role_policy

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
            role = aws.iam.Role(f"{name}-{workload_name}", assume_role_policy=trust, tags=tags,
                                description=f"Pod Identity role of {args.namespace}/{workload.service_account}", opts=child)
            aws.iam.RolePolicy(f"{name}-{workload_name}-s3", role=role.id,
                               policy=bucket_arns.apply(lambda arns, w=workload: s3_access_policy(w, arns)), opts=child)
            self.roles[workload_name] = role
            self.associations[workload_name] = aws.eks.PodIdentityAssociation(
                f"{name}-{workload_name}-association", cluster_name=args.cluster_name, namespace=args.namespace,
                service_account=workload.service_account, role_arn=role.arn, tags=tags, opts=child)

        self.fsx_csi_role = aws.iam.Role(f"{name}-fsx-csi", assume_role_policy=trust, tags=tags,
                                         description="Pod Identity role of the FSx CSI controller", opts=child)
        aws.iam.RolePolicy(f"{name}-fsx-csi-policy", role=self.fsx_csi_role.id, policy=fsx_csi_policy(), opts=child)
        self.register_outputs({f"{k}RoleArn": r.arn for k, r in self.roles.items()})
