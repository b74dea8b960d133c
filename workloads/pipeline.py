"""The pipeline on Kubernetes: training PyTorchJob -> evaluation Job -> conversion Job -> Triton, with their
ConfigMaps and secrets and the gatekeeper that releases each stage's gated pods, declared in dependency order. The builders in training.py, evaluation.py,
conversion.py and serving.py make the manifests; this component only declares them."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pulumi
import pulumi_kubernetes as k8s

from infra import catalog
from infra.config import StackConfig
from infra.identity import WORKLOADS
from workloads import (conversion, evaluation, fabric, gatekeeper, network_policy, observability, pods, runconfig,
                       serving, training)

ENTRYPOINTS = Path(__file__).parent / "entrypoints"
NETWORK_POLICY = "network_policy:"  # role prefix of the namespace's NetworkPolicies in manifests()


def entrypoint_files() -> dict[str, str]:
    """Every module the pods run, as ConfigMap data: the stock NGC images need no custom build."""
    return {path.name: path.read_text() for path in sorted(ENTRYPOINTS.glob("*.py")) if path.name != "__init__.py"}


def configmap_manifest(name: str, namespace: str, data: Mapping[str, str], component: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace, "labels": pods.labels(component)}, "data": dict(data)}


def docker_config_json(api_key: str) -> str:
    """nvcr.io credentials in the format of a kubernetes.io/dockerconfigjson Secret (user $oauthtoken)."""
    auth = base64.b64encode(f"$oauthtoken:{api_key}".encode()).decode()
    return json.dumps({"auths": {"nvcr.io": {"username": "$oauthtoken", "password": api_key, "auth": auth}}})


@dataclass(frozen=True)
class Names:
    """Kubernetes names of one run; each carries the id of what determines its content."""

    training_job: str
    training_configmap: str
    evaluation_job: str
    evaluation_configmap: str
    conversion_job: str
    serving_configmap: str
    deployment: str = "triton"


def names(cfg: StackConfig) -> Names:
    run = runconfig.run_id(cfg)
    serving_hash = runconfig.serving_id(cfg).rsplit("-", 1)[1]
    eval_hash = runconfig.eval_id(cfg).rsplit("-", 1)[1]
    return Names(training_job=f"train-{run}", training_configmap=f"train-{run}",
                 evaluation_job=f"eval-{run}-{eval_hash}", evaluation_configmap=f"eval-{run}-{eval_hash}",
                 conversion_job=f"convert-{run}-{serving_hash}", serving_configmap=f"serve-{run}-{serving_hash}")


def manifests(cfg: StackConfig, training_image: Any = None) -> dict[str, dict[str, Any]]:
    """Every pipeline manifest of the stack, by role (without the secrets, whose data only Pulumi holds).
    ``training_image``: the reference of the stack's own EFA training image, when it builds one."""
    n, paths = names(cfg), runconfig.run_paths(cfg)
    plan, pipeline, ns = cfg.sizing, cfg.pipeline, cfg.namespace
    training_instance = plan.request.instance
    serving_instance = catalog.get(plan.serving.instance_type)
    wait_seconds = pipeline.timeout_minutes * 60
    run = runconfig.run_id(cfg)
    build_gpus = plan.serving.world_size if pipeline.serving_backend == "engine" else 0
    faults = pipeline.fault_tolerance
    training_spec = training.TrainingSpec(
        name=n.training_job, namespace=ns, run_id=run, image=fabric.training_image(cfg, training_image),
        instance=training_instance,
        nodes=plan.parallelism.nodes, node_group=cfg.training_node_group,
        service_account=WORKLOADS["training"].service_account, run_configmap=n.training_configmap,
        prepared_marker=str(paths.prepared_marker),
        ngc_pull_secret=pipeline.ngc_api_key is not None, hf_token=pipeline.hf_token is not None,
        await_completion=pipeline.wait_for_completion, worker_restarts=faults.worker_restarts,
        pod_restarts=faults.pod_restarts, nccl_timeout_seconds=faults.nccl_timeout_seconds,
        rendezvous_timeout_seconds=faults.rendezvous_timeout_seconds,
        efa=fabric.preflight(cfg, paths, run))
    evaluate = pipeline.evaluation.enabled
    # Conversion waits for the evaluation's verdict when there is one, else for training; and fails with it.
    upstream_marker = paths.evaluation_marker if evaluate else paths.training_marker
    upstream = f"Job/{n.evaluation_job}" if evaluate else f"PyTorchJob/{n.training_job}"
    conversion_spec = conversion.ConversionSpec(
        name=n.conversion_job, namespace=ns, run_id=run, serving_id=paths.serving_id,
        nemo_image=pipeline.nemo_image, triton_image=pipeline.triton_image, instance=serving_instance,
        gpus=build_gpus, model_params=plan.model.params, node_group=cfg.serving_node_group,
        service_account=WORKLOADS["conversion"].service_account, run_configmap=n.serving_configmap,
        upstream_marker=str(upstream_marker), upstream=upstream,
        ngc_pull_secret=pipeline.ngc_api_key is not None, await_completion=pipeline.wait_for_completion)
    serving_spec = serving.ServingSpec(
        name=n.deployment, namespace=ns, run_id=run, serving_id=paths.serving_id, image=pipeline.triton_image,
        instance=serving_instance, world_size=plan.serving.world_size, node_group=cfg.serving_node_group,
        service_account=WORKLOADS["serving"].service_account, run_configmap=n.serving_configmap,
        conversion_marker=str(paths.conversion_marker), conversion_job=n.conversion_job,
        progress_deadline_seconds=wait_seconds,
        ngc_pull_secret=pipeline.ngc_api_key is not None, min_replicas=pipeline.min_replicas,
        max_replicas=pipeline.max_replicas, target_queue_time_ms=pipeline.target_queue_time_ms)
    result = {
        "entrypoints": configmap_manifest(pods.ENTRYPOINTS_CONFIGMAP, ns, entrypoint_files(), "pipeline"),
        "training_config": configmap_manifest(
            n.training_configmap, ns, {"run.json": json.dumps(runconfig.training_document(cfg), indent=2)}, "training"),
        "serving_config": configmap_manifest(
            n.serving_configmap, ns, {"run.json": json.dumps(runconfig.run_document(cfg), indent=2)}, "serving"),
        "training": training.pytorchjob_manifest(training_spec),
        "conversion": conversion.job_manifest(conversion_spec),
        "deployment": serving.deployment_manifest(serving_spec),
        "service": serving.service_manifest(serving_spec),
        "disruption_budget": serving.disruption_budget_manifest(serving_spec),
        "autoscaler": serving.autoscaler_manifest(serving_spec),
        **gatekeeper.manifests(ns),
    }
    if evaluate:
        evaluation_spec = evaluation.EvaluationSpec(
            name=n.evaluation_job, namespace=ns, run_id=run, eval_id=paths.eval_id, image=pipeline.nemo_image,
            instance=training_instance, gpus=plan.evaluation.gpus, cpu_offload=plan.evaluation.cpu_offload,
            model_params=plan.model.params, metrics_port=runconfig.EVALUATION_METRICS_PORT,
            node_group=cfg.training_node_group, service_account=WORKLOADS["training"].service_account,
            run_configmap=n.evaluation_configmap, training_marker=str(paths.training_marker),
            training_job=n.training_job, ngc_pull_secret=pipeline.ngc_api_key is not None,
            await_completion=pipeline.wait_for_completion)
        result["evaluation_config"] = configmap_manifest(
            n.evaluation_configmap, ns, {"run.json": json.dumps(runconfig.evaluation_document(cfg), indent=2)},
            "evaluation")
        result["evaluation"] = evaluation.job_manifest(evaluation_spec)
    for policy_name, policy in network_policy.manifests(ns, n.training_job, cfg.pipeline.monitoring, evaluate).items():
        result[f"{NETWORK_POLICY}{policy_name}"] = policy
    if cfg.pipeline.monitoring.enabled:
        result["service_monitor"] = serving.service_monitor_manifest(serving_spec)
        result["pod_monitor"] = observability.pod_monitor_manifest(ns)
        result["alerts"] = observability.prometheus_rule_manifest(ns, cfg.pipeline.monitoring)
        result["dashboard"] = observability.dashboard_configmap_manifest(ns)
    return result


