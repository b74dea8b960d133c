"""The container entrypoints' plain-Python logic: data layout and validation, the Triton model repository,
serve.py's command lines, markers and the conversion steps' idempotence.

The entrypoints import each other as top-level modules (they sit flat in /opt/nemo-eks in the pod), so the
directory goes on sys.path here as it does there. NeMo and TensorRT-LLM calls are not run here (see tests/nemo
for the NeMo objects); ``trtllm_calls`` is replaced by a stand-in that records what it was asked to build.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import types
from pathlib import Path

import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from infra import config
from tests.conftest import relocate, write_run
from tools import synth
from workloads import runconfig

ENTRYPOINTS = Path(__file__).resolve().parents[1] / "workloads" / "entrypoints"
sys.path.insert(0, str(ENTRYPOINTS))

import build_engine  # noqa: E402
import dataset  # noqa: E402
import export  # noqa: E402
import finetune  # noqa: E402
import layout  # noqa: E402
import serve  # noqa: E402
import triton_repo  # noqa: E402


def stack_run(stack: str) -> dict:
    raw, secret_keys = synth.read_stack_config(stack)
    return runconfig.run_document(config.load(raw, stack, secret_keys=secret_keys))


def llmapi_variant(run: dict) -> dict:
    variant = copy.deepcopy(run)
    variant["serving"]["backend"] = "llmapi"
    return variant


RUNS = {stack: stack_run(stack) for stack in synth.stack_names()}
ALL_RUNS = {**RUNS, **{f"{s}-llmapi": llmapi_variant(r) for s, r in RUNS.items()}}



def examples(count: int, start: int = 0) -> list[dict]:
    return [{"input": f"question {i}", "output": f"answer {i}"} for i in range(start, start + count)]


def test_run_schema_matches_the_generator():
    assert layout.RUN_SCHEMA == runconfig.SCHEMA_VERSION


def test_the_global_batch_key_the_dataset_errors_name_is_a_stack_key():
    """dataset.py cannot import infra.config in the pod: its error messages spell the key out."""
    key = dataset.GLOBAL_BATCH_KEY.removeprefix(f"{config.PROJECT}:")
    assert key == "training.globalBatchSize" and key in {k.path for k in config.KEYS}


def test_load_run_refuses_another_schema(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"schema": 99}))
    with pytest.raises(ValueError, match="schema 99"):
        layout.load_run(path)


# --------------------------------------------------------------------------------------------------
# Data


def test_validation_report_names_every_bad_line():
    lines = ['{"input": "a", "output": "b"}', "", "{bad json", '"a string"', '{"input": "a"}',
             '{"input": " ", "output": "x"}', '{"input": 1, "output": "x"}', '{"input": "a", "output": "b"}',
             '{"input": "c", "output": "d", "extra": 1}']
    records, report = dataset.parse(lines, "f.jsonl")
    assert [r["input"] for r in records] == ["a", "c"]
    assert report.errors == {
        "not valid JSON (Expecting property name enclosed in double quotes)": [3], "not a JSON object": [4],
        "missing field 'output'": [5], "field 'input' is empty": [6], "field 'input' is not a string": [7],
        "duplicate of an earlier example": [8]}
    assert report.warnings == {"blank line (skipped)": [2]}
    assert not report.ok and "INVALID" in report.render()


def test_long_examples_are_a_warning_with_their_line_numbers():
    lines = [json.dumps({"input": "x" * 3000, "output": "y"}), json.dumps({"input": "short", "output": "y"})]
    records, report = dataset.parse(lines, "f.jsonl", seq_length=512)
    assert len(records) == 2 and report.ok
    assert list(report.warnings.values()) == [[1]]
    assert report.max_tokens_estimate == dataset.estimate_tokens("x" * 3000) + 1 + 1


def test_report_caps_the_listed_lines():
    _, report = dataset.parse(["nope"] * 50, "f.jsonl")
    assert "50 line(s): 1, 2, 3" in report.render() and "and 30 more" in report.render()


def test_an_empty_file_is_invalid():
    _, report = dataset.parse([], "f.jsonl")
    assert not report.ok and "no examples" in report.render()


def test_split_is_deterministic_and_order_independent():
    records = examples(400)
    train, validation = dataset.split(records)
    assert len(validation) == 20 and len(train) == 380
    shuffled = list(reversed(records))
    assert sorted(map(dataset.record_key, dataset.split(shuffled)[1])) == sorted(map(dataset.record_key, validation))
    assert dataset.split(examples(2))[1] and len(dataset.split(examples(100_000))[1]) == dataset.MAX_VALIDATION_EXAMPLES
    with pytest.raises(dataset.DatasetError, match="at least 2"):
        dataset.split(examples(1))


def test_a_derived_validation_set_holds_one_global_batch():
    # 5% of 400 is 20: fewer than a global batch of 32, so NeMo would never validate; the split takes 32
    train, validation = dataset.split(examples(400), minimum=32)
    assert (len(train), len(validation)) == (368, 32)
    assert len(dataset.split(examples(4000), minimum=32)[1]) == 200  # 5% is more than one batch already
    with pytest.raises(dataset.DatasetError, match=r"globalBatchSize = 32\).*lower"):
        dataset.split(examples(32), minimum=32)
    # a global batch above MAX_VALIDATION_EXAMPLES still gets one whole batch: the cap must not empty validation
    big = dataset.MAX_VALIDATION_EXAMPLES + 200
    assert len(dataset.split(examples(3 * big), minimum=big)[1]) == big


def test_a_given_validation_set_smaller_than_a_global_batch_is_refused(tmp_path):
    train_file, validation_file = tmp_path / "train.jsonl", tmp_path / "validation.jsonl"
    dataset.write_jsonl(train_file, examples(100))
    dataset.write_jsonl(validation_file, examples(219)[200:])  # 19 examples, none also in training
    with pytest.raises(dataset.DatasetError) as refused:
        dataset.load_dataset(train_file, validation_file, global_batch_size=32)
    assert "19 validation example(s), fewer than one global batch" in str(refused.value)
    assert "nemo-eks:training.globalBatchSize = 32" in str(refused.value)
    assert len(dataset.load_dataset(train_file, validation_file, global_batch_size=16)[1]) == 19


def test_layout_splits_and_is_idempotent(tmp_path):
    source, target = tmp_path / "datasets" / "default", tmp_path / "run" / "data"
    dataset.write_jsonl(source / "train.jsonl", examples(100))
    details = dataset.layout(source, target, seq_length=4096)
    assert details == {"training_examples": 95, "validation_examples": 5, "validation_split": "derived"}
    first = {p.name: p.read_bytes() for p in target.iterdir()}
    assert set(first) == {"training.jsonl", "validation.jsonl"}
    dataset.layout(source, target, seq_length=4096)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == first


def test_layout_keeps_a_given_validation_file(tmp_path):
    source, target = tmp_path / "src", tmp_path / "data"
    dataset.write_jsonl(source / "train.jsonl", examples(10))
    dataset.write_jsonl(source / "validation.jsonl", examples(3, start=50))
    assert dataset.layout(source, target)["validation_split"] == "given"
    assert [json.loads(line)["input"] for line in (target / "validation.jsonl").read_text().splitlines()] == [
        "question 50", "question 51", "question 52"]


def test_layout_without_training_data_says_how_to_upload(tmp_path):
    with pytest.raises(dataset.DatasetError, match="tools.data upload"):
        dataset.layout(tmp_path / "missing", tmp_path / "data")


def test_calibration_texts_follow_the_training_prompt(tmp_path):
    dataset.write_jsonl(tmp_path / "training.jsonl", examples(10))
    assert dataset.calibration_texts(tmp_path / "training.jsonl", 3) == [
        "question 0 answer 0", "question 1 answer 1", "question 2 answer 2"]


# --------------------------------------------------------------------------------------------------
# Triton model repository


def parse_pbtxt(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


ENGINE_RUNS = {name: run for name, run in ALL_RUNS.items() if run["serving"]["backend"] == "engine"}


@pytest.mark.parametrize("name", sorted(ENGINE_RUNS))
def test_every_config_pbtxt_parses_and_is_filled(name):
    run = ENGINE_RUNS[name]
    files = triton_repo.model_repository_files(run)
    assert set(files) == {f"{m}/config.pbtxt" for m in triton_repo.ENGINE_MODELS}
    serving, paths = run["serving"], run["paths"]
    for relative, text in files.items():
        assert "${" not in text, relative
        model = parse_pbtxt(text)
        assert model.name == relative.split("/")[0]
        assert model.max_batch_size == serving["max_batch_size"]
        params = {k: v.string_value for k, v in model.parameters.items()}
        missing = set(triton_repo.REQUIRED_PARAMETERS[model.name]) - set(params)
        assert not missing, f"{relative} lacks {missing}"
        assert all("${" not in value for value in params.values())
    trt = parse_pbtxt(files["tensorrt_llm/config.pbtxt"])
    params = {k: v.string_value for k, v in trt.parameters.items()}
    assert trt.backend == "tensorrtllm"
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["gpt_model_path"] == paths["engine_dir"]
    assert params["batch_scheduler_policy"] == serving["batch_scheduler_policy"]
    assert float(params["kv_cache_free_gpu_mem_fraction"]) == serving["kv_cache_free_gpu_mem_fraction"]
    assert params["max_beam_width"] == "1"
    assert params["guided_decoding_backend"] == "" and params["xgrammar_tokenizer_info_path"] == ""
    assert "engine_dir" not in params and "batching_strategy" not in params  # template variables, not keys
    assert trt.model_transaction_policy.decoupled is serving["decoupled"]
    assert trt.dynamic_batching.max_queue_delay_microseconds == serving["max_queue_delay_microseconds"]
    assert [g.count for g in trt.instance_group] == [1]
    for model in ("preprocessing", "postprocessing"):
        pre = parse_pbtxt(files[f"{model}/config.pbtxt"])
        assert pre.parameters["tokenizer_dir"].string_value == paths["export_dir"]
        assert pre.backend == "python"


@pytest.mark.parametrize("name", sorted(ENGINE_RUNS))
def test_ensemble_wiring_is_consistent(name):
    files = triton_repo.model_repository_files(ENGINE_RUNS[name])
    models = {m: parse_pbtxt(files[f"{m}/config.pbtxt"]) for m in triton_repo.ENGINE_MODELS}
    ensemble = models["ensemble"]
    assert ensemble.platform == "ensemble"
    available = {t.name for t in ensemble.input}
    produced = set()
    for step in ensemble.ensemble_scheduling.step:
        target = models[step.model_name]
        assert set(step.input_map) <= {t.name for t in target.input}, step.model_name
        assert set(step.output_map) <= {t.name for t in target.output}, step.model_name
        assert set(step.input_map.values()) <= available | produced, step.model_name
        produced |= set(step.output_map.values())
        required = {t.name for t in target.input if not t.optional}
        assert required <= set(step.input_map), f"{step.model_name} needs {required - set(step.input_map)}"
    assert {t.name for t in ensemble.output} <= produced
    assert len({t.name for t in ensemble.output}) == len(ensemble.output)  # no duplicate outputs


LLMAPI_RUNS = {name: run for name, run in ALL_RUNS.items() if run["serving"]["backend"] == "llmapi"}
# tensorrt_llm.LLM arguments (llmapi/llm_args.py BaseLlmArgs/TorchLlmArgs) model.yaml may carry, and the
# triton_config keys all_models/llmapi/tensorrt_llm/1/model.py reads.
LLM_API_KEYS = {"model", "backend", "tensor_parallel_size", "pipeline_parallel_size", "max_batch_size",
                "max_num_tokens", "max_seq_len", "kv_cache_config", "scheduler_config", "triton_config"}
KV_CACHE_CONFIG_KEYS = {"free_gpu_memory_fraction", "dtype", "enable_block_reuse", "max_tokens"}
TRITON_CONFIG_KEYS = {"max_batch_size", "decoupled", "cancellation_check_period_ms"}


@pytest.mark.parametrize("name", sorted(LLMAPI_RUNS))
def test_model_yaml_uses_documented_keys(name):
    run = LLMAPI_RUNS[name]
    files = triton_repo.model_repository_files(run)
    assert set(files) == {triton_repo.LLMAPI_MODEL_YAML}
    document = yaml.safe_load(files[triton_repo.LLMAPI_MODEL_YAML])
    assert set(document) <= LLM_API_KEYS
    assert set(document["kv_cache_config"]) <= KV_CACHE_CONFIG_KEYS
    assert set(document["triton_config"]) <= TRITON_CONFIG_KEYS
    assert document == triton_repo.llmapi_model_config(run)
    serving = run["serving"]
    assert (document["model"], document["backend"]) == (run["paths"]["export_dir"], "pytorch")
    assert (document["tensor_parallel_size"], document["pipeline_parallel_size"]) == (serving["tp"], serving["pp"])
    assert document["max_seq_len"] == serving["max_seq_length"]
    assert document["triton_config"] == {"max_batch_size": 0, "decoupled": serving["decoupled"]}
    assert document["kv_cache_config"]["dtype"] == ("fp8" if serving["kv_cache_dtype"] == "fp8" else "auto")


def test_template_comparison_finds_missing_tensors():
    ours = triton_repo.model_repository_files(RUNS["dev"])["postprocessing/config.pbtxt"]
    template = ours.replace('name: "OUTPUT"', 'name: "OUTPUT"\n  },\n  {\n    name: "NEW_OUTPUT"') \
        + 'parameters {\n  key: "extra"\n  value: { string_value: "${extra}" }\n}\n'
    notes = triton_repo.compare_with_template("postprocessing", ours, template)
    assert notes == ["postprocessing: the image's template has output 'NEW_OUTPUT', the generated config does not",
                     "info: postprocessing: parameter 'extra' left to the backend's default"]
    assert triton_repo.compare_with_template("postprocessing", ours, ours) == []


def test_unknown_backend_is_rejected():
    run = copy.deepcopy(RUNS["dev"])
    run["serving"]["backend"] = "vllm"
    with pytest.raises(ValueError, match="'engine' or 'llmapi'"):
        triton_repo.model_repository_files(run)


# --------------------------------------------------------------------------------------------------
# serve.py


def serving_run(backend="engine", tp=1, pp=1):
    run = copy.deepcopy(RUNS["dev"])
    run["serving"].update(backend=backend, tp=tp, pp=pp, world_size=tp * pp)
    return run


def test_single_gpu_engine_runs_tritonserver_directly():
    run = serving_run()
    repo = run["paths"]["model_repository"]
    assert serve.command_for(run) == [
        "/opt/tritonserver/bin/tritonserver", f"--model-repository={repo}", "--grpc-port=8001", "--http-port=8000",
        "--metrics-port=8002", "--disable-auto-complete-config",
        "--backend-config=python,shm-region-prefix-name=prefix0_"]


def test_multi_gpu_engine_runs_one_tritonserver_per_rank_under_mpirun():
    run = serving_run(tp=4, pp=2)
    command = serve.command_for(run)
    assert command[:4] == ["mpirun", "--allow-run-as-root", "--bind-to", "none"]
    blocks, block = [], []
    for word in command[4:] + [":"]:
        if word == ":":
            blocks.append(block)
            block = []
        else:
            block.append(word)
    assert len(blocks) == 8
    for rank, words in enumerate(blocks):
        assert words[:3] == ["-n", "1", "/opt/tritonserver/bin/tritonserver"]
        assert f"--backend-config=python,shm-region-prefix-name=prefix{rank}_" in words
        assert "--disable-auto-complete-config" in words and "--http-port=8000" in words
        explicit = ["--model-control-mode=explicit", "--load-model=tensorrt_llm"]
        assert all(w in words for w in explicit) == (rank != 0)


@pytest.mark.parametrize("tp", [2, 8])
def test_triton_ranks_are_not_pinned_to_a_core(tp):
    """Open MPI pins each rank to a core when it starts two or fewer: a TP2 engine's two tritonservers and
    their Python stubs would each share one core."""
    command = serve.command_for(serving_run(tp=tp))
    mpirun_options = command[:command.index("-n")]
    assert mpirun_options[0] == "mpirun"
    assert mpirun_options[mpirun_options.index("--bind-to") + 1] == "none"


def test_llmapi_keeps_auto_complete_for_model_yaml():
    command = serve.command_for(serving_run(backend="llmapi", tp=2))
    assert command[0] == "/opt/tritonserver/bin/tritonserver" and "mpirun" not in command
    assert "--disable-auto-complete-config" not in command
    assert "--model-repository=" + serving_run()["paths"]["model_repository"] in command


def test_world_size_must_equal_tp_times_pp():
    run = serving_run(tp=2)
    run["serving"]["world_size"] = 4
    with pytest.raises(ValueError, match="world_size 4 != tp 2 x pp 1"):
        serve.command_for(run)


def test_serve_print_and_refusal(tmp_path, capsys):
    run = relocate(serving_run(tp=2), tmp_path)
    path = write_run(run, tmp_path)
    assert serve.main(["--config", path, "--print"]) == 0
    assert capsys.readouterr().out.startswith("mpirun --allow-run-as-root --bind-to none -n 1 /opt/tritonserver/bin/tritonserver")
    assert serve.main(["--config", path]) == 1  # no conversion marker: never exec a partial repository
    assert "CONVERSION_COMPLETE is missing" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Markers and stage idempotence


def test_markers_are_written_atomically(tmp_path):
    marker = tmp_path / "a" / "TRAINING_COMPLETE"
    assert layout.read_marker(marker) is None
    layout.write_marker(marker, checkpoint="/x")
    assert layout.read_marker(marker)["checkpoint"] == "/x" and "completed_at" in layout.read_marker(marker)
    assert os.listdir(marker.parent) == ["TRAINING_COMPLETE"]
    assert layout.done_marker("/fsx/models/base/x/hf/") == "/fsx/models/base/x/hf.complete"


def training_run(stack: str) -> dict:
    """The run.json the training pods get: the training-only document where the pipeline makes one."""
    raw, secret_keys = synth.read_stack_config(stack)
    document_for = getattr(runconfig, "training_document", runconfig.run_document)
    return document_for(config.load(raw, stack, secret_keys=secret_keys))


def test_prepare_lays_out_data_once_and_reports_bad_data(tmp_path, monkeypatch):
    run = relocate(training_run("dev"), tmp_path)
    calls = []
    monkeypatch.setattr(finetune, "download_base_model", lambda r: calls.append("download") or "downloaded")
    monkeypatch.setattr(finetune, "import_base_model", lambda r: calls.append("import") or "imported")
    paths = run["paths"]
    os.makedirs(paths["dataset_dir"])
    Path(paths["dataset_dir"], "train.jsonl").write_text('{"input": "a", "output": "b"}\n{"input": "a"}\n')
    assert finetune.prepare(run) == 1
    assert "missing field 'output'" in layout.read_marker(layout.failure_marker(paths["prepared_marker"]))["error"]
    assert not os.path.exists(paths["prepared_marker"]) and calls == []
    global_batch = run["training"]["batch"]["global_batch_size"]
    dataset.write_jsonl(Path(paths["dataset_dir"], "train.jsonl"), examples(global_batch))
    assert finetune.prepare(run) == 1  # no room for a validation set of one global batch and any training
    assert "globalBatchSize = " in layout.read_marker(layout.failure_marker(paths["prepared_marker"]))["error"]
    dataset.write_jsonl(Path(paths["dataset_dir"], "train.jsonl"), examples(global_batch + 40))
    assert finetune.prepare(run) == 0
    assert not os.path.exists(layout.failure_marker(paths["prepared_marker"]))  # cleared by the new attempt
    prepared = layout.read_marker(paths["prepared_marker"])
    assert (prepared["training_examples"], prepared["validation_examples"]) == (40, global_batch)
    assert calls == ["download", "import"]
    assert finetune.prepare(run) == 0 and calls == ["download", "import"]  # second run: nothing redone


def test_final_checkpoint_prefers_last_then_highest_step(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for name in ("model--val_loss=1.20-step=49-consumed_samples=6400.0",
                 "model--val_loss=1.10-step=149-consumed_samples=19200.0"):
        (checkpoints / name).mkdir(parents=True)
    assert finetune.final_checkpoint(str(checkpoints)).endswith("step=149-consumed_samples=19200.0")
    target = checkpoints / "model--val_loss=1.15-step=199-consumed_samples=25600.0"
    target.mkdir()
    (checkpoints / "model--val_loss=1.15-step=199-consumed_samples=25600.0-last").symlink_to(target)
    assert finetune.final_checkpoint(str(checkpoints)) == str(target)


def test_pipeline_split_for_405b():
    assert finetune.pipeline_split(126, 4) == {"account_for_embedding_in_pipeline_split": True,
                                               "account_for_loss_in_pipeline_split": True}
    assert not any(finetune.pipeline_split(80, 2).values())
    with pytest.raises(ValueError, match="do not split"):
        finetune.pipeline_split(126, 5)


def test_export_needs_a_complete_checkpoint(tmp_path):
    run = relocate(RUNS["dev"], tmp_path)
    with pytest.raises(export.ExportError, match="training has not finished"):
        export.final_checkpoint(run)
    layout.write_marker(run["paths"]["training_marker"], checkpoint=str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "weights").mkdir(parents=True)
    with pytest.raises(export.ExportError, match="no context/"):
        export.final_checkpoint(run)


@pytest.fixture
def templates(tmp_path):
    """A stand-in for the image's /app/all_models: our own configs as the templates, plus model code."""
    root = tmp_path / "all_models"
    for model, text in triton_repo.model_repository_files(RUNS["dev"]).items():
        (root / "inflight_batcher_llm" / model).parent.mkdir(parents=True, exist_ok=True)
        (root / "inflight_batcher_llm" / model).write_text(text)
    for model in build_engine.IMAGE_PYTHON_MODELS:
        (root / "inflight_batcher_llm" / model / "1").mkdir(parents=True)
        (root / "inflight_batcher_llm" / model / "1" / "model.py").write_text(f"# {model} from the image\n")
    (root / "llmapi" / "tensorrt_llm" / "1").mkdir(parents=True)
    (root / "llmapi" / "tensorrt_llm" / "config.pbtxt").write_text('name: "tensorrt_llm"\nbackend: "python"\n')
    (root / "llmapi" / "tensorrt_llm" / "1" / "model.py").write_text("# llmapi model from the image\n")
    return root


