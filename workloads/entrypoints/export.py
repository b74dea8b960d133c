"""Conversion, first half (NeMo image): the fine-tuned checkpoint as a Hugging Face model directory.

    python3 /opt/nemo-eks/export.py --config /etc/nemo-eks/run.json

LoRA runs merge the adapters into the base weights first (``llm.peft.merge_lora``): the NeMo adapters sit on the
fused ``linear_qkv``/``linear_fc1`` projections, which a Hugging Face checkpoint (and TensorRT-LLM reading it)
has no place for. Then ``llm.export_ckpt(target="hf")`` writes ``paths.export_dir``, which holds the tokenizer
too (Triton's pre/postprocessing read it). Idempotent: each finished directory has a ``.complete`` marker.

Two Jobs run it: the evaluation Job (init container, run.json = the evaluation document: training and paths, no
serving section), which makes the export it evaluates, and the conversion Job (the full document), which finds it
done. Only ``training`` and the training/export paths are read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import layout  # noqa: E402


class ExportError(RuntimeError):
    pass


def final_checkpoint(run: dict) -> str:
    marker = layout.read_marker(run["paths"]["training_marker"])
    if not marker or not marker.get("checkpoint"):
        raise ExportError(f"{run['paths']['training_marker']}: missing or names no checkpoint; training has not "
                          "finished")
    checkpoint = marker["checkpoint"]
    for part in ("context", "weights"):  # what export_ckpt/merge_lora load a NeMo 2 checkpoint from
        if not os.path.isdir(os.path.join(checkpoint, part)):
            raise ExportError(f"{checkpoint}: no {part}/ directory; not a complete NeMo 2 checkpoint")
    return checkpoint


def merged_dir(run: dict) -> str:
    """The merge depends only on training, so it lives with the run and every serving shape reuses it."""
    return os.path.join(run["paths"]["run_dir"], "merged")


def _staged(target: str) -> str:
    staged = f"{target}.partial"
    shutil.rmtree(staged, ignore_errors=True)
    return staged


def _publish(staged: str, target: str, **details) -> None:
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staged, target)
    layout.write_marker(layout.done_marker(target), **details)


def stage_marker(run: dict) -> str:
    """The marker of the stage this export runs in, whose failure marker reports an export that cannot succeed:
    conversion's in the full document, evaluation's in the evaluation document (which has no conversion paths)."""
    paths = run["paths"]
    return paths.get("conversion_marker") or paths["evaluation_marker"]


def export(run: dict) -> dict:
    paths = run["paths"]
    export_dir = paths["export_dir"]
    if os.path.exists(layout.done_marker(export_dir)):
        return {"export": "reused", "export_dir": export_dir}
    source = final_checkpoint(run)

    from pathlib import Path

    from nemo.collections import llm

    if run["training"]["method"] == "lora":
        merged = merged_dir(run)
        if not os.path.exists(layout.done_marker(merged)):
            staged = _staged(merged)
            # merge_lora(lora_checkpoint_path, output_path, legacy_ckpt=False, trust_remote_code=False)
            # (nemo/collections/llm/peft/api.py, 2.7.3): loads the base named in the adapter metadata, on the CPU.
            llm.peft.merge_lora(lora_checkpoint_path=source, output_path=staged)
            _publish(staged, merged, lora_checkpoint=source)
        source = merged
    staged = _staged(export_dir)
    # export_ckpt(path, target, output_path=None, overwrite=False, load_connector=..., modelopt_export_kwargs=None)
    # (nemo/collections/llm/api.py, 2.7.3); overwrite because a failed attempt may have left a partial directory.
    llm.export_ckpt(path=Path(source), target="hf", output_path=Path(staged), overwrite=True)
    _publish(staged, export_dir, source=source)
    return {"export": "written", "export_dir": export_dir, "source": source}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(layout.RUN_CONFIG_FILE))
    args = parser.parse_args(argv)
    run = layout.load_run(args.config)
    failed = layout.failure_marker(stage_marker(run))
    if os.path.exists(failed):
        os.remove(failed)
    try:
        details = export(run)
    except ExportError as exc:
        layout.write_marker(failed, error=str(exc))
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        return 1
    print(json.dumps(details, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
