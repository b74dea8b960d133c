"""Every TensorRT-LLM call the pipeline makes, in one place (it runs only inside the Triton TRT-LLM image).

API: TensorRT-LLM 1.2.x, the last line with the TensorRT engine path (Triton 26.03-26.07 ship 1.2.0/1.2.1; the
engine backend was removed after 1.2.1). The engine LLM is ``tensorrt_llm._tensorrt_engine.LLM`` (an alias of
``tensorrt_llm.llmapi.llm._TrtLLM``); plain ``tensorrt_llm.LLM`` is the PyTorch backend in 1.x and cannot save
an engine. References (NVIDIA/TensorRT-LLM):
  - examples/llm-api/_tensorrt_engine/llm_quantization.py: QuantConfig(quant_algo=QuantAlgo.FP8,
    kv_cache_quant_algo=QuantAlgo.FP8), CalibConfig(calib_dataset=..., calib_batches=..., calib_max_seq_length=...)
  - examples/llm-api/_tensorrt_engine/llm_inference_customize.py: BuildConfig().max_batch_size/max_num_tokens,
    LLM(model=..., build_config=..., kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=...)), llm.save(dir)
  - tensorrt_llm/llmapi/llm_args.py: CalibConfig fields device, calib_dataset ("name or local path"),
    calib_batches, calib_batch_size, calib_max_seq_length, random_seed, tokenizer_max_seq_length
  - tensorrt_llm/quantization/quantize_by_modelopt.py get_calib_dataloader: a local directory is read with
    ``datasets.load_dataset(dir, split="train")`` and its ``text`` column
"""

from __future__ import annotations

from typing import Any


def tensorrt_llm_version() -> str:
    import tensorrt_llm

    return tensorrt_llm.__version__


def build_and_save_engine(*, checkpoint_dir: str, engine_dir: str, tp: int, pp: int, max_batch_size: int,
                          max_num_tokens: int, max_seq_len: int, fp8: bool, fp8_kv_cache: bool,
                          calibration_dir: str | None, calibration_samples: int, calibration_max_seq_length: int,
                          kv_cache_free_gpu_memory_fraction: float, kv_cache_reuse: bool) -> dict[str, Any]:
    """Build a TensorRT engine from a Hugging Face checkpoint directory and write it to ``engine_dir``
    (config.json + rank<N>.engine per TP x PP rank). The LLM API spawns the TP x PP MPI workers itself.

    ``kv_cache_reuse`` is what the served config.pbtxt says (enable_kv_cache_reuse). KvCacheConfig's
    enable_block_reuse defaults to True, so it is stated here too: the build and the served model then agree
    whatever the default or the arbitration of the TensorRT-LLM in the image.

    What the TensorRT-LLM source says about block reuse with FP8 (NVIDIA/TensorRT-LLM). No 1.2.x source was
    read: no copy of these files from a commit known to be on the 1.2 line was found, and the published
    tensorrt-llm 1.2.x Python packages are download stubs without it. Releases below are inferred from the code,
    not from version.py at the same commit.
      - tensorrt_llm/llmapi/llm_args.py, a 0.19-era version (read without its commit): _setup_kv_cache_config
        claims use_paged_context_fmha=True for enable_block_reuse, _setup_quant_config claims it False for
        QuantAlgo.FP8, and _ConfigArbitrator._arbitrate raises ConfigArbitrateError("Cannot set
        'use_paged_context_fmha' to be ..."): there an FP8 build with the default KvCacheConfig is refused.
      - the same file at commit fcd3f31682808ae56118ae43c1d7864a3a945e6f (pre-1.0: LlmArgs = TrtLlmArgs), read
        whole: no _ConfigArbitrator, no claim_func; BaseLlmArgs and TrtLlmArgs check with pydantic model
        validators, none of which ties enable_block_reuse to the quantisation. A later version (fork
        mikeiovine/TensorRT-LLM, commit 1b1598c0c25ff230a26e1fde71ad5494b68be14a; TrtLlmArgs has
        validate_kv_cache_dtype), BaseLlmArgs and TrtLlmArgs read whole, has no such check either.
      - tensorrt_llm/builder.py build() at commit 008b2b8d23af95e4e19fa6f354f9c5f6349b2bfc ("Logics to control
        paged_context_fmha and fp8_context_fmha"): for QuantAlgo.FP8 on SM 8.9+ paged context FMHA stays on,
        and FP8 context FMHA is switched on when the KV cache is FP8.
    So the refusal is shown for the 0.19-era code only; stating the setting is right under every version read."""
    from tensorrt_llm._tensorrt_engine import LLM
    from tensorrt_llm.llmapi import BuildConfig, CalibConfig, KvCacheConfig, QuantAlgo, QuantConfig

    build_config = BuildConfig(max_batch_size=max_batch_size, max_num_tokens=max_num_tokens,
                               max_seq_len=max_seq_len, max_beam_width=1)
    quant_config = None
    calib_config = None
    if fp8 or fp8_kv_cache:
        quant_config = QuantConfig(quant_algo=QuantAlgo.FP8 if fp8 else None,
                                   kv_cache_quant_algo=QuantAlgo.FP8 if fp8_kv_cache else None)
        if calibration_dir is None:
            raise ValueError("FP8 needs calibration data; the default (cnn_dailymail) would be downloaded")
        calib_config = CalibConfig(calib_dataset=calibration_dir, calib_batches=calibration_samples,
                                   calib_batch_size=1, calib_max_seq_length=calibration_max_seq_length)
    llm = LLM(model=checkpoint_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp, build_config=build_config,
              quant_config=quant_config, calib_config=calib_config,
              kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction,
                                            enable_block_reuse=kv_cache_reuse))
    try:
        llm.save(engine_dir)
    finally:
        llm.shutdown()
    return {"tensorrt_llm": tensorrt_llm_version(), "fp8": fp8, "fp8_kv_cache": fp8_kv_cache}


def gpu_compute_capability() -> tuple[int, int]:
    """FP8 kernels need SM 8.9+ (Ada, Hopper); the engine example gates FP8 on exactly this check."""
    import torch

    return torch.cuda.get_device_capability()
