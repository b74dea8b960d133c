"""Conversion, second half (Triton TRT-LLM image, the same tag that serves): engine and model repository.

    python3 /opt/nemo-eks/build_engine.py --config /etc/nemo-eks/run.json
        [--templates /app/all_models/inflight_batcher_llm] [--llmapi-templates /app/all_models/llmapi]

engine backend: build a TensorRT-LLM engine from the merged Hugging Face export (TP x PP from the serving plan;
FP8 weights and FP8 KV cache when the plan says so, calibrated on the run's own training data), then write the
inflight_batcher_llm model repository. llmapi backend: write the llmapi model repository pointing at the export.
Then the conversion marker Triton's init container waits for. Every step is skipped when its output is complete,
so a retried Job resumes where the last one stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dataset  # noqa: E402
import layout  # noqa: E402
import triton_repo  # noqa: E402

# Where the NGC tritonserver:<yy.mm>-trtllm-python-py3 image keeps TensorRT-LLM's Triton model templates.
DEFAULT_TEMPLATES = "/app/all_models/inflight_batcher_llm"
DEFAULT_LLMAPI_TEMPLATES = "/app/all_models/llmapi"
# Python models whose code we take from the image, version directory and all: they must match its backend.
IMAGE_PYTHON_MODELS = ("preprocessing", "postprocessing")


class ConversionError(RuntimeError):
    """A problem a retry will not fix: written to the failure marker for the waiting Triton pod."""


def _replace_dir(staged: str, target: str) -> None:
    """Swap a fully written directory into place; a reader sees the old one or the new one, never a mix."""
    old = f"{target}.old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(target):
        os.replace(target, old)
    os.replace(staged, target)
    shutil.rmtree(old, ignore_errors=True)


def _require_dir(path: str, what: str, option: str) -> None:
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: {what} not found in this image. Pass {option} with the directory that holds "
                              "them (TensorRT-LLM's triton_backend/all_models of the same version as the image).")


def write_calibration_set(run: dict, out_dir: str) -> str:
    """The calibration dataset as a local Hugging Face dataset directory (train split, ``text`` column), made from
    the run's training data, so FP8 calibration never downloads anything and sees the fine-tuning distribution."""
    calibration = run["serving"]["calibration"]
    if calibration["source"] != "training":
        raise ConversionError(f"serving.calibration.source {calibration['source']!r}: only 'training' is supported")
    texts = dataset.calibration_texts(os.path.join(run["paths"]["data_dir"], dataset.NEMO_TRAINING_FILE),
                                      calibration["samples"])
    dataset.write_jsonl(os.path.join(out_dir, "train.jsonl"), ({"text": t} for t in texts))
    return out_dir


def write_engine_repository(run: dict, templates: str, staged: str) -> list[str]:
    """The four-model repository in ``staged``: our config.pbtxt files, the image's Python model code."""
    _require_dir(templates, "the inflight_batcher_llm templates", "--templates")
    files = triton_repo.model_repository_files(run)
    notes: list[str] = []
    for model in triton_repo.ENGINE_MODELS:
        os.makedirs(os.path.join(staged, model, "1"), exist_ok=True)
        template_config = os.path.join(templates, model, "config.pbtxt")
        if os.path.isfile(template_config):
            with open(template_config, encoding="utf-8") as handle:
                notes += triton_repo.compare_with_template(model, files[f"{model}/config.pbtxt"], handle.read())
    mismatches = [n for n in notes if not n.startswith("info:")]
    if mismatches:
        raise ConversionError("the image's templates differ from the generated configs (another TensorRT-LLM "
                              "version?):\n  " + "\n  ".join(mismatches))
    for model in IMAGE_PYTHON_MODELS:
        source = os.path.join(templates, model, "1")
        if not os.path.isfile(os.path.join(source, "model.py")):
            raise ConversionError(f"{source}/model.py not found: the {model} model's code must come from the image")
        shutil.copytree(source, os.path.join(staged, model, "1"), dirs_exist_ok=True)
    for relative, text in files.items():
        with open(os.path.join(staged, relative), "w", encoding="utf-8") as handle:
            handle.write(text)
    return notes


def write_llmapi_repository(run: dict, templates: str, staged: str) -> None:
    _require_dir(templates, "the llmapi model templates", "--llmapi-templates")
    shutil.copytree(templates, staged, dirs_exist_ok=True)  # config.pbtxt and model.py, as the image ships them
    for relative, text in triton_repo.model_repository_files(run).items():
        path = os.path.join(staged, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)


