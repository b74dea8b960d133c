"""S3 buckets for datasets, checkpoints and models, and the FSx for Lustre file system linked to them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

import pulumi
import pulumi_aws as aws

from infra.config import StorageConfig
from infra.naming import name_args

# Kind -> whether S3 keeps old versions. Checkpoints and models are what a run produced: an overwrite or a
# delete (FSx exports deletions too) must be recoverable. Datasets are inputs that live elsewhere as well.
BUCKETS: Mapping[str, bool] = {"datasets": False, "checkpoints": True, "models": True}
LUSTRE_PORTS = ((988, 988), (1018, 1023))  # FSx Lustre guide: "inbound traffic on ports 988 and 1018-1023"
FSX_EVENTS = ["NEW", "CHANGED", "DELETED"]


def tls_only_policy(bucket_arn: str) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [{
        "Sid": "DenyInsecureTransport", "Effect": "Deny", "Principal": "*", "Action": "s3:*",
        "Resource": [bucket_arn, f"{bucket_arn}/*"],
        "Condition": {"Bool": {"aws:SecureTransport": "false"}},
    }]})


def lifecycle_rules(versioned: bool, config: StorageConfig) -> list[dict[str, Any]]:
    rules = [{"id": "abort-incomplete-uploads", "status": "Enabled", "filter": {},
              "abort_incomplete_multipart_upload": {"days_after_initiation": config.abort_incomplete_upload_days}}]
    if versioned:
        rules.append({"id": "expire-old-versions", "status": "Enabled", "filter": {},
                      "noncurrent_version_expiration": {"noncurrent_days": config.noncurrent_version_days}})
    return rules


def metadata_configuration(config: StorageConfig) -> dict[str, Any]:
    """pulumi-aws LustreFileSystemMetadataConfigurationArgs: mode, and iops for USER_PROVISIONED only."""
    if config.fsx_metadata_mode == "USER_PROVISIONED":
        return {"mode": "USER_PROVISIONED", "iops": config.fsx_metadata_iops}
    return {"mode": config.fsx_metadata_mode}


@dataclass(frozen=True)
class StorageArgs:
    config: StorageConfig
    prefix: str
    vpc_id: pulumi.Input[str]
    subnet_id: pulumi.Input[str]  # private subnet of the file system's zone
    client_security_group_id: pulumi.Input[str]  # the nodes that mount the file system
    tags: Mapping[str, str]


class Storage(pulumi.ComponentResource):
    buckets: dict[str, aws.s3.Bucket]
    file_system: aws.fsx.LustreFileSystem

    def __init__(self, name: str, args: StorageArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("nemo-eks:infra:Storage", name, None, opts)
        cfg, tags = args.config, dict(args.tags)
        child = pulumi.ResourceOptions(parent=self)
        # Stateful resources: protected against `pulumi destroy` and kept in AWS if removed from the program.
        stateful = pulumi.ResourceOptions(parent=self, protect=cfg.protect, retain_on_delete=cfg.protect)

        self.buckets = {}
        for kind, versioned in BUCKETS.items():
            bucket = aws.s3.Bucket(f"{name}-{kind}", **name_args("aws:s3/bucket:Bucket", f"{name}-{kind}"),
                                   force_destroy=not cfg.protect, tags={**tags, "nemo-eks/data": kind}, opts=stateful)
            self.buckets[kind] = bucket
            aws.s3.BucketOwnershipControls(f"{name}-{kind}-ownership", bucket=bucket.id,
                                           rule={"object_ownership": "BucketOwnerEnforced"}, opts=child)
            block = aws.s3.BucketPublicAccessBlock(f"{name}-{kind}-public-access", bucket=bucket.id, block_public_acls=True,
                                                   block_public_policy=True, ignore_public_acls=True,
                                                   restrict_public_buckets=True, opts=child)
            aws.s3.BucketServerSideEncryptionConfiguration(f"{name}-{kind}-encryption", bucket=bucket.id, rules=[{
                "apply_server_side_encryption_by_default": {"sse_algorithm": "AES256"},
                "bucket_key_enabled": True}], opts=child)
            # The policy waits for the public access block: S3 evaluates a new policy against the block.
            aws.s3.BucketPolicy(f"{name}-{kind}-policy", bucket=bucket.id, policy=bucket.arn.apply(tls_only_policy),
                                opts=pulumi.ResourceOptions(parent=self, depends_on=[block]))
            lifecycle_deps = []
            if versioned:
                lifecycle_deps.append(aws.s3.BucketVersioning(
                    f"{name}-{kind}-versioning", bucket=bucket.id, versioning_configuration={"status": "Enabled"}, opts=child))
            aws.s3.BucketLifecycleConfiguration(f"{name}-{kind}-lifecycle", bucket=bucket.id, rules=lifecycle_rules(versioned, cfg),
                                                opts=pulumi.ResourceOptions(parent=self, depends_on=lifecycle_deps))

        self.security_group = aws.ec2.SecurityGroup(
            f"{name}-fsx", **name_args("aws:ec2/securityGroup:SecurityGroup", f"{name}-fsx"), vpc_id=args.vpc_id,
            description="FSx for Lustre: Lustre from the nodes and between file servers", tags={**tags, "Name": f"{name}-fsx"}, opts=child)
        # The rules are checked when the file system is created and cannot fix it afterwards: the file system
        # waits for all of them.
        rules: list[pulumi.Resource] = []
        for from_port, to_port in LUSTRE_PORTS:
            for source, label in ((args.client_security_group_id, "nodes"), (self.security_group.id, "self")):
                rules.append(aws.vpc.SecurityGroupIngressRule(
                    f"{name}-fsx-{from_port}-{label}", security_group_id=self.security_group.id,
                    referenced_security_group_id=source, ip_protocol="tcp", from_port=from_port, to_port=to_port,
                    description=f"Lustre {from_port}-{to_port} from {label}", opts=child))
        rules.append(aws.vpc.SecurityGroupEgressRule(
            f"{name}-fsx-out", security_group_id=self.security_group.id, cidr_ipv4="0.0.0.0/0", ip_protocol="-1",
            description="File servers to each other and to S3", opts=child))
        # Lustre is two-way: the file servers also open connections to the clients on the same ports, so the
        # nodes' security group must accept them from the file system's (FSx Lustre guide, "File system
        # access control with Amazon VPC", client rules).
        for from_port, to_port in LUSTRE_PORTS:
            rules.append(aws.vpc.SecurityGroupIngressRule(
                f"{name}-nodes-{from_port}-from-fsx", security_group_id=args.client_security_group_id,
                referenced_security_group_id=self.security_group.id, ip_protocol="tcp", from_port=from_port,
                to_port=to_port, description=f"Lustre {from_port}-{to_port} from FSx", opts=child))

        self.file_system = aws.fsx.LustreFileSystem(
            f"{name}-lustre",
            deployment_type="PERSISTENT_2",
            storage_type="SSD",
            storage_capacity=cfg.fsx_storage_capacity_gib,
            per_unit_storage_throughput=cfg.fsx_throughput_per_tib,
            subnet_ids=args.subnet_id,
            security_group_ids=[self.security_group.id],
            data_compression_type="LZ4",
            # Only at creation: a PERSISTENT_2 file system made without a metadata configuration can never raise
            # its metadata performance (FSx Lustre guide, "Managing metadata performance").
            metadata_configuration=metadata_configuration(cfg),
            file_system_type_version="2.15",
            # The durable copy is S3 through the repository associations; FSx backups would duplicate it.
            automatic_backup_retention_days=0,
            tags={**tags, "Name": f"{name}-lustre"},
            opts=pulumi.ResourceOptions(parent=self, protect=cfg.protect, retain_on_delete=cfg.protect, depends_on=rules))

        # Each bucket appears as a directory of the file system; new and changed objects flow both ways.
        # FSx fails associations created in parallel ("does not have the required permissions for the S3
        # bucket", terraform-provider-aws#24678), so each waits for the one before; the metadata import of a
        # large bucket can outlast the default 10 minutes.
        self.associations = {}
        previous: list[pulumi.Resource] = []
        for kind, bucket in self.buckets.items():
            self.associations[kind] = aws.fsx.DataRepositoryAssociation(
                f"{name}-{kind}-link",
                file_system_id=self.file_system.id,
                file_system_path=f"/{kind}",
                data_repository_path=bucket.bucket.apply(lambda b: f"s3://{b}"),
                batch_import_meta_data_on_create=True,
                delete_data_in_filesystem=False,
                s3={"auto_import_policy": {"events": FSX_EVENTS}, "auto_export_policy": {"events": FSX_EVENTS}},
                tags=tags,
                opts=pulumi.ResourceOptions(parent=self, depends_on=previous,
                                            custom_timeouts=pulumi.CustomTimeouts(create="60m", delete="60m")))
            previous = [self.associations[kind]]
        self.register_outputs({
            "buckets": {kind: b.bucket for kind, b in self.buckets.items()},
            "fileSystemId": self.file_system.id,
        })
