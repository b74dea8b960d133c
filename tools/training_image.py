"""The EFA training image's build inputs, for `make image` and .github/workflows/training-image.yml.

    python -m tools.training_image tag [--base-tag 26.02]          the image tag: <NeMo tag>-efa<installer>
    python -m tools.training_image build-args [--base-tag 26.02]   `docker build` --build-arg flags
    python -m tools.training_image targets                         JSON: the stacks that train on it, with their
                                                                   ECR repository, tag and build flags

The pins live in infra/images.py TRAINING_IMAGES; the Dockerfile's ARG defaults equal them (a test checks), and
the build passes them explicitly so that a build for another base tag takes that tag's row.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from infra import config, images
from tools import synth


def build_args(base_tag: str) -> list[str]:
    row = images.training_image_for(f"nvcr.io/nvidia/nemo:{base_tag}")
    values = {"BASE_TAG": row.base_tag, "EFA_INSTALLER_VERSION": row.efa_installer,
              "AWS_OFI_NCCL_VERSION": row.aws_ofi_nccl, "AWS_OFI_NCCL_SHA512": row.aws_ofi_nccl_sha512,
              "NCCL_TESTS_VERSION": row.nccl_tests}
    return [part for key, value in values.items() for part in ("--build-arg", f"{key}={value}")]


def targets() -> list[dict[str, str]]:
    """Every stack whose training runs on the project-built image, with what its build needs."""
    found = []
    for stack in synth.stack_names():
        raw, secret_keys = synth.read_stack_config(stack)
        cfg = config.load(raw, stack, synth.PROJECT, secret_keys)
        tag = cfg.pipeline.efa.built_image_tag
        if tag is None:
            continue
        base_tag = images.parse(cfg.pipeline.nemo_image).tag
        found.append({"stack": stack, "repository": images.training_repository_name(cfg.prefix), "tag": tag,
                      "build_args": shlex.join(build_args(base_tag))})
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("tag", "build-args", "targets"))
    parser.add_argument("--base-tag", default=images.parse(images.DEFAULT_NEMO_IMAGE).tag)
    args = parser.parse_args(argv)
    try:
        if args.what == "tag":
            print(images.training_image_for(f"nvcr.io/nvidia/nemo:{args.base_tag}").tag)
        elif args.what == "build-args":
            print(shlex.join(build_args(args.base_tag)))
        else:
            print(json.dumps(targets(), sort_keys=True))
    except images.ImageError as error:
        print(f"--base-tag {args.base_tag}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
