"""The pipeline on Kubernetes, for every stack file: training PyTorchJob -> conversion Job -> Triton."""

from __future__ import annotations

import json
import shlex

import jsonschema
import pytest
import yaml

from infra.config import ConfigError, load
from infra.gpu_nodes import FSX_AGENT_TAINT, GPU_TAINT
from tests.conftest import raw_config, synth_config, synth_stack
from tools import synth
from workloads import pipeline, runconfig, training
from workloads.entrypoints import gatekeeper

PYTORCHJOB = "kubernetes:kubeflow.org/v1:PyTorchJob"
JOB = "kubernetes:batch/v1:Job"
DEPLOYMENT = "kubernetes:apps/v1:Deployment"


def crd_schema(file: str, version: str) -> dict:
    crd = yaml.safe_load((synth.ROOT / "schemas" / file).read_text())
    [entry] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return entry["schema"]["openAPIV3Schema"]


def by_kind(s: synth.Synth, kind: str) -> list[dict]:
    return [m for m in s.manifests() if m["kind"] == kind]


def stack_config(stack: str):
    raw, secrets = synth.read_stack_config(stack)
    return load(raw, stack, secret_keys=secrets)


def refs(s: synth.Synth, reg: synth.Registration) -> set[str]:
    return {s.name_of(u) for u in reg.depends_on}


def containers(template: dict) -> list[dict]:
    return template["spec"].get("initContainers", []) + template["spec"]["containers"]


# ---------------------------------------------------------------------------------------------- schemas


def test_pytorchjobs_validate_against_the_kubeflow_crd(stack_synth):
    schema = crd_schema("kubeflow.org_pytorchjobs.yaml", "v1")
    [job] = by_kind(stack_synth, "PyTorchJob")
    jsonschema.validate(job, schema)


def test_the_crd_schema_check_catches_a_bad_pytorchjob():
    schema = crd_schema("kubeflow.org_pytorchjobs.yaml", "v1")
    [job] = by_kind(synth_stack("dev"), "PyTorchJob")
    bad = json.loads(json.dumps(job))
    bad["spec"]["runPolicy"]["backoffLimit"] = "three"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_service_monitor_validates_against_the_prometheus_operator_crd():
    [monitor] = [m for m in by_kind(synth_stack("dev"), "ServiceMonitor") if m["metadata"]["name"] == "triton"]
    jsonschema.validate(monitor, crd_schema("monitoring.coreos.com_servicemonitors.yaml", "v1"))
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]
    without = synth_config("no-monitoring", {"nemo-eks:monitoring": {"stack": "none"}})
    assert not by_kind(without, "ServiceMonitor")  # no prometheus-operator CRDs in the cluster


# ---------------------------------------------------------------------------------------------- training


