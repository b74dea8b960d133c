"""Writes the run.json files tests/nemo builds NeMo objects from, with the main environment (the config code
needs packages .venv-nemo does not have):

    .venv/bin/python -m tests.nemo.write_runs OUT_DIR

One per stack file (exactly what its training pods are given) and one per planner shape below: shapes no
stack file has, so that NeMo's own checks see every kind of plan the planner makes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from infra import config
from tools import synth
from workloads import runconfig

# name -> stack config on top of a one-group stack. Each is here for what the stacks do not cover.
SHAPES: dict[str, dict] = {
    # long sequences: the planner adds context parallelism (CP 2 at 16k tokens for 70B on p5)
    "shape-70b-sft-seq16k": {
        "nemo-eks:gpuNodeGroups": [{"name": "train", "instanceType": "p5.48xlarge"}],
        "nemo-eks:model": {"variant": "70b"},
        "nemo-eks:training": {"method": "sft", "seqLength": 16384}},
    # 126 layers over a pipeline that does not divide them, full SFT in FP8
    "shape-405b-sft-fp8": {
        "nemo-eks:gpuNodeGroups": [{"name": "train", "instanceType": "p5.48xlarge"}],
        "nemo-eks:model": {"variant": "405b"},
        "nemo-eks:training": {"method": "sft", "precision": "fp8"}},
}


def shape_config(overrides: dict) -> dict[str, str]:
    merged = {"aws:region": "us-east-1", **overrides}
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in merged.items()}


def write(out: Path) -> list[Path]:
    written = []
    for stack in synth.stack_names():
        raw, secret_keys = synth.read_stack_config(stack)
        written.append(out / f"{stack}.json")
        document = runconfig.training_document(config.load(raw, stack, secret_keys=secret_keys))
        written[-1].write_text(json.dumps(document, indent=1))
    for name, overrides in SHAPES.items():
        written.append(out / f"{name}.json")
        document = runconfig.training_document(config.load(shape_config(overrides), "test"))
        written[-1].write_text(json.dumps(document, indent=1))
    return written


if __name__ == "__main__":
    write(Path(sys.argv[1]))
