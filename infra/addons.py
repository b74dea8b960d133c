"""What the cluster needs before a training job can run: EKS add-ons, device plugins, the training operator,
the pipeline namespace with its service accounts, and the FSx volume and claim."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import pulumi
import pulumi_aws as aws
import pulumi_kubernetes as k8s

from infra.config import AddonsConfig
from infra.gpu_nodes import EFA_PRESENT_LABEL, NODE_ROLE_LABEL, node_agent_tolerations
from infra.identity import FSX_CSI_SERVICE_ACCOUNT, WORKLOADS

# Relative to the project directory, where Pulumi runs the program: an absolute path would differ between
# machines and show as a change in every preview.
TRAINING_OPERATOR_MANIFEST = "infra/vendor/training-operator-v1.9.3.yaml"
NVIDIA_DEVICE_PLUGIN_REPO = "https://nvidia.github.io/k8s-device-plugin"
EKS_CHARTS_REPO = "https://aws.github.io/eks-charts"
FSX_CLAIM_NAME = "fsx"  # the claim every pipeline pod mounts
# Lustre ignores a volume's declared size, and a statically bound claim cannot be resized: a fixed nominal
# size keeps a larger file system from turning into a claim update the API server refuses.
FSX_NOMINAL_SIZE = "1200Gi"
DEVICE_PLUGIN_NAMESPACE = "kube-system"


def nvidia_device_plugin_values() -> dict[str, Any]:
    # Only GPU nodes, and through all of their taints: the plugin must run before the FSx agent is ready,
    # or a new node would not advertise its GPUs until then. Setting tolerations replaces the chart's
    # default list, so its CriticalAddonsOnly toleration is kept.
    return {
        "nodeSelector": {NODE_ROLE_LABEL: "gpu"},
        "tolerations": [{"key": "CriticalAddonsOnly", "operator": "Exists"}, *node_agent_tolerations()],
    }


def efa_device_plugin_values() -> dict[str, Any]:
    # Scheduled only where EFA exists: on other nodes the plugin crash-loops ("No valid EFA devices found").
    return {"nodeSelector": {EFA_PRESENT_LABEL: "true"}, "tolerations": node_agent_tolerations()}


def namespace_manifest(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "nemo-eks"}}}


def service_account_manifest(namespace: str, name: str, workload: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"app.kubernetes.io/part-of": "nemo-eks", "app.kubernetes.io/component": workload}}}


def fsx_volume_manifest(name: str, file_system_id: Any, dns_name: Any, mount_name: Any) -> dict[str, Any]:
    """A static PersistentVolume for the file system we declare (no dynamic provisioning, no storage class)."""
    return {"apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "nemo-eks"}},
            "spec": {
                "capacity": {"storage": FSX_NOMINAL_SIZE},
                "volumeMode": "Filesystem",
                "accessModes": ["ReadWriteMany"],
                "persistentVolumeReclaimPolicy": "Retain",  # deleting the claim never touches the data
                "storageClassName": "",
                "mountOptions": ["flock"],  # POSIX locks across nodes, for checkpoint writers
                "csi": {"driver": "fsx.csi.aws.com", "volumeHandle": file_system_id,
                        "volumeAttributes": {"dnsname": dns_name, "mountname": mount_name}},
            }}


def fsx_claim_manifest(namespace: str, volume_name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": FSX_CLAIM_NAME, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "nemo-eks"}},
            "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": volume_name,
                     "resources": {"requests": {"storage": FSX_NOMINAL_SIZE}}}}


@dataclass(frozen=True)
class AddonsArgs:
    config: AddonsConfig
    prefix: str
    namespace: str
    cluster_name: pulumi.Input[str]
    provider: k8s.Provider
    system_nodes: pulumi.Resource  # add-ons need somewhere to run before they report healthy
    fsx_csi_role_arn: pulumi.Input[str]
    file_system: aws.fsx.LustreFileSystem
    tags: Mapping[str, str]


class Addons(pulumi.ComponentResource):
    namespace: k8s.core.v1.Namespace
    training_operator: k8s.yaml.v2.ConfigFile
    fsx_claim: k8s.core.v1.PersistentVolumeClaim

    def __init__(self, name: str, args: AddonsArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("nemo-eks:infra:Addons", name, None, opts)
        cfg, tags = args.config, dict(args.tags)
        after_nodes = pulumi.ResourceOptions(parent=self, depends_on=[args.system_nodes])

        pod_identity_agent = aws.eks.Addon(
            f"{name}-pod-identity-agent", cluster_name=args.cluster_name, addon_name="eks-pod-identity-agent",
            addon_version=cfg.pod_identity_agent_version, resolve_conflicts_on_create="OVERWRITE",
            resolve_conflicts_on_update="OVERWRITE", tags=tags, opts=after_nodes)
        # The FSx add-on gets its credentials through Pod Identity, so the agent must be running first.
        fsx_csi = aws.eks.Addon(
            f"{name}-fsx-csi", cluster_name=args.cluster_name, addon_name="aws-fsx-csi-driver",
            addon_version=cfg.fsx_csi_driver_version, resolve_conflicts_on_create="OVERWRITE",
            resolve_conflicts_on_update="OVERWRITE",
            pod_identity_associations=[{"role_arn": args.fsx_csi_role_arn, "service_account": FSX_CSI_SERVICE_ACCOUNT[1]}],
            tags=tags, opts=pulumi.ResourceOptions(parent=self, depends_on=[args.system_nodes, pod_identity_agent]))

        k8s_opts = pulumi.ResourceOptions(parent=self, provider=args.provider, depends_on=[args.system_nodes])
        self.device_plugins = [k8s.helm.v3.Release(
            f"{name}-nvidia-device-plugin", name="nvidia-device-plugin", chart="nvidia-device-plugin",
            version=cfg.nvidia_device_plugin_version, repository_opts={"repo": NVIDIA_DEVICE_PLUGIN_REPO},
            namespace=DEVICE_PLUGIN_NAMESPACE, values=nvidia_device_plugin_values(), opts=k8s_opts), k8s.helm.v3.Release(
            f"{name}-efa-device-plugin", name="aws-efa-k8s-device-plugin", chart="aws-efa-k8s-device-plugin",
            version=cfg.efa_device_plugin_version, repository_opts={"repo": EKS_CHARTS_REPO},
            namespace=DEVICE_PLUGIN_NAMESPACE, values=efa_device_plugin_values(), opts=k8s_opts)]

        # Pinned, vendored manifests (infra/vendor/README.md): no network fetch at preview, a reviewable diff
        # on upgrade. Kubeflow ships no Helm chart for the v1 operator.
        self.training_operator = k8s.yaml.v2.ConfigFile(
            f"{name}-training-operator", file=TRAINING_OPERATOR_MANIFEST, opts=k8s_opts)

        ns = namespace_manifest(args.namespace)
        self.namespace = k8s.core.v1.Namespace(f"{name}-namespace", metadata=ns["metadata"],
                                               opts=pulumi.ResourceOptions(parent=self, provider=args.provider))
        in_namespace = pulumi.ResourceOptions(parent=self, provider=args.provider, depends_on=[self.namespace])
        self.service_accounts = {}
        for workload_name, workload in WORKLOADS.items():
            manifest = service_account_manifest(args.namespace, workload.service_account, workload_name)
            self.service_accounts[workload_name] = k8s.core.v1.ServiceAccount(
                f"{name}-sa-{workload_name}", metadata=manifest["metadata"], opts=in_namespace)

        fs = args.file_system
        volume_name = f"{args.prefix}-fsx"
        volume = fsx_volume_manifest(volume_name, fs.id, fs.dns_name, fs.mount_name)
        # Mounts go through the CSI driver: the volume is only usable once the add-on runs.
        pv = k8s.core.v1.PersistentVolume(f"{name}-fsx-volume", metadata=volume["metadata"], spec=volume["spec"],
                                          opts=pulumi.ResourceOptions(parent=self, provider=args.provider, depends_on=[fsx_csi]))
        claim = fsx_claim_manifest(args.namespace, volume_name)
        self.fsx_claim = k8s.core.v1.PersistentVolumeClaim(
            f"{name}-fsx-claim", metadata=claim["metadata"], spec=claim["spec"],
            opts=pulumi.ResourceOptions(parent=self, provider=args.provider, depends_on=[self.namespace, pv]))
        self.register_outputs({"namespace": args.namespace, "fsxClaim": FSX_CLAIM_NAME})
