"""Container images and what each NGC tag carries: the compatibility table checked at config time.

Sources:
- NeMo Framework containers -> NeMo: Megatron-Bridge docs/releases/software-versions.md and the NeMo
  Framework release notes. 26.02 is the last container with ``nemo.collections.llm`` (NeMo 2.7); from
  26.04 the containers ship Megatron-Bridge instead.
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
