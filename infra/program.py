"""The whole stack: config -> network -> cluster -> GPU nodes, storage, identity -> add-ons -> pipeline ->
exports."""

from __future__ import annotations

from typing import Any

import pulumi

from infra import autoscaler
from infra.addons import FSX_CLAIM_NAME, Addons, AddonsArgs
from infra.cluster import Cluster, ClusterArgs
from infra.config import StackConfig
from infra.gpu_nodes import GpuNodeGroup, GpuNodeGroupArgs
from infra.identity import IdentityArgs, WorkloadIdentity
from infra.network import Network, NetworkArgs
from infra.storage import Storage, StorageArgs


def build(cfg: StackConfig) -> dict[str, Any]:
    """Declare every resource of the stack and return its outputs. ``cfg`` is already validated: nothing here
    can fail on a config value, so a bad config never half-deploys."""
    prefix, tags = cfg.prefix, cfg.tags
    network = Network(f"{prefix}-network", NetworkArgs(cfg.network, prefix, cluster_name=prefix, region=cfg.region, tags=tags))
    cluster = Cluster(f"{prefix}-cluster", ClusterArgs(
        cfg.cluster, cfg.system_nodes, cluster_name=prefix, vpc_id=network.vpc_id,
        private_subnet_ids=list(network.private_subnet_ids.values()),
        public_subnet_ids=list(network.public_subnet_ids.values()), tags=tags))

    autoscaled = cfg.autoscaling.enabled
    gpu_groups = [
        GpuNodeGroup(f"{prefix}-{group.name}", GpuNodeGroupArgs(
            group, prefix, cluster_name=cluster.name, cluster_security_group_id=cluster.node_security_group_id,
            node_role_arn=cluster.node_role_arn, vpc_id=network.vpc_id,
            subnet_id=network.private_subnet_ids[group.availability_zone], tags=tags,
            # A node must find the CNI and kube-proxy (children of the cluster) and the node role's policies.
            depends_on=[cluster],
            autoscaled=autoscaled,
            node_group_tags=autoscaler.node_group_tags(group) if autoscaled else {},
            autoscaling_group_tags=autoscaler.autoscaling_group_tags(group, prefix) if autoscaled else {}))
        for group in cfg.gpu_node_groups
    ]

    storage = Storage(f"{prefix}-storage", StorageArgs(
        cfg.storage, prefix, vpc_id=network.vpc_id, subnet_id=network.private_subnet_ids[cfg.storage.fsx_availability_zone],
        client_security_group_id=cluster.node_security_group_id, tags=tags))
    identity = WorkloadIdentity(f"{prefix}-identity", IdentityArgs(
        cluster_name=cluster.name, namespace=cfg.namespace,
        bucket_arns={kind: bucket.arn for kind, bucket in storage.buckets.items()}, tags=tags))
    addons = Addons(f"{prefix}-addons", AddonsArgs(
        cfg.addons, prefix, cfg.namespace, cluster_name=cluster.name, provider=cluster.provider,
        system_nodes=cluster.system_nodes, fsx_csi_role_arn=identity.fsx_csi_role.arn,
        file_system=storage.file_system, tags=tags))

    runs_on = ci_runners(cfg, cluster, network)

    monitoring_ready: list[pulumi.Resource] = []
    if cfg.pipeline.monitoring.enabled:
        from infra.monitoring import Monitoring, MonitoringArgs

        monitoring = Monitoring(f"{prefix}-monitoring", MonitoringArgs(
            cfg.pipeline.monitoring, provider=cluster.provider, system_nodes=cluster.system_nodes,
            device_plugins=addons.device_plugins))
        monitoring_ready = monitoring.crds_ready

    if autoscaled:
        autoscaler.ClusterAutoscaler(f"{prefix}-autoscaler", autoscaler.ClusterAutoscalerArgs(
            cfg.autoscaling, cfg.gpu_node_groups, cluster_name=prefix, cluster=cluster.name, region=cfg.region,
            autoscaling_group_names={g.name: c.autoscaling_group_name for g, c in zip(cfg.gpu_node_groups, gpu_groups)},
            provider=cluster.provider, system_nodes=cluster.system_nodes,
            service_monitor=cfg.pipeline.monitoring.enabled, tags=tags,
            # Credentials come through the Pod Identity agent (an add-on); the chart's ServiceMonitor needs the
            # prometheus-operator CRDs when this stack installs them.
            depends_on=[addons, *monitoring_ready]))
    training_image = None
    if cfg.pipeline.efa.built_image_tag:
        from infra.registry import TrainingImageRegistry, TrainingImageRegistryArgs

        # Multi-node training needs NCCL over EFA, which the stock NeMo image cannot load: the stack keeps its own
        # image, built by .github/workflows/training-image.yml or `make image`.
        registry = TrainingImageRegistry(f"{prefix}-training-image", TrainingImageRegistryArgs(
            prefix, cfg.pipeline.efa.built_image_tag, protect=cfg.storage.protect, tags=tags))
        training_image = registry.image

    outputs: dict[str, Any] = {}
    if cfg.pipeline.enabled:
        from workloads import runconfig
        from workloads.pipeline import Pipeline, PipelineArgs

        node_groups = {group.name: component.node_group for group, component in zip(cfg.gpu_node_groups, gpu_groups)}
        Pipeline(f"{prefix}-pipeline", PipelineArgs(
            cfg, provider=cluster.provider, namespace=addons.namespace,
            service_accounts=list(addons.service_accounts.values()), fsx_claim=addons.fsx_claim,
            training_operator=addons.training_operator, device_plugins=addons.device_plugins,
            training_nodes=node_groups[cfg.training_node_group], serving_nodes=node_groups[cfg.serving_node_group],
            monitoring_ready=monitoring_ready, training_image=training_image))
        outputs = {"runId": runconfig.run_id(cfg), "servingId": runconfig.serving_id(cfg)}
    if training_image is not None:
        outputs["trainingImage"] = training_image

    return {
        **outputs,
        "clusterName": cluster.name,
        "kubeconfig": pulumi.Output.secret(cluster.cluster.kubeconfig_json),
        "vpcId": network.vpc_id,
        "gpuNodeGroups": {group.name: ng.node_group.node_group_name for group, ng in zip(cfg.gpu_node_groups, gpu_groups)},
        "buckets": {kind: bucket.bucket for kind, bucket in storage.buckets.items()},
        "fsxFileSystemId": storage.file_system.id,
        "namespace": cfg.namespace,
        "fsxClaim": FSX_CLAIM_NAME,
        "workloadRoleArns": {name: role.arn for name, role in identity.roles.items()},
        "sizing": sizing_summary(cfg),
        **({"ciRunsOn": runs_on} if runs_on else {}),
    }