def test_training_job_shape_comes_from_the_plan(stack_synth):
    cfg = stack_config(stack_synth.stack)
    plan, instance = cfg.sizing, cfg.sizing.request.instance
    [job] = by_kind(stack_synth, "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas.get("Worker", {"replicas": 0})["replicas"] == plan.parallelism.nodes - 1
    faults = cfg.pipeline.fault_tolerance
    assert job["spec"]["runPolicy"]["backoffLimit"] == faults.pod_restarts * plan.parallelism.nodes + 1
    assert "ttlSecondsAfterFinished" not in job["spec"]["runPolicy"] and "elasticPolicy" not in job["spec"]
    assert job["spec"]["nprocPerNode"] == str(instance.gpus)
    for role, spec in replicas.items():
        assert spec["restartPolicy"] == "OnFailure"
        pod = spec["template"]["spec"]
        [main] = pod["containers"]
        assert main["name"] == "pytorch"
        if cfg.pipeline.efa.multi_node:  # the stack's EFA image in its ECR repository (tests/test_efa.py)
            assert main["image"].endswith(f"repositoryUrl>:{cfg.pipeline.efa.built_image_tag}")
        else:
            assert main["image"] == cfg.pipeline.nemo_image
        script = main["command"][-1]
        args = shlex.split(script.split("exec ", 1)[1])
        assert args[0] == "torchrun"
        assert f"--nnodes={plan.parallelism.nodes}" in args and f"--nproc-per-node={instance.gpus}" in args
        assert "--rdzv-backend=c10d" in args and "--rdzv-endpoint=${MASTER_ADDR}:${MASTER_PORT}" in args
        assert f"--rdzv-id={runconfig.run_id(cfg)}" in args
        assert f"--max-restarts={faults.worker_restarts}" in args
        assert f"--rdzv-conf=join_timeout={faults.rendezvous_timeout_seconds}" in args
        assert "/opt/amazon/aws-ofi-nccl/lib" in script.split("exec ", 1)[0]
        resources = main["resources"]
        assert resources["requests"] == resources["limits"]
        assert resources["limits"]["nvidia.com/gpu"] == instance.gpus
        assert resources["limits"]["vpc.amazonaws.com/efa"] == instance.efa_interfaces
        assert int(resources["limits"]["cpu"]) <= instance.vcpus
        assert int(resources["limits"]["memory"].removesuffix("Gi")) <= instance.memory_gib
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]
        assert shm["medium"] == "Memory" and shm["sizeLimit"].endswith("Gi")
        assert {"name": "dshm", "mountPath": "/dev/shm"} in main["volumeMounts"]
        fsx = next(v for v in pod["volumes"] if v["name"] == "fsx")
        assert fsx["persistentVolumeClaim"]["claimName"] == "fsx"
        assert pod["serviceAccountName"] == "nemo-training"
        assert pod["nodeSelector"] == {"nemo-eks/node-group": cfg.training_node_group}
        assert {(t["key"], t["effect"]) for t in pod["tolerations"]} == {("nvidia.com/gpu", "NoSchedule")}
        env = {e["name"]: e.get("value") for e in main["env"]}
        assert env["FI_EFA_USE_HUGE_PAGE"] == "0"
        assert not any(name.startswith("RDMAV_") for name in env) and "FI_PROVIDER" not in env
        assert env["NEMO_EKS_NCCL_TIMEOUT_SECONDS"] == str(faults.nccl_timeout_seconds)
        assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"  # a timed-out collective ends the rank
        if role == "Master":
            # The master prepares the run itself (its own work, not a wait) and is never gated.
            [init] = pod["initContainers"]
            assert init["args"][-1] == "--prepare" and "schedulingGates" not in pod
        else:
            # Workers hold no GPU node while the master prepares: gated on the PREPARED marker.
            assert "initContainers" not in pod
            assert pod["schedulingGates"] == [{"name": gatekeeper.GATE}]
            annotations = spec["template"]["metadata"]["annotations"]
            assert annotations[gatekeeper.WAIT_FOR] == runconfig.run_paths(cfg).as_dict()["prepared_marker"]
            assert annotations[gatekeeper.ON_FAILURE] == "hold"


def test_single_node_run_has_no_workers():
    [job] = by_kind(synth_stack("dev"), "PyTorchJob")
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master"}


def test_training_waits_for_its_dependencies():
    s = synth_stack("prod")
    job = s.one(PYTORCHJOB, "nemo-eks-prod-pipeline-training")
    assert {"nemo-eks-prod-train-nodes", "nemo-eks-prod-addons-fsx-claim", "nemo-eks-prod-addons-training-operator",
            "nemo-eks-prod-addons-nvidia-device-plugin", "nemo-eks-prod-addons-efa-device-plugin",
            "nemo-eks-prod-pipeline-training-config", "nemo-eks-prod-pipeline-entrypoints"} <= refs(s, job)
    assert job.options == {"deleteBeforeReplace": True, "replaceOnChanges": ["spec"]}
    assert job.inputs["metadata"]["annotations"] == {"pulumi.com/skipAwait": "true"}
    evaluation = s.one(JOB, "nemo-eks-prod-pipeline-evaluation")
    assert "nemo-eks-prod-pipeline-training" in refs(s, evaluation)
    conversion = s.one(JOB, "nemo-eks-prod-pipeline-conversion")
    assert "nemo-eks-prod-pipeline-evaluation" in refs(s, conversion)
    triton = s.one(DEPLOYMENT, "nemo-eks-prod-pipeline-triton")
    assert "nemo-eks-prod-pipeline-conversion" in refs(s, triton)


def test_wait_for_completion_makes_pulumi_up_wait():
    s = synth_config("wait", {"nemo-eks:pipeline": {"waitForCompletion": True, "timeoutMinutes": 90}})
    job = s.one(PYTORCHJOB, "nemo-eks-test-pipeline-training")
    assert job.inputs["metadata"]["annotations"] == {"pulumi.com/waitFor": "condition=Succeeded"}
    assert job.options["customTimeouts"] == {"create": "90m", "update": "90m"}
    conversion = s.one(JOB, "nemo-eks-test-pipeline-conversion")
    assert conversion.options["customTimeouts"] == {"create": "90m", "update": "90m"}
    evaluation = s.one(JOB, "nemo-eks-test-pipeline-evaluation")
    assert evaluation.options["customTimeouts"] == {"create": "90m", "update": "90m"}
    assert "pulumi.com/skipAwait" not in conversion.inputs["metadata"].get("annotations", {})


