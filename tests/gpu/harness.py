"""The pipeline's own entrypoints on one CUDA GPU, on a tiny Llama made here; every step checked here.

    python3 tests/gpu/harness.py [--stages setup,train,export,evaluate] [--methods lora,sft]

run.sh runs it (it sets PYTHONPATH and OUT). Steps, for LoRA and full SFT side by side after a shared setup:

1. setup: an instruction/answer JSONL (examples/data/*.jsonl when there is one, else generated), a byte-level BPE
   tokenizer trained on it with `tokenizers`, a random-weight Hugging Face Llama of tiny_model.py's shape, and the
   run.json documents, built by infra.config + workloads.runconfig from stack config the way the pods get them,
   with the tiny model and one GPU put in and the /fsx paths moved under the work directory.
2. prepare: ``finetune.py --prepare``: the dataset layout and ``import_ckpt`` into a NeMo checkpoint.
3. train: ``finetune.py`` under torchrun, SIGKILLed once a finished checkpoint of step >= --kill-step exists, then
   started again: it must resume from that checkpoint (TensorBoard steps of the second process start there), end
   at max_steps with the training marker, and the loss must have fallen.
4. export: ``export.py`` (merge_lora for LoRA, export_ckpt to Hugging Face); the export and the base load with
   transformers, generate, and differ exactly in the LoRA target projections (LoRA) or somewhere (SFT).
5. evaluate: ``evaluate.py``: base and fine-tuned loss, perplexity, exact match, ROUGE-L, report and gate.
6. measure: step time, tokens/s and peak GPU memory of the resumed training process, against
   infra.sizing.memory_breakdown for the same tiny configuration.

Writes $OUT/summary.json (after every step, so a run cut short still reports) and $OUT/logs.tar.gz. Exit code 0
only when every check passed.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
ENTRYPOINTS = os.path.join(ROOT, "workloads", "entrypoints")
sys.path[:0] = [ROOT, ENTRYPOINTS, HERE]

import layout  # noqa: E402
import tiny_model  # noqa: E402

STACK = "gpu-test"
DATASET = "gpu-test"
METHODS = ("lora", "sft")
# Stack config of the run, as `pulumi config` would hold it; the planner sizes it for the preset, then the tiny
# model and one GPU replace the model and the parallelism (tiny_run_document).
STACK_CONFIG: dict[str, Any] = {
    "aws:region": "us-east-1",
    "nemo-eks:gpuNodeGroups": [{"name": "train", "instanceType": "p5en.48xlarge"}],
    "nemo-eks:model": {"variant": "7b", "preset": "llama31-8b", "hfModelId": tiny_model.HF_MODEL_ID},
    "nemo-eks:training": {"seqLength": 256, "microBatchSize": 4, "globalBatchSize": 32, "maxSteps": 100,
                          "learningRate": 0.001, "loraRank": 16},
    "nemo-eks:data": {"dataset": DATASET},
    "nemo-eks:evaluation": {"lossSamples": 64, "generationSamples": 32, "maxNewTokens": 16,
                            "metricsLingerSeconds": 0},
}
PLANNER_INSTANCE = "p5en.48xlarge"  # H200: the planner's memory model does not depend on the card otherwise
# Hugging Face modules each NeMo LoRA target becomes in the export (HFLlamaExporter, nemo 2.7.3: linear_qkv is
# split into q/k/v_proj, linear_fc1 into gate/up_proj)
HF_MODULES_OF_LORA_TARGET = {"linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_proj": ("o_proj",),
                             "linear_fc1": ("gate_proj", "up_proj"), "linear_fc2": ("down_proj",)}
METRICS_PORTS = {"lora": 9401, "sft": 9402}
TRAIN_LOSS = "reduced_train_loss"  # what NeMo logs (training_metrics.NEMO_TRAIN_LOSS)
STEP_TIMING = "train_step_timing in s"  # NeMo's TimingCallback (training_metrics.NEMO_STEP_TIMING)


class CheckFailed(AssertionError):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# --------------------------------------------------------------------------------------------------
# Bookkeeping


class Summary:
    """summary.json, rewritten after every step."""

    def __init__(self, paths: list[str], resume: bool):
        """Written to every path; with ``resume`` it goes on from the first one's content (a later invocation on
        the same work directory adds its steps to the earlier ones')."""
        self.paths = paths
        self.lock = threading.Lock()
        self.data: dict[str, Any] = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                     "steps": {}, "checks_passed": None}
        if resume and os.path.exists(paths[0]):
            with open(paths[0], encoding="utf-8") as handle:
                self.data = json.load(handle)

    def step(self, name: str, **fields: Any) -> None:
        with self.lock:
            self.data["steps"].setdefault(name, {}).update(fields)
            self._write()

    def set(self, key: str, value: Any) -> None:
        with self.lock:
            self.data[key] = value
            self._write()

    def _write(self) -> None:
        for path in self.paths:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            partial = path + ".partial"
            with open(partial, "w", encoding="utf-8") as handle:
                json.dump(self.data, handle, indent=2, default=str)
            os.replace(partial, path)


