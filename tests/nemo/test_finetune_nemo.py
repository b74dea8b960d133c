"""The fine-tuning entrypoint builds its real NeMo 2 objects from every stack's run.json (nemo_toolkit 2.7.3, CPU).

Runs in .venv-nemo via tests/nemo/run.sh, which writes each stack's run.json into NEMO_EKS_RUNS_DIR with the main
environment (the config code needs Pulumi-side packages this environment does not have). Nothing trains: the
configuration is built with fiddle exactly as ``nemo_run.run(recipe, direct=True)`` builds it in the pod, with two
test-only overrides because the test environment has neither a GPU nor Transformer Engine: the trainer's accelerator
(cpu, one device) and ``apply_rope_fusion=False`` (Megatron's config rejects the fused RoPE without TE).
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "workloads" / "entrypoints"))

import finetune  # noqa: E402

RUNS_DIR = os.environ.get("NEMO_EKS_RUNS_DIR")
RUN_FILES = sorted(Path(RUNS_DIR).glob("*.json")) if RUNS_DIR else []
STACK_FILES = sorted((ROOT / "stacks").glob("Pulumi.*.yaml"))

pytestmark = pytest.mark.skipif(not RUNS_DIR, reason="run through tests/nemo/run.sh (sets NEMO_EKS_RUNS_DIR)")


def build_for_test(run_file: Path):
    """The real NeMo objects of a stack's run, with the two test-only overrides (CPU, no fused RoPE)."""
    import fiddle as fdl

    run = json.loads(run_file.read_text())
    recipe = finetune.build_recipe(run)
    testable = copy.deepcopy(recipe)
    testable.trainer.accelerator, testable.trainer.devices, testable.trainer.num_nodes = "cpu", 1, 1
    testable.model.config.apply_rope_fusion = False
    partial = fdl.build(testable)  # functools.partial(llm.finetune, model=..., trainer=..., ...)
    return run, recipe, partial.func, partial.keywords


def test_every_stack_has_a_run_file():
    stacks = {p.name[len("Pulumi."):-len(".yaml")] for p in STACK_FILES}
    assert {p.stem for p in RUN_FILES} == stacks


@pytest.fixture(scope="module", params=RUN_FILES, ids=lambda p: p.stem)
def built(request):
    return build_for_test(request.param)


def test_the_run_is_llm_finetune(built):
    from nemo.collections import llm

    _, _, func, objects = built
    assert func is llm.finetune
    assert set(objects) >= {"model", "data", "trainer", "log", "resume", "optim", "peft"}


def test_parallelism(built):
    from nemo import lightning as nl

    run, recipe, _, objects = built
    par = run["training"]["parallelism"]
    strategy = objects["trainer"].strategy
    assert isinstance(strategy, nl.MegatronStrategy)
    assert strategy.tensor_model_parallel_size == par["tp"]
    assert strategy.pipeline_model_parallel_size == par["pp"]
    assert strategy.context_parallel_size == par["cp"]
    assert strategy.virtual_pipeline_model_parallel_size == par["vp"]
    assert strategy.sequence_parallel == (par["sequence_parallel"] and par["tp"] > 1)
    layers = run["training"]["model"]["layers"]
    uneven = par["pp"] > 1 and layers % par["pp"] != 0
    assert strategy.account_for_embedding_in_pipeline_split == uneven
    assert strategy.account_for_loss_in_pipeline_split == uneven
    # the configuration the pod builds asks for the real cluster shape (the test only swaps the accelerator)
    assert recipe.trainer.num_nodes == par["nodes"] and recipe.trainer.devices == par["gpus_per_node"]
    assert recipe.trainer.accelerator == "gpu"
    assert par["tp"] * par["pp"] * par["cp"] * par["dp"] == par["nodes"] * par["gpus_per_node"]