def test_pipeline_can_be_left_out():
    s = synth_config("no-pipeline", {"nemo-eks:pipeline": {"enabled": False}})
    assert not s.resources(PYTORCHJOB) and not s.resources(DEPLOYMENT)
    assert "runId" not in s.outputs


# ---------------------------------------------------------------------------------------------- run ids


def test_run_id_changes_with_the_training_config_only():
    base = load(raw_config(), "dev")
    same = load(raw_config(), "dev")
    assert runconfig.run_id(base) == runconfig.run_id(same)
    for change in ({"nemo-eks:training": {"loraRank": 32}}, {"nemo-eks:data": {"dataset": "v2"}},
                   {"nemo-eks:training": {"learningRate": 2e-4}}, {"nemo-eks:images": {"nemo": "nvcr.io/nvidia/nemo:25.11"}}):
        assert runconfig.run_id(load(raw_config(change), "dev")) != runconfig.run_id(base), change
    served = load(raw_config({"nemo-eks:serving": {"maxSeqLength": 2048}}), "dev")
    assert runconfig.run_id(served) == runconfig.run_id(base)
    assert runconfig.serving_id(served) != runconfig.serving_id(base)
    # A serving change leaves the training job and its config exactly as they were.
    assert pipeline.manifests(served)["training"] == pipeline.manifests(base)["training"]
    assert pipeline.manifests(served)["training_config"] == pipeline.manifests(base)["training_config"]
    assert pipeline.names(served).conversion_job != pipeline.names(base).conversion_job


def test_run_id_names_the_job_and_the_checkpoint_directory():
    cfg = load(raw_config(), "dev")
    run = runconfig.run_id(cfg)
    doc = runconfig.training_document(cfg)
    assert doc["paths"]["run_dir"] == f"/fsx/checkpoints/{run}"
    assert pipeline.names(cfg).training_job == f"train-{run}"
    assert len(pipeline.names(cfg).conversion_job) <= 63


def test_resolved_training_config_comes_from_the_plan(stack_synth):
    cfg = stack_config(stack_synth.stack)
    [configmap] = [m for m in by_kind(stack_synth, "ConfigMap") if m["metadata"]["name"].startswith("train-")]
    doc = json.loads(configmap["data"]["run.json"])
    par = cfg.sizing.parallelism
    assert doc["training"]["parallelism"] == {"nodes": par.nodes, "gpus_per_node": par.gpus_per_node, "tp": par.tp,
                                              "pp": par.pp, "vp": par.vp if par.vp > 1 else None, "cp": par.cp,
                                              "dp": par.dp, "sequence_parallel": par.sequence_parallel,
                                              "recompute": par.recompute}
    assert doc["training"]["memory"] == {"grad_reduce_in_fp32": False, "disable_parameter_transpose_cache": True}
    assert doc["training"]["batch"]["global_batch_size"] == cfg.sizing.request.global_batch_size
    assert (doc["training"]["lora"] is None) == (cfg.sizing.request.method == "sft")
    assert "serving" not in doc


# ---------------------------------------------------------------------------------------------- conversion and serving


def workload_pod_templates(s: synth.Synth) -> dict[str, dict]:
    """Every pod template of the pipeline: the PyTorchJob's replicas, the Jobs and the Triton Deployment."""
    templates = {}
    for manifest in s.manifests():
        name = f"{manifest['kind']}/{manifest['metadata']['name']}"
        if manifest["kind"] == "PyTorchJob":
            for role, replica in manifest["spec"]["pytorchReplicaSpecs"].items():
                templates[f"{name}/{role}"] = replica["template"]
        elif manifest["kind"] in ("Job", "Deployment") and manifest["metadata"].get("namespace") == "nemo":
            templates[name] = manifest["spec"]["template"]
    return templates