@pytest.fixture
def fake_trtllm(monkeypatch):
    calls = []

    def build_and_save_engine(**kwargs):
        calls.append(kwargs)
        os.makedirs(kwargs["engine_dir"])
        Path(kwargs["engine_dir"], "rank0.engine").write_text("engine")
        return {"tensorrt_llm": "1.2.1"}

    module = types.SimpleNamespace(tensorrt_llm_version=lambda: "1.2.1", gpu_compute_capability=lambda: (9, 0),
                                   build_and_save_engine=build_and_save_engine)
    monkeypatch.setitem(sys.modules, "trtllm_calls", module)
    return calls


def test_engine_build_states_kv_cache_reuse_to_the_llm_api(monkeypatch, tmp_path):
    """KvCacheConfig's enable_block_reuse defaults to True, which the 0.19-era engine LLM API's arbitration
    refused with FP8 and which the served config turns off: trtllm_calls must pass the setting, not leave it to
    the default."""
    recorded = {}

    def recorder(name):
        def make(**kwargs):
            recorded[name] = kwargs
            return types.SimpleNamespace(**kwargs)
        return make

    class LLM:
        def __init__(self, **kwargs):
            recorded["LLM"] = kwargs

        def save(self, path):
            recorded["saved"] = path

        def shutdown(self):
            pass

    llmapi = types.SimpleNamespace(**{name: recorder(name) for name in ("BuildConfig", "CalibConfig", "KvCacheConfig",
                                                                         "QuantConfig")},
                                   QuantAlgo=types.SimpleNamespace(FP8="FP8"))
    monkeypatch.setitem(sys.modules, "tensorrt_llm", types.SimpleNamespace(__version__="1.2.1"))
    monkeypatch.setitem(sys.modules, "tensorrt_llm._tensorrt_engine", types.SimpleNamespace(LLM=LLM))
    monkeypatch.setitem(sys.modules, "tensorrt_llm.llmapi", llmapi)
    import trtllm_calls

    trtllm_calls.build_and_save_engine(
        checkpoint_dir="ckpt", engine_dir=str(tmp_path), tp=2, pp=1, max_batch_size=8, max_num_tokens=4096,
        max_seq_len=4096, fp8=True, fp8_kv_cache=True, calibration_dir=str(tmp_path), calibration_samples=4,
        calibration_max_seq_length=512, kv_cache_free_gpu_memory_fraction=0.85,
        kv_cache_reuse=triton_repo.KV_CACHE_REUSE)
    assert recorded["KvCacheConfig"] == {"free_gpu_memory_fraction": 0.85, "enable_block_reuse": False}
    assert recorded["QuantConfig"]["quant_algo"] == "FP8"
    assert recorded["LLM"]["kv_cache_config"].enable_block_reuse is False


