"""Container images and what each NGC tag carries: the compatibility table checked at config time.

Sources:
- NeMo Framework containers -> NeMo: Megatron-Bridge docs/releases/software-versions.md and the NeMo
  Framework release notes. 26.02 is the last container with ``nemo.collections.llm`` (NeMo 2.7); from
  26.04 the containers ship Megatron-Bridge instead.
- NeMo 26.02 ships CUDA 13.0.2 (Megatron-Bridge docs/releases/software-versions.md, "NeMo Framework 26.02").
- The EFA training image (images/training/Dockerfile): see ``TRAINING_IMAGES`` below.
- Triton ``<yy.mm>-trtllm-python-py3`` -> TensorRT-LLM: triton-inference-server/server
  docs/introduction/compatibility.md. TensorRT-LLM 1.2.x is the last line that builds TensorRT engines
  (``trtllm-build``, ``tensorrt_llm._tensorrt_engine.LLM``); later releases serve through the PyTorch backend only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

NGC_REGISTRY = "nvcr.io"
DEFAULT_NEMO_IMAGE = "nvcr.io/nvidia/nemo:26.02"
DEFAULT_TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3"
BACKENDS = ("engine", "llmapi")

# NeMo Framework container (yy.mm) -> nemo_toolkit version. Fine-tuning uses the NeMo 2 API of these.
NEMO_CONTAINERS: Mapping[str, str] = MappingProxyType({
    "24.12": "2.1.0", "25.02": "2.2.0", "25.04": "2.3.0", "25.07": "2.4.0", "25.09": "2.5.0", "25.11": "2.6.0",
    "26.02": "2.7.0",
})
# Triton TensorRT-LLM container (yy.mm) -> TensorRT-LLM. Only 1.x: the entrypoints use the 1.x LLM API.
TRITON_TRTLLM: Mapping[str, str] = MappingProxyType({
    "25.09": "1.0.0", "25.10": "1.0.0", "25.11": "1.0.3", "25.12": "1.1.0", "26.01": "1.1.0", "26.02": "1.1.0",
    "26.03": "1.2.0", "26.04": "1.2.1", "26.05": "1.2.1", "26.06": "1.2.1", "26.07": "1.2.1",
})
LAST_ENGINE_TRTLLM = "1.2.1"

_IMAGE = re.compile(r"(?P<repository>[a-z0-9.-]+(?::\d+)?/[a-z0-9._/-]+):(?P<tag>[A-Za-z0-9._-]+)")
_RELEASE = re.compile(r"(?P<release>\d{2}\.\d{2})(\.\d+)?(-.+)?")


class ImageError(ValueError):
    pass


@dataclass(frozen=True)
class Image:
    reference: str
    repository: str
    tag: str
    release: str | None  # yy.mm of an NGC release tag

    @property
    def from_ngc(self) -> bool:
        return self.repository.startswith(f"{NGC_REGISTRY}/")


def parse(reference: str) -> Image:
    match = _IMAGE.fullmatch(reference)
    if not match or match.group("tag") == "latest":
        raise ImageError("an image pinned by tag, <registry>/<repository>:<tag> (not 'latest')")
    release = _RELEASE.fullmatch(match.group("tag"))
    if release and not 1 <= int(release.group("release")[3:]) <= 12:
        # NGC tags are <yy>.<mm> of the release month: 26.13 is a typo, and would pass a "newer than" test
        raise ImageError(f"a release tag <yy.mm> with a month 01..12; {release.group('release')} has month "
                         f"{release.group('release')[3:]}")
    return Image(reference, match.group("repository"), match.group("tag"), release.group("release") if release else None)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def check_nemo(reference: str) -> Image:
    image = parse(reference)
    if image.release not in NEMO_CONTAINERS:
        raise ImageError(f"a NeMo Framework container with nemo.collections.llm (NeMo 2.x): tags "
                         f"{', '.join(NEMO_CONTAINERS)}; 26.04 and later carry Megatron-Bridge instead")
    return image


def trtllm_version(reference: str) -> str:
    return TRITON_TRTLLM[parse(reference).release or ""]


def check_triton(reference: str, backend: str) -> Image:
    """The Triton image serves, and for the engine backend also builds, the model."""
    image = parse(reference)
    if not image.tag.endswith("-trtllm-python-py3"):
        raise ImageError("a Triton TensorRT-LLM image, tag <yy.mm>-trtllm-python-py3")
    if image.release not in TRITON_TRTLLM:
        newer = bool(image.release) and image.release > max(TRITON_TRTLLM)
        if newer and backend == "llmapi":
            return image  # newer than the table: TensorRT-LLM >= 1.2.1, whose PyTorch backend llmapi uses
        if newer:
            raise ImageError(f"for the engine backend, TensorRT-LLM <= {LAST_ENGINE_TRTLLM} (Triton <= 26.07); "
                             "later releases build no engines: use serving.backend llmapi with them")
        raise ImageError(f"a Triton release with TensorRT-LLM 1.x: {', '.join(TRITON_TRTLLM)}"
                         + (" or newer for the llmapi backend" if backend == "llmapi" else ""))
    if backend == "engine" and _version_tuple(TRITON_TRTLLM[image.release]) > _version_tuple(LAST_ENGINE_TRTLLM):
        raise ImageError(f"for the engine backend, TensorRT-LLM <= {LAST_ENGINE_TRTLLM} (Triton <= 26.07)")
    return image


# --------------------------------------------------------------------------------------------------
# The EFA-ready training image built from images/training/Dockerfile.
#
# The stock NeMo image cannot run NCCL over EFA on AWS: HPC-X's own rdma-core (/opt/rdma-core/build/lib)
# shadows the system libibverbs that libefa was built against, the aws-ofi-nccl plugin fails to load
# ("version `IBVERBS_PRIVATE_34' not found") and NCCL silently falls back to TCP sockets
# (NVIDIA-NeMo/Megatron-Bridge#2824, NeMo 26.02.00). The project's image adds the EFA software and an
# aws-ofi-nccl built against the image's own CUDA and NCCL, and takes HPC-X's rdma-core off the loader path.


@dataclass(frozen=True)
class TrainingImage:
    """What the project's training image adds to one NeMo base tag. The Dockerfile's ARG defaults must equal
    the row of ``DEFAULT_NEMO_IMAGE``'s tag (tests/test_training_image.py parses the Dockerfile)."""

    base_tag: str
    cuda: str  # of the base image: aws-ofi-nccl is compiled against it
    efa_installer: str
    aws_ofi_nccl: str  # release tag of aws/aws-ofi-nccl
    aws_ofi_nccl_sha512: str  # of the release tarball, from the release notes
    nccl_tests: str  # release tag of NVIDIA/nccl-tests

    @property
    def tag(self) -> str:
        """The image tag names the NeMo base and the EFA installer: a new installer is a new, immutable tag."""
        return f"{self.base_tag}-efa{self.efa_installer}"