def _check_virtual_pipeline(run, objects):
    """What Megatron-Core builds from the strategy NeMo hands the model: the strategy's parallelism copied into
    the model config (NeMo's set_model_parallel_attributes, as MegatronStrategy does at setup), then
    megatron-core's own get_num_layers_to_build for every pipeline rank and virtual stage (it asserts that each
    rank's layers divide by VP), and the interleaved schedule's micro-batch grouping."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from nemo.lightning import _strategy_lib

    par, batch = run["training"]["parallelism"], run["training"]["batch"]
    strategy = objects["trainer"].strategy
    assert strategy.virtual_pipeline_model_parallel_size == par["vp"]
    config = _strategy_lib.set_model_parallel_attributes(objects["model"], strategy.parallelism)
    assert config.virtual_pipeline_model_parallel_size == par["vp"]
    chunks = range(par["vp"]) if par["vp"] else [None]
    layers = sum(get_num_layers_to_build(config, vp_stage=v, pp_rank=r) for r in range(par["pp"]) for v in chunks)
    assert layers == run["training"]["model"]["layers"]
    if par["vp"]:
        micro_batches = batch["global_batch_size"] // (batch["micro_batch_size"] * par["dp"])
        group = config.microbatch_group_size_per_vp_stage
        assert group == par["pp"] <= micro_batches and micro_batches % group == 0


def test_virtual_pipeline_builds(built):
    run, _, _, objects = built
    _check_virtual_pipeline(run, objects)


def _tuned_vp_runs():
    """Every layout with virtual pipeline stages the planner can choose for NVIDIA's tuned rows, as the run.json
    of the prod stack (Llama-3.1-70B on p5.48xlarge) with that method, precision and layout."""
    if not RUN_FILES or not any(p.stem == "prod" for p in RUN_FILES):
        return []
    sys.path.insert(0, str(ROOT))
    from infra import catalog, sizing  # pure Python: the planner needs no Pulumi-side package

    base = json.loads(next(p for p in RUN_FILES if p.stem == "prod").read_text())
    runs = []
    for tuned in sizing.TUNED:
        if tuned.vp is None or tuned.model != base["training"]["model"]["key"]:
            continue
        request = sizing.TrainingRequest(sizing.MODELS[tuned.model], tuned.method, catalog.get("p5.48xlarge"),
                                         tuned.precision, global_batch_size=tuned.global_batch_size,
                                         nodes=tuned.gpus // 8)
        par = sizing.plan(request).parallelism
        run = copy.deepcopy(base)
        training = run["training"]
        training["method"], training["precision"] = tuned.method, tuned.precision
        training["batch"]["global_batch_size"] = tuned.global_batch_size
        training["parallelism"] = {"nodes": par.nodes, "gpus_per_node": par.gpus_per_node, "tp": par.tp, "pp": par.pp,
                                   "vp": par.vp if par.vp > 1 else None, "cp": par.cp, "dp": par.dp,
                                   "sequence_parallel": par.sequence_parallel, "recompute": par.recompute}
        training["lora"] = {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": [
            "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]} if tuned.method == "lora" else None
        runs.append(pytest.param(run, id=f"{tuned.model}-{tuned.method}-{tuned.precision}-{tuned.gpus}"))
    return runs


@pytest.mark.parametrize("run", _tuned_vp_runs())
def test_tuned_virtual_pipeline_layouts_build(run, tmp_path):
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps(run))
    run, _, _, objects = build_for_test(run_file)
    _check_virtual_pipeline(run, objects)
    assert objects["trainer"].strategy.tensor_model_parallel_size == run["training"]["parallelism"]["tp"]
    recompute = objects["model"].config.recompute_granularity
    assert recompute == ("full" if run["training"]["parallelism"]["recompute"] == "full" else None)


def test_memory_settings_reach_nemo(built):
    run, _, _, objects = built
    memory = run["training"]["memory"]
    plugin = objects["trainer"].strategy.precision_plugin
    assert plugin.dtype_config.grad_reduce_in_fp32 == memory["grad_reduce_in_fp32"]
    assert objects["model"].config.disable_parameter_transpose_cache == memory["disable_parameter_transpose_cache"]


def test_model_and_recompute(built):
    from nemo.collections import llm

    run, _, _, objects = built
    model = objects["model"]
    assert isinstance(model, llm.LlamaModel)
    assert type(model.config).__name__ == run["training"]["model"]["nemo_config"]
    assert model.config.num_layers == run["training"]["model"]["layers"]
    assert model.config.seq_length == run["training"]["batch"]["seq_length"]
    if run["training"]["parallelism"]["recompute"] == "full":
        assert (model.config.recompute_granularity, model.config.recompute_method,
                model.config.recompute_num_layers) == ("full", "uniform", 1)
    else:
        assert model.config.recompute_granularity is None


def test_lora_or_full_sft(built):
    from nemo.collections import llm

    run, _, _, objects = built
    peft, lora = objects["peft"], run["training"]["lora"]
    if run["training"]["method"] == "lora":
        assert isinstance(peft, llm.peft.LoRA)
        assert peft.target_modules == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
        assert (peft.dim, peft.alpha, peft.dropout) == (lora["rank"], lora["alpha"], lora["dropout"])
        assert objects["optim"].config.use_distributed_optimizer is False
    else:
        assert peft is None
        assert objects["optim"].config.use_distributed_optimizer is True


def test_precision(built):
    from nemo.lightning.pytorch.plugins.mixed_precision import MegatronMixedPrecision

    run, _, _, objects = built
    plugin = objects["trainer"].strategy.precision_plugin
    assert isinstance(plugin, MegatronMixedPrecision)
    config = plugin.dtype_config
    assert config.bf16 is True
    if run["training"]["precision"] == "fp8":
        assert (config.fp8, config.fp8_recipe) == ("hybrid", "delayed")
        assert config.fp8_param_gather == (run["training"]["method"] != "lora")
    else:
        assert config.fp8 is None


def test_data_module(built):
    from nemo.collections import llm

    run, _, _, objects = built
    data, batch = objects["data"], run["training"]["batch"]
    assert isinstance(data, llm.FineTuningDataModule)
    assert str(data.dataset_root) == run["paths"]["data_dir"]
    assert (data.seq_length, data.micro_batch_size, data.global_batch_size) == (
        batch["seq_length"], batch["micro_batch_size"], batch["global_batch_size"])
    assert str(data.train_path).endswith("/training.jsonl") and str(data.validation_path).endswith("/validation.jsonl")


def test_optimizer_and_schedule(built):
    run, _, _, objects = built
    opt, schedule, trainer = run["training"]["optimizer"], run["training"]["schedule"], objects["trainer"]
    optim = objects["optim"]
    assert (optim.config.lr, optim.config.weight_decay, optim.config.adam_beta2, optim.config.clip_grad) == (
        opt["lr"], opt["weight_decay"], opt["adam_beta2"], opt["clip_grad"])
    assert (optim.lr_scheduler.warmup_steps, optim.lr_scheduler.min_lr, optim.lr_scheduler.max_steps) == (
        opt["warmup_steps"], opt["min_lr"], schedule["max_steps"])
    assert trainer.max_steps == schedule["max_steps"]
    assert trainer.val_check_interval == schedule["val_check_interval"]
    assert trainer.limit_val_batches == schedule["limit_val_batches"]


def test_checkpointing_and_resume(built):
    from nemo import lightning as nl

    run, _, _, objects = built
    ckpt, paths = run["training"]["checkpointing"], run["paths"]
    log, resume = objects["log"], objects["resume"]
    assert isinstance(log.ckpt, nl.ModelCheckpoint)
    assert log.ckpt.save_top_k == ckpt["save_top_k"]
    assert log.ckpt._every_n_train_steps == ckpt["every_n_train_steps"]
    assert log.ckpt.monitor == ckpt["monitor"]
    assert (log.log_dir, log.name, log.use_datetime_version) == (paths["nemo_log_dir"], finetune.LOG_NAME, False)
    assert isinstance(resume, nl.AutoResume)
    assert resume.resume_if_exists is True and resume.resume_ignore_no_checkpoint is True
    assert resume.restore_config.path == paths["base_nemo_dir"]


def test_dry_run_prints_the_configuration(capsys):
    run_file = RUN_FILES[0]
    assert finetune.main(["--config", str(run_file), "--dry-run"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[:out.index("\n}\n") + 2])
    run = json.loads(run_file.read_text())
    assert summary["tp"] == run["training"]["parallelism"]["tp"]
    assert "Dry run for task nemo.collections.llm.api:finetune" in out


def test_pipeline_split_rejects_an_impossible_layout():
    assert finetune.pipeline_split(126, 4)["account_for_loss_in_pipeline_split"] is True
    assert finetune.pipeline_split(80, 4)["account_for_loss_in_pipeline_split"] is False
    with pytest.raises(ValueError, match="do not split"):
        finetune.pipeline_split(126, 5)
