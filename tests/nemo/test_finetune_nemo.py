"""The fine-tuning entrypoint builds its real NeMo 2 objects from every stack's run.json (nemo_toolkit 2.7.3, CPU).

Runs in .venv-nemo via tests/nemo/run.sh, which writes the run.json of every stack file and of the planner shapes
of tests/nemo/write_runs.py into NEMO_EKS_RUNS_DIR with the main environment (the config code needs Pulumi-side
packages this environment does not have). Nothing trains. The configuration is built with fiddle exactly as
``nemo_run.run(recipe, direct=True)`` builds it in the pod, with three test-only overrides because the test
environment has neither a GPU nor Transformer Engine nor the imported base on FSx: the trainer's accelerator (cpu),
``apply_rope_fusion=False`` (Megatron's config rejects the fused RoPE without TE) and no tokenizer (the pods load
it from the imported base; a test below checks where). Then what ``llm.finetune`` does
before ``trainer.fit`` runs with NeMo's and Megatron-Core's own code: ``_validate_config``, the optimizer's and
the strategy's ``connect``, and the optimizer construction, as far as a CPU goes.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback
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
    """The real NeMo objects of a stack's run, with the test-only overrides (CPU, no fused RoPE, and no tokenizer:
    it is loaded from the imported base checkpoint on FSx, which a CPU test does not have)."""
    import fiddle as fdl

    run = json.loads(run_file.read_text())
    recipe = finetune.build_recipe(run)
    testable = copy.deepcopy(recipe)
    testable.trainer.accelerator, testable.trainer.devices, testable.trainer.num_nodes = "cpu", 1, 1
    testable.model.config.apply_rope_fusion = False
    testable.model.tokenizer = None
    partial = fdl.build(testable)  # functools.partial(llm.finetune, model=..., trainer=..., ...)
    return run, recipe, partial.func, partial.keywords


def test_every_stack_has_a_run_file():
    stacks = {p.name[len("Pulumi."):-len(".yaml")] for p in STACK_FILES}
    assert {p.stem for p in RUN_FILES if not p.stem.startswith("shape-")} == stacks


def test_run_files_cover_every_kind_of_plan():
    """The stack files and the planner shapes of write_runs.py together: each kind of plan NeMo checks
    differently is built and validated below."""
    kinds = set()
    for run_file in RUN_FILES:
        training = json.loads(run_file.read_text())["training"]
        par, layers = training["parallelism"], training["model"]["layers"]
        kinds |= {training["method"], training["precision"]}
        kinds |= {"cp>1"} if par["cp"] > 1 else set()
        kinds |= {"uneven pp"} if par["pp"] > 1 and layers % par["pp"] else set()
    assert kinds >= {"lora", "sft", "bf16", "fp8", "cp>1", "uneven pp"}


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


@pytest.mark.parametrize("run_file", RUN_FILES, ids=lambda p: p.stem)
def test_the_tokenizer_comes_from_the_imported_base_never_from_a_resumed_checkpoint(run_file):
    """A restarted run keeps the base's tokenizer: AutoResume must not take it from the checkpoint it resumes
    from, which ModelCheckpoint later deletes (finetune.build_recipe says why)."""
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

    run = json.loads(run_file.read_text())
    recipe = finetune.build_recipe(run)
    assert recipe.model.tokenizer.__fn_or_cls__ is AutoTokenizer
    assert recipe.model.tokenizer.pretrained_model_name == os.path.join(run["paths"]["base_nemo_dir"], "context",
                                                                       "nemo_tokenizer")
    assert recipe.resume.restore_config.load_artifacts is False
    assert recipe.resume.restore_config.path == run["paths"]["base_nemo_dir"]


@pytest.mark.parametrize("run", _tuned_vp_runs())
def test_tuned_virtual_pipeline_layouts_build(run, tmp_path):
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps(run))
    run, _, _, objects = build_for_test(run_file)
    _check_virtual_pipeline(run, objects)
    assert objects["trainer"].strategy.tensor_model_parallel_size == run["training"]["parallelism"]["tp"]
    recompute = objects["model"].config.recompute_granularity
    assert recompute == ("full" if run["training"]["parallelism"]["recompute"] == "full" else None)


def test_nccl_timeout_reaches_the_process_group(monkeypatch):
    """faultTolerance.ncclTimeoutSeconds, passed to the pod as an environment variable, becomes the timeout that
    Lightning's DDPStrategy (MegatronStrategy's base) gives init_process_group, so a hung collective ends."""
    import datetime

    monkeypatch.setenv(finetune.layout.NCCL_TIMEOUT_ENV, "123")
    _, _, _, objects = build_for_test(RUN_FILES[0])
    assert objects["trainer"].strategy._timeout == datetime.timedelta(seconds=123)


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


# ---------------------------------------------------------------------------------------------------------
# Past fiddle.build: what llm.finetune does before trainer.fit, with NeMo's and Megatron-Core's own code


def build_in_cluster_shape(run_file: Path):
    """The run's objects with the trainer of the real cluster shape (nodes x GPUs per node) on the CPU
    accelerator: NeMo's checks compare the device count with TP x PP x CP x DP."""
    import fiddle as fdl

    run = json.loads(run_file.read_text())
    testable = copy.deepcopy(finetune.build_recipe(run))
    testable.trainer.accelerator = "cpu"
    testable.model.config.apply_rope_fusion = False
    testable.model.tokenizer = None  # loaded from the imported base on FSx (build_for_test)
    return run, fdl.build(testable).keywords