def test_workload_pods_tolerate_the_gpu_taint_but_wait_for_fsx(stack_synth):
    """The FSx start-up taint keeps pods off a node until its Lustre client is ready: a workload pod that
    tolerated it could start on a node that cannot mount its volume yet."""
    templates = workload_pod_templates(stack_synth)
    kinds = {name.split("/")[0] for name in templates}
    assert {"PyTorchJob", "Job", "Deployment"} <= kinds
    for name, template in templates.items():
        keys = {t["key"] for t in template["spec"].get("tolerations", [])}
        assert FSX_AGENT_TAINT not in keys, name
        if any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in template["spec"]["containers"]):
            assert keys == {GPU_TAINT}, name


def test_conversion_job(stack_synth):
    cfg = stack_config(stack_synth.stack)
    [job] = [j for j in by_kind(stack_synth, "Job") if j["metadata"]["name"].startswith("convert-")]
    pod = job["spec"]["template"]["spec"]
    init = pod["initContainers"]
    assert [c["name"] for c in init] == ["export"]
    assert all(c["image"] == cfg.pipeline.nemo_image for c in init)
    # Conversion builds only what passed the evaluation gate: gated on its marker, failed at once if it failed.
    marker = runconfig.run_paths(cfg).as_dict()["evaluation_marker"]
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    assert pod["schedulingGates"] == [{"name": gatekeeper.GATE}]
    assert annotations[gatekeeper.WAIT_FOR] == marker and annotations[gatekeeper.FAILURE_MARKER] == f"{marker}.failed"
    assert annotations[gatekeeper.UPSTREAM] == f"Job/{pipeline.names(cfg).evaluation_job}"
    assert annotations[gatekeeper.ON_FAILURE] == "fail"
    assert job["spec"]["podFailurePolicy"]["rules"] == [
        {"action": "FailJob", "onPodConditions": [{"type": gatekeeper.CONDITION, "status": "True"}]}]
    [build] = pod["containers"]
    assert build["image"] == cfg.pipeline.triton_image  # the tag that serves it builds it
    assert build["resources"]["limits"]["nvidia.com/gpu"] == cfg.sizing.serving.tp * cfg.sizing.serving.pp
    assert pod["serviceAccountName"] == "nemo-conversion" and pod["restartPolicy"] == "Never"
    assert "ttlSecondsAfterFinished" not in job["spec"]