def converted_run(tmp_path, stack="prod"):
    run = relocate(RUNS[stack], tmp_path / "fsx")
    layout.write_marker(layout.done_marker(run["paths"]["export_dir"]))
    dataset.write_jsonl(Path(run["paths"]["data_dir"], "training.jsonl"), examples(30))
    return run


def test_engine_conversion_builds_once_and_writes_the_repository(tmp_path, templates, fake_trtllm):
    run = converted_run(tmp_path)
    args = [str(templates / "inflight_batcher_llm"), str(templates / "llmapi")]
    details = build_engine.convert(run, *args)
    assert details["engine"] == "built" and len(fake_trtllm) == 1
    call = fake_trtllm[0]
    serving = run["serving"]
    assert (call["tp"], call["pp"], call["max_batch_size"], call["fp8"], call["fp8_kv_cache"]) == (
        serving["tp"], serving["pp"], serving["max_batch_size"], True, True)
    # the engine is built with the KV cache reuse the served config declares (an FP8 build cannot have it)
    served = parse_pbtxt(triton_repo.model_repository_files(run)["tensorrt_llm/config.pbtxt"])
    assert call["kv_cache_reuse"] is False
    assert served.parameters["enable_kv_cache_reuse"].string_value == str(call["kv_cache_reuse"]).lower()
    calibration = Path(call["calibration_dir"], "train.jsonl").read_text().splitlines()
    assert json.loads(calibration[0]) == {"text": "question 0 answer 0"} and len(calibration) == 30
    repo = Path(run["paths"]["model_repository"])
    for relative, text in triton_repo.model_repository_files(run).items():
        assert (repo / relative).read_text() == text
    assert (repo / "preprocessing" / "1" / "model.py").read_text() == "# preprocessing from the image\n"
    assert (repo / "ensemble" / "1").is_dir() and (repo / "tensorrt_llm" / "1").is_dir()
    assert Path(run["paths"]["engine_dir"], "rank0.engine").exists()
    assert layout.read_marker(run["paths"]["conversion_marker"])["serving_id"] == run["serving_id"]
    assert build_engine.convert(run, *args)["serving_id"] == run["serving_id"] and len(fake_trtllm) == 1
    os.remove(run["paths"]["conversion_marker"])  # a rerun after a lost marker reuses the engine
    assert build_engine.convert(run, *args)["engine"] == "reused" and len(fake_trtllm) == 1