@pytest.fixture(scope="module", params=RUN_FILES, ids=lambda p: p.stem)
def shaped(request):
    return build_in_cluster_shape(request.param)


def test_llm_finetune_accepts_the_configuration(shaped):
    """llm.finetune runs _validate_config on its arguments before it trains (nemo/collections/llm/api.py,
    2.7.3): CP > 1 needs per-token loss, the devices must divide by TP x PP x CP, the global batch by the
    micro batch times DP, a pipeline needs a dtype."""
    from nemo.collections.llm.api import _validate_config

    run, objects = shaped
    trainer = objects["trainer"]
    par = run["training"]["parallelism"]
    assert (trainer.num_nodes, trainer.num_devices) == (par["nodes"], par["gpus_per_node"])
    _validate_config(objects["model"], objects["data"], trainer, log=objects["log"], resume=objects["resume"],
                     optim=objects["optim"], model_transform=objects["peft"])
    assert objects["model"].config.calculate_per_token_loss == (par["cp"] > 1)


def test_strategy_configures_the_model_and_the_optimizer(shaped):
    """What llm.finetune's setup does next: the optimizer module connects to the model and the strategy
    copies the parallel layout and the precision into Megatron's TransformerConfig, whose __post_init__
    checks them (heads over TP, sequence parallelism, FP8), and aligns the DDP config with the optimizer."""
    run, objects = shaped
    model, strategy, optim = objects["model"], objects["trainer"].strategy, objects["optim"]
    training = run["training"]
    par = training["parallelism"]
    optim.connect(model)
    strategy.connect(model)
    config = model.config
    assert (config.tensor_model_parallel_size, config.pipeline_model_parallel_size, config.context_parallel_size) == (
        par["tp"], par["pp"], par["cp"])
    assert config.sequence_parallel == (par["sequence_parallel"] and par["tp"] > 1)
    assert config.fp8 == ("hybrid" if training["precision"] == "fp8" else None)
    assert config.bf16 and optim.config.bf16
    distributed = training["method"] == "sft"
    assert optim.config.use_distributed_optimizer == strategy.ddp_config.use_distributed_optimizer == distributed
    assert strategy.ddp_config.average_in_collective is False  # CP > 1 fine-tuning requires it (_validate_config)


@pytest.fixture(scope="module")
def megatron_process_groups():
    """One rank on gloo: Megatron-Core's optimizer looks up its data-parallel groups."""
    import socket

    import torch.distributed as dist
    from megatron.core import parallel_state

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def test_optimizer_builds_with_this_megatron_core(shaped, megatron_process_groups):
    """NeMo's MegatronOptimizerModule builds Megatron-Core's optimizer with get_megatron_optimizer(...,
    no_weight_decay_cond=...): Megatron-Core 0.16 removed that argument and the call fails with a TypeError
    (on a GPU too). Here the real call runs with the run's optimizer and DDP configuration, over a one-layer
    module standing in for the model (Megatron's DDP wrapper allocates its buffers on CUDA): it builds the
    parameter groups and the torch optimizer, and stops only where Megatron's mixed-precision wrapper puts its
    first tensor on CUDA."""
    import torch
    from megatron.core.optimizer.optimizer import MixedPrecisionOptimizer
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.transformer_config import TransformerConfig
    from nemo.lightning.megatron_parallel import MegatronParallel

    run, objects = shaped
    strategy, optim = objects["trainer"].strategy, objects["optim"]
    optim.connect(objects["model"])
    strategy.connect(objects["model"])

    class OneLayer(MegatronModule):
        def __init__(self):
            super().__init__(TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                                               use_cpu_initialization=True))
            self.linear = torch.nn.Linear(8, 8)
            self.ddp_config = strategy.ddp_config  # what Megatron's DDP wrapper carries

    class Wrapped(torch.nn.Module):  # MegatronParallel holds each chunk inside its DDP wrapper
        def __init__(self):
            super().__init__()
            self.module = OneLayer()

    model = MegatronParallel([Wrapped()], ddp_config=strategy.ddp_config, cpu=True)
    with pytest.raises(AssertionError, match="Torch not compiled with CUDA enabled") as failure:
        optim.optimizers(model)
    frames = [frame for frame, _ in traceback.walk_tb(failure.tb)]
    reached = [type(f.f_locals["self"]).__name__ for f in frames
               if f.f_code.co_name == "__init__" and isinstance(f.f_locals.get("self"), MixedPrecisionOptimizer)]
    expected = "DistributedOptimizer" if run["training"]["method"] == "sft" else "Float16OptimizerWithFloat16Params"
    assert reached and reached[0] == expected
    inner = next(f.f_locals["optimizer"] for f in frames if f.f_code.co_name == "__init__"
                 and isinstance(f.f_locals.get("optimizer"), torch.optim.Optimizer))
    assert inner.defaults["lr"] == run["training"]["optimizer"]["lr"]