def ci_runners(cfg: StackConfig, cluster: Cluster, network: Network) -> dict[str, str] | None:
    """The in-cluster CI runners, when the stack has them: the `runs-on` label of each purpose."""
    if cfg.ci_runners is None or not cfg.ci_runners.enabled:
        return None
    from infra.runners import CiRunners, CiRunnersArgs, scale_sets

    CiRunners(f"{cfg.prefix}-ci", CiRunnersArgs(
        cfg.ci_runners, cfg.prefix, cluster_name=cluster.name, node_role_arn=cluster.node_role_arn,
        subnet_ids=list(network.private_subnet_ids.values()), provider=cluster.provider, tags=cfg.tags,
        # Like the GPU groups: a node must find the CNI and kube-proxy (children of the cluster).
        depends_on=[cluster]))
    return {s.purpose: s.name for s in scale_sets(cfg.prefix)}


def sizing_summary(cfg: StackConfig) -> dict[str, Any]:
    """The plan's shape as stack outputs: what `pulumi stack output sizing` shows an operator."""
    plan, par, serving = cfg.sizing, cfg.sizing.parallelism, cfg.sizing.serving
    return {
        "model": plan.model.display, "hfModelId": cfg.hf_model_id, "method": plan.request.method,
        "precision": plan.request.precision,
        "training": {"nodeGroup": cfg.training_node_group, "instanceType": plan.request.instance.name,
                     "nodes": par.nodes, "gpus": par.gpus, "tp": par.tp, "pp": par.pp, "cp": par.cp, "dp": par.dp,
                     "recompute": par.recompute, "tokensPerSecPerGpu": round(plan.tokens_per_sec_per_gpu)},
        "serving": {"nodeGroup": cfg.serving_node_group, "tp": serving.tp, "pp": serving.pp,
                    "worldSize": serving.world_size, "precision": serving.precision,
                    "maxBatchSize": serving.max_batch_size, "maxSeqLength": serving.max_seq_length},
    }