@dataclass(frozen=True)
class PipelineArgs:
    config: StackConfig
    provider: k8s.Provider
    namespace: pulumi.Resource
    service_accounts: Sequence[pulumi.Resource]
    fsx_claim: pulumi.Resource
    training_operator: pulumi.Resource
    device_plugins: Sequence[pulumi.Resource]
    training_nodes: pulumi.Resource
    serving_nodes: pulumi.Resource
    monitoring_ready: Sequence[pulumi.Resource] = ()  # the prometheus-operator CRDs, when this stack installs them
    training_image: Any = None  # the stack's EFA training image in its ECR repository (infra/registry.py), if any


class Pipeline(pulumi.ComponentResource):
    training_job: k8s.apiextensions.CustomResource
    evaluation_job: k8s.batch.v1.Job | None
    conversion_job: k8s.batch.v1.Job
    deployment: k8s.apps.v1.Deployment
    gatekeeper: k8s.apps.v1.Deployment

    def __init__(self, name: str, args: PipelineArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("nemo-eks:workloads:Pipeline", name, None, opts)
        cfg = args.config
        m = manifests(cfg, args.training_image)
        timeouts = pulumi.CustomTimeouts(create=f"{cfg.pipeline.timeout_minutes}m",
                                         update=f"{cfg.pipeline.timeout_minutes}m") if cfg.pipeline.wait_for_completion else None

        def opts_after(*deps: pulumi.Resource, **extra: Any) -> pulumi.ResourceOptions:
            return pulumi.ResourceOptions(parent=self, provider=args.provider, depends_on=[args.namespace, *deps], **extra)

        def configmap(key: str, logical: str) -> k8s.core.v1.ConfigMap:
            return k8s.core.v1.ConfigMap(f"{name}-{logical}", metadata=m[key]["metadata"], data=m[key]["data"],
                                         opts=opts_after())

        # Ingress rules for every pod of the namespace; they need nothing but the namespace.
        for key, policy in m.items():
            if key.startswith(NETWORK_POLICY):
                k8s.networking.v1.NetworkPolicy(f"{name}-{policy['metadata']['name']}", metadata=policy["metadata"],
                                                spec=policy["spec"], opts=opts_after())

        secrets: list[pulumi.Resource] = []
        if cfg.pipeline.ngc_api_key is not None:
            secrets.append(k8s.core.v1.Secret(
                f"{name}-ngc-pull", type="kubernetes.io/dockerconfigjson",
                metadata={"name": pods.NGC_PULL_SECRET, "namespace": cfg.namespace, "labels": pods.labels("pipeline")},
                string_data={".dockerconfigjson": pulumi.Output.secret(cfg.pipeline.ngc_api_key).apply(docker_config_json)},
                opts=opts_after()))
        if cfg.pipeline.hf_token is not None:
            secrets.append(k8s.core.v1.Secret(
                f"{name}-hf-token", type="Opaque",
                metadata={"name": pods.HF_TOKEN_SECRET, "namespace": cfg.namespace, "labels": pods.labels("pipeline")},
                string_data={"token": pulumi.Output.secret(cfg.pipeline.hf_token)}, opts=opts_after()))
        code = configmap("entrypoints", "entrypoints")
        training_config = configmap("training_config", "training-config")
        serving_config = configmap("serving_config", "serving-config")

        # The gatekeeper releases the gated pods below (training's workers, evaluation, conversion, Triton):
        # each of those comes after it, so no gated pod exists before something can release it.
        account = m["gatekeeper_service_account"]
        gatekeeper_account = k8s.core.v1.ServiceAccount(f"{name}-gatekeeper-account", metadata=account["metadata"],
                                                        opts=opts_after())
        role = m["gatekeeper_role"]
        gatekeeper_role = k8s.rbac.v1.Role(f"{name}-gatekeeper-role", metadata=role["metadata"], rules=role["rules"],
                                           opts=opts_after())
        binding = m["gatekeeper_role_binding"]
        gatekeeper_binding = k8s.rbac.v1.RoleBinding(
            f"{name}-gatekeeper-binding", metadata=binding["metadata"], role_ref=binding["roleRef"],
            subjects=binding["subjects"], opts=opts_after(gatekeeper_account, gatekeeper_role))
        controller = m["gatekeeper"]
        self.gatekeeper = k8s.apps.v1.Deployment(
            f"{name}-gatekeeper", metadata=controller["metadata"], spec=controller["spec"],
            opts=opts_after(gatekeeper_binding, code, args.fsx_claim))

        job = m["training"]
        # Training needs its GPU nodes, the FSx claim, the device plugins (GPUs and EFA interfaces are only
        # schedulable once advertised) and the operator (the PyTorchJob kind and its webhook). A changed
        # run id is a new job: the old one is deleted first so two runs never compete for the GPUs.
        self.training_job = k8s.apiextensions.CustomResource(
            f"{name}-training", api_version=job["apiVersion"], kind=job["kind"], metadata=job["metadata"],
            spec=job["spec"],
            opts=opts_after(args.training_nodes, args.fsx_claim, args.training_operator, *args.device_plugins,
                            *args.service_accounts, code, training_config, *secrets, self.gatekeeper,
                            replace_on_changes=["spec"], delete_before_replace=True, custom_timeouts=timeouts))
        upstream: pulumi.Resource = self.training_job
        self.evaluation_job = None
        if "evaluation" in m:
            evaluation_config = configmap("evaluation_config", "evaluation-config")
            evaluate = m["evaluation"]
            # Evaluation measures what training wrote: in-cluster its pod stays gated (holding no GPU) until the
            # training marker exists; for Pulumi it comes after the PyTorchJob (and, with waitForCompletion,
            # after it succeeded).
            self.evaluation_job = k8s.batch.v1.Job(
                f"{name}-evaluation", metadata=evaluate["metadata"], spec=evaluate["spec"],
                opts=opts_after(self.training_job, code, evaluation_config, *secrets, self.gatekeeper,
                                delete_before_replace=True, custom_timeouts=timeouts))
            upstream = self.evaluation_job
        convert = m["conversion"]
        # Conversion builds what passed the evaluation gate (what training wrote, without evaluation): its pod
        # stays gated until that stage's marker exists, and the Job fails at once when that stage failed.
        self.conversion_job = k8s.batch.v1.Job(
            f"{name}-conversion", metadata=convert["metadata"], spec=convert["spec"],
            opts=opts_after(upstream, args.serving_nodes, code, serving_config, *secrets, self.gatekeeper,
                            delete_before_replace=True, custom_timeouts=timeouts))
        deployment = m["deployment"]
        # Triton serves what the conversion built: its new pods stay gated until the conversion marker exists.
        self.deployment = k8s.apps.v1.Deployment(
            f"{name}-triton", metadata=deployment["metadata"], spec=deployment["spec"],
            opts=opts_after(self.conversion_job, code, serving_config, *secrets, self.gatekeeper))
        after_triton = opts_after(self.deployment)
        k8s.core.v1.Service(f"{name}-triton-service", metadata=m["service"]["metadata"], spec=m["service"]["spec"],
                            opts=after_triton)
        k8s.policy.v1.PodDisruptionBudget(f"{name}-triton-pdb", metadata=m["disruption_budget"]["metadata"],
                                          spec=m["disruption_budget"]["spec"], opts=after_triton)
        k8s.autoscaling.v2.HorizontalPodAutoscaler(f"{name}-triton-hpa", metadata=m["autoscaler"]["metadata"],
                                                   spec=m["autoscaler"]["spec"], opts=after_triton)
        if "service_monitor" in m:
            # Monitors and rules are prometheus-operator custom resources: they wait for its CRDs.
            for key, logical in (("service_monitor", "triton-monitor"), ("pod_monitor", "pod-monitor"),
                                 ("alerts", "alerts")):
                monitor = m[key]
                k8s.apiextensions.CustomResource(
                    f"{name}-{logical}", api_version=monitor["apiVersion"], kind=monitor["kind"],
                    metadata=monitor["metadata"], spec=monitor["spec"],
                    opts=opts_after(*args.monitoring_ready))
            configmap("dashboard", "dashboard")
        self.register_outputs({"runId": runconfig.run_id(cfg), "servingId": runconfig.serving_id(cfg),
                               "evalId": runconfig.eval_id(cfg),
                               "trainingJob": names(cfg).training_job})