def test_engine_conversion_rejects_another_image_version(tmp_path, templates, fake_trtllm, monkeypatch):
    monkeypatch.setattr(sys.modules["trtllm_calls"], "tensorrt_llm_version", lambda: "1.1.0")
    run = converted_run(tmp_path)
    path = write_run(run, tmp_path)
    assert build_engine.main(["--config", path, "--templates", str(templates / "inflight_batcher_llm")]) == 1
    error = layout.read_marker(layout.failure_marker(run["paths"]["conversion_marker"]))["error"]
    assert "TensorRT-LLM 1.1.0" in error and fake_trtllm == []


def test_engine_conversion_fails_clearly_without_templates(tmp_path, fake_trtllm):
    run = converted_run(tmp_path, stack="dev")
    with pytest.raises(build_engine.ConversionError, match="--templates"):
        build_engine.convert(run, str(tmp_path / "nowhere"), str(tmp_path / "nowhere"))


def test_llmapi_conversion_writes_model_yaml_next_to_the_image_files(tmp_path, templates):
    run = llmapi_variant(converted_run(tmp_path, stack="dev"))
    details = build_engine.convert(run, str(templates / "inflight_batcher_llm"), str(templates / "llmapi"))
    repo = Path(run["paths"]["model_repository"])
    assert details["backend"] == "llmapi"
    assert yaml.safe_load((repo / "tensorrt_llm/1/model.yaml").read_text())["model"] == run["paths"]["export_dir"]
    assert (repo / "tensorrt_llm/1/model.py").read_text() == "# llmapi model from the image\n"
    assert (repo / "tensorrt_llm/config.pbtxt").exists()


def test_conversion_waits_for_the_export(tmp_path, templates):
    run = relocate(RUNS["dev"], tmp_path)
    with pytest.raises(build_engine.ConversionError, match="export.py runs before"):
        build_engine.convert(run, str(templates), str(templates))
