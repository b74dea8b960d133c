"""Where every stage reads and writes on the shared FSx volume, and the markers that chain the stages.

Stdlib only: this file ships to the pods (in the entrypoints ConfigMap) and is imported by the Pulumi side,
so both agree on every path by construction.

    /fsx/datasets/<dataset>/train.jsonl [validation.jsonl]      (the datasets bucket, linked by FSx)
    /fsx/models/base/<hf org>/<hf name>/hf                      Hugging Face download of the base model
    /fsx/models/base/<hf org>/<hf name>/nemo                    its NeMo import, made once and reused
    /fsx/checkpoints/<run id>/data/{training,validation}.jsonl  the run's data, as NeMo's data module wants it
    /fsx/checkpoints/<run id>/PREPARED                          marker: data laid out, base model imported
    /fsx/checkpoints/<run id>/nemo/...                          NeMo logs and checkpoints (AutoResume looks here)
    /fsx/checkpoints/<run id>/TRAINING_COMPLETE                 marker: training finished
    /fsx/checkpoints/<run id>/hf                                merged Hugging Face export (evaluated, then served)
    /fsx/checkpoints/<run id>/evaluation/<eval id>/report.json  evaluation report (report.md beside it)
    /fsx/checkpoints/<run id>/evaluation/<eval id>/EVALUATION_COMPLETE   marker: the gate passed
    /fsx/models/base/<hf org>/<hf name>/evaluation/<key>.json   the base model's numbers, once per dataset
    /fsx/models/<run id>/<serving id>/engine                    TensorRT-LLM engine (engine backend)
    /fsx/models/<run id>/<serving id>/triton                    Triton model repository
    /fsx/models/<run id>/<serving id>/CONVERSION_COMPLETE       marker: the model repository is ready
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

FSX_MOUNT = PurePosixPath("/fsx")
ENTRYPOINTS_DIR = PurePosixPath("/opt/nemo-eks")  # the entrypoints ConfigMap
RUN_CONFIG_DIR = PurePosixPath("/etc/nemo-eks")  # the run's ConfigMap
RUN_CONFIG_FILE = RUN_CONFIG_DIR / "run.json"

PREPARED_MARKER = "PREPARED"
TRAINING_MARKER = "TRAINING_COMPLETE"
EVALUATION_MARKER = "EVALUATION_COMPLETE"
CONVERSION_MARKER = "CONVERSION_COMPLETE"
NCCL_TIMEOUT_ENV = "NEMO_EKS_NCCL_TIMEOUT_SECONDS"  # set in the training containers; finetune.py reads it
RUN_SCHEMA = 1  # workloads.runconfig.SCHEMA_VERSION; the pods cannot import it, a test keeps the two equal


@dataclass(frozen=True)
class RunPaths:
    run_id: str
    serving_id: str
    dataset: str
    hf_model_id: str
    eval_id: str = "default"

    @property
    def dataset_dir(self) -> PurePosixPath:
        return FSX_MOUNT / "datasets" / self.dataset

    @property
    def base_model_dir(self) -> PurePosixPath:
        return FSX_MOUNT / "models" / "base" / self.hf_model_id

    @property
    def base_hf_dir(self) -> PurePosixPath:
        return self.base_model_dir / "hf"

    @property
    def base_nemo_dir(self) -> PurePosixPath:
        return self.base_model_dir / "nemo"

    @property
    def run_dir(self) -> PurePosixPath:
        return FSX_MOUNT / "checkpoints" / self.run_id

    @property
    def data_dir(self) -> PurePosixPath:
        return self.run_dir / "data"

    @property
    def nemo_log_dir(self) -> PurePosixPath:
        return self.run_dir / "nemo"

    @property
    def prepared_marker(self) -> PurePosixPath:
        return self.run_dir / PREPARED_MARKER

    @property
    def training_marker(self) -> PurePosixPath:
        return self.run_dir / TRAINING_MARKER

    @property
    def serving_dir(self) -> PurePosixPath:
        return FSX_MOUNT / "models" / self.run_id / self.serving_id

    @property
    def export_dir(self) -> PurePosixPath:
        # Depends on the trained checkpoint only: evaluation reads it, every serving shape converts it.
        return self.run_dir / "hf"

    @property
    def base_eval_cache_dir(self) -> PurePosixPath:
        return self.base_model_dir / "evaluation"

    @property
    def evaluation_dir(self) -> PurePosixPath:
        return self.run_dir / "evaluation" / self.eval_id

    @property
    def evaluation_report(self) -> PurePosixPath:
        return self.evaluation_dir / "report.json"

    @property
    def evaluation_marker(self) -> PurePosixPath:
        return self.evaluation_dir / EVALUATION_MARKER

    @property
    def engine_dir(self) -> PurePosixPath:
        return self.serving_dir / "engine"

    @property
    def model_repository(self) -> PurePosixPath:
        return self.serving_dir / "triton"

    @property
    def conversion_marker(self) -> PurePosixPath:
        return self.serving_dir / CONVERSION_MARKER

    def as_dict(self) -> dict[str, str]:
        names = ("dataset_dir", "base_hf_dir", "base_nemo_dir", "run_dir", "data_dir", "nemo_log_dir",
                 "prepared_marker", "training_marker", "export_dir", "base_eval_cache_dir", "evaluation_dir",
                 "evaluation_report", "evaluation_marker", "serving_dir", "engine_dir", "model_repository",
                 "conversion_marker")
        return {name: str(getattr(self, name)) for name in names}


def write_marker(path: str | os.PathLike, **details: Any) -> None:
    """Write a completion marker atomically: the next stage never sees a half-written file."""
    target = os.fspath(path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = f"{target}.partial"
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump({"completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **details}, handle, indent=2)
    os.replace(partial, target)


def read_marker(path: str | os.PathLike) -> dict[str, Any] | None:
    try:
        with open(os.fspath(path), encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None


def failure_marker(marker: str | os.PathLike) -> str:
    """Where a stage records an error that a retry cannot fix (bad data, a config the image rejects), next to the
    marker it would have written; the gatekeeper (gatekeeper.py) then fails or holds the next stage's gated pods
    with its message instead of leaving them waiting. A stage removes its own failure marker when it starts again."""
    return f"{os.fspath(marker)}.failed"


def done_marker(directory: str | os.PathLike) -> str:
    """A sibling file that says a directory is complete (a download, an import, an export): the directory itself
    may be replaced wholesale, the marker is written only after it is."""
    return f"{os.fspath(directory).rstrip('/')}.complete"


def load_run(path: str | os.PathLike = RUN_CONFIG_FILE) -> dict[str, Any]:
    """The run.json a pod was given; refuses a schema this code does not know rather than misreading it."""
    with open(os.fspath(path), encoding="utf-8") as handle:
        run = json.load(handle)
    if run.get("schema") != RUN_SCHEMA:
        raise ValueError(f"{os.fspath(path)}: run.json schema {run.get('schema')!r}, this code reads schema {RUN_SCHEMA}")
    return run
