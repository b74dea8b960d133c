"""For every stack file: no GPU pod waits for an upstream stage while holding GPUs (gated instead), the GPU
groups are sized for what can hold GPUs at once (from the numbers in sizing.json), and the training run's
restart settings hold against the training operator's counting rule."""

from __future__ import annotations

import json

import pytest
import yaml

from infra import catalog
from infra.config import ConfigError, load
from tests.conftest import raw_config
from tools import synth
from workloads import pipeline, runconfig, training
from workloads.entrypoints import gatekeeper, layout

GPU = "nvidia.com/gpu"
MARKERS = (layout.PREPARED_MARKER, layout.TRAINING_MARKER, layout.EVALUATION_MARKER, layout.CONVERSION_MARKER)


def stack_config(stack: str):
    raw, secrets = synth.read_stack_config(stack)
    return load(raw, stack, secret_keys=secrets)


def pod_templates(s: synth.Synth) -> list[tuple[dict, str, dict]]:
    """(owner manifest, role, pod template) of every workload in the stack's rendered manifests."""
    found = []
    for manifest in s.manifests():
        kind, spec = manifest["kind"], manifest.get("spec") or {}
        if kind == "PyTorchJob":
            found += [(manifest, role, replica["template"]) for role, replica in spec["pytorchReplicaSpecs"].items()]
        elif kind in ("Job", "Deployment", "StatefulSet", "DaemonSet") and "template" in spec:
            found.append((manifest, kind, spec["template"]))
    return found


def requests_gpus(template: dict) -> bool:
    return any(GPU in (c.get("resources") or {}).get(part, {}) for c in template["spec"]["containers"]
               for part in ("requests", "limits"))


# ------------------------------------------------------------------------------------------------ gating


def test_no_gpu_pod_waits_for_a_marker_in_an_init_container(stack_synth):
    gpu_templates = [(m, role, t) for m, role, t in pod_templates(stack_synth) if requests_gpus(t)]
    assert gpu_templates
    for manifest, role, template in gpu_templates:
        for init in template["spec"].get("initContainers", []):
            words = " ".join(init.get("command", []) + init.get("args", []))
            assert "wait_for" not in words, (manifest["metadata"]["name"], init["name"])
            assert not any(marker in words for marker in MARKERS), (manifest["metadata"]["name"], init["name"])
    # Every GPU pod but the training master has an upstream stage, and waits for it gated.
    ungated = {(m["kind"], role) for m, role, t in gpu_templates if not t["spec"].get("schedulingGates")}
    assert ungated == {("PyTorchJob", "Master")}
    entrypoints = next(m for m in stack_synth.manifests() if m["metadata"]["name"] == "nemo-eks-entrypoints")
    assert "wait_for.py" not in entrypoints["data"] and "gatekeeper.py" in entrypoints["data"]


