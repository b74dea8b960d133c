"""Runs one pipeline entrypoint (workloads/entrypoints/*.py) unchanged, as ``python3 entry.py SCRIPT ARGS...``.

Before the script runs as ``__main__`` it
- puts the tiny model's NeMo config class into ``nemo.collections.llm`` (finetune.py looks it up by name),
- lets NeMo's Hugging Face converters run without Transformer Engine (``adapt_to_missing_transformer_engine``),
- trains without the distributed optimizer where torch's AdamW stands in for FusedAdam (``adapt_to_missing_fused_adam``),
- moves the training metrics port to ``GPU_TEST_METRICS_PORT`` when set (two runs train side by side here),
and once the script exits it writes the process's peak GPU memory to ``GPU_TEST_STATS`` (JSON), when set.
The guard matters: checkpoint saving starts processes that import the main module again.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
import runpy
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ENTRYPOINTS = os.path.join(os.path.dirname(os.path.dirname(HERE)), "workloads", "entrypoints")


def register_tiny_model() -> None:
    from nemo.collections import llm

    import tiny_llama_nemo

    llm.TinyLlamaConfig = tiny_llama_nemo.TinyLlamaConfig


def adapt_to_missing_transformer_engine() -> None:
    """What NeMo's Hugging Face converters need on a machine without Transformer Engine; nothing changes where TE
    is installed (NeMo's image).

    - LoRA's module matching looks up ``te.Linear`` unguarded: it gets a class no module is.
    - The importer builds a plain ``LlamaConfig`` (HFLlamaImporter.config, nemo 2.7.3), whose fused RoPE
      Megatron-Core refuses without TE: it builds the tiny model's config class instead (the same fields, the
      fusions off).
    - Megatron-Core then builds its local layer spec, whose RMSNorm weights are separate modules
      (``input_layernorm``, ``pre_mlp_layernorm``) where the TE spec fuses them into the next linear layer
      (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``). The importer and exporter map weights
      by the TE names only, so their mappings are translated to the local names with the very correspondence
      Megatron-Core declares for its checkpoints (the local spec's ``sharded_state_dict_keys_map``,
      megatron/core/models/gpt/gpt_layer_specs.py, 0.15.3), and the float32 norm weights of the local spec are
      cast to the model's dtype as TE's would be."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from nemo.collections.llm.gpt.model import base, llama
    from nemo.lightning import io

    import tiny_llama_nemo

    if base.HAVE_TE:
        return
    llama.LlamaConfig = tiny_llama_nemo.TinyLlamaConfig
    # LoRA.transform compares a module's class with te.Linear before it looks at HAVE_TE
    # (nemo/collections/llm/peft/lora.py, 2.7.3), and NeMo's placeholder for a missing TE raises on that lookup.
    from nemo.collections.llm.peft import lora

    lora.te = types.SimpleNamespace(Linear=type("TransformerEngineLinearAbsent", (), {}))
    # peft/utils.py decides HAVE_TE from imports of megatron.core.extensions.transformer_engine, which succeed
    # without TE and hand back placeholders that isinstance() rejects
    from nemo.collections.llm.peft import utils as peft_utils

    peft_utils.HAVE_TE = False
    local_to_te = get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map
    original = io.apply_transforms

    def local_name(key):
        if isinstance(key, str):
            for local, te in local_to_te.items():
                key = key.replace(te, local)
        return key

    def apply_transforms(source, target, mapping, *args, **kwargs):
        mapping = {local_name(k): local_name(v) for k, v in mapping.items()}
        if len(args) < 3 and kwargs.get("cast_dtype") is None:
            # The local spec keeps its RMSNorm weights in float32 where TE keeps them in the parameter dtype;
            # the converters insist every target parameter keeps its dtype unless told to cast: cast to the
            # target's own (majority) dtype, which is the one a TE model would have throughout.
            module = getattr(target, "module", target)
            dtypes = Counter(p.dtype for p in module.parameters())
            kwargs["cast_dtype"] = dtypes.most_common(1)[0][0]
        return original(source, target, mapping, *args, **kwargs)

    io.apply_transforms = apply_transforms


def adapt_to_missing_fused_adam() -> None:
    """Train full SFT with Megatron-Core's plain mixed-precision optimizer where neither TE nor apex provides
    FusedAdam: the distributed optimizer cannot checkpoint and resume torch's AdamW there.

    Without TE or apex Megatron-Core falls back to ``torch.optim.AdamW`` (megatron/core/optimizer/__init__.py,
    0.15.3, the import chain at its top), which keeps a 0-dim ``step`` tensor per parameter. Seen on the GPU
    machine: saving in NeMo's default ``dp_reshardable`` format fails (DistributedOptimizer
    .sharded_param_state_dp_reshardable asserts every state tensor spans its bucket range:
    ``AssertionError: (torch.Size([]), 0, ...)``), and after a save in the ``fully_reshardable`` format the restart
    fails before loading (DistributedOptimizer.state_dict asserts exactly one ``step`` among the per-parameter
    states, ``assert len(steps) == 1``, which a freshly built optimizer has none of). NeMo's image has TE, whose
    FusedAdam keeps ``step`` per param group, so the pods take neither path. Here SFT runs as the LoRA runs
    already do (finetune.py turns the distributed optimizer off for LoRA): NeMo's recipe function is wrapped to
    do the same, and MegatronStrategy carries the setting into the DDP config (megatron_strategy.py, nemo 2.7.3:
    "ddp_config.use_distributed_optimizer = mcore_opt_config.use_distributed_optimizer")."""
    import torch
    from megatron.core import optimizer as mcore_optimizer
    from nemo.collections.llm.recipes.optim import adam

    if mcore_optimizer.Adam is not torch.optim.AdamW:
        return
    recipe_function = adam.distributed_fused_adam_with_cosine_annealing

    @functools.wraps(recipe_function)
    def without_distributed_optimizer(*args, **kwargs):
        optim = recipe_function(*args, **kwargs)
        optim.config.use_distributed_optimizer = False
        return optim

    adam.distributed_fused_adam_with_cosine_annealing = without_distributed_optimizer


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
    adapt_to_missing_transformer_engine()
    adapt_to_missing_fused_adam()
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
