"""Multi-node training over EFA: config, the training image and its ECR repository, the steps before torchrun
(run for real in bash with stand-ins for python3 and torchrun), the floors, and the fabric test's arithmetic
(checked against nccl-tests' own published output)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from infra import catalog, images, registry
from infra.config import ConfigError, load
from tests.conftest import raw_config, synth_config, synth_stack
from tools import synth
from workloads import fabric, pipeline, runconfig

ENTRYPOINTS = Path(__file__).resolve().parents[1] / "workloads" / "entrypoints"
sys.path.insert(0, str(ENTRYPOINTS))

import fabric_test  # noqa: E402

MULTI_NODE = {"nemo-eks:training": {"nodes": 2}}  # 2 x p4d.24xlarge, 4 EFA interfaces each


def stack_config(stack: str):
    raw, secrets = synth.read_stack_config(stack)
    return load(raw, stack, secret_keys=secrets)


def training_containers(manifest: dict) -> list[dict]:
    return [spec["template"]["spec"]["containers"][0] for spec in manifest["spec"]["pytorchReplicaSpecs"].values()]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container["env"]}


# ---------------------------------------------------------------------------------------------- config


def test_multi_node_efa_runs_get_the_checks_and_the_built_image():
    cfg = load(raw_config(MULTI_NODE), "test")
    efa = cfg.pipeline.efa
    assert efa.multi_node and efa.efa_devices == 4 and efa.fabric_test
    assert efa.built_image_tag == images.TRAINING_IMAGES["26.02"].tag == "26.02-efa1.50.0"
    assert efa.min_bus_bandwidth_gbps == catalog.FABRIC_FLOORS["p4d.24xlarge"].floor_gbps


def test_single_node_runs_keep_the_stock_image_and_no_network_pin():
    cfg = load(raw_config(), "test")
    assert cfg.sizing.parallelism.nodes == 1 and not cfg.pipeline.efa.multi_node
    [container, *_] = training_containers(pipeline.manifests(cfg)["training"])
    assert container["image"] == cfg.pipeline.nemo_image
    assert "NCCL_NET" not in env_of(container) and "efa_check.py" not in container["command"][-1]


@pytest.mark.parametrize("overrides,key,fragment", [
    ({"nemo-eks:images": {"nemo": "nvcr.io/nvidia/nemo:25.11"}}, "nemo-eks:images.nemo",
     "training spans 2 x p4d.24xlarge"),
    ({"nemo-eks:images": {"training": "nvcr.io/nvidia/nemo:latest"}}, "nemo-eks:images.training", "not 'latest'"),
    ({"nemo-eks:efa": {"minBusBandwidthGBps": -5}}, "nemo-eks:efa.minBusBandwidthGBps", "> 0"),
    ({"nemo-eks:efa": {"fabricTests": False}}, "nemo-eks:efa.fabricTests", "Did you mean 'fabricTest'?"),
])
def test_bad_efa_config_names_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as error:
        load(raw_config({**MULTI_NODE, **overrides}), "test")
    assert error.value.key == key and fragment in str(error.value)


def test_an_older_nemo_base_is_fine_for_a_single_node_run():
    cfg = load(raw_config({"nemo-eks:images": {"nemo": "nvcr.io/nvidia/nemo:25.11"}}), "test")
    assert cfg.pipeline.efa.built_image_tag is None


# ---------------------------------------------------------------------------------------------- image and registry


def test_every_multi_node_stack_builds_the_image_into_its_own_repository():
    for stack in synth.stack_names():
        cfg = stack_config(stack)
        s = synth_stack(stack)
        repositories = s.resources("aws:ecr/repository:Repository")
        [job] = [m for m in s.manifests() if m["kind"] == "PyTorchJob"]
        if not cfg.pipeline.efa.multi_node:
            assert repositories == [], stack
            continue
        [repository] = repositories
        assert repository.inputs["name"] == images.training_repository_name(cfg.prefix) == f"nemo-eks-{stack}-training"
        assert repository.inputs["imageTagMutability"] == "IMMUTABLE"
        assert repository.inputs["imageScanningConfiguration"] == {"scanOnPush": True}
        assert repository.protect == cfg.storage.protect
        [policy] = s.resources("aws:ecr/lifecyclePolicy:LifecyclePolicy")
        assert policy.inputs["policy"] == registry.lifecycle_policy()
        for container in training_containers(job):
            assert container["image"] == f"<{repository.name}.repositoryUrl>:{cfg.pipeline.efa.built_image_tag}"
            assert env_of(container)["NCCL_NET"] == images.NCCL_NET_NAME == "Libfabric"
            assert "efa_check.py" in container["command"][-1] and "fabric_test.py" in container["command"][-1]
        assert s.plan()["outputs"]["trainingImage"].endswith(f":{cfg.pipeline.efa.built_image_tag}")


def test_lifecycle_policy_expires_untagged_images_and_keeps_the_newest():
    rules = json.loads(registry.lifecycle_policy())["rules"]
    assert [r["rulePriority"] for r in rules] == [1, 2]
    assert rules[0]["selection"]["tagStatus"] == "untagged" and rules[0]["selection"]["countType"] == "sinceImagePushed"
    # ECR: the rule with tagStatus any must have the highest rulePriority
    assert rules[-1]["selection"]["tagStatus"] == "any" and rules[-1]["selection"]["countNumber"] == registry.TAGGED_KEPT
    assert all(r["action"] == {"type": "expire"} for r in rules)


def test_an_explicit_training_image_needs_no_repository():
    s = synth_config("efa-explicit", {**MULTI_NODE, "nemo-eks:images": {"training": "registry.example/efa-nemo:1.0"}})
    assert s.resources("aws:ecr/repository:Repository") == []
    [job] = [m for m in s.manifests() if m["kind"] == "PyTorchJob"]
    assert {c["image"] for c in training_containers(job)} == {"registry.example/efa-nemo:1.0"}
    assert "efa_check.py" in training_containers(job)[0]["command"][-1]


def test_fabric_test_can_be_turned_off_but_the_check_stays():
    cfg = load(raw_config({**MULTI_NODE, "nemo-eks:efa": {"fabricTest": False}}), "test")
    [container, *_] = training_containers(pipeline.manifests(cfg)["training"])
    script = container["command"][-1]
    assert "efa_check.py --config /etc/nemo-eks/run.json --efa-devices 4 && exec torchrun" in script
    assert "fabric_test.py" not in script


def test_the_floor_reaches_the_fabric_test():
    cfg = load(raw_config({**MULTI_NODE, "nemo-eks:efa": {"minBusBandwidthGBps": 60}}), "test")
    [container, *_] = training_containers(pipeline.manifests(cfg)["training"])
    assert "--min-busbw 60.0 --instance-type p4d.24xlarge" in container["command"][-1]


# ---------------------------------------------------------------------------------------------- the steps before torchrun


@pytest.fixture
def steps(tmp_path):
    """The training container's shell command for a multi-node run, with /fsx under tmp_path and stand-ins for
    python3 (efa_check.py) and torchrun that log their arguments and exit as told."""
    cfg = load(raw_config(MULTI_NODE), "test")
    [container, *_] = training_containers(pipeline.manifests(cfg)["training"])
    script = container["command"][-1].replace("/fsx", str(tmp_path / "fsx"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    stand_ins = {
        "python3": f'echo "python3 $*" >> {log}; exit "${{CHECK_EXIT:-0}}"',
        "torchrun": f'echo "torchrun $*" >> {log}; case "$*" in *fabric_test.py*) exit "${{FABRIC_EXIT:-0}}";; esac',
    }
    for name, body in stand_ins.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    marker = Path(fabric.fabric_marker(runconfig.run_paths(cfg)).replace("/fsx", str(tmp_path / "fsx")))

    def run(**env: str) -> tuple[int, list[str]]:
        log.unlink(missing_ok=True)
        done = subprocess.run(["/bin/bash", "-c", script], env={
            "PATH": f"{bin_dir}:/usr/bin:/bin", "MASTER_ADDR": "train-master-0", "MASTER_PORT": "23456", **env},
            capture_output=True, text=True, timeout=60)
        calls = log.read_text().splitlines() if log.exists() else []
        return done.returncode, [c.split()[0] + " " + Path(next(a for a in c.split() if a.endswith(".py"))).name
                                 for c in calls]

    return run, marker


def test_a_failed_efa_check_stops_the_pod_before_any_torchrun(steps):
    run, _ = steps
    assert run(CHECK_EXIT="1") == (1, ["python3 efa_check.py"])


def test_the_fabric_test_runs_before_training_and_a_failure_stops_it(steps):
    run, _ = steps
    assert run() == (0, ["python3 efa_check.py", "torchrun fabric_test.py", "torchrun finetune.py"])
    assert run(FABRIC_EXIT="1") == (1, ["python3 efa_check.py", "torchrun fabric_test.py"])


def test_a_run_whose_fabric_passed_does_not_test_it_again(steps):
    run, marker = steps
    marker.parent.mkdir(parents=True)
    marker.write_text("{}")
    assert run() == (0, ["python3 efa_check.py", "torchrun finetune.py"])


# ---------------------------------------------------------------------------------------------- floors and the measurement


def test_every_efa_gpu_type_has_a_floor_below_its_published_figure():
    for name in catalog.GPU_INSTANCE_TYPES:
        if not catalog.get(name).efa:
            continue
        floor = catalog.FABRIC_FLOORS[name]
        assert 0 < floor.floor_gbps < floor.published_gbps
        assert "nccl-tests" in floor.source and str(floor.message_bytes) in floor.source
        assert floor.message_bytes >= fabric_test.LARGE_MESSAGE_BYTES  # the floor is a large-message figure


def test_bus_bandwidth_is_computed_as_nccl_tests_does():
    # awsome-distributed-training micro-benchmarks/nccl-tests/README.md, 2 x p5.48xlarge (16 ranks), 2147483648 B:
    # time 9074.5 us, algbw 236.65 GB/s, busbw 443.72 GB/s; 2 x p4de (16 ranks): 51406 us, 41.78, 78.33.
    assert fabric_test.measure(2147483648, 9074.5e-6, 16) == fabric_test.Measurement(2147483648, 9074.5e-6, 236.65, 443.72)
    assert fabric_test.measure(2147483648, 51406e-6, 16).busbw_gbps == catalog.FABRIC_FLOORS["p4de.24xlarge"].published_gbps
    # topology-aware-nccl-tests/README.md, p5en, 17179869184 B: 92173 us, algbw 186.39, busbw 369.86 GB/s. The README
    # gives no rank count: these three agree only for 128 ranks, the 16 nodes the floor records.
    p5en = catalog.FABRIC_FLOORS["p5en.48xlarge"]
    ranks = p5en.nodes * catalog.get("p5en.48xlarge").gpus
    assert fabric_test.measure(p5en.message_bytes, 92173e-6, ranks) == fabric_test.Measurement(
        p5en.message_bytes, 92173e-6, 186.39, p5en.published_gbps)
    assert fabric_test.measure(p5en.message_bytes, 92173e-6, ranks // 2).busbw_gbps != p5en.published_gbps


def test_the_verdict_counts_large_messages_and_names_the_measured_number():
    floor = catalog.FABRIC_FLOORS["p5.48xlarge"].floor_gbps
    healthy = [fabric_test.measure(256 * 1024 ** 2, 1e-3, 32), fabric_test.measure(2 * 1024 ** 3, 9.2e-3, 32)]
    passed, message = fabric_test.verdict(healthy, floor, 32, 4, "p5.48xlarge")
    assert passed and "passed" in message
    # sockets: 2 GiB in 0.8 s; a fast small message must not rescue it
    sockets = [fabric_test.measure(256 * 1024 ** 2, 1e-4, 32), fabric_test.measure(2 * 1024 ** 3, 0.8, 32)]
    passed, message = fabric_test.verdict(sockets, floor, 32, 4, "p5.48xlarge")
    busbw = fabric_test.large_message_busbw(sockets)
    assert not passed and busbw < 10 and f"{busbw:.1f} GB/s" in message and f"floor {floor:.1f} GB/s" in message
    assert "not on EFA" in message and "efa.fabricTest" in message
    # half the interfaces: a fabric problem, not sockets
    half = [fabric_test.measure(2 * 1024 ** 3, 2 * 9.2e-3 * 1.1, 32)]
    passed, message = fabric_test.verdict(half, floor, 32, 4, "p5.48xlarge")
    assert not passed and "part of the fabric" in message


def test_the_report_reads_like_all_reduce_perf():
    lines = fabric_test.table([fabric_test.measure(2147483648, 9074.5e-6, 16)]).splitlines()
    assert lines[0].split()[1:] == ["size", "count", "type", "redop", "time", "algbw", "busbw"]
    assert lines[2].split() == ["2147483648", "536870912", "float", "sum", "9074.5", "236.65", "443.72"]


def test_every_failure_the_pods_can_report_has_a_runbook_entry():
    import efa_check

    runbook = (synth.ROOT / "docs" / "runbook.md").read_text()
    for check in efa_check.CHECKS:
        assert f'<a id="runbook-efa-{check}"></a>' in runbook
    assert '<a id="runbook-efa-fabric"></a>' in runbook and "runbook.md#runbook-efa-fabric" in fabric_test.DOCS
    assert '<a id="runbook-efa-image"></a>' in runbook
    import re
    reported = set(re.findall(r'Problem\("(\w+)"', (ENTRYPOINTS / "efa_check.py").read_text()))
    assert reported == set(efa_check.CHECKS)
    problem = efa_check.Problem("plugin", "cause", "fix")
    assert "docs/runbook.md#runbook-efa-plugin" in str(problem)