# EFA installer 1.50.0 (2026-08-21): libfabric 2.6.0amzn1.0, rdma-core 64.0, aws-ofi-nccl 1.21.1 (AWS EC2 user
# guide, "Elastic Fabric Adapter release notes", efa-changelog). aws-ofi-nccl v1.21.1 was "tested with Libfabric
# v2.6.0amzn1.0 ... backward compatibility with older NCCL versions (NCCL v2.17.1 and later)" (its GitHub
# release notes, which also give the tarball's sha512). nccl-tests v2.19.6 is the newest release tag of
# NVIDIA/nccl-tests in the snapshot read (2026-07-09).
TRAINING_IMAGES: Mapping[str, TrainingImage] = MappingProxyType({
    "26.02": TrainingImage(
        base_tag="26.02", cuda="13.0.2", efa_installer="1.50.0", aws_ofi_nccl="v1.21.1",
        aws_ofi_nccl_sha512=("ab7aa6b6f2f5117252e7603cf39458ec9b2d03a4bc2d8b36ac61f0b41287bcea"
                             "3de619ed2d1638b4258694f48380971a2c60a4eac8e230097e80de2bb8e04e75"),
        nccl_tests="v2.19.6"),
})
TRAINING_REPOSITORY_SUFFIX = "training"  # the stack's ECR repository: <project>-<stack>-training

# Where the image installs the plugin, and the network name NCCL must be pinned to. NCCL_NET_PLUGIN may be a
# path: NCCL dlopen()s it as given (NVIDIA/nccl src/plugin/plugin_open.cc, openPluginLib), so no other
# libnccl-net*.so on the search path (the EFA installer's own, an NGC default) can be picked instead.
# aws-ofi-nccl names its network "Libfabric" from v1.13.0 on (the tags' src/nccl_ofi_interface_nvidia.c[pp]:
# v1.12.1-aws still has only ``.name = "AWS Libfabric"``; the code's own comment says "1.11.0 and prior"), and for
# scripts that still set "AWS Libfabric" (or "OFI") the plugin renames itself to match NCCL_NET
# (nvidia_plugin_name_fixup, at v1.21.1 too). The file: libnccl-net.so up to v1.14; from v1.15.0 on
# libnccl-net-ofi.so with libnccl-net.so as a link or copy beside it by default (src/Makefile.am of each tag).
AWS_OFI_NCCL_PREFIX = "/opt/aws-ofi-nccl"
NCCL_NET_PLUGIN_PATH = f"{AWS_OFI_NCCL_PREFIX}/lib/libnccl-net-ofi.so"
NCCL_NET_NAME = "Libfabric"
EFA_BIN_DIR = "/opt/amazon/efa/bin"  # fi_info; the installer puts libfabric under /opt/amazon/efa
NCCL_TESTS_DIR = "/opt/nccl-tests/build"


def training_image_for(nemo_reference: str) -> TrainingImage:
    """The training image row for a NeMo image; ImageError names the tags the project can build on."""
    release = parse(nemo_reference).tag
    if release not in TRAINING_IMAGES:
        raise ImageError(f"a NeMo tag the EFA training image is built for: {', '.join(TRAINING_IMAGES)} "
                         "(images/training/Dockerfile and infra/images.py TRAINING_IMAGES); or set images.training "
                         "to an EFA-ready image you build yourself")
    return TRAINING_IMAGES[release]


def training_repository_name(prefix: str) -> str:
    return f"{prefix}-{TRAINING_REPOSITORY_SUFFIX}"