def build_engine(run: dict) -> dict:
    import trtllm_calls  # the image's TensorRT-LLM; imported here so the rest of this file runs anywhere

    serving, paths = run["serving"], run["paths"]
    engine_dir = paths["engine_dir"]
    if os.path.exists(layout.done_marker(engine_dir)):
        return {"engine": "reused", **(layout.read_marker(layout.done_marker(engine_dir)) or {})}
    fp8, fp8_kv = serving["precision"] == "fp8", serving["kv_cache_dtype"] == "fp8"
    if fp8 or fp8_kv:
        capability = trtllm_calls.gpu_compute_capability()
        if capability < (8, 9):
            raise ConversionError(f"FP8 needs compute capability 8.9+ (Ada/Hopper); this GPU is "
                                  f"{capability[0]}.{capability[1]}. Plan bf16 for this instance type.")
    calibration_dir = (write_calibration_set(run, os.path.join(paths["serving_dir"], "calibration"))
                       if fp8 or fp8_kv else None)
    staged = f"{engine_dir}.partial"
    shutil.rmtree(staged, ignore_errors=True)
    details = trtllm_calls.build_and_save_engine(
        checkpoint_dir=paths["export_dir"], engine_dir=staged, tp=serving["tp"], pp=serving["pp"],
        max_batch_size=serving["max_batch_size"], max_num_tokens=serving["max_num_tokens"],
        max_seq_len=serving["max_seq_length"], fp8=fp8, fp8_kv_cache=fp8_kv, calibration_dir=calibration_dir,
        calibration_samples=serving["calibration"]["samples"],
        calibration_max_seq_length=serving["calibration"]["max_seq_length"],
        kv_cache_free_gpu_memory_fraction=serving["kv_cache_free_gpu_mem_fraction"],
        kv_cache_reuse=triton_repo.KV_CACHE_REUSE)
    _replace_dir(staged, engine_dir)
    layout.write_marker(layout.done_marker(engine_dir), **details)
    return {"engine": "built", **details}


def check_image_version(run: dict) -> None:
    """An engine runs only on the TensorRT-LLM version that built it; the plan names the version it expects."""
    import trtllm_calls

    expected = run["serving"].get("trtllm_version")
    found = trtllm_calls.tensorrt_llm_version()
    if expected and found.split("+")[0] != expected:
        raise ConversionError(f"this image has TensorRT-LLM {found}, the run was planned for {expected} "
                              f"({run['serving']['image']}); build and serve with that image")


def convert(run: dict, templates: str, llmapi_templates: str) -> dict:
    paths, serving = run["paths"], run["serving"]
    marker = paths["conversion_marker"]
    done = layout.read_marker(marker)
    if done and done.get("serving_id") == run["serving_id"]:
        print(f"{marker} exists: nothing to do")
        return done
    if not os.path.exists(layout.done_marker(paths["export_dir"])):
        raise ConversionError(f"{paths['export_dir']} is not complete (no {layout.done_marker(paths['export_dir'])});"
                              " export.py runs before this step")
    details: dict = {"serving_id": run["serving_id"], "backend": serving["backend"]}
    staged = f"{paths['model_repository']}.partial"
    shutil.rmtree(staged, ignore_errors=True)
    if serving["backend"] == "engine":
        check_image_version(run)
        details.update(build_engine(run))
        for note in write_engine_repository(run, templates, staged):
            print(note)
    elif serving["backend"] == "llmapi":
        write_llmapi_repository(run, llmapi_templates, staged)
    else:
        raise ConversionError(f"serving.backend {serving['backend']!r}: expected 'engine' or 'llmapi'")
    _replace_dir(staged, paths["model_repository"])
    details["model_repository"] = paths["model_repository"]
    layout.write_marker(marker, **details)
    return details


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(layout.RUN_CONFIG_FILE))
    parser.add_argument("--templates", default=DEFAULT_TEMPLATES,
                        help="the image's triton_backend/all_models/inflight_batcher_llm")
    parser.add_argument("--llmapi-templates", default=DEFAULT_LLMAPI_TEMPLATES,
                        help="the image's triton_backend/all_models/llmapi")
    args = parser.parse_args(argv)
    run = layout.load_run(args.config)
    failed = layout.failure_marker(run["paths"]["conversion_marker"])
    if os.path.exists(failed):
        os.remove(failed)
    try:
        details = convert(run, args.templates, args.llmapi_templates)
    except (ConversionError, dataset.DatasetError) as exc:
        layout.write_marker(failed, error=str(exc))
        print(f"conversion failed: {exc}", file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()  # possibly transient (a GPU, the file system): the Job's retry decides
        return 1
    print(json.dumps(details, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
