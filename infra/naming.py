"""AWS resource names that fit the API's length limits for every stack and group name the config accepts.

A stack name of 24 characters and a GPU group name of 20 make logical names like
``nemo-eks-<stack>-<group>-nodes`` (60 characters). Pulumi auto-names a resource from its logical name plus
``-`` and 7 random characters, and checks the result only against the maximum the provider declares, which for
some resources is not the API's (pulumi-aws provider/resources.go: ``aws_eks_node_group`` auto-names
``nodeGroupName`` with a maximum of 255, while EKS accepts 63): such a name passes ``pulumi preview`` and fails
at ``CreateNodegroup``.

``name_args`` is the one place that decides a resource's name:
- when the auto-name fits the API's limit, nothing is passed and Pulumi auto-names as it always did, so
  every stack that could already deploy keeps its names and no resource is replaced;
- otherwise a name prefix is passed: the beginning and the end of the logical name around a hash of the
  whole (two long names that differ only in the middle still differ), to which the provider appends a
  unique suffix. A prefix, not a
  fixed name, so that a replacement can still create the new resource before deleting the old one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

# Pulumi's auto-name: the logical name, "-" and 7 random hex characters (pulumi-aws provider/resources.go,
# tfbridge.AutoName(..., maxlen, "-"); the bridge's default random length is 7).
AUTONAME_SUFFIX = 8
# What the provider appends to a *_prefix argument: terraform-plugin-sdk helper/id UniqueIDSuffixLength, "an
# incrementing 26 digit value".
PREFIX_SUFFIX = 26
HASH_LENGTH = 8


@dataclass(frozen=True)
class NameLimit:
    """The name argument of a resource type, its prefix argument (None: the type has none) and the longest
    name the AWS API accepts, with where that limit is written."""

    name_arg: str
    prefix_arg: str | None
    limit: int
    source: str

    @property
    def longest_prefix(self) -> int:
        return self.limit - PREFIX_SUFFIX


# Every AWS resource type the program names (or lets Pulumi name). A type missing here fails
# tests/test_naming.py the moment it is declared.
LIMITS: Mapping[str, NameLimit] = MappingProxyType({
    "aws:eks/nodeGroup:NodeGroup": NameLimit(
        "node_group_name", "node_group_name_prefix", 63,
        "EKS API CreateNodegroup; pulumi_aws/eks/node_group.py: \"can't be longer than 63 characters\""),
    "aws:ec2/launchTemplate:LaunchTemplate": NameLimit(
        "name", "name_prefix", 128, "EC2 API CreateLaunchTemplate, LaunchTemplateName: 3-128 characters"),
    "aws:iam/role:Role": NameLimit(
        "name", "name_prefix", 64, "IAM API CreateRole, RoleName: 1-64 characters (name_prefix: 64 - 26 = 38)"),
    "aws:iam/rolePolicy:RolePolicy": NameLimit(
        "name", "name_prefix", 128, "IAM API PutRolePolicy, PolicyName: 1-128 characters"),
    "aws:ec2/securityGroup:SecurityGroup": NameLimit(
        "name", "name_prefix", 255, "EC2 API CreateSecurityGroup, GroupName: up to 255 characters"),
    "aws:ec2/placementGroup:PlacementGroup": NameLimit(
        "name", None, 255, "EC2 API CreatePlacementGroup, GroupName: up to 255 ASCII characters"),
    "aws:s3/bucket:Bucket": NameLimit(
        "bucket", "bucket_prefix", 63,
        "S3 bucket naming rules: 3-63 characters; pulumi_aws/s3/bucket.py: bucket_prefix at most 37"),
    "aws:kms/alias:Alias": NameLimit("name", "name_prefix", 256, "KMS API CreateAlias, AliasName: 1-256 characters"),
    "eks:index:Cluster": NameLimit(
        "name", None, 100, "EKS API CreateCluster; pulumi_aws/eks/cluster.py: \"between 1-100 characters\""),
})
# AWS tags: keys up to 128 characters, values up to 256 (Tagging AWS resources, "Tag naming limits and
# requirements"). FSx file systems, VPCs, subnets and the other unnamed resources are told apart by their
# Name tag.
TAG_KEY_LIMIT, TAG_VALUE_LIMIT = 128, 256


def fit(name: str, limit: int) -> str:
    """``name`` if it has at most ``limit`` characters, else its beginning (project and stack), a hash of the
    whole name and its end (group and kind): readable in the console, and unique."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:HASH_LENGTH]
    text = limit - HASH_LENGTH - 2
    head, tail = name[:(text + 1) // 2].rstrip("-_"), name[len(name) - text // 2:].lstrip("-_")
    return f"{head}-{digest}-{tail}"


def name_args(type_token: str, logical_name: str) -> dict[str, str]:
    """The name arguments for a resource of ``type_token`` declared as ``logical_name``: none while Pulumi's
    auto-name fits the API, else a prefix (or, for a type without one, a fixed name) that does."""
    spec = LIMITS[type_token]
    if len(logical_name) + AUTONAME_SUFFIX <= spec.limit:
        return {}
    if spec.prefix_arg is None:
        return {spec.name_arg: fit(logical_name, spec.limit)}
    return {spec.prefix_arg: fit(logical_name, spec.longest_prefix - 1) + "-"}


def fixed_name(type_token: str, name: str) -> str:
    """A name we must choose ourselves (a cluster, a KMS alias), cut to the API's limit."""
    return fit(name, LIMITS[type_token].limit)