def run_step(summary: Summary, name: str, function, *args) -> Any:
    """Run one checked step; its result, error and time go into the summary. Returns None when it failed."""
    started = time.monotonic()
    print(f"== {name}", flush=True)
    try:
        details = function(*args) or {}
    except Exception as exc:  # noqa: BLE001 - a failed step is reported, the others still run where they can
        summary.step(name, ok=False, seconds=round(time.monotonic() - started, 1),
                     error=f"{exc.__class__.__name__}: {exc}")
        print(f"!! {name} FAILED: {exc.__class__.__name__}: {exc}", flush=True)
        if not isinstance(exc, CheckFailed):
            traceback.print_exc()
        return None
    summary.step(name, ok=True, seconds=round(time.monotonic() - started, 1), **details)
    print(f"ok {name} ({time.monotonic() - started:.0f} s)", flush=True)
    return details


class Processes:
    """Entrypoint runs, each with its own log file and process group (so a kill takes its workers too)."""

    def __init__(self, logs: str, env: dict[str, str]):
        self.logs = logs
        self.env = env
        self.live: set[subprocess.Popen] = set()

    def kill_all(self) -> None:
        for process in list(self.live):
            kill_tree(process.pid)

    def start(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
        log_path = os.path.join(self.logs, f"{name}.log")
        log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed by wait()
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                   env={**self.env, **(extra_env or {})}, start_new_session=True)
        process._log = log  # type: ignore[attr-defined]
        self.live.add(process)
        return process, log_path

    def wait(self, process: subprocess.Popen, timeout: float) -> int:
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(process.pid)
            process.wait()
            raise CheckFailed(f"{' '.join(process.args[-4:])} still running after {timeout:.0f} s: killed")
        finally:
            process._log.close()  # type: ignore[attr-defined]
            self.live.discard(process)

    def run(self, name: str, argv: list[str], timeout: float, extra_env: dict[str, str] | None = None) -> tuple[int, str]:
        process, log_path = self.start(name, argv, extra_env)
        return self.wait(process, timeout), log_path


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc). torchrun starts its workers in sessions of their own, so killing
    the launcher's process group leaves the training worker running; a pod restart ends them all."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL to ``pid`` and everything below it, as a pod's restart would end them."""
    for target in [pid, *descendants(pid)]:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass


def tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------------
# 1. setup: data, tokenizer, model, run.json

WORDS = ("apple river stone cloud green orange table window garden silver yellow mountain paper bridge candle "
         "forest rabbit winter summer planet coffee violet marble harbor tiger falcon lemon piano rocket castle "
         "meadow copper shadow thunder island crystal feather lantern pepper rainbow saddle timber velvet walnut "
         "basket button canyon dolphin engine fabric glacier hammer jacket kettle ladder magnet needle").split()
ANIMALS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "sheep": "baa", "lion": "roar",
           "owl": "hoot", "frog": "croak", "horse": "neigh", "bee": "buzz", "mouse": "squeak", "pig": "oink"}


def generated_examples(count: int = 2400, seed: int = 17) -> list[dict[str, str]]:
    """Instruction/answer pairs with a learnable answer (the animal named first decides it) and a long filler,
    so most sequences reach the sequence length and the micro-batches are as full as the planner assumes."""
    rng = random.Random(seed)
    examples, seen = [], set()
    while len(examples) < count:
        animal = rng.choice(sorted(ANIMALS))
        filler = " ".join(rng.choice(WORDS) for _ in range(rng.randint(150, 300)))
        record = {"input": f"Which sound does the {animal} make? Notes: {filler}",
                  "output": f"The {animal} says {ANIMALS[animal]}."}
        if record["input"] not in seen:
            seen.add(record["input"])
            examples.append(record)
    return examples


def example_dataset() -> tuple[list[dict[str, str]], str]:
    """examples/data/*.jsonl when the repository has one, else the generated set."""
    for path in sorted(glob.glob(os.path.join(ROOT, "examples", "data", "*.jsonl"))):
        with open(path, encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle if line.strip()]
        usable = [r for r in records if isinstance(r.get("input"), str) and isinstance(r.get("output"), str)]
        if len(usable) >= 200:
            return usable, os.path.relpath(path, ROOT)
    return generated_examples(), "generated by tests/gpu/harness.py"


def train_tokenizer(texts: list[str], target: str):
    """Byte-level BPE trained here (no download), saved as a Hugging Face fast tokenizer with BOS/EOS/PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=tiny_model.VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                      eos_token="</s>", pad_token="<pad>")
    wrapped.save_pretrained(target)
    return wrapped


def make_base_model(target: str, texts: list[str]) -> dict[str, Any]:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    os.makedirs(target, exist_ok=True)
    tokenizer = train_tokenizer(texts, target)
    check(len(tokenizer) <= tiny_model.VOCAB, f"tokenizer has {len(tokenizer)} tokens, the model {tiny_model.VOCAB}")
    torch.manual_seed(1234)
    config = LlamaConfig(**tiny_model.hf_config_kwargs(tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                       tokenizer.pad_token_id))
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(target, safe_serialization=True)
    # What a finished download looks like to finetune.py --prepare (download_base_model reuses it)
    layout.write_marker(layout.done_marker(target), repo=tiny_model.HF_MODEL_ID, made_by="tests/gpu/harness.py")
    return {"params": sum(p.numel() for p in model.parameters()), "tokenizer_tokens": len(tokenizer)}


def relocate(run: dict[str, Any], root: str) -> dict[str, Any]:
    """The /fsx paths under ``root`` (as tests/conftest.py ``relocate`` does for the CPU tests)."""
    moved = copy.deepcopy(run)
    moved["paths"] = {k: root + v[len("/fsx"):] for k, v in run["paths"].items()}
    return moved


def tiny_run_document(document: dict[str, Any], fsx: str) -> dict[str, Any]:
    """The pods' run.json with the tiny model and a one-GPU layout in place of the preset's."""
    run = relocate(document, fsx)
    training = run["training"]
    training["model"] = tiny_model.model_section()
    training["parallelism"] = {"nodes": 1, "gpus_per_node": 1, "tp": 1, "pp": 1, "cp": 1, "dp": 1,
                               "sequence_parallel": False, "recompute": "none"}
    if run.get("evaluation"):
        run["evaluation"]["gpus"] = 1
    return run


def run_documents(method: str, fsx: str) -> dict[str, dict[str, Any]]:
    from infra import config
    from workloads import runconfig

    raw = dict(STACK_CONFIG)
    raw["nemo-eks:training"] = {**raw["nemo-eks:training"], "method": method}
    cfg = config.load({k: v if isinstance(v, str) else json.dumps(v) for k, v in raw.items()}, STACK)
    return {"train": tiny_run_document(runconfig.training_document(cfg), fsx),
            "eval": tiny_run_document(runconfig.evaluation_document(cfg), fsx)}


def setup(work: str, methods: list[str]) -> dict[str, Any]:
    fsx = os.path.join(work, "fsx")
    records, source = example_dataset()
    runs = {m: run_documents(m, fsx) for m in methods}
    first = runs[methods[0]]["train"]
    dataset_dir = first["paths"]["dataset_dir"]
    os.makedirs(dataset_dir, exist_ok=True)
    with open(os.path.join(dataset_dir, "train.jsonl"), "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    model = make_base_model(first["paths"]["base_hf_dir"], [f"{r['input']} {r['output']}" for r in records])
    files = {}
    for method, documents in runs.items():
        for kind, document in documents.items():
            path = os.path.join(work, "runs", f"{method}-{kind}.json")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(document, handle, indent=1)
            files[f"{method}-{kind}"] = path
    return {"dataset": source, "examples": len(records), "model": model, "run_files": files,
            "run_ids": {m: runs[m]["train"]["run_id"] for m in methods}}


def load_run(work: str, method: str, kind: str) -> tuple[dict[str, Any], str]:
    path = os.path.join(work, "runs", f"{method}-{kind}.json")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle), path


# --------------------------------------------------------------------------------------------------
# 2. prepare


def entry(script: str) -> list[str]:
    return [sys.executable, os.path.join(HERE, "entry.py"), os.path.join(ENTRYPOINTS, script)]


def prepare(procs: Processes, work: str, method: str) -> dict[str, Any]:
    run, path = load_run(work, method, "train")
    code, log = procs.run(f"{method}-prepare", entry("finetune.py") + ["--config", path, "--prepare"], timeout=400)
    check(code == 0, f"finetune.py --prepare exited {code}:\n{tail(log)}")
    paths = run["paths"]
    marker = layout.read_marker(paths["prepared_marker"])
    check(marker is not None, f"{paths['prepared_marker']} missing after --prepare")
    for name in ("training.jsonl", "validation.jsonl"):
        check(os.path.getsize(os.path.join(paths["data_dir"], name)) > 0, f"{name} missing or empty")
    check(os.path.exists(layout.done_marker(paths["base_nemo_dir"])), "the NeMo import has no .complete marker")
    for part in ("context", "weights"):
        check(os.path.isdir(os.path.join(paths["base_nemo_dir"], part)), f"imported checkpoint has no {part}/")
    return {"marker": marker}


# --------------------------------------------------------------------------------------------------
# 3. train, kill, resume

STEP_IN_NAME = re.compile(r"step=(\d+)")


def finished_checkpoints(directory: str) -> dict[int, str]:
    """Checkpoint directories by step, leaving out any NeMo still marks as being written (``-unfinished``)."""
    if not os.path.isdir(directory):
        return {}
    names = os.listdir(directory)
    if any(n.endswith("-unfinished") for n in names):
        return {}  # a save is in flight: nothing is settled yet
    found, last = {}, set()
    for name in names:
        full = os.path.join(directory, name)
        match = STEP_IN_NAME.search(name)
        if not match or not os.path.isdir(full):
            continue
        if name.endswith("-last"):
            last.add(int(match.group(1)))
        elif not os.path.islink(full):
            found[int(match.group(1))] = full
    # AutoResume restarts from the "-last" checkpoint: settled once it names the newest step too
    return found if found and max(found) in last else {}


def scalars(event_files: list[str], tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for path in event_files:
        accumulator = EventAccumulator(path, size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags().get("scalars", []):
            values += [(event.step, event.value) for event in accumulator.Scalars(tag)]
    return sorted(values)


def event_files(log_dir: str) -> set[str]:
    return set(glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True))


def train(procs: Processes, work: str, method: str, kill_step: int) -> dict[str, Any]:
    run, path = load_run(work, method, "train")
    paths, schedule = run["paths"], run["training"]["schedule"]
    max_steps = schedule["max_steps"]
    checkpoints = os.path.join(paths["nemo_log_dir"], "finetune", "checkpoints")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    argv = torchrun + entry("finetune.py")[1:] + ["--config", path]
    stats = os.path.join(work, "stats")
    os.makedirs(stats, exist_ok=True)
    env = {"GPU_TEST_METRICS_PORT": str(METRICS_PORTS[method])}

    # first process: killed with SIGKILL once a checkpoint at or past kill_step is on disk
    process, first_log = procs.start(f"{method}-train-1", argv, {**env, "GPU_TEST_STATS": f"{stats}/{method}-1.json"})
    deadline = time.monotonic() + 300
    killed_at = None
    while time.monotonic() < deadline:
        done = finished_checkpoints(checkpoints)
        if done and max(done) >= kill_step:
            kill_tree(process.pid)
            killed_at = max(done)
            break
        if process.poll() is not None:
            break
        time.sleep(0.2)
    first_code = procs.wait(process, timeout=60)
    check(killed_at is not None, f"no finished checkpoint at step >= {kill_step} before the first process ended "
                                 f"(exit {first_code}):\n{tail(first_log)}")
    check(not os.path.exists(paths["training_marker"]), "training marker written by the killed process")
    on_disk = sorted(os.listdir(checkpoints))
    before_restart = event_files(paths["nemo_log_dir"])

    # second process: must resume from the newest finished checkpoint and finish
    code, second_log = procs.run(f"{method}-train-2", argv, timeout=400,
                                 extra_env={**env, "GPU_TEST_STATS": f"{stats}/{method}-2.json"})
    check(code == 0, f"the restarted training exited {code}:\n{tail(second_log)}")
    marker = layout.read_marker(paths["training_marker"])
    check(marker is not None, "no training marker after the restarted run")
    final_step = int(STEP_IN_NAME.search(os.path.basename(marker["checkpoint"])).group(1))
    # the name's step is trainer.global_step at the save; the index of the last step (max_steps - 1) is accepted
    check(final_step in (max_steps - 1, max_steps), f"final checkpoint {marker['checkpoint']} is not the last step's")

    second_events = sorted(event_files(paths["nemo_log_dir"]) - before_restart)
    first_events = sorted(before_restart)
    check(bool(second_events), "the restarted run wrote no TensorBoard events")
    first_losses = scalars(first_events, TRAIN_LOSS)
    second_losses = scalars(second_events, TRAIN_LOSS)
    check(bool(first_losses) and bool(second_losses), f"no {TRAIN_LOSS} logged")
    resumed_first_step = second_losses[0][0]
    # A run that started over trains max_steps steps again (and logs from step 0); one that resumed trains only
    # the steps after the checkpoint (NeMo logs the loss every step: log_every_n_steps=1 in its finetune trainer).
    check(len(second_losses) <= max_steps - killed_at, f"the restarted run trained {len(second_losses)} steps of "
                                                       f"{max_steps}: it did not resume from step {killed_at}")
    check(resumed_first_step >= killed_at, f"the restarted run logged step {resumed_first_step} first, before the "
                                           f"checkpoint of step {killed_at}: it did not resume")
    check(second_losses[-1][0] >= max_steps - 1, f"the restarted run stopped logging at {second_losses[-1][0]}")
    with open(second_log, encoding="utf-8", errors="replace") as handle:
        restore_lines = [line.strip() for line in handle
                         if re.search(r"restor|resum", line, re.IGNORECASE) and "checkpoint" in line]
    check(any(f"step={killed_at}" in line for line in restore_lines),
          f"the restarted run's log does not name the step={killed_at} checkpoint it restored: {restore_lines[:5]}")
    first_loss, last_loss = first_losses[0][1], second_losses[-1][1]
    check(last_loss < first_loss, f"training loss did not fall: {first_loss:.4f} -> {last_loss:.4f}")

    timings = [v for s, v in scalars(second_events, STEP_TIMING)]
    with open(f"{stats}/{method}-2.json", encoding="utf-8") as handle:
        peak = json.load(handle)
    return {"killed_after_checkpoint_step": killed_at, "checkpoints_at_kill": on_disk,
            "first_process_exit": first_code,
            "resumed_first_logged_step": resumed_first_step, "steps_trained_after_restart": len(second_losses),
            "steps_logged_before_kill": len(first_losses), "final_step": final_step,
            "restore_log_lines": restore_lines[:4], "final_checkpoint": marker["checkpoint"],
            "loss": {"first": first_loss, "at_kill": first_losses[-1][1], "last": last_loss,
                     "first_step": first_losses[0][0], "last_step": second_losses[-1][0]},
            "val_loss": scalars(first_events + second_events, "val_loss")[-3:],
            "step_times_s": timings, "peak": peak}


# --------------------------------------------------------------------------------------------------
# 4. export and the weight check


def export(procs: Processes, work: str, method: str) -> dict[str, Any]:
    run, path = load_run(work, method, "eval")
    code, log = procs.run(f"{method}-export", entry("export.py") + ["--config", path], timeout=400)
    check(code == 0, f"export.py exited {code}:\n{tail(log)}")
    paths = run["paths"]
    check(os.path.exists(layout.done_marker(paths["export_dir"])), "export has no .complete marker")
    if method == "lora":
        check(os.path.exists(layout.done_marker(os.path.join(paths["run_dir"], "merged"))), "no merged checkpoint")
    return {"export_dir": paths["export_dir"], "files": sorted(os.listdir(paths["export_dir"]))}


VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def comparable_rows(name: str, base_shape: tuple, export_shape: tuple, tokenizer_tokens: int) -> int:
    """How many leading rows of a tensor the base and the export must agree on. The export keeps one embedding and
    output row per tokenizer token (NeMo's exporter prunes the vocabulary padding: TransformFns.prune_padding),
    while the base here has the model's full vocabulary rows; every other tensor has the same shape in both."""
    if name in VOCAB_TENSORS and export_shape[0] != base_shape[0]:
        check(export_shape[1:] == base_shape[1:] and export_shape[0] == tokenizer_tokens,
              f"{name}: export {export_shape} is not the base {base_shape} cut to the {tokenizer_tokens} tokens")
        return export_shape[0]
    check(export_shape == base_shape, f"{name}: shape {export_shape} != {base_shape}")
    return base_shape[0] if base_shape else 0


def weight_check(work: str, method: str) -> dict[str, Any]:
    """Load base and export with transformers; compare every tensor."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, _ = load_run(work, method, "eval")
    paths = run["paths"]
    base = AutoModelForCausalLM.from_pretrained(paths["base_hf_dir"], dtype=torch.bfloat16)
    tuned = AutoModelForCausalLM.from_pretrained(paths["export_dir"], dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(paths["export_dir"])
    base_state, tuned_state = base.state_dict(), tuned.state_dict()
    check(set(base_state) == set(tuned_state), f"parameter names differ: {set(base_state) ^ set(tuned_state)}")
    changed, unchanged, max_delta = [], [], {}
    for name, tensor in base_state.items():
        other = tuned_state[name]
        rows = comparable_rows(name, tuple(tensor.shape), tuple(other.shape), len(tokenizer))
        delta = (other[:rows].float() - tensor[:rows].float()).abs().max().item()
        (changed if delta > 0 else unchanged).append(name)
        max_delta[name] = delta
    details: dict[str, Any] = {"tensors": len(base_state), "changed": len(changed), "unchanged": len(unchanged)}
    if method == "lora":
        modules = [m for t in run["training"]["lora"]["target_modules"] for m in HF_MODULES_OF_LORA_TARGET[t]]
        expected = {n for n in base_state if any(f".{m}." in n for m in modules)}
        check(set(changed) == expected, f"LoRA merge changed {sorted(set(changed) - expected)[:6]} beyond its "
                                        f"targets and left {sorted(expected - set(changed))[:6]} unchanged")
        details["lora_targets_hf"] = modules
        details["min_target_delta"] = min(max_delta[n] for n in expected)
    else:
        check(bool(changed), "full fine-tuning changed no weight")
        details["unchanged_names"] = unchanged[:20]
    # the export is a working model: a short greedy generation on the GPU
    tuned = tuned.to("cuda")
    # a Llama takes no token_type_ids, which the tokenizer trained here would add (its model_input_names)
    prompt = tokenizer("Which sound does the cat make? Notes: apple river", return_tensors="pt",
                       return_token_type_ids=False).to("cuda")
    output = tuned.generate(**prompt, max_new_tokens=8, do_sample=False)
    details["sample_generation"] = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    return details


# --------------------------------------------------------------------------------------------------
# 5. evaluate


def evaluate(procs: Processes, work: str, method: str) -> dict[str, Any]:
    run, path = load_run(work, method, "eval")
    code, log = procs.run(f"{method}-evaluate", [sys.executable, os.path.join(ENTRYPOINTS, "evaluate.py"),
                                                 "--config", path], timeout=300)
    paths = run["paths"]
    check(code in (0, 3), f"evaluate.py exited {code} (an error, not a gate decision):\n{tail(log)}")
    with open(paths["evaluation_report"], encoding="utf-8") as handle:
        report = json.load(handle)
    models = report["models"]
    for model in ("base", "finetuned"):
        for key in ("loss", "perplexity", "exact_match", "rouge_l"):
            value = models[model].get(key)
            check(isinstance(value, (int, float)) and math.isfinite(value), f"{model} {key} is {value!r}")
    passed = report["gate"]["passed"]
    check((code == 0) == passed, f"exit code {code} but the gate says passed={passed}")
    check(os.path.exists(paths["evaluation_marker"]) == passed, "the gate marker disagrees with the report")
    check(os.path.exists(os.path.join(paths["evaluation_dir"], "report.md")), "no report.md")
    return {"exit_code": code, "gate": report["gate"],
            "base": {k: models["base"].get(k) for k in ("loss", "perplexity", "exact_match", "rouge_l", "cached")},
            "finetuned": {k: models["finetuned"].get(k) for k in ("loss", "perplexity", "exact_match", "rouge_l")},
            "samples": report.get("samples", [])[:2]}


# --------------------------------------------------------------------------------------------------
# 6. measurements against the planner


def measure(work: str, method: str, trained: dict[str, Any]) -> dict[str, Any]:
    from infra import catalog, sizing

    run, _ = load_run(work, method, "train")
    batch, training = run["training"]["batch"], run["training"]
    request = sizing.TrainingRequest(model=tiny_model.model_spec(), method=method,
                                     instance=catalog.get(PLANNER_INSTANCE), precision=training["precision"],
                                     seq_length=batch["seq_length"], micro_batch_size=batch["micro_batch_size"],
                                     global_batch_size=batch["global_batch_size"],
                                     lora_rank=(training["lora"] or {}).get("rank", 16))
    planned = sizing.memory_breakdown(request, tp=1, pp=1, cp=1, dp=1, recompute="none")
    times = trained["step_times_s"][3:] or trained["step_times_s"]  # the first steps include warm-up
    step_time = statistics.median(times)
    tokens = batch["global_batch_size"] * batch["seq_length"]
    peak = trained["peak"].get("peak_allocated_bytes")
    check(peak is not None, "the training process recorded no GPU memory")
    return {"median_step_time_s": round(step_time, 4), "steps_timed": len(times),
            "tokens_per_s": round(tokens / step_time, 1), "tokens_per_step": tokens,
            "peak_allocated_gib": round(peak / 2**30, 3),
            "peak_reserved_gib": round(trained["peak"]["peak_reserved_bytes"] / 2**30, 3),
            "planned_bytes": {k: getattr(planned, k) for k in ("weights", "gradients", "optimizer", "lora_adapters",
                                                               "activations", "logits", "total")},
            "planned_total_gib": round(planned.total / 2**30, 3),
            "measured_over_planned": round(peak / planned.total, 2),
            "params": tiny_model.model_spec().params}


# --------------------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    from importlib import metadata

    versions = {}
    for name in ("torch", "nemo_toolkit", "megatron_core", "nemo_run", "transformers", "lightning",
                 "pytorch_lightning", "tokenizers", "huggingface_hub", "numpy", "tensorboard", "transformer_engine",
                 "apex"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
    except OSError as exc:
        gpu = f"nvidia-smi: {exc}"
    import torch

    return {"python": sys.version.split()[0], "versions": versions, "gpu": gpu, "cuda": torch.version.cuda,
            "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d", time.gmtime())}


def chain(procs: Processes, summary: Summary, work: str, method: str, stages: set[str], kill_step: int,
          prepared: threading.Event | None, wait_for: threading.Event | None) -> None:
    if "train" in stages:
        if wait_for is not None:
            wait_for.wait()  # the base import is shared: one --prepare at a time
        ok = run_step(summary, f"{method}.prepare", prepare, procs, work, method)
        if prepared is not None:
            prepared.set()
        if ok is None:
            return
        trained = run_step(summary, f"{method}.train_kill_resume", train, procs, work, method, kill_step)
        if trained is None:
            return
        run_step(summary, f"{method}.measure", measure, work, method, trained)
    if "export" in stages:
        if run_step(summary, f"{method}.export", export, procs, work, method) is None:
            return
        run_step(summary, f"{method}.weights", weight_check, work, method)
    if "evaluate" in stages:
        run_step(summary, f"{method}.evaluate", evaluate, procs, work, method)


def bundle_logs(work: str, out: str) -> None:
    with tarfile.open(os.path.join(out, "logs.tar.gz"), "w:gz") as archive:
        for pattern in ("logs/*.log", "runs/*.json", "stats/*.json", "fsx/checkpoints/*/evaluation/*/report.*",
                        "fsx/checkpoints/*/PREPARED", "fsx/checkpoints/*/TRAINING_COMPLETE"):
            for path in sorted(glob.glob(os.path.join(work, pattern))):
                archive.add(path, arcname=os.path.relpath(path, work))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=os.environ.get("GPU_TEST_WORK", os.path.expanduser("~/nemo-eks-gpu")))
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "build", "gpu-out"))
    parser.add_argument("--stages", default="setup,train,export,evaluate")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--kill-step", type=int, default=40)
    args = parser.parse_args(argv)
    stages, methods = set(args.stages.split(",")), [m for m in args.methods.split(",") if m]
    os.makedirs(args.out, exist_ok=True)
    if "setup" in stages:
        shutil.rmtree(args.work, ignore_errors=True)
    logs = os.path.join(args.work, "logs")
    os.makedirs(logs, exist_ok=True)
    summary = Summary([os.path.join(args.work, "summary.json"), os.path.join(args.out, "summary.json")],
                      resume="setup" not in stages)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "NEMO_HOME": os.path.join(args.work, "nemo-home"), "TOKENIZERS_PARALLELISM": "false"}
    procs = Processes(logs, env)

    def stop(signum, frame):  # run.sh's time limit: keep what ran, drop what is still running
        procs.kill_all()
        summary.set("stopped", f"signal {signum}: {sorted(set(METHODS) & set(methods))} cut short")
        summary.set("checks_passed", False)
        bundle_logs(args.work, args.out)
        print("stopped by the time limit; results so far are in", args.out, flush=True)
        os._exit(124)

    signal.signal(signal.SIGTERM, stop)
    try:
        summary.set("environment", environment())
        if "setup" in stages and run_step(summary, "setup", setup, args.work, methods) is None:
            return 1
        # LoRA and SFT side by side on the one GPU; SFT's --prepare waits for LoRA's (the base import is shared)
        events = [threading.Event() for _ in methods]
        with ThreadPoolExecutor(len(methods)) as pool:
            futures = [pool.submit(chain, procs, summary, args.work, m, stages, args.kill_step, events[i],
                                   events[i - 1] if i else None) for i, m in enumerate(methods)]
            for future in futures:
                future.result()
    finally:
        steps = summary.data["steps"]
        summary.set("checks_passed", bool(steps) and all(s.get("ok") for s in steps.values()))
        bundle_logs(args.work, args.out)
    print(json.dumps({name: ("ok" if s.get("ok") else s.get("error")) for name, s in steps.items()}, indent=1))
    return 0 if summary.data["checks_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