def test_llmapi_backend_builds_nothing_on_gpus():
    s = synth_config("llmapi", {"nemo-eks:serving": {"backend": "llmapi"}})
    [job] = [j for j in by_kind(s, "Job") if j["metadata"]["name"].startswith("convert-")]
    [build] = job["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in build["resources"]["limits"]


def test_triton_deployment(stack_synth):
    cfg = stack_config(stack_synth.stack)
    serving = cfg.sizing.serving
    [deployment] = [m for m in by_kind(stack_synth, "Deployment") if m["metadata"]["name"] == "triton"]
    pod = deployment["spec"]["template"]["spec"]
    [triton] = pod["containers"]
    assert triton["image"] == cfg.pipeline.triton_image
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == serving.world_size == serving.tp * serving.pp
    assert {p["containerPort"] for p in triton["ports"]} == {8000, 8001, 8002}
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert pod["serviceAccountName"] == "nemo-serving"
    # New pods stay gated (holding nothing) until their engine exists, and are held, not failed, when the
    # conversion fails: the old ReplicaSet keeps serving.
    assert "initContainers" not in pod and pod["schedulingGates"] == [{"name": gatekeeper.GATE}]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations[gatekeeper.WAIT_FOR] == runconfig.run_paths(cfg).as_dict()["conversion_marker"]
    assert annotations[gatekeeper.UPSTREAM] == f"Job/{pipeline.names(cfg).conversion_job}"
    assert annotations[gatekeeper.ON_FAILURE] == "hold"
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    [run_json] = [json.loads(m["data"]["run.json"]) for m in by_kind(stack_synth, "ConfigMap")
                  if m["metadata"]["name"].startswith("serve-")]
    assert run_json["serving"]["world_size"] == serving.world_size
    [hpa] = by_kind(stack_synth, "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (cfg.pipeline.min_replicas, cfg.pipeline.max_replicas)
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "triton_queue_time_per_request_ms"
    [pdb] = by_kind(stack_synth, "PodDisruptionBudget")
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    [service] = [m for m in by_kind(stack_synth, "Service") if m["metadata"]["name"] == "triton"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_entrypoints_ship_in_a_configmap():
    [code] = [m for m in by_kind(synth_stack("dev"), "ConfigMap") if m["metadata"]["name"] == "nemo-eks-entrypoints"]
    assert set(code["data"]) == set(pipeline.entrypoint_files()) and "layout.py" in code["data"]
    assert sum(len(v) for v in code["data"].values()) < 900_000  # ConfigMaps hold at most 1 MiB


# ---------------------------------------------------------------------------------------------- evaluation


def test_evaluation_job(stack_synth):
    cfg = stack_config(stack_synth.stack)
    [job] = [j for j in by_kind(stack_synth, "Job") if j["metadata"]["name"].startswith("eval-")]
    assert job["metadata"]["name"] == pipeline.names(cfg).evaluation_job
    pod = job["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["export"]
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    assert pod["schedulingGates"] == [{"name": gatekeeper.GATE}]
    assert annotations[gatekeeper.WAIT_FOR] == runconfig.run_paths(cfg).as_dict()["training_marker"]
    assert annotations[gatekeeper.UPSTREAM] == f"PyTorchJob/{pipeline.names(cfg).training_job}"
    [main] = pod["containers"]
    assert main["image"] == cfg.pipeline.nemo_image and main["args"][0].endswith("/evaluate.py")
    # No more GPUs than inference of the model needs, from the plan.
    assert main["resources"]["limits"]["nvidia.com/gpu"] == cfg.sizing.evaluation.gpus <= cfg.sizing.parallelism.gpus_per_node
    assert {"name": "metrics", "containerPort": 9400} in main["ports"]
    gate_failed, upstream_failed = job["spec"]["podFailurePolicy"]["rules"]
    assert gate_failed == {"action": "FailJob",
                           "onExitCodes": {"containerName": "evaluate", "operator": "In", "values": [3]}}
    assert upstream_failed == {"action": "FailJob",
                               "onPodConditions": [{"type": gatekeeper.CONDITION, "status": "True"}]}
    assert pod["restartPolicy"] == "Never"
    [configmap] = [m for m in by_kind(stack_synth, "ConfigMap") if m["metadata"]["name"] == pipeline.names(cfg).evaluation_configmap]
    doc = json.loads(configmap["data"]["run.json"])
    assert doc["evaluation"]["gpus"] == cfg.sizing.evaluation.gpus and "serving" not in doc
    assert doc["paths"]["export_dir"] == f"/fsx/checkpoints/{runconfig.run_id(cfg)}/hf"


def test_evaluation_sizes_from_the_plan():
    assert [stack_config(s).sizing.evaluation.gpus for s in ("dev", "staging", "prod", "prod-405b")] == [1, 1, 4, 8]
    assert stack_config("prod-405b").sizing.evaluation.cpu_offload  # 811 GB of 16-bit weights exceed 8 x 80 GiB


def test_gate_settings_re_evaluate_without_retraining():
    base = load(raw_config(), "dev")
    stricter = load(raw_config({"nemo-eks:evaluation": {"minLossImprovementPercent": 5}}), "dev")
    assert runconfig.run_id(stricter) == runconfig.run_id(base)
    assert runconfig.eval_id(stricter) != runconfig.eval_id(base)
    assert pipeline.manifests(stricter)["training"] == pipeline.manifests(base)["training"]
    assert pipeline.names(stricter).evaluation_job != pipeline.names(base).evaluation_job


def test_without_evaluation_conversion_waits_for_training():
    s = synth_config("no-evaluation", {"nemo-eks:evaluation": {"enabled": False}})
    assert not [j for j in by_kind(s, "Job") if j["metadata"]["name"].startswith("eval-")]
    [job] = by_kind(s, "Job")
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    assert annotations[gatekeeper.WAIT_FOR].endswith("/TRAINING_COMPLETE")
    assert annotations[gatekeeper.UPSTREAM] == f"PyTorchJob/{job['metadata']['name'].replace('convert-', 'train-').rsplit('-', 1)[0]}"
    conversion = s.one(JOB, "nemo-eks-test-pipeline-conversion")
    assert "nemo-eks-test-pipeline-training" in refs(s, conversion)


@pytest.mark.parametrize("key,value,allowed", [("minLossImprovementPercent", 150, "-100..100"),
                                                ("maxExactMatchDrop", -1, "0..100"), ("lossSamples", 0, "1..100000")])
def test_bad_gate_settings(key, value, allowed):
    with pytest.raises(ConfigError) as caught:
        load(raw_config({"nemo-eks:evaluation": {key: value}}), "dev")
    assert caught.value.key == f"nemo-eks:evaluation.{key}" and allowed in str(caught.value)


# ---------------------------------------------------------------------------------------------- images and secrets


NGC_KEY = "nvapi-test-key-not-real-0123456789"


def test_ngc_pull_secret_is_never_plain_text(tmp_path):
    s = synth_config("ngc", {"nemo-eks:ngcApiKey": NGC_KEY, "nemo-eks:hfToken": "hf_test_token_not_real"},
                     secret_keys=["nemo-eks:ngcApiKey", "nemo-eks:hfToken"])
    target = synth.write(s, tmp_path)
    for path in target.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert NGC_KEY not in text and "hf_test_token_not_real" not in text, path
    [pull] = [m for m in by_kind(s, "Secret") if m["metadata"]["name"] == "ngc-pull"]
    assert pull["type"] == "kubernetes.io/dockerconfigjson" and pull["stringData"] == synth.SECRET
    for kind in ("PyTorchJob", "Job", "Deployment"):
        for manifest in [m for m in by_kind(s, kind) if m["metadata"]["namespace"] == "nemo"]:
            templates = ([r["template"] for r in manifest["spec"]["pytorchReplicaSpecs"].values()]
                         if kind == "PyTorchJob" else [manifest["spec"]["template"]])
            for template in templates:
                if any(c["image"].startswith("nvcr.io/") for c in containers(template)):
                    assert template["spec"]["imagePullSecrets"] == [{"name": "ngc-pull"}]
                else:  # the gatekeeper's public image needs no NGC credentials
                    assert "imagePullSecrets" not in template["spec"]


def test_docker_config_json_format():
    doc = json.loads(pipeline.docker_config_json("abc"))
    assert doc["auths"]["nvcr.io"]["username"] == "$oauthtoken" and doc["auths"]["nvcr.io"]["password"] == "abc"


@pytest.mark.parametrize("key", ["nemo-eks:ngcApiKey", "nemo-eks:hfToken"])
def test_credentials_in_plain_text_are_rejected_without_echoing_them(key):
    with pytest.raises(ConfigError) as caught:
        load(raw_config({key: "super-secret-value"}), "dev")
    assert caught.value.key == key and "super-secret-value" not in str(caught.value)


IMAGE_CASES = [
    ({"nemo-eks:images": {"triton": "nvcr.io/nvidia/tritonserver:26.08-trtllm-python-py3"}}, "nemo-eks:images.triton",
     "for the engine backend"),
    ({"nemo-eks:images": {"nemo": "nvcr.io/nvidia/nemo:26.04"}}, "nemo-eks:images.nemo", "Megatron-Bridge"),
    ({"nemo-eks:images": {"nemo": "nvcr.io/nvidia/nemo:latest"}}, "nemo-eks:images.nemo", "not 'latest'"),
    ({"nemo-eks:images": {"triton": "nvcr.io/nvidia/tritonserver:26.07-py3"}}, "nemo-eks:images.triton",
     "trtllm-python-py3"),
    ({"nemo-eks:images": {"triton": "nvcr.io/nvidia/tritonserver:24.12-trtllm-python-py3"}}, "nemo-eks:images.triton",
     "TensorRT-LLM 1.x"),
]


@pytest.mark.parametrize("overrides,key,fragment", IMAGE_CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(IMAGE_CASES)])
def test_image_combinations_that_cannot_work_are_rejected(overrides, key, fragment):
    with pytest.raises(ConfigError) as caught:
        load(raw_config(overrides), "dev")
    assert caught.value.key == key and fragment in str(caught.value)


def test_newer_triton_is_fine_for_the_llmapi_backend():
    cfg = load(raw_config({"nemo-eks:serving": {"backend": "llmapi"},
                           "nemo-eks:images": {"triton": "nvcr.io/nvidia/tritonserver:26.10-trtllm-python-py3"}}), "dev")
    assert cfg.pipeline.serving_backend == "llmapi"


def test_every_manifest_is_valid_kubernetes_for_the_stack_version(stack_synth):
    import kubernetes_validate
    version = stack_config(stack_synth.stack).cluster.kubernetes_version
    for manifest in stack_synth.manifests():
        if "/" in manifest["apiVersion"] and manifest["apiVersion"].split("/")[0].endswith((".org", ".com")):
            continue  # custom resources: checked against their CRD schemas above
        kubernetes_validate.validate(manifest, version, strict=True)
