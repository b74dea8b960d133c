"""images/training/Dockerfile: linted with hadolint, parsed with dockerfile-parse (both from .venv-tools,
requirements-tools.txt), and held to the pins of infra/images.py TRAINING_IMAGES and to the steps the EFA
fix depends on. Building it needs docker, NGC and tens of GB: the training-image workflow and `make image` do."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from infra import images
from tools import synth, training_image

DOCKERFILE = synth.ROOT / "images" / "training" / "Dockerfile"
TOOLS_BIN = synth.ROOT / ".venv-tools" / "bin"
HADOLINT = Path(os.environ.get("HADOLINT", TOOLS_BIN / "hadolint"))
TOOLS_PYTHON = Path(os.environ.get("TOOLS_PYTHON", TOOLS_BIN / "python"))

PARSE = """
import json, sys
from dockerfile_parse import DockerfileParser
parser = DockerfileParser(path=sys.argv[1])
print(json.dumps({"baseimage": parser.baseimage, "args": parser.args,
                  "structure": [{"instruction": i["instruction"], "value": i["value"]} for i in parser.structure]}))
"""


@pytest.fixture(scope="module")
def parsed() -> dict:
    assert TOOLS_PYTHON.exists(), f"{TOOLS_PYTHON} is missing: `make test` installs .venv-tools"
    done = subprocess.run([str(TOOLS_PYTHON), "-c", PARSE, str(DOCKERFILE)], capture_output=True, text=True,
                          timeout=120, check=True)
    return json.loads(done.stdout)


def instructions(parsed: dict, kind: str) -> list[str]:
    return [i["value"] for i in parsed["structure"] if i["instruction"] == kind]


def run_step(parsed: dict, needle: str) -> tuple[int, str]:
    """Index among all instructions and text of the one RUN containing ``needle``."""
    found = [(n, i["value"]) for n, i in enumerate(parsed["structure"])
             if i["instruction"] == "RUN" and needle in i["value"]]
    assert len(found) == 1, (needle, found)
    return found[0]


def test_hadolint_passes_and_would_catch_a_bad_dockerfile(tmp_path):
    assert HADOLINT.exists(), f"{HADOLINT} is missing: `make test` installs it into .venv-tools"
    result = subprocess.run([str(HADOLINT), str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM nvcr.io/nvidia/nemo:latest\nRUN cd /tmp && curl -O http://example.invalid/x | sh\n")
    result = subprocess.run([str(HADOLINT), str(bad)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "DL3007" in result.stdout and "DL3003" in result.stdout


def test_pins_equal_the_compatibility_table(parsed):
    row = images.training_image_for(images.DEFAULT_NEMO_IMAGE)
    assert parsed["baseimage"] == images.DEFAULT_NEMO_IMAGE
    assert instructions(parsed, "FROM") == ["nvcr.io/nvidia/nemo:${BASE_TAG}"]
    args = parsed["args"]
    assert args["BASE_TAG"] == row.base_tag
    assert args["EFA_INSTALLER_VERSION"] == row.efa_installer
    assert args["AWS_OFI_NCCL_VERSION"] == row.aws_ofi_nccl
    assert args["AWS_OFI_NCCL_SHA512"] == row.aws_ofi_nccl_sha512 and re.fullmatch(r"[0-9a-f]{128}", row.aws_ofi_nccl_sha512)
    assert args["NCCL_TESTS_VERSION"] == row.nccl_tests
    assert args["AWS_OFI_NCCL_PREFIX"] == images.AWS_OFI_NCCL_PREFIX
    # the tag names the base and the installer
    assert row.tag == f"{args['BASE_TAG']}-efa{args['EFA_INSTALLER_VERSION']}"
    assert f"NEMO_EKS_TRAINING_IMAGE=${{BASE_TAG}}-efa${{EFA_INSTALLER_VERSION}}" in instructions(parsed, "ENV")[0]


def test_the_build_passes_every_pin_the_dockerfile_declares(parsed):
    flags = training_image.build_args(images.parse(images.DEFAULT_NEMO_IMAGE).tag)
    passed = dict(flag.split("=", 1) for flag in flags[1::2])
    assert set(passed) <= set(parsed["args"])
    assert all(parsed["args"][key] == value for key, value in passed.items())
    # every pin (not the build's own knobs) is passed, so another base tag's row is built as a whole
    assert set(parsed["args"]) - set(passed) == {"AWS_OFI_NCCL_PREFIX", "NCCL_GENCODE"}


def test_efa_installer_runs_as_in_a_container(parsed):
    _, step = run_step(parsed, "efa_installer.sh")
    assert "--skip-kmod" in step and "--skip-limit-conf" in step and "--no-verify" in step
    assert "efa-installer.amazonaws.com/aws-efa-installer-${EFA_INSTALLER_VERSION}.tar.gz" in step
    # the base image's own rdma-core goes first, so there is one
    assert step.index("apt-get remove") < step.index("efa_installer.sh") and "libibverbs1" in step


def test_hpcx_rdma_core_is_off_the_loader_path_before_the_plugin_is_built(parsed):
    disable, step = run_step(parsed, "/opt/rdma-core")
    assert "/etc/ld.so.conf.d/" in step and "mv /opt/rdma-core" in step and "ldconfig" in step
    installer, _ = run_step(parsed, "efa_installer.sh")
    plugin, _ = run_step(parsed, "aws-ofi-nccl/releases/download")
    assert installer < disable < plugin


def test_plugin_is_built_against_the_images_cuda_and_checked(parsed):
    _, step = run_step(parsed, "aws-ofi-nccl/releases/download")
    assert "sha512sum -c" in step
    assert "--with-cuda=/usr/local/cuda" in step and "--with-libfabric=/opt/amazon/efa" in step
    assert '--prefix="${AWS_OFI_NCCL_PREFIX}"' in step and "--enable-platform-aws" in step
    [env] = instructions(parsed, "ENV")
    assert "NCCL_NET_PLUGIN=${AWS_OFI_NCCL_PREFIX}/lib/libnccl-net-ofi.so" in env
    assert images.NCCL_NET_PLUGIN_PATH == f"{images.AWS_OFI_NCCL_PREFIX}/lib/libnccl-net-ofi.so"
    # the build fails if the plugin does not load, or the image's NCCL is older than the plugin supports
    _, verify = run_step(parsed, "ctypes.CDLL")
    assert "os.RTLD_NOW | os.RTLD_LOCAL" in verify and "(2, 17, 1)" in verify and "rdma-core" in verify


def test_nccl_tests_are_built_with_mpi_against_the_images_nccl(parsed):
    _, step = run_step(parsed, "nccl-tests/archive/refs/tags/${NCCL_TESTS_VERSION}")
    assert "MPI=1" in step and "MPI_HOME=/opt/amazon/openmpi" in step and "NCCL_HOME=/usr" in step
    assert 'NVCC_GENCODE="${NCCL_GENCODE}"' in step
    assert "compute_80" in parsed["args"]["NCCL_GENCODE"] and "compute_90" in parsed["args"]["NCCL_GENCODE"]
    assert images.NCCL_TESTS_DIR in instructions(parsed, "ENV")[0]


# ---------------------------------------------------------------------------------------------- how it is built


def test_workflow_builds_on_dockerfile_or_pin_changes_for_every_target():
    import yaml

    workflow = yaml.safe_load((synth.ROOT / ".github" / "workflows" / "training-image.yml").read_text())
    on = workflow.pop(True)  # YAML 1.1 reads the key `on` as true
    assert set(on) == {"push", "workflow_dispatch"}
    assert on["push"]["branches"] == ["main"]
    assert {"images/training/**", "infra/images.py"} <= set(on["push"]["paths"])
    assert workflow["permissions"] == {"contents": "read"}
    targets, build = workflow["jobs"]["targets"], workflow["jobs"]["build"]
    assert any("tools.training_image targets" in step.get("run", "") for step in targets["steps"])
    assert build["strategy"]["matrix"]["target"] == "${{ fromJSON(needs.targets.outputs.targets) }}"
    assert build["permissions"] == {"contents": "read", "id-token": "write"}  # OIDC, no stored keys
    assert build["environment"] == "${{ matrix.target.stack }}"  # the stack's own role and region
    steps = build["steps"]
    names = [step.get("name") or step.get("uses") for step in steps]
    assert names.index("Free disk for the base image") < names.index("Build and push")
    assert "data-root" in steps[0]["run"] and "rm -rf /usr/share/dotnet" in steps[0]["run"]
    [credentials] = [s for s in steps if s.get("uses", "").startswith("aws-actions/configure-aws-credentials")]
    assert "role-to-assume" in credentials["with"]
    [push] = [s for s in steps if s.get("name") == "Build and push"]
    assert push["if"] == "steps.pushed.outputs.done != 'true'"  # immutable tags: an existing one is left alone
    assert "docker build $BUILD_ARGS" in push["run"] and "images/training" in push["run"]


def test_targets_are_the_multi_node_stacks_with_their_repository_and_flags():
    found = {t["stack"]: t for t in training_image.targets()}
    for stack in synth.stack_names():
        raw, secrets = synth.read_stack_config(stack)
        from infra.config import load

        cfg = load(raw, stack, secret_keys=secrets)
        if cfg.pipeline.efa.built_image_tag is None:
            assert stack not in found
            continue
        target = found[stack]
        assert target["repository"] == f"nemo-eks-{stack}-training" and target["tag"] == cfg.pipeline.efa.built_image_tag
        assert target["build_args"].split() == training_image.build_args(images.parse(cfg.pipeline.nemo_image).tag)
    assert found, "no stack builds the image: the workflow would never run a build"


def test_make_image_builds_what_the_workflow_builds():
    done = subprocess.run(["make", "-n", "image", "STACK=prod"], cwd=synth.ROOT, capture_output=True, text=True,
                          timeout=120, check=True)
    assert "tools.training_image tag --base-tag 26.02" in done.stdout
    assert "tools.training_image build-args --base-tag 26.02" in done.stdout
    assert "images/training" in done.stdout and "nemo-eks-prod-training" in done.stdout
    assert training_image.main(["tag", "--base-tag", "25.11"]) == 2  # no row for that base: refused
