"""Fine-tuning (NeMo image, nemo_toolkit 2.7.x): data and base-model preparation, and the NeMo 2 training run.

    python3 /opt/nemo-eks/finetune.py --config /etc/nemo-eks/run.json --prepare    # master init container, once
    torchrun ... /opt/nemo-eks/finetune.py --config /etc/nemo-eks/run.json          # every rank
    python3 /opt/nemo-eks/finetune.py --config /etc/nemo-eks/run.json --dry-run     # print the NeMo config

The run is ``llm.finetune`` configured as a nemo_run ``Partial`` from ``default_finetune_recipe`` (the recipe
every NeMo model-specific fine-tune recipe starts from), with every setting that matters overridden from
run.json: nothing is left to a recipe default that the sizing plan did not choose. Global rank 0 serves the
training metrics for Prometheus on port 9401 while it trains (training_metrics.py) and writes the training
marker with the final checkpoint once every rank has finished.

Signatures used are those of nemo_toolkit 2.7.3 (nemo/collections/llm/api.py, recipes/finetune_default.py,
recipes/optim/adam.py, recipes/precision/mixed_precision.py, lightning/pytorch/strategies/megatron_strategy.py,
lightning/resume.py, lightning/nemo_logger.py, lightning/pytorch/callbacks/model_checkpoint.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import sys
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dataset  # noqa: E402
import layout  # noqa: E402
import training_metrics  # noqa: E402

# Where import_ckpt's context keeps the tokenizer's files: the importer saves them to /tmp/nemo_tokenizer
# (ModelConnector.save_hf_tokenizer_assets, nemo/lightning/io/connector.py) and the context copies a directory
# artifact under its own name (DirArtifact.dump, nemo/lightning/io/artifact/file.py; nemo_toolkit 2.7.3).
BASE_TOKENIZER_DIR = "nemo_tokenizer"
LOG_NAME = "finetune"  # stable: AutoResume finds <nemo_log_dir>/finetune/checkpoints after a pod restart
SEED = 1234
# Llama was pretrained with BOS; NeMo's SFT dataset defaults to add_bos=False. Training with it keeps the
# fine-tuned prompts like the serving prompts (Triton's preprocessing adds special tokens).
DATASET_KWARGS = {"add_bos": True}


class PrepareError(RuntimeError):
    """Input a retry will not fix: reported through the PREPARED failure marker."""


# --------------------------------------------------------------------------------------------------
# The NeMo configuration


def pipeline_split(layers: int, pp: int) -> dict[str, bool]:
    """Megatron needs the transformer layers split evenly over the pipeline stages. When they are not
    (Llama-3.1-405B: 126 layers), counting the input embedding and the loss as one layer each makes
    layers + 2 stages' worth (128 / 4 = 32), exactly as NeMo's own llama31_405b recipe does."""
    if pp <= 1 or layers % pp == 0:
        return {"account_for_embedding_in_pipeline_split": False, "account_for_loss_in_pipeline_split": False}
    if (layers + 2) % pp == 0:
        return {"account_for_embedding_in_pipeline_split": True, "account_for_loss_in_pipeline_split": True}
    raise ValueError(f"{layers} layers do not split over pipeline parallel size {pp}, not even counting the "
                     "embedding and the loss as layers; choose a pp that divides layers or layers + 2")


def build_recipe(run: dict[str, Any]):
    """The fine-tuning run as a ``run.Partial(llm.finetune, ...)``; building it (``fdl.build``) gives the real
    objects, calling the result trains."""
    import nemo_run as nr
    import torch
    from nemo import lightning as nl
    from nemo.collections import llm
    from nemo.collections.llm.recipes.finetune_default import default_finetune_recipe
    from nemo.collections.llm.recipes.log.default import tensorboard_logger
    from nemo.collections.llm.recipes.optim.adam import distributed_fused_adam_with_cosine_annealing
    from nemo.collections.llm.recipes.precision.mixed_precision import bf16_mixed, bf16_with_fp8_mixed
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

    training, paths = run["training"], run["paths"]
    model_spec, par, batch = training["model"], training["parallelism"], training["batch"]
    lora, opt, schedule, ckpt = training["lora"], training["optimizer"], training["schedule"], training["checkpointing"]
    is_lora = training["method"] == "lora"

    config_cls = getattr(llm, model_spec["nemo_config"], None)
    if config_cls is None:
        raise ValueError(f"training.model.nemo_config {model_spec['nemo_config']!r} is not a class of "
                         "nemo.collections.llm in this NeMo version")
    model = nr.Config(llm.LlamaModel, config=nr.Config(config_cls, seq_length=batch["seq_length"]))
    # default_finetune_recipe(model, resume_path, dir, name, num_nodes, num_gpus_per_node, packed_sequence)
    recipe = default_finetune_recipe(model, model_spec["hf_model_id"], paths["nemo_log_dir"], LOG_NAME,
                                     par["nodes"], par["gpus_per_node"], False)

    # -- parallelism and memory
    strategy = recipe.trainer.strategy
    strategy.tensor_model_parallel_size = par["tp"]
    strategy.pipeline_model_parallel_size = par["pp"]
    strategy.context_parallel_size = par["cp"]
    # interleaved 1F1B: MegatronStrategy(virtual_pipeline_model_parallel_size) in NeMo 2.7.3, None when not
    # interleaved. The sizing plan only writes sizes Megatron-Core accepts (validated with the stack config).
    strategy.virtual_pipeline_model_parallel_size = par.get("vp")
    strategy.sequence_parallel = bool(par["sequence_parallel"]) and par["tp"] > 1  # only meaningful with TP
    strategy.pipeline_dtype = torch.bfloat16
    for key, value in pipeline_split(model_spec["layers"], par["pp"]).items():
        setattr(strategy, key, value)
    # A collective that hangs (a rank stuck or gone) fails its rank after this long instead of hanging the run:
    # MegatronStrategy passes ``timeout`` through **kwargs to Lightning's DDPStrategy, which gives it to
    # init_process_group; with TORCH_NCCL_ASYNC_ERROR_HANDLING=1 the NCCL watchdog then ends the process and
    # torchrun restarts the ranks. The pod sets it from faultTolerance.ncclTimeoutSeconds.
    nccl_timeout = os.environ.get(layout.NCCL_TIMEOUT_ENV)
    if nccl_timeout:
        strategy.timeout = datetime.timedelta(seconds=int(nccl_timeout))

    # the memory settings the sizing plan assumes, those of NVIDIA's tuned recipes: bf16 gradient buffers and no
    # FP8 weight/transpose cache kept between micro-batches
    memory = training["memory"]
    recipe.model.config.disable_parameter_transpose_cache = memory["disable_parameter_transpose_cache"]
    if par["cp"] > 1:
        # A context-parallel rank whose share of a sequence is all masked (prompt) tokens gets a NaN loss when
        # the loss is averaged per rank; it is summed per token instead. llm.finetune asserts it before
        # training (nemo_toolkit 2.7.3,
        # nemo/collections/llm/api.py _validate_config, "When finetuning with CP>1,
        # model.config.calculate_per_token_loss must be True").
        recipe.model.config.calculate_per_token_loss = True
    if par["recompute"] == "full":
        # recompute every layer's activations in the backward pass (uniform, one layer per checkpoint)
        recipe.model.config.recompute_granularity = "full"
        recipe.model.config.recompute_method = "uniform"
        recipe.model.config.recompute_num_layers = 1

    # -- trainer
    trainer = recipe.trainer
    trainer.num_nodes = par["nodes"]
    trainer.devices = par["gpus_per_node"]
    trainer.max_steps = schedule["max_steps"]
    trainer.val_check_interval = schedule["val_check_interval"]
    trainer.limit_val_batches = schedule["limit_val_batches"]
    trainer.limit_test_batches = schedule["limit_val_batches"]
    if training["precision"] == "fp8":
        trainer.plugins = bf16_with_fp8_mixed()
        # FP8 parameter gathering belongs to the distributed optimizer, which LoRA runs turn off (below)
        trainer.plugins.fp8_param_gather = not is_lora
    else:
        trainer.plugins = bf16_mixed()
    # MegatronStrategy copies the plugin's grad_reduce_in_fp32 into its DDP config (update_config_with_dtype_overrides)
    trainer.plugins.grad_reduce_in_fp32 = memory["grad_reduce_in_fp32"]
    # Prometheus metrics from global rank 0 (training_metrics.py), after the recipe's TimingCallback, whose step
    # time it reads; NeMo's own logging is unchanged
    trainer.callbacks = [*(trainer.callbacks or []), nr.Config(
        training_metrics.TrainingMetricsCallback, run_id=run["run_id"], port=training_metrics.PORT,
        global_batch_size=batch["global_batch_size"], seq_length=batch["seq_length"])]

    # -- data: the layout finetune --prepare wrote
    recipe.data = nr.Config(llm.FineTuningDataModule, dataset_root=paths["data_dir"], seq_length=batch["seq_length"],
                            micro_batch_size=batch["micro_batch_size"],
                            global_batch_size=batch["global_batch_size"], seed=SEED,
                            dataset_kwargs=dict(DATASET_KWARGS))

    # -- optimizer: Adam (Megatron distributed) with cosine annealing
    recipe.optim = distributed_fused_adam_with_cosine_annealing(
        precision="bf16-mixed", warmup_steps=opt["warmup_steps"], max_lr=opt["lr"], min_lr=opt["min_lr"],
        adam_beta2=opt["adam_beta2"], clip_grad=opt["clip_grad"])
    recipe.optim.config.weight_decay = opt["weight_decay"]
    # CosineAnnealingScheduler defaults to max_steps=10 and the recipe never sets it: decay over the whole run
    recipe.optim.lr_scheduler.max_steps = schedule["max_steps"]

    # -- LoRA or full SFT
    if is_lora:
        recipe.peft = nr.Config(llm.peft.LoRA, target_modules=list(lora["target_modules"]), dim=lora["rank"],
                                alpha=lora["alpha"], dropout=lora["dropout"])
        # as NeMo's LoRA recipes: only the adapters train, and these two are known not to work with LoRA
        recipe.optim.config.use_distributed_optimizer = False
        recipe.model.config.cross_entropy_loss_fusion = False
    else:
        recipe.peft = None

    # -- checkpoints and logs, in a directory that does not change between restarts
    recipe.log = nr.Config(
        nl.NeMoLogger, name=LOG_NAME, log_dir=paths["nemo_log_dir"], use_datetime_version=False,
        tensorboard=tensorboard_logger(name=LOG_NAME),
        ckpt=nr.Config(nl.ModelCheckpoint, save_last="link", save_top_k=ckpt["save_top_k"],
                       every_n_train_steps=ckpt["every_n_train_steps"], monitor=ckpt["monitor"], mode="min",
                       filename="{model_name}--{val_loss:.2f}-{step}-{consumed_samples}"))
    # Continue from the newest checkpoint in the log dir when a pod restarts; start from the imported base
    # otherwise (the log dir takes precedence over restore_config).
    recipe.resume = nr.Config(nl.AutoResume, resume_if_exists=True, resume_ignore_no_checkpoint=True,
                              restore_config=nr.Config(nl.RestoreConfig, path=paths["base_nemo_dir"],
                                                       load_artifacts=False))
    # The tokenizer always comes from the imported base, whose directory lives as long as the run. With
    # load_artifacts, AutoResume would take it from the checkpoint a restarted run resumes from (except for PEFT,
    # "in case the first peft checkpoint is deleted before the current peft checkpoint is saved":
    # AutoResume.setup, nemo/lightning/resume.py, nemo_toolkit 2.7.3). ModelCheckpoint deletes that checkpoint once
    # newer ones exist, and from then on every save names the deleted directory instead of copying it
    # (DirOrStringArtifact.dump keeps a path that does not exist as a plain string, nemo/lightning/io/artifact/
    # file.py), so export_ckpt of the final checkpoint fails. Seen on a GPU after a kill and resume of full SFT
    # (docs/gpu-run.md). The tokenizer is built as the Llama importer builds it, AutoTokenizer(<assets dir>)
    # (HFLlamaImporter.tokenizer, nemo/collections/llm/gpt/model/llama.py), from the copy import_ckpt keeps in the
    # base's context/nemo_tokenizer (io.load_context cannot be used here: it calls fdl.build, which fiddle forbids
    # inside the recipe's own build).
    recipe.model.tokenizer = nr.Config(AutoTokenizer, pretrained_model_name=os.path.join(
        paths["base_nemo_dir"], "context", BASE_TOKENIZER_DIR))
    return recipe


def summary(recipe) -> dict[str, Any]:
    """The settings a reviewer checks, read back from the configuration (what --dry-run prints first)."""
    strategy, trainer = recipe.trainer.strategy, recipe.trainer
    peft = recipe.peft
    return {
        "model": recipe.model.config.__fn_or_cls__.__name__,
        "seq_length": recipe.model.config.seq_length,
        "nodes": trainer.num_nodes, "gpus_per_node": trainer.devices,
        "tp": strategy.tensor_model_parallel_size, "pp": strategy.pipeline_model_parallel_size,
        "vp": strategy.virtual_pipeline_model_parallel_size,
        "grad_reduce_in_fp32": trainer.plugins.grad_reduce_in_fp32,
        "disable_parameter_transpose_cache": recipe.model.config.disable_parameter_transpose_cache,
        "cp": strategy.context_parallel_size, "sequence_parallel": strategy.sequence_parallel,
        "account_for_embedding_in_pipeline_split": strategy.account_for_embedding_in_pipeline_split,
        "account_for_loss_in_pipeline_split": strategy.account_for_loss_in_pipeline_split,
        "recompute": getattr(recipe.model.config, "recompute_granularity", None),
        "precision": trainer.plugins.precision, "fp8": getattr(trainer.plugins, "fp8", None),
        "max_steps": trainer.max_steps, "val_check_interval": trainer.val_check_interval,
        "callbacks": [c.__fn_or_cls__.__name__ for c in trainer.callbacks or []],
        "micro_batch_size": recipe.data.micro_batch_size, "global_batch_size": recipe.data.global_batch_size,
        "data": recipe.data.dataset_root,
        "peft": None if peft is None else {"target_modules": peft.target_modules, "dim": peft.dim,
                                           "alpha": peft.alpha, "dropout": peft.dropout},
        "lr": recipe.optim.config.lr, "min_lr": recipe.optim.lr_scheduler.min_lr,
        "warmup_steps": recipe.optim.lr_scheduler.warmup_steps,
        "checkpoint": {"save_top_k": recipe.log.ckpt.save_top_k,
                       "every_n_train_steps": recipe.log.ckpt.every_n_train_steps},
        "log_dir": f"{recipe.log.log_dir}/{recipe.log.name}",
        "resume_if_exists": recipe.resume.resume_if_exists, "restore_from": recipe.resume.restore_config.path,
    }


# --------------------------------------------------------------------------------------------------
# --prepare


def download_base_model(run: dict[str, Any]) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    target = run["paths"]["base_hf_dir"]
    if os.path.exists(layout.done_marker(target)):
        return "reused"
    repo = run["training"]["model"]["hf_model_id"]
    try:
        # original/ holds Meta's consolidated .pth copy of the same weights (800 GB for 405B): not needed
        snapshot_download(repo_id=repo, local_dir=target, token=os.environ.get("HF_TOKEN") or None,
                          ignore_patterns=["original/*", "*.pth"])
    except (GatedRepoError, RepositoryNotFoundError) as exc:
        raise PrepareError(f"cannot download {repo}: {exc.__class__.__name__}. Llama models are gated: accept the "
                           "license on Hugging Face and give the pod HF_TOKEN") from exc
    layout.write_marker(layout.done_marker(target), repo=repo)
    return "downloaded"


def import_base_model(run: dict[str, Any]) -> str:
    from pathlib import Path

    from nemo.collections import llm

    target = run["paths"]["base_nemo_dir"]
    if os.path.exists(layout.done_marker(target)):
        return "reused"
    staged = f"{target}.partial"
    shutil.rmtree(staged, ignore_errors=True)
    config_cls = getattr(llm, run["training"]["model"]["nemo_config"])
    # import_ckpt(model, source, output_path=None, overwrite=False) (nemo/collections/llm/api.py, 2.7.3);
    # hf:// with a local directory reads the download instead of the Hub
    llm.import_ckpt(model=llm.LlamaModel(config=config_cls()), source=f"hf://{run['paths']['base_hf_dir']}",
                    output_path=Path(staged), overwrite=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staged, target)
    layout.write_marker(layout.done_marker(target), source=run["paths"]["base_hf_dir"])
    return "imported"


def prepare(run: dict[str, Any]) -> int:
    paths = run["paths"]
    marker, failed = paths["prepared_marker"], layout.failure_marker(paths["prepared_marker"])
    if os.path.exists(failed):
        os.remove(failed)  # a new attempt: the waiting workers must not see the last one's failure
    if os.path.exists(marker):
        print(f"{marker} exists: already prepared")
        return 0
    try:
        batch = run["training"]["batch"]
        details = dataset.layout(paths["dataset_dir"], paths["data_dir"], batch["seq_length"],
                                 batch["global_batch_size"])
        details["base_hf"] = download_base_model(run)
        details["base_nemo"] = import_base_model(run)
    except (dataset.DatasetError, PrepareError) as exc:
        layout.write_marker(failed, error=str(exc))
        print(f"prepare failed:\n{exc}", file=sys.stderr)
        return 1
    layout.write_marker(marker, run_id=run["run_id"], **details)
    print(json.dumps(details, indent=2))
    return 0


# --------------------------------------------------------------------------------------------------
# training


def final_checkpoint(checkpoint_dir: str) -> str:
    """The checkpoint export starts from: the ``-last`` one ModelCheckpoint keeps (save_last="link"), else the
    one with the highest step."""
    entries = [e for e in os.listdir(checkpoint_dir) if os.path.isdir(os.path.join(checkpoint_dir, e))]
    last = sorted(e for e in entries if e.endswith("-last"))
    if last:
        return os.path.realpath(os.path.join(checkpoint_dir, last[-1]))
    stepped = [(int(m.group(1)), e) for e in entries if (m := re.search(r"step=(\d+)", e))]
    if not stepped:
        raise RuntimeError(f"no checkpoint in {checkpoint_dir}")
    return os.path.join(checkpoint_dir, max(stepped)[1])


def train(run: dict[str, Any]) -> int:
    import nemo_run as nr
    import torch.distributed as dist

    paths = run["paths"]
    if not os.path.exists(paths["prepared_marker"]):
        print(f"{paths['prepared_marker']} is missing: run finetune.py --prepare first", file=sys.stderr)
        return 1
    nr.run(build_recipe(run), direct=True)  # fdl.build(recipe)() in this process: torchrun already made the ranks
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank has finished writing its checkpoint shards
    if int(os.environ.get("RANK", "0")) == 0:
        checkpoint = final_checkpoint(os.path.join(paths["nemo_log_dir"], LOG_NAME, "checkpoints"))
        layout.write_marker(paths["training_marker"], run_id=run["run_id"], checkpoint=checkpoint,
                            method=run["training"]["method"])
        print(f"training complete: {checkpoint}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(layout.RUN_CONFIG_FILE))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--prepare", action="store_true", help="lay out data, download and import the base model")
    mode.add_argument("--dry-run", action="store_true", help="print the resolved NeMo configuration and exit")
    args = parser.parse_args(argv)
    run = layout.load_run(args.config)
    if args.prepare:
        return prepare(run)
    if args.dry_run:
        import nemo_run as nr

        recipe = build_recipe(run)
        print(json.dumps(summary(recipe), indent=2, default=str))
        nr.dryrun_fn(recipe, build=False)
        return 0
    if os.path.exists(run["paths"]["training_marker"]):
        print(f"{run['paths']['training_marker']} exists: this run is already trained")
        return 0
    try:
        return train(run)
    except Exception:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
