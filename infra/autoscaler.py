"""The Kubernetes Cluster Autoscaler on the system nodes: GPU node groups grow from 0 for pending pods and shrink
back to 0 when idle.

Facts about the autoscaler are from its source at the pinned release (github.com/kubernetes/autoscaler, tag
cluster-autoscaler-1.34.5, under cluster-autoscaler/) and its Helm chart (tag cluster-autoscaler-chart-9.59.0,
cluster-autoscaler/charts/cluster-autoscaler/). How it sees a managed node group at 0 nodes
(cloudprovider/aws/aws_manager.go, buildNodeFromTemplate):

- CPU, memory and GPU count come from the instance type of the group's launch template (ec2:DescribeInstanceTypes at
  start-up, aws_util.go GenerateEC2InstanceTypes; the built-in list ec2_instance_types.go of 1.34.5 lacks
  p5e.48xlarge, so that call must be allowed);
- an Auto Scaling group carrying the tags ``eks:nodegroup-name`` and ``eks:cluster-name`` (EKS sets them) is a managed
  node group: eks:DescribeNodegroup then adds its labels, its taints (only those with a value:
  aws_wrapper.go getManagedNodegroupInfo) and the ``k8s.io/cluster-autoscaler/node-template/resources/<name>`` tags
  of the node group (they override the same tags on the Auto Scaling group);
- extended resources such as ``vpc.amazonaws.com/efa`` are known only from those node-template tags;
- per-group options (``.../node-template/autoscaling-options/scaledownunneededtime``) are read from the Auto Scaling
  group's tags only (auto_scaling_groups.go regenerate -> extractAutoscalingOptionsFromTags);
- groups are found by the tag keys ``k8s.io/cluster-autoscaler/enabled`` and ``k8s.io/cluster-autoscaler/<cluster>``
  (the chart's autoDiscovery.tags default; DescribeAutoScalingGroups with tag filters, aws_wrapper.go).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pulumi
import pulumi_kubernetes as k8s

from infra.catalog import InstanceType
from infra.config import AutoscalingConfig, GpuNodeGroupConfig
from infra.gpu_nodes import FSX_AGENT_TAINT, NODE_GROUP_LABEL, NODE_ROLE_LABEL
from infra.identity import CLUSTER_AUTOSCALER_SERVICE_ACCOUNT, cluster_autoscaler_identity

CHART_REPO = "https://kubernetes.github.io/autoscaler"
CHART = "cluster-autoscaler"
NAMESPACE, SERVICE_ACCOUNT = CLUSTER_AUTOSCALER_SERVICE_ACCOUNT
METRICS_PORT = 8085  # the chart's service.servicePort and the container's port

TAG_PREFIX = "k8s.io/cluster-autoscaler"
ENABLED_TAG = f"{TAG_PREFIX}/enabled"
CLUSTER_TAG_VALUE = "owned"  # what the IAM condition on scaling actions requires (infra/identity.py)
NODE_TEMPLATE_RESOURCE_TAG = f"{TAG_PREFIX}/node-template/resources/"
SCALE_DOWN_UNNEEDED_TAG = f"{TAG_PREFIX}/node-template/autoscaling-options/scaledownunneededtime"
EFA_RESOURCE = "vpc.amazonaws.com/efa"  # what the EFA device plugin advertises and training pods request
EFA_TEMPLATE_TAG = NODE_TEMPLATE_RESOURCE_TAG + EFA_RESOURCE
# Reservation-backed groups first (capacity already paid for, and the only capacity a Capacity Block offers);
# every other group after them. The priority expander skips groups no expression matches.
RESERVED_PRIORITY, DEFAULT_PRIORITY = 20, 10


def cluster_tag(cluster_name: str) -> str:
    return f"{TAG_PREFIX}/{cluster_name}"


def node_template_tags(instance: InstanceType) -> dict[str, str]:
    """What a node of this type offers that the instance type alone does not tell the autoscaler: the EFA
    interfaces (infra/catalog.py), which every training pod requests in full."""
    return {EFA_TEMPLATE_TAG: str(instance.efa_interfaces)} if instance.efa else {}


def node_group_tags(group: GpuNodeGroupConfig) -> dict[str, str]:
    """Tags on the EKS node group, read through eks:DescribeNodegroup while the group is at 0."""
    return node_template_tags(group.instance)


def autoscaling_group_tags(group: GpuNodeGroupConfig, cluster_name: str) -> dict[str, str]:
    """Tags on the group's Auto Scaling group: discovery, the IAM condition's tag, the group's scale-down delay
    (a Go duration, as the flag takes it), and the node template again so that scale-up from 0 still works when
    eks:DescribeNodegroup fails (the autoscaler then logs the error and keeps the Auto Scaling group's tags)."""
    return {ENABLED_TAG: "true", cluster_tag(cluster_name): CLUSTER_TAG_VALUE, NODE_GROUP_LABEL: group.name,
            SCALE_DOWN_UNNEEDED_TAG: f"{group.scale_down_after_minutes}m", **node_template_tags(group.instance)}


def discovery_tags(cluster_name: str) -> list[str]:
    """Tag keys an Auto Scaling group must all carry to be scaled. EKS tags every managed node group's Auto
    Scaling group with the first two ("Nodes launched as part of a managed node group are automatically tagged for
    auto-discovery by the Kubernetes Cluster Autoscaler", EKS User Guide, managed-node-groups.html), the system
    group's too: the third, which only our GPU groups carry, keeps the autoscaler off the system group, whose
    size stays Pulumi's."""
    return [ENABLED_TAG, cluster_tag(cluster_name), NODE_GROUP_LABEL]


_RE2_SPECIAL = re.compile(r"([\\.^$|?*+()\[\]{}])")


def _re2_literal(text: str) -> str:
    """``text`` as a Go (RE2) regular expression matching exactly it."""
    return _RE2_SPECIAL.sub(r"\\\1", text)


def expander_priorities(groups: Sequence[GpuNodeGroupConfig], asg_names: Mapping[str, str]) -> str:
    """The priority expander's ConfigMap text (expander/priority/readme.md): priority -> regular expressions
    matched against Auto Scaling group names. Reservation-backed groups win; a catch-all keeps every other
    discovered group expandable."""
    reserved = sorted(asg_names[g.name] for g in groups if g.uses_reservation)
    lines = []
    if reserved:
        lines.append(f"{RESERVED_PRIORITY}:")
        lines += [f"  - ^{_re2_literal(name)}$" for name in reserved]
    lines += [f"{DEFAULT_PRIORITY}:", "  - .*"]
    return "\n".join(lines) + "\n"


def helm_values(cfg: AutoscalingConfig, cluster_name: str, region: str, priorities: Any,
                service_monitor: bool) -> dict[str, Any]:
    """Values of the cluster-autoscaler chart (values.yaml of chart 9.59.0)."""
    values: dict[str, Any] = {
        "cloudProvider": "aws",
        # AWS_REGION for the SDK: the pod never reads the region from instance metadata (hop limit 1 on GPU nodes).
        "awsRegion": region,
        # --node-group-auto-discovery=asg:tag=<the keys, comma-separated> (templates/deployment.yaml)
        "autoDiscovery": {"clusterName": cluster_name, "tags": discovery_tags(cluster_name)},
        "image": {"tag": cfg.image_tag},
        "fullnameOverride": CHART,
        # Its own service account, bound to its Pod Identity role (infra/identity.py).
        "rbac": {"serviceAccount": {"create": True, "name": SERVICE_ACCOUNT}},
        "nodeSelector": {NODE_ROLE_LABEL: "system"},
        "extraArgs": {
            # The FSx CSI node agent removes this taint once Lustre can be mounted; a template node that kept it
            # would fit no pipeline pod (they never tolerate it). flags.go: --startup-taint, taints.go.
            "startup-taint": FSX_AGENT_TAINT,
            "expander": "priority,least-waste",
            # cluster_autoscaler_node_group_target_count and _backoff_status for the dashboard (metrics.go
            # RegisterAll registers them only with this flag).
            "emit-per-nodegroup-metrics": "true",
        },
        # Read by the chart only as a string when it is one (templates/priority-expander-configmap.yaml).
        "expanderPriorities": priorities,
    }
    if service_monitor:
        # The chart's ServiceMonitor scrapes /metrics on its Service; kube-prometheus-stack picks up every
        # ServiceMonitor (infra/monitoring.py), the labels only say whose it is.
        values["serviceMonitor"] = {"enabled": True, "namespace": NAMESPACE, "interval": "30s",
                                    "selector": {"app.kubernetes.io/part-of": "nemo-eks"}}
    return values


@dataclass(frozen=True)
class ClusterAutoscalerArgs:
    config: AutoscalingConfig
    groups: Sequence[GpuNodeGroupConfig]
    cluster_name: str
    cluster: pulumi.Input[str]  # the cluster's name as an output: the role's association waits for the cluster
    region: str
    autoscaling_group_names: Mapping[str, pulumi.Input[str]]  # by GPU group name
    provider: k8s.Provider
    system_nodes: pulumi.Resource
    service_monitor: bool
    tags: Mapping[str, str]
    # The Pod Identity agent (credentials) and, with a metrics stack, its CRDs (the chart's ServiceMonitor).
    depends_on: Sequence[pulumi.Resource] = ()


class ClusterAutoscaler(pulumi.ComponentResource):
    release: k8s.helm.v3.Release

    def __init__(self, name: str, args: ClusterAutoscalerArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("nemo-eks:infra:ClusterAutoscaler", name, None, opts)
        self.role, association = cluster_autoscaler_identity(
            name, args.cluster, (cluster_tag(args.cluster_name), CLUSTER_TAG_VALUE), NODE_GROUP_LABEL, dict(args.tags),
            parent=self)
        names = pulumi.Output.all(**args.autoscaling_group_names)
        priorities = names.apply(lambda resolved: expander_priorities(args.groups, resolved))
        self.release = k8s.helm.v3.Release(
            f"{name}-release", name=CHART, chart=CHART, version=args.config.chart_version,
            repository_opts={"repo": CHART_REPO}, namespace=NAMESPACE,
            values=helm_values(args.config, args.cluster_name, args.region, priorities, args.service_monitor),
            # Without its role the pod has no AWS credentials and restarts until the association exists.
            opts=pulumi.ResourceOptions(parent=self, provider=args.provider,
                                        depends_on=[args.system_nodes, association, *args.depends_on]))
        self.register_outputs({"roleArn": self.role.arn, "chartVersion": args.config.chart_version,
                               "imageTag": args.config.image_tag})