def test_every_gate_names_a_marker_its_upstream_writes_and_a_way_to_fail(stack_synth):
    cfg = stack_config(stack_synth.stack)
    paths, names = runconfig.run_paths(cfg).as_dict(), pipeline.names(cfg)
    rendered = {(m["kind"], m["metadata"]["name"]) for m in stack_synth.manifests()}
    writes = {f"PyTorchJob/{names.training_job}": paths["training_marker"],
              f"Job/{names.evaluation_job}": paths["evaluation_marker"],
              f"Job/{names.conversion_job}": paths["conversion_marker"]}
    gated = [(m, role, t) for m, role, t in pod_templates(stack_synth) if t["spec"].get("schedulingGates")]
    assert len(gated) >= 3
    for manifest, role, template in gated:
        assert template["spec"]["schedulingGates"] == [{"name": gatekeeper.GATE}]
        annotations = template["metadata"]["annotations"]
        marker = annotations[gatekeeper.WAIT_FOR]
        assert annotations[gatekeeper.FAILURE_MARKER] == layout.failure_marker(marker)
        upstream = annotations.get(gatekeeper.UPSTREAM)
        if upstream is None:  # the workers wait for their own master's prepare
            assert (manifest["kind"], role, marker) == ("PyTorchJob", "Worker", paths["prepared_marker"])
        else:
            assert tuple(upstream.split("/", 1)) in rendered and writes[upstream] == marker, upstream
        if manifest["kind"] == "Job":
            # The gatekeeper's Failed pod fails the Job at once, with the reason, instead of pending forever.
            assert annotations[gatekeeper.ON_FAILURE] == "fail"
            assert {"action": "FailJob", "onPodConditions": [{"type": gatekeeper.CONDITION, "status": "True"}]} \
                in manifest["spec"]["podFailurePolicy"]["rules"]
            assert template["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it
        else:
            # A replaced pod would be gated and failed again in a loop: held, with the reason, instead.
            assert annotations[gatekeeper.ON_FAILURE] == "hold"


def test_deployment_keeps_the_old_pods_serving_while_new_ones_are_gated(stack_synth):
    [triton] = [m for m in stack_synth.manifests() if m["kind"] == "Deployment" and m["metadata"]["name"] == "triton"]
    # maxUnavailable 0: no old pod goes before a new one is ready, and a gated new pod is never ready.
    assert triton["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


@pytest.mark.parametrize("path", [synth.ROOT / "schemas" / "kubeflow.org_pytorchjobs.yaml",
                                  synth.ROOT / "infra" / "vendor" / "training-operator-v1.9.3.yaml"])
def test_the_installed_pytorchjob_crd_keeps_scheduling_gates(path):
    """A structural CRD prunes unknown fields: the gate only reaches the operator's pods if the schema has it
    (the operator copies the replica template into each pod)."""
    [crd] = [d for d in yaml.safe_load_all(path.read_text())
             if d and d.get("kind") == "CustomResourceDefinition" and d["spec"]["names"]["kind"] == "PyTorchJob"]
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    replica = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["pytorchReplicaSpecs"]
    template = replica["additionalProperties"]["properties"]["template"]["properties"]
    assert "schedulingGates" in template["spec"]["properties"]
    assert "annotations" in template["metadata"]["properties"]


# ------------------------------------------------------------------------------------------------ sizing


def nodes_for(pods_gpus: list[int], whole_nodes: int, gpus_per_node: int) -> int:
    """Nodes for whole-node pods plus smaller pods packed first-fit decreasing (none is split over nodes)."""
    free: list[int] = []
    for gpus in sorted(pods_gpus, reverse=True):
        for i, left in enumerate(free):
            if left >= gpus:
                free[i] -= gpus
                break
        else:
            free.append(gpus_per_node - gpus)
    return whole_nodes + len(free)


def phases_from_sizing(sizing: dict, training_group: str, serving_group: str, replicas: int):
    """Who holds GPUs at once, from sizing.json: gated stages take turns, the old replicas keep serving, and
    a rollout adds one surge replica (or the conversion its TP x PP GPUs) beside them."""
    serving = sizing["serving"]["world_size"]
    old = [serving] * replicas
    return {  # phase -> [(group, whole nodes, smaller pods' GPUs)]
        "training": [(training_group, sizing["parallelism"]["nodes"], []), (serving_group, 0, old)],
        "evaluation": [(training_group, 0, [sizing["evaluation"]["gpus"]]), (serving_group, 0, old)],
        "conversion or rollout": [(serving_group, 0, old + [serving])],
    }


def demand(phases, group: str, gpus_per_node: int) -> dict[str, int]:
    out = {}
    for phase, holders in phases.items():
        whole, small = 0, []
        for g, nodes, pods in holders:
            if g == group:
                whole, small = whole + nodes, small + pods
        out[phase] = nodes_for(small, whole, gpus_per_node)
    return out


def explicit_max_sizes(stack: str) -> dict[str, int]:
    raw, _ = synth.read_stack_config(stack)
    groups = json.loads(raw["nemo-eks:gpuNodeGroups"])
    return {g["name"]: g["maxSize"] for g in groups if "maxSize" in g}


def test_gpu_groups_are_sized_for_what_holds_gpus_at_once(stack_synth):
    cfg = stack_config(stack_synth.stack)
    sizing = stack_synth.sizing  # what `make plan` writes as sizing.json
    phases = phases_from_sizing(sizing, cfg.training_node_group, cfg.serving_node_group, cfg.pipeline.max_replicas)
    explicit = explicit_max_sizes(stack_synth.stack)
    for group in cfg.gpu_node_groups:
        per_phase = demand(phases, group.name, catalog.get(group.instance_type).gpus)
        if group.name in explicit:
            # A smaller group set on purpose: the stages take turns, but each fits on it alone.
            assert group.max_size == explicit[group.name] >= sizing["parallelism"]["nodes"]
        else:
            assert group.max_size == max(per_phase.values()), per_phase


def test_gating_is_what_makes_prod_fit():
    """Before, every stage's pods were created at once and held their GPUs while they waited."""
    cfg, sizing = stack_config("prod"), synth.synthesize("prod").sizing
    [group] = cfg.gpu_node_groups
    serving = sizing["serving"]["world_size"]
    all_at_once = nodes_for([sizing["evaluation"]["gpus"], serving, *[serving] * (cfg.pipeline.max_replicas + 1)],
                            sizing["parallelism"]["nodes"], catalog.get(group.instance_type).gpus)
    assert all_at_once > group.max_size


def test_a_separate_serving_group_has_room_for_the_surge_replica():
    cfg = load(raw_config({
        "nemo-eks:gpuNodeGroups": [{"name": "train", "instanceType": "p5.48xlarge"},
                                   {"name": "serve", "instanceType": "p5.48xlarge"}],
        "nemo-eks:model": {"variant": "70b"}, "nemo-eks:serving": {"nodeGroup": "serve", "tp": 4, "maxReplicas": 2}}),
        "dev")
    sizes = {g.name: g.max_size for g in cfg.gpu_node_groups}
    # Two TP4 replicas fill one p5; the conversion or a new replica beside them needs a second node.
    assert sizes == {"train": cfg.sizing.parallelism.nodes, "serve": 2}


# ------------------------------------------------------------------------------------------------ faults


def past_backoff_limit(limit: int, restart_policies: dict[str, str], pods: list[tuple[str, str, list[int]]]) -> bool:
    """kubeflow/trainer v1.9.3 pkg/core/job.go:93-133 (PastBackoffLimit), transcribed: the restart counts of the
    init containers and containers of every Running pod whose replica restarts (OnFailure, Always, ExitCode)
    are summed; the job has failed when the sum reaches the limit (or is above 0 for a limit of 0)."""
    total = sum(sum(counts) for replica, phase, counts in pods
                if restart_policies[replica] in ("OnFailure", "Always", "ExitCode") and phase == "Running")
    return total > 0 if limit == 0 else total >= limit


def test_backoff_limit_survives_the_configured_container_faults(stack_synth):
    cfg = stack_config(stack_synth.stack)
    [job] = [m for m in stack_synth.manifests() if m["kind"] == "PyTorchJob"]
    replicas = job["spec"]["pytorchReplicaSpecs"]
    policies = {role: spec["restartPolicy"] for role, spec in replicas.items()}
    limit, faults = job["spec"]["runPolicy"]["backoffLimit"], cfg.pipeline.fault_tolerance.pod_restarts
    roles = [role for role, spec in replicas.items() for _ in range(spec["replicas"])]

    def after(fault_count: int) -> list[tuple[str, str, list[int]]]:
        # The worst case: each fault restarts every node's container once (the master's took the store with it).
        return [(role, "Running", [fault_count]) for role in roles]

    assert len(roles) == cfg.sizing.parallelism.nodes
    assert not past_backoff_limit(limit, policies, after(faults))
    assert past_backoff_limit(limit, policies, after(faults + 1))
    # A lost node's pod is recreated by the operator with fresh counts: only the survivors' restarts count.
    survivors = [(role, "Running", [faults]) for role in roles[1:]] + [(roles[0], "Pending", [])]
    assert not past_backoff_limit(limit, policies, survivors)


def test_the_old_limit_failed_a_four_node_run_at_its_first_fault():
    policies = {"Master": "OnFailure", "Worker": "OnFailure"}
    one_fault = [("Master", "Running", [1])] + [("Worker", "Running", [1])] * 3
    assert past_backoff_limit(3, policies, one_fault)
    assert not past_backoff_limit(training.backoff_limit(4, 1), policies, one_fault)


def test_fault_tolerance_comes_from_config():
    cfg = load(raw_config({"nemo-eks:faultTolerance": {"workerRestarts": 50, "podRestarts": 5,
                                                       "ncclTimeoutSeconds": 600, "rendezvousTimeoutSeconds": 900}}),
               "dev")
    job = pipeline.manifests(cfg)["training"]
    [master] = job["spec"]["pytorchReplicaSpecs"].values()
    [container] = master["template"]["spec"]["containers"]
    script = container["command"][-1]
    assert "--max-restarts=50" in script and "--rdzv-conf=join_timeout=900" in script
    assert {"name": layout.NCCL_TIMEOUT_ENV, "value": "600"} in container["env"]
    assert job["spec"]["runPolicy"]["backoffLimit"] == 5 * cfg.sizing.parallelism.nodes + 1


@pytest.mark.parametrize("key,value,allowed", [("workerRestarts", -1, "0..1000"), ("podRestarts", 101, "0..100"),
                                                ("ncclTimeoutSeconds", 10, "60..7200"),
                                                ("rendezvousTimeoutSeconds", 86400, "60..7200")])
def test_bad_fault_tolerance_settings(key, value, allowed):
    with pytest.raises(ConfigError) as caught:
        load(raw_config({"nemo-eks:faultTolerance": {key: value}}), "dev")
    assert caught.value.key == f"nemo-eks:faultTolerance.{key}" and allowed in str(caught.value)


def test_a_misspelt_fault_tolerance_key_is_rejected():
    with pytest.raises(ConfigError) as caught:
        load(raw_config({"nemo-eks:faultTolerance": {"maxRestarts": 5}}), "dev")
    assert "workerRestarts" in str(caught.value)


# ------------------------------------------------------------------------------------------------ no-op ups


def test_an_unchanged_config_renders_the_same_manifests():
    first, second = pipeline.manifests(load(raw_config(), "dev")), pipeline.manifests(load(raw_config(), "dev"))
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)


def test_a_new_serving_shape_leaves_training_evaluation_and_the_gatekeeper_alone():
    base = pipeline.manifests(load(raw_config(), "dev"))
    served = pipeline.manifests(load(raw_config({"nemo-eks:serving": {"maxSeqLength": 2048}}), "dev"))
    for key in ("training", "training_config", "evaluation", "evaluation_config", "gatekeeper",
                "gatekeeper_role", "gatekeeper_role_binding", "gatekeeper_service_account"):
        assert served[key] == base[key], key
    assert served["conversion"] != base["conversion"] and served["deployment"] != base["deployment"]
