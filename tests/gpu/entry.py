"""Runs one pipeline entrypoint (workloads/entrypoints/*.py) unchanged, as ``python3 entry.py SCRIPT ARGS...``.

Before the script runs as ``__main__`` it
- puts the tiny model's NeMo config class into ``nemo.collections.llm`` (finetune.py looks it up by name),
- lets NeMo's Hugging Face converters work on Megatron-Core's local layer spec (``use_local_spec_names``),
- moves the training metrics port to ``GPU_TEST_METRICS_PORT`` when set (two runs train side by side here),
and once the script exits it writes the process's peak GPU memory to ``GPU_TEST_STATS`` (JSON), when set.
The guard matters: checkpoint saving starts processes that import the main module again.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ENTRYPOINTS = os.path.join(os.path.dirname(os.path.dirname(HERE)), "workloads", "entrypoints")


def register_tiny_model() -> None:
    from nemo.collections import llm

    import tiny_llama_nemo

    llm.TinyLlamaConfig = tiny_llama_nemo.TinyLlamaConfig


def use_local_spec_names() -> None:
    """Without Transformer Engine, Megatron-Core builds its local layer spec, whose RMSNorm weights are separate
    modules (``input_layernorm``, ``pre_mlp_layernorm``) where the TE spec fuses them into the next linear layer
    (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``). NeMo's Hugging Face importer and exporter
    map weights by the TE names only, so here their mappings are translated to the local names, with the very
    correspondence Megatron-Core declares for its checkpoints (the local spec's ``sharded_state_dict_keys_map``,
    megatron/core/models/gpt/gpt_layer_specs.py, 0.15.3). Nothing changes where TE is installed."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from nemo.collections.llm.gpt.model import base
    from nemo.lightning import io

    if base.HAVE_TE:
        return
    local_to_te = get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map
    original = io.apply_transforms

    def local_name(key):
        if isinstance(key, str):
            for local, te in local_to_te.items():
                key = key.replace(te, local)
        return key

    def apply_transforms(source, target, mapping, *args, **kwargs):
        mapping = {local_name(k): local_name(v) for k, v in mapping.items()}
        return original(source, target, mapping, *args, **kwargs)

    io.apply_transforms = apply_transforms


def write_stats(path: str, started: float, code) -> None:
    stats = {"exit_code": code, "seconds": round(time.monotonic() - started, 1), "rank": os.environ.get("RANK")}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        stats.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(),
                     peak_reserved_bytes=torch.cuda.max_memory_reserved(),
                     device=torch.cuda.get_device_name())
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(stats, handle, indent=2)


def main() -> None:
    started = time.monotonic()
    script = os.path.abspath(sys.argv[1])
    sys.argv = [script, *sys.argv[2:]]
    sys.path.insert(0, HERE)
    sys.path.insert(0, ENTRYPOINTS)  # what the script does itself; first, so training_metrics is its module
    port = os.environ.get("GPU_TEST_METRICS_PORT")
    if port:
        import training_metrics

        training_metrics.PORT = int(port)
    register_tiny_model()
    use_local_spec_names()
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        code = 1
        raise
    finally:
        if os.environ.get("GPU_TEST_STATS"):
            write_stats(os.environ["GPU_TEST_STATS"], started, code)
    sys.exit(code)


if __name__ == "__main__":
    main()
