"""The Triton model repository a run serves, as text: every ``config.pbtxt`` (engine backend) or ``model.yaml``
(llmapi backend), generated from run.json with every value filled in.

Stdlib only and pure: ``build_engine.py`` writes these files in the conversion Job, and the offline plan
(``make plan``) writes the same text for review, so a pull request shows the exact serving configuration.

Engine backend (TensorRT-LLM <= 1.2.x, Triton <= 26.07): the four models of TensorRT-LLM's
``triton_backend/all_models/inflight_batcher_llm`` (ensemble -> preprocessing -> tensorrt_llm -> postprocessing).
Tensor names, types and shapes follow those templates, because the image's own ``model.py`` files look their
outputs up by name. Instead of running ``tools/fill_template.py`` (which silently leaves unknown ``${var}`` in
place), each file is rendered whole with the parameter KEYS the backend reads (``gpt_model_path``, not the
template variable ``engine_dir``; ``gpt_model_type``, not ``batching_strategy``). A parameter the backend treats
as optional is left out rather than left as a placeholder: ``ModelState::GetParameter`` throws "Cannot find
parameter" and every optional read catches it and uses the default
(``triton_backend/inflight_batcher_llm/src/model_state.cc``, ``model_instance_state.cc``).

llmapi backend (PyTorch backend): ``tensorrt_llm/1/model.yaml`` of ``triton_backend/all_models/llmapi``; its
``config.pbtxt`` and ``model.py`` are the image's, unchanged.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

ENGINE_MODELS = ("ensemble", "preprocessing", "tensorrt_llm", "postprocessing")
LLMAPI_MODEL_YAML = "tensorrt_llm/1/model.yaml"
# Fixed by the NGC tritonserver:<yy.mm>-trtllm-python-py3 image layout.
EXECUTOR_WORKER_PATH = "/opt/tritonserver/backends/tensorrtllm/trtllmExecutorWorker"
# Tokenizing and detokenizing are Python and CPU-bound; a few instances keep up with an in-flight batch of a
# few hundred requests without competing with the GPU ranks for the pod's cores.
PRE_POST_INSTANCES = 4
MAX_BEAM_WIDTH = 1  # sampling only; beam search would need an engine built for it
LOGITS_DATATYPE = "TYPE_FP32"

# The parameters each model must carry, with the reason. The tests assert them on every generated file.
REQUIRED_PARAMETERS = {
    # read without a default: a missing key fails the model load
    "tensorrt_llm": ("gpt_model_type", "gpt_model_path", "tokenizer_dir", "xgrammar_tokenizer_info_path",
                     "guided_decoding_backend",
                     # the serving plan's knobs: absent, the backend would silently use its own defaults
                     "max_beam_width", "batch_scheduler_policy", "kv_cache_free_gpu_mem_fraction",
                     "exclude_input_in_output", "enable_kv_cache_reuse", "enable_chunked_context",
                     "executor_worker_path"),
    # model.py reads parameters['tokenizer_dir'] and parameters['multimodal_model_path'] unguarded
    "preprocessing": ("tokenizer_dir", "multimodal_model_path", "add_special_tokens"),
    "postprocessing": ("tokenizer_dir", "skip_special_tokens"),
    "ensemble": (),
}

# --------------------------------------------------------------------------------------------------
# Tensor tables: (name, data type, dims, flags). Flags: "optional", "ragged" (allow_ragged_batch), "scalar"
# (reshape to [] as the C++ backend expects for per-request scalars).

_TRTLLM_INPUTS: tuple[tuple[str, str, tuple[int, ...], str], ...] = (
    ("input_ids", "TYPE_INT32", (-1,), "optional ragged"),
    ("encoder_input_features", "TYPE_FP16", (-1, -1), "optional ragged"),
    ("encoder_output_lengths", "TYPE_INT32", (1,), "optional scalar"),
    ("input_lengths", "TYPE_INT32", (1,), "scalar"),
    ("request_output_len", "TYPE_INT32", (1,), "scalar"),
    ("num_return_sequences", "TYPE_INT32", (1,), "optional scalar"),
    ("draft_input_ids", "TYPE_INT32", (-1,), "optional ragged"),
    ("decoder_input_ids", "TYPE_INT32", (-1,), "optional ragged"),
    ("decoder_input_lengths", "TYPE_INT32", (1,), "optional scalar"),
    ("draft_logits", LOGITS_DATATYPE, (-1, -1), "optional ragged"),
    ("draft_acceptance_threshold", "TYPE_FP32", (1,), "optional scalar"),
    ("end_id", "TYPE_INT32", (1,), "optional scalar"),
    ("pad_id", "TYPE_INT32", (1,), "optional scalar"),
    ("stop_words_list", "TYPE_INT32", (2, -1), "optional ragged"),
    ("bad_words_list", "TYPE_INT32", (2, -1), "optional ragged"),
    ("embedding_bias", "TYPE_FP32", (-1,), "optional ragged"),
    ("beam_width", "TYPE_INT32", (1,), "optional scalar"),
    ("temperature", "TYPE_FP32", (1,), "optional scalar"),
    ("runtime_top_k", "TYPE_INT32", (1,), "optional scalar"),
    ("runtime_top_p", "TYPE_FP32", (1,), "optional scalar"),
    ("runtime_top_p_min", "TYPE_FP32", (1,), "optional scalar"),
    ("runtime_top_p_decay", "TYPE_FP32", (1,), "optional scalar"),
    ("runtime_top_p_reset_ids", "TYPE_INT32", (1,), "optional scalar"),
    ("len_penalty", "TYPE_FP32", (1,), "optional scalar"),
    ("early_stopping", "TYPE_BOOL", (1,), "optional scalar"),
    ("repetition_penalty", "TYPE_FP32", (1,), "optional scalar"),
    ("min_tokens", "TYPE_INT32", (1,), "optional scalar"),
    ("beam_search_diversity_rate", "TYPE_FP32", (1,), "optional scalar"),
    ("presence_penalty", "TYPE_FP32", (1,), "optional scalar"),
    ("frequency_penalty", "TYPE_FP32", (1,), "optional scalar"),
    ("seed", "TYPE_UINT64", (1,), "optional scalar"),
    ("return_log_probs", "TYPE_BOOL", (1,), "optional scalar"),
    ("return_context_logits", "TYPE_BOOL", (1,), "optional scalar"),
    ("return_generation_logits", "TYPE_BOOL", (1,), "optional scalar"),
    ("return_perf_metrics", "TYPE_BOOL", (1,), "optional scalar"),
    ("return_num_input_tokens", "TYPE_BOOL", (1,), "optional scalar"),
    ("return_num_output_tokens", "TYPE_BOOL", (1,), "optional scalar"),
    ("exclude_input_in_output", "TYPE_BOOL", (1,), "optional scalar"),
    ("stop", "TYPE_BOOL", (1,), "optional scalar"),
    ("streaming", "TYPE_BOOL", (1,), "optional scalar"),
    ("prompt_embedding_table", "TYPE_FP16", (-1, -1), "optional ragged"),
    ("prompt_table_extra_ids", "TYPE_UINT64", (-1,), "optional ragged"),
    ("prompt_vocab_size", "TYPE_INT32", (1,), "optional scalar"),
    ("cross_attention_mask", "TYPE_BOOL", (-1, -1), "optional ragged"),
    ("mrope_rotary_cos_sin", "TYPE_FP32", (-1,), "optional"),
    ("mrope_position_deltas", "TYPE_INT64", (1,), "optional"),
    ("lora_task_id", "TYPE_UINT64", (1,), "optional scalar"),
    ("lora_weights", "TYPE_FP16", (-1, -1), "optional ragged"),
    ("lora_config", "TYPE_INT32", (-1, 3), "optional ragged"),
    ("context_phase_params", "TYPE_UINT8", (-1,), "optional ragged"),
    ("skip_cross_attn_blocks", "TYPE_BOOL", (1,), "optional ragged"),
    ("retention_token_range_starts", "TYPE_INT32", (-1,), "optional ragged"),
    ("retention_token_range_ends", "TYPE_INT32", (-1,), "optional ragged"),
    ("retention_token_range_priorities", "TYPE_INT32", (-1,), "optional ragged"),
    ("retention_token_range_durations_ms", "TYPE_INT32", (-1,), "optional ragged"),
    ("retention_decode_priority", "TYPE_INT32", (1,), "optional ragged"),
    ("retention_decode_duration_ms", "TYPE_INT32", (1,), "optional ragged"),
    ("guided_decoding_guide_type", "TYPE_STRING", (1,), "optional ragged"),
    ("guided_decoding_guide", "TYPE_STRING", (1,), "optional ragged"),
    ("lookahead_window_size", "TYPE_INT32", (1,), "optional ragged"),
    ("lookahead_ngram_size", "TYPE_INT32", (1,), "optional ragged"),
    ("lookahead_verification_set_size", "TYPE_INT32", (1,), "optional ragged"),
)

_TRTLLM_OUTPUTS = (
    ("output_ids", "TYPE_INT32", (-1, -1), ""),
    ("sequence_length", "TYPE_INT32", (-1,), ""),
    ("cum_log_probs", "TYPE_FP32", (-1,), ""),
    ("output_log_probs", "TYPE_FP32", (-1, -1), ""),
    ("context_logits", LOGITS_DATATYPE, (-1, -1), ""),
    ("generation_logits", LOGITS_DATATYPE, (-1, -1, -1), ""),
    ("batch_index", "TYPE_INT32", (1,), ""),
    ("sequence_index", "TYPE_INT32", (1,), ""),
    ("context_phase_params", "TYPE_UINT8", (-1,), ""),
    ("kv_cache_alloc_new_blocks", "TYPE_INT32", (1,), ""),
    ("kv_cache_reused_blocks", "TYPE_INT32", (1,), ""),
    ("kv_cache_alloc_total_blocks", "TYPE_INT32", (1,), ""),
    ("arrival_time_ns", "TYPE_INT64", (1,), ""),
    ("first_scheduled_time_ns", "TYPE_INT64", (1,), ""),
    ("first_token_time_ns", "TYPE_INT64", (1,), ""),
    ("last_token_time_ns", "TYPE_INT64", (1,), ""),
    ("acceptance_rate", "TYPE_FP32", (1,), ""),
    ("total_accepted_draft_tokens", "TYPE_INT32", (1,), ""),
    ("total_draft_tokens", "TYPE_INT32", (1,), ""),
    ("num_input_tokens", "TYPE_INT32", (1,), ""),
    ("num_output_tokens", "TYPE_INT32", (1,), ""),
)

_PRE_INPUTS = (
    ("QUERY", "TYPE_STRING", (1,), ""),
    ("DECODER_QUERY", "TYPE_STRING", (1,), "optional"),
    ("IMAGE_BYTES", "TYPE_UINT8", (-1, -1, -1, -1), "optional"),
    ("IMAGE_URL", "TYPE_STRING", (1,), "optional"),
    ("IMAGES", "TYPE_STRING", (-1,), "optional"),
    ("VIDEO_BYTES", "TYPE_UINT8", (-1, -1, -1, -1), "optional"),
    ("REQUEST_OUTPUT_LEN", "TYPE_INT32", (1,), ""),
    ("BAD_WORDS_DICT", "TYPE_STRING", (-1,), "optional"),
    ("STOP_WORDS_DICT", "TYPE_STRING", (-1,), "optional"),
    ("EMBEDDING_BIAS_WORDS", "TYPE_STRING", (-1,), "optional"),
    ("EMBEDDING_BIAS_WEIGHTS", "TYPE_FP32", (-1,), "optional"),
    ("END_ID", "TYPE_INT32", (1,), "optional"),
    ("PAD_ID", "TYPE_INT32", (1,), "optional"),
    ("PROMPT_TABLE_EXTRA_ID", "TYPE_UINT64", (1,), "optional"),
)

_PRE_OUTPUTS = (
    ("INPUT_ID", "TYPE_INT32", (-1,), ""),
    ("REQUEST_INPUT_LEN", "TYPE_INT32", (1,), ""),
    ("DECODER_INPUT_ID", "TYPE_INT32", (-1,), ""),
    ("REQUEST_DECODER_INPUT_LEN", "TYPE_INT32", (1,), ""),
    ("BAD_WORDS_IDS", "TYPE_INT32", (2, -1), ""),
    ("STOP_WORDS_IDS", "TYPE_INT32", (2, -1), ""),
    ("EMBEDDING_BIAS", "TYPE_FP32", (-1,), ""),
    ("REQUEST_OUTPUT_LEN", "TYPE_INT32", (-1,), ""),
    ("OUT_END_ID", "TYPE_INT32", (1,), ""),
    ("OUT_PAD_ID", "TYPE_INT32", (1,), ""),
    ("OUT_PROMPT_TABLE_EXTRA_IDS", "TYPE_UINT64", (-1,), ""),
    ("PIXEL_VALUES", "TYPE_FP16", (-1, -1, -1, -1), ""),
    ("ASPECT_RATIO_IDS", "TYPE_INT64", (-1,), ""),
    ("ASPECT_RATIO_MASK", "TYPE_INT64", (-1, -1), ""),
    ("CROSS_ATTENTION_MASK", "TYPE_INT64", (-1, -1, -1), ""),
    ("IMAGE_SIZES", "TYPE_INT64", (-1, 2), ""),
    ("IS_VIDEO_INPUT", "TYPE_BOOL", (1,), ""),
    ("ATTENTION_MASK", "TYPE_INT64", (-1,), ""),
    ("IMAGE_GRID_THW", "TYPE_INT64", (3,), ""),
    ("VISION_INPUT_ID", "TYPE_INT32", (-1,), ""),
)

_POST_INPUTS = (
    ("TOKENS_BATCH", "TYPE_INT32", (-1, -1), ""),
    ("SEQUENCE_LENGTH", "TYPE_INT32", (-1,), ""),
)
_POST_OUTPUTS = (("OUTPUT", "TYPE_STRING", (-1,), ""),)

# The ensemble's public API: what a client sends to /v2/models/ensemble/generate, and where it goes.
_ENSEMBLE_INPUTS = (
    ("text_input", "TYPE_STRING", (1,), ""),
    ("decoder_text_input", "TYPE_STRING", (1,), "optional"),
    ("max_tokens", "TYPE_INT32", (1,), ""),
    ("num_return_sequences", "TYPE_INT32", (1,), "optional"),
    ("bad_words", "TYPE_STRING", (-1,), "optional"),
    ("stop_words", "TYPE_STRING", (-1,), "optional"),
    ("exclude_input_in_output", "TYPE_BOOL", (1,), "optional"),
    ("end_id", "TYPE_INT32", (1,), "optional"),
    ("pad_id", "TYPE_INT32", (1,), "optional"),
    ("top_k", "TYPE_INT32", (1,), "optional"),
    ("top_p", "TYPE_FP32", (1,), "optional"),
    ("temperature", "TYPE_FP32", (1,), "optional"),
    ("length_penalty", "TYPE_FP32", (1,), "optional"),
    ("repetition_penalty", "TYPE_FP32", (1,), "optional"),
    ("min_tokens", "TYPE_INT32", (1,), "optional"),
    ("presence_penalty", "TYPE_FP32", (1,), "optional"),
    ("frequency_penalty", "TYPE_FP32", (1,), "optional"),
    ("seed", "TYPE_UINT64", (1,), "optional"),
    ("return_log_probs", "TYPE_BOOL", (1,), "optional"),
    ("return_context_logits", "TYPE_BOOL", (1,), "optional"),
    ("return_generation_logits", "TYPE_BOOL", (1,), "optional"),
    ("return_perf_metrics", "TYPE_BOOL", (1,), "optional"),
    ("return_num_input_tokens", "TYPE_BOOL", (1,), "optional"),
    ("return_num_output_tokens", "TYPE_BOOL", (1,), "optional"),
    ("beam_width", "TYPE_INT32", (1,), "optional"),
    ("stream", "TYPE_BOOL", (1,), "optional"),
    ("prompt_embedding_table", "TYPE_FP16", (-1, -1), "optional"),
    ("prompt_table_extra_id", "TYPE_UINT64", (1,), "optional"),
    ("prompt_vocab_size", "TYPE_INT32", (1,), "optional"),
    ("embedding_bias_words", "TYPE_STRING", (-1,), "optional"),
    ("embedding_bias_weights", "TYPE_FP32", (-1,), "optional"),
    ("lora_task_id", "TYPE_UINT64", (1,), "optional"),
    ("lora_weights", "TYPE_FP16", (-1, -1), "optional ragged"),
    ("lora_config", "TYPE_INT32", (-1, 3), "optional ragged"),
    ("guided_decoding_guide_type", "TYPE_STRING", (1,), "optional ragged"),
    ("guided_decoding_guide", "TYPE_STRING", (1,), "optional ragged"),
)
# Outputs the ensemble passes straight through from tensorrt_llm (text_output comes from postprocessing).
_ENSEMBLE_PASSTHROUGH_OUTPUTS = (
    "cum_log_probs", "output_log_probs", "context_logits", "generation_logits", "batch_index", "sequence_index",
    "kv_cache_alloc_new_blocks", "kv_cache_reused_blocks", "kv_cache_alloc_total_blocks", "arrival_time_ns",
    "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns", "acceptance_rate",
    "total_accepted_draft_tokens", "total_draft_tokens", "num_input_tokens", "num_output_tokens",
)
_PREPROCESSING_MAP = {  # preprocessing input <- ensemble input
    "inputs": (("QUERY", "text_input"), ("DECODER_QUERY", "decoder_text_input"), ("REQUEST_OUTPUT_LEN", "max_tokens"),
               ("BAD_WORDS_DICT", "bad_words"), ("STOP_WORDS_DICT", "stop_words"),
               ("EMBEDDING_BIAS_WORDS", "embedding_bias_words"), ("EMBEDDING_BIAS_WEIGHTS", "embedding_bias_weights"),
               ("END_ID", "end_id"), ("PAD_ID", "pad_id"), ("PROMPT_TABLE_EXTRA_ID", "prompt_table_extra_id")),
    "outputs": (("REQUEST_INPUT_LEN", "_REQUEST_INPUT_LEN"), ("INPUT_ID", "_INPUT_ID"),
                ("REQUEST_DECODER_INPUT_LEN", "_REQUEST_DECODER_INPUT_LEN"), ("DECODER_INPUT_ID", "_DECODER_INPUT_ID"),
                ("REQUEST_OUTPUT_LEN", "_REQUEST_OUTPUT_LEN"), ("STOP_WORDS_IDS", "_STOP_WORDS_IDS"),
                ("BAD_WORDS_IDS", "_BAD_WORDS_IDS"), ("EMBEDDING_BIAS", "_EMBEDDING_BIAS"),
                ("OUT_END_ID", "_PREPROCESSOR_END_ID"), ("OUT_PAD_ID", "_PREPROCESSOR_PAD_ID"),
                ("OUT_PROMPT_TABLE_EXTRA_IDS", "_OUT_PROMPT_TABLE_EXTRA_IDS")),
}
_TRTLLM_MAP = {  # tensorrt_llm input <- ensemble tensor
    "inputs": (("input_ids", "_INPUT_ID"), ("decoder_input_ids", "_DECODER_INPUT_ID"),
               ("input_lengths", "_REQUEST_INPUT_LEN"), ("decoder_input_lengths", "_REQUEST_DECODER_INPUT_LEN"),
               ("exclude_input_in_output", "exclude_input_in_output"), ("request_output_len", "_REQUEST_OUTPUT_LEN"),
               ("end_id", "_PREPROCESSOR_END_ID"), ("pad_id", "_PREPROCESSOR_PAD_ID"),
               ("embedding_bias", "_EMBEDDING_BIAS"), ("runtime_top_k", "top_k"), ("runtime_top_p", "top_p"),
               ("temperature", "temperature"), ("len_penalty", "length_penalty"),
               ("repetition_penalty", "repetition_penalty"), ("min_tokens", "min_tokens"),
               ("presence_penalty", "presence_penalty"), ("frequency_penalty", "frequency_penalty"), ("seed", "seed"),
               ("return_log_probs", "return_log_probs"), ("return_context_logits", "return_context_logits"),
               ("return_generation_logits", "return_generation_logits"),
               ("return_perf_metrics", "return_perf_metrics"),
               ("return_num_input_tokens", "return_num_input_tokens"),
               ("return_num_output_tokens", "return_num_output_tokens"),
               ("num_return_sequences", "num_return_sequences"), ("beam_width", "beam_width"),
               ("streaming", "stream"), ("prompt_embedding_table", "prompt_embedding_table"),
               ("prompt_vocab_size", "prompt_vocab_size"), ("stop_words_list", "_STOP_WORDS_IDS"),
               ("bad_words_list", "_BAD_WORDS_IDS"), ("prompt_table_extra_ids", "_OUT_PROMPT_TABLE_EXTRA_IDS"),
               ("lora_task_id", "lora_task_id"), ("lora_weights", "lora_weights"), ("lora_config", "lora_config"),
               ("guided_decoding_guide_type", "guided_decoding_guide_type"),
               ("guided_decoding_guide", "guided_decoding_guide")),
    "outputs": (("output_ids", "_TOKENS_BATCH"), ("sequence_length", "_SEQUENCE_LENGTH"))
    + tuple((name, name) for name in _ENSEMBLE_PASSTHROUGH_OUTPUTS),
}
_POSTPROCESSING_MAP = {
    "inputs": (("TOKENS_BATCH", "_TOKENS_BATCH"), ("SEQUENCE_LENGTH", "_SEQUENCE_LENGTH")),
    "outputs": (("OUTPUT", "text_output"),),
}

# --------------------------------------------------------------------------------------------------
# Rendering


def _quote(value: str) -> str:
    return json.dumps(value)  # protobuf text format accepts JSON string escapes


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _tensors(section: str, tensors: Iterable[tuple[str, str, tuple[int, ...], str]]) -> str:
    blocks = []
    for name, dtype, dims, flags in tensors:
        lines = [f"    name: {_quote(name)}", f"    data_type: {dtype}", f"    dims: [ {', '.join(map(str, dims))} ]"]
        if "scalar" in flags.split():
            lines.append("    reshape: { shape: [ ] }")
        if "optional" in flags.split():
            lines.append("    optional: true")
        if "ragged" in flags.split():
            lines.append("    allow_ragged_batch: true")
        blocks.append("  {\n" + "\n".join(lines) + "\n  }")
    return f"{section} [\n" + ",\n".join(blocks) + "\n]\n"


def _parameters(values: dict[str, str]) -> str:
    return "".join(f"parameters {{\n  key: {_quote(key)}\n  value: {{ string_value: {_quote(value)} }}\n}}\n"
                   for key, value in values.items())


def _instances(count: int) -> str:
    return f"instance_group [\n  {{\n    count: {count}\n    kind: KIND_CPU\n  }}\n]\n"


def _dynamic_batching(serving: dict[str, Any]) -> str:
    return ("dynamic_batching {\n"
            f"  preferred_batch_size: [ {serving['max_batch_size']} ]\n"
            f"  max_queue_delay_microseconds: {serving['max_queue_delay_microseconds']}\n"
            "  default_queue_policy { max_queue_size: 0 }\n"
            "}\n")


def _header(run: dict[str, Any], model: str) -> str:
    return (f"# Generated by nemo-eks from run {run['run_id']} / serving {run['serving_id']} (stack {run['stack']}).\n"
            f"# Model {model!r} of the TensorRT-LLM inflight_batcher_llm repository; edit run.json, not this file.\n")


# KV cache block reuse needs an engine with paged context FMHA. The 0.19-era engine LLM API turned that off for
# FP8 builds; later TensorRT-LLM code keeps it on for FP8 on SM 8.9+, and no 1.2.x source was verified either
# way (trtllm_calls.build_and_save_engine says what was read). Off is right under both: off, for the engine build
# (build_engine.py) and the served config (below) alike.
KV_CACHE_REUSE = False


def tensorrt_llm_parameters(run: dict[str, Any]) -> dict[str, str]:
    serving, paths = run["serving"], run["paths"]
    return {
        # keys the C++ backend reads (the template variables engine_dir/batching_strategy are not keys)
        "gpt_model_type": "inflight_fused_batching",
        "gpt_model_path": paths["engine_dir"],
        "max_beam_width": str(MAX_BEAM_WIDTH),
        "batch_scheduler_policy": serving["batch_scheduler_policy"],
        "kv_cache_free_gpu_mem_fraction": str(serving["kv_cache_free_gpu_mem_fraction"]),
        # API clients get the completion only, as from an OpenAI-style endpoint (the backend default echoes it)
        "exclude_input_in_output": "true",
        # Both need paged context FMHA in the engine (see KV_CACHE_REUSE). The engine is built with the same
        # setting (build_engine.py passes KV_CACHE_REUSE).
        "enable_kv_cache_reuse": str(KV_CACHE_REUSE).lower(),
        "enable_chunked_context": "false",
        "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
        "executor_worker_path": EXECUTOR_WORKER_PATH,
        # read unguarded by getGuidedDecodingConfigFromParams: present, and empty = guided decoding off
        "tokenizer_dir": paths["export_dir"],
        "xgrammar_tokenizer_info_path": "",
        "guided_decoding_backend": "",
    }


def _tensorrt_llm(run: dict[str, Any]) -> str:
    serving = run["serving"]
    return (_header(run, "tensorrt_llm")
            + 'name: "tensorrt_llm"\nbackend: "tensorrtllm"\n'
            + f"max_batch_size: {serving['max_batch_size']}\n"
            # streaming needs a decoupled model: one request, many responses
            + f"model_transaction_policy {{\n  decoupled: {_bool(serving['decoupled'])}\n}}\n"
            + _dynamic_batching(serving)
            + _tensors("input", _TRTLLM_INPUTS) + _tensors("output", _TRTLLM_OUTPUTS)
            # one CPU instance: the GPUs are driven by the backend's MPI ranks, not by Triton instances
            + _instances(1)
            + _parameters(tensorrt_llm_parameters(run)))


def _preprocessing(run: dict[str, Any]) -> str:
    serving, paths = run["serving"], run["paths"]
    return (_header(run, "preprocessing")
            + 'name: "preprocessing"\nbackend: "python"\n'
            + f"max_batch_size: {serving['max_batch_size']}\n"
            + _dynamic_batching(serving)
            + _tensors("input", _PRE_INPUTS) + _tensors("output", _PRE_OUTPUTS)
            + _parameters({
                # the HF export carries the tokenizer the model was fine-tuned with
                "tokenizer_dir": paths["export_dir"],
                # BOS on, as in training (finetune.py sets add_bos for the SFT dataset)
                "add_special_tokens": "true",
                "multimodal_model_path": "",  # text only; empty means none
                "gpt_model_path": paths["engine_dir"],
                "hf_model_path": paths["export_dir"],
            })
            + _instances(PRE_POST_INSTANCES))


def _postprocessing(run: dict[str, Any]) -> str:
    serving, paths = run["serving"], run["paths"]
    return (_header(run, "postprocessing")
            + 'name: "postprocessing"\nbackend: "python"\n'
            + f"max_batch_size: {serving['max_batch_size']}\n"
            + "dynamic_batching {}\n"
            + _tensors("input", _POST_INPUTS) + _tensors("output", _POST_OUTPUTS)
            + _parameters({"tokenizer_dir": paths["export_dir"], "skip_special_tokens": "true"})
            + _instances(PRE_POST_INSTANCES))


def _step(model: str, mapping: dict[str, tuple[tuple[str, str], ...]]) -> str:
    lines = [f"    {{\n      model_name: {_quote(model)}\n      model_version: -1"]
    lines += [f"      input_map {{ key: {_quote(k)} value: {_quote(v)} }}" for k, v in mapping["inputs"]]
    lines += [f"      output_map {{ key: {_quote(k)} value: {_quote(v)} }}" for k, v in mapping["outputs"]]
    return "\n".join(lines) + "\n    }"


def _ensemble(run: dict[str, Any]) -> str:
    serving = run["serving"]
    by_name = {t[0]: t for t in _TRTLLM_OUTPUTS}
    outputs = (("text_output", "TYPE_STRING", (-1,), ""),) + tuple(
        (name, by_name[name][1], by_name[name][2], "") for name in _ENSEMBLE_PASSTHROUGH_OUTPUTS)
    steps = ",\n".join((_step("preprocessing", _PREPROCESSING_MAP), _step("tensorrt_llm", _TRTLLM_MAP),
                        _step("postprocessing", _POSTPROCESSING_MAP)))
    return (_header(run, "ensemble")
            + 'name: "ensemble"\nplatform: "ensemble"\n'
            + f"max_batch_size: {serving['max_batch_size']}\n"
            + _tensors("input", _ENSEMBLE_INPUTS) + _tensors("output", outputs)
            + "ensemble_scheduling {\n  step [\n" + steps + "\n  ]\n}\n")


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid YAML double-quoted scalar


def _yaml(document: dict[str, Any], indent: int = 0) -> str:
    out = []
    for key, value in document.items():
        if isinstance(value, dict):
            out.append(" " * indent + f"{key}:")
            out.append(_yaml(value, indent + 2).rstrip("\n"))
        else:
            out.append(" " * indent + f"{key}: {_yaml_scalar(value)}")
    return "\n".join(out) + "\n"


def llmapi_model_config(run: dict[str, Any]) -> dict[str, Any]:
    """``model.yaml``: every key but ``triton_config`` is passed to ``tensorrt_llm.LLM(**kwargs)`` through
    ``update_llm_args_with_extra_dict`` (all_models/llmapi/tensorrt_llm/1/model.py); ``triton_config`` is
    applied to the Triton model config by the model's ``auto_complete_config``."""
    serving = run["serving"]
    config: dict[str, Any] = {
        "model": run["paths"]["export_dir"],  # the merged HF export; the PyTorch backend needs no engine
        "backend": "pytorch",
        "tensor_parallel_size": serving["tp"],
        "pipeline_parallel_size": serving["pp"],
        "max_batch_size": serving["max_batch_size"],
        "max_num_tokens": serving["max_num_tokens"],
        "max_seq_len": serving["max_seq_length"],
        "kv_cache_config": {
            "free_gpu_memory_fraction": serving["kv_cache_free_gpu_mem_fraction"],
            # weights keep the export's dtype (bf16): FP8 weights on this path need a ModelOpt FP8 checkpoint
            "dtype": "fp8" if serving["kv_cache_dtype"] == "fp8" else "auto",
        },
    }
    if serving["batch_scheduler_policy"] != "guaranteed_no_evict":  # the LLM API's default otherwise
        config["scheduler_config"] = {"capacity_scheduler_policy": serving["batch_scheduler_policy"].upper()}
    # Batching happens inside TRT-LLM; the backend does not support Triton-level batching (max_batch_size 0).
    config["triton_config"] = {"max_batch_size": 0, "decoupled": bool(serving["decoupled"])}
    return config


def model_repository_files(run: dict[str, Any]) -> dict[str, str]:
    """Relative path in the model repository -> file text, for every generated configuration file."""
    backend = run["serving"]["backend"]
    if backend == "engine":
        return {
            "ensemble/config.pbtxt": _ensemble(run),
            "preprocessing/config.pbtxt": _preprocessing(run),
            "tensorrt_llm/config.pbtxt": _tensorrt_llm(run),
            "postprocessing/config.pbtxt": _postprocessing(run),
        }
    if backend == "llmapi":
        header = (f"# Generated by nemo-eks from run {run['run_id']} / serving {run['serving_id']} "
                  f"(stack {run['stack']}); edit run.json, not this file.\n")
        return {LLMAPI_MODEL_YAML: header + _yaml(llmapi_model_config(run))}
    raise ValueError(f"serving.backend {backend!r}: expected 'engine' or 'llmapi'")


# --------------------------------------------------------------------------------------------------
# Cross-check against the image's own templates (run in the conversion Job, where the image is at hand)

def template_names(text: str) -> dict[str, set[str]]:
    """Input, output and parameter names of a config.pbtxt (ours or a template with ``${...}``), by a scan of
    the text format that is enough for these flat files."""
    import re

    names: dict[str, set[str]] = {"input": set(), "output": set(), "parameters": set()}
    section = None
    depth = 0
    for line in text.splitlines():
        stripped = line.split("#", 1)[0].strip()
        if not stripped:
            continue
        if depth == 0:
            match = re.match(r"(input|output)\s*\[", stripped)
            if match:
                section = match.group(1)
            elif stripped.startswith("parameters"):
                section = "parameters"
            else:
                section = None
        if section in ("input", "output"):
            match = re.match(r'name\s*:\s*"([^"]+)"', stripped)
            if match:
                names[section].add(match.group(1))
        elif section == "parameters":
            match = re.match(r'key\s*:\s*"([^"]+)"', stripped)
            if match:
                names["parameters"].add(match.group(1))
        depth += stripped.count("{") + stripped.count("[") - stripped.count("}") - stripped.count("]")
    return names


def compare_with_template(model: str, ours: str, template: str) -> list[str]:
    """Tensor names the image's model.py or backend expects that our file lacks (a real mismatch), and template
    parameters we leave to the backend's default (informational, prefixed 'info:')."""
    mine, theirs = template_names(ours), template_names(template)
    problems = []
    for section in ("input", "output"):
        for name in sorted(theirs[section] - mine[section]):
            problems.append(f"{model}: the image's template has {section} {name!r}, the generated config does not")
    for name in sorted(theirs["parameters"] - mine["parameters"]):
        problems.append(f"info: {model}: parameter {name!r} left to the backend's default")
    return problems
