"""Evaluation (NeMo image): the base and the fine-tuned model on the run's held-out validation set, and the gate.

    python3 /opt/nemo-eks/evaluate.py --config /etc/nemo-eks/run.json            # the evaluation Job's container
    python3 /opt/nemo-eks/evaluate.py --config /etc/nemo-eks/run.json --dry-run  # what would be evaluated

Both models are Hugging Face directories: the base download ``finetune.py --prepare`` made (``paths.base_hf_dir``)
and the merged export of the trained checkpoint (``paths.export_dir``, written by ``export.py`` in the init
container). They are measured on ``<data_dir>/validation.jsonl``, the held-out split training validated on:

- loss and perplexity: the first ``evaluation.loss_samples`` examples, laid out exactly as NeMo's
  ``GPTSFTDataset`` laid them out for training (template ``"{input} {output}"``, BOS as finetune.DATASET_KWARGS,
  EOS after the answer, input truncated first to ``training.batch.seq_length``); cross-entropy over the answer
  tokens and the EOS only (answer-only loss), token-weighted over all examples; perplexity = exp(loss).
- generation: the first ``evaluation.generation_samples`` examples, prompt = BOS + input, greedy decoding of at
  most ``evaluation.max_new_tokens`` tokens; exact match (whitespace collapsed, stripped, case-folded) and ROUGE-L
  F1 (Lin 2004, LCS over lower-cased whitespace tokens, beta = 1) against ``output``.

The base model's numbers depend only on the base model and the data, so they are computed once and cached at
``<base_eval_cache_dir>/<key>.json`` (see ``cache_key``) and reused by every later run on the same data.

The gate (``evaluation.gate``): the fine-tuned loss must be at least ``min_loss_improvement_percent`` % below the
base loss, and exact match must not drop by more than ``max_exact_match_drop`` percentage points. Missing or
non-finite numbers fail it (fail closed).

Outputs, all under the run directory (exported to the checkpoints bucket by FSx):
``<evaluation_dir>/report.json``, ``report.md``, ``metrics.prom``; then ``EVALUATION_COMPLETE`` when the gate
passed, or ``EVALUATION_COMPLETE.failed`` with the reason when it did not (conversion's waiter fails fast on it).

Exit codes: 0 the gate passed (or had already passed: the marker exists, nothing is redone); 3 the gate failed or
the input cannot be evaluated (no validation examples): a retry cannot change that, the Job's podFailurePolicy
fails at once, and the reason is in /dev/termination-log (the pod's and the Job's status) and the log; 1 any other
error (a lost node, out of memory), retried by the Job.

Metrics (Prometheus text exposition format, on ``0.0.0.0:<evaluation.metrics_port>/metrics`` for
``evaluation.metrics_linger_seconds`` after the report is written, and in ``<evaluation_dir>/metrics.prom``),
all gauges:

    nemo_eval_validation_loss{model="base"|"finetuned",run_id,dataset}     mean answer-token cross-entropy (nats)
    nemo_eval_perplexity{model,run_id,dataset}                             exp(validation loss)
    nemo_eval_exact_match_ratio{model,run_id,dataset}                      exact-match fraction, 0..1
    nemo_eval_rouge_l_f1{model,run_id,dataset}                             mean ROUGE-L F1, 0..1
    nemo_eval_loss_improvement_percent{run_id,dataset}                     (base - finetuned) / base x 100
    nemo_eval_gate_passed{run_id,dataset}                                  1 passed, 0 failed

Every torch and transformers call is in the "model calls" section (``load_model``, ``loss_terms``,
``generate_answers``, ``release_model``); everything else is stdlib and tested without them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dataset  # noqa: E402
import layout  # noqa: E402

EXIT_PASSED, EXIT_ERROR, EXIT_GATE_FAILED = 0, 1, 3  # 3: workloads/evaluation.py GATE_FAILED_EXIT_CODE
TERMINATION_LOG = "/dev/termination-log"  # Kubernetes' default terminationMessagePath
TERMINATION_LOG_LIMIT = 4096  # Kubernetes keeps at most this many bytes of it
REPORT_SAMPLES = 5  # sample generations shown in the report
SAMPLE_TEXT_LIMIT = 1000  # characters of each sample text kept in the report
METHOD_VERSION = 1  # part of the cache key: bump when the way numbers are computed changes
GENERATION_BATCH_SIZE = 8  # prompts generated together (left-padded); the loss is computed one example at a time
MODEL_DTYPE = "bfloat16"
GPU_HEADROOM_FRACTION = 0.2  # with CPU offload: GPU memory left free for activations, the KV cache and logits
HOST_MEMORY_FRACTION = 0.8  # with CPU offload: share of the pod's available memory the offloaded weights may use
PROGRESS_EVERY = 16  # examples between progress lines

# The prompt layout of training (finetune.py's FineTuningDataModule, NeMo's GPTSFTDataset defaults): the template,
# BOS before the prompt, EOS after the answer, the loss on the answer and the EOS, the input truncated first.
# finetune.py is not imported for them (it pulls in the training callbacks); tests keep them equal to its
# DATASET_KWARGS, and tests/nemo compares the layout with NeMo's own dataset built from those kwargs.
PROMPT_TEMPLATE = "{input} {output}"
ADD_BOS = True  # finetune.DATASET_KWARGS["add_bos"]
ADD_EOS = True  # NeMo's default; finetune.DATASET_KWARGS does not change it

METRICS = {  # name -> help text
    "nemo_eval_validation_loss": "Mean cross-entropy (nats) of the validation answer tokens, token-weighted.",
    "nemo_eval_perplexity": "Perplexity of the validation answers: exp(validation loss).",
    "nemo_eval_exact_match_ratio": "Fraction of generated answers equal to the reference after normalization.",
    "nemo_eval_rouge_l_f1": "Mean ROUGE-L F1 (LCS of lower-cased whitespace tokens) of generated answers.",
    "nemo_eval_loss_improvement_percent": "Fine-tuned validation loss below the base model's, in percent.",
    "nemo_eval_gate_passed": "1 when the evaluation gate passed, 0 when it failed.",
}


class EvaluationError(RuntimeError):
    """Input an evaluation cannot use and a retry will not fix: fails the stage like a failed gate."""


# --------------------------------------------------------------------------------------------------
# Text metrics


def normalize(text: str) -> str:
    """Exact-match normalization: whitespace runs collapsed to one space, stripped, case-folded."""
    return " ".join(text.split()).casefold()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, two rows)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries", section 3.1): with X the
    reference of m tokens and Y the candidate of n tokens, R = LCS(X, Y) / m, P = LCS(X, Y) / n and
    F = (1 + beta^2) R P / (R + beta^2 P) with beta = 1, i.e. 2 P R / (P + R). Tokens: the lower-cased text split
    on whitespace. Two empty texts score 1, one empty text 0."""
    candidate, ref = prediction.lower().split(), reference.lower().split()
    if not candidate and not ref:
        return 1.0
    if not candidate or not ref:
        return 0.0
    common = lcs_length(ref, candidate)
    if common == 0:
        return 0.0
    recall, precision = common / len(ref), common / len(candidate)
    return 2 * precision * recall / (precision + recall)


def generation_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return {"exact_match": None, "rouge_l": None, "generation_examples": 0, "exact_matches": 0}
    matches = sum(exact_match(p, r) for p, r in zip(predictions, references))
    return {"exact_match": matches / len(references),
            "rouge_l": sum(rouge_l(p, r) for p, r in zip(predictions, references)) / len(references),
            "generation_examples": len(references), "exact_matches": matches}


def aggregate_loss(terms: Sequence[tuple[float, int]]) -> dict[str, Any]:
    """Token-weighted mean of per-example (summed negative log-likelihood, scored tokens): every answer token counts
    once, as in NeMo's validation loss, so a long answer weighs more than a short one. Perplexity = exp(loss)."""
    tokens = sum(count for _, count in terms)
    if tokens <= 0:
        raise EvaluationError("no answer tokens to score: every validation answer is empty after truncation")
    loss = sum(nll for nll, _ in terms) / tokens
    try:
        perplexity = math.exp(loss)
    except OverflowError:
        perplexity = math.inf
    return {"loss": loss, "perplexity": perplexity, "loss_examples": len(terms), "loss_tokens": tokens}


# --------------------------------------------------------------------------------------------------
# The prompt layout of training (NeMo 2.7.3 nemo/collections/llm/gpt/data/core.py GPTSFTDataset)


def prompt_texts(record: dict[str, Any], space_sensitive: bool) -> tuple[str, str]:
    """The two strings GPTSFTDataset tokenizes separately for ``"{input} {output}"``: the values stripped of spaces,
    and the template's space before ``{output}`` kept only for a space-sensitive tokenizer (one where
    tokenize("x y") != tokenize("x") + tokenize("y"), e.g. Llama 3's; not SentencePiece Llama 2's)."""
    return record["input"].strip(" "), (" " if space_sensitive else "") + record["output"].strip(" ")


def fit_to_length(context: list[int], answer: list[int], seq_length: int, add_bos: bool = ADD_BOS,
                  add_eos: bool = ADD_EOS) -> tuple[list[int], list[int]]:
    """GPTSFTDataset's truncation (truncation_field="input", truncation_method="right", tokens_to_generate=0):
    the input loses its end first; if that is not enough, the answer loses its end, then the input the rest."""
    total = len(context) + len(answer) + add_bos + add_eos
    excess = total - seq_length
    if excess <= 0:
        return list(context), list(answer)
    cut = min(excess, len(context))
    context = context[:len(context) - cut]
    excess -= cut
    if excess > 0:
        cut = min(excess, len(answer))
        answer = answer[:len(answer) - cut]
        excess -= cut
        context = context[:max(0, len(context) - excess)]
    return list(context), list(answer)


def training_sequence(context: list[int], answer: list[int], bos_id: int | None, eos_id: int | None,
                      seq_length: int, add_bos: bool = ADD_BOS, add_eos: bool = ADD_EOS) -> tuple[list[int], int]:
    """The token sequence training saw and the index of its first scored token (the answer's first token; the
    EOS after the answer is scored too). The very first token has nothing before it and is never scored."""
    add_bos, add_eos = add_bos and bos_id is not None, add_eos and eos_id is not None
    context, answer = fit_to_length(context, answer, seq_length, add_bos, add_eos)
    prefix = ([bos_id] if add_bos else []) + context
    sequence = prefix + answer + ([eos_id] if add_eos else [])
    return sequence, max(1, len(prefix))


def generation_prompt(context: list[int], bos_id: int | None, seq_length: int, max_new_tokens: int,
                      add_bos: bool = ADD_BOS) -> list[int]:
    """BOS + the input, its end cut (as training cuts it) so that the answer still fits in the sequence length."""
    prefix = [bos_id] if add_bos and bos_id is not None else []
    budget = max(seq_length - max_new_tokens, seq_length // 2) - len(prefix)
    return prefix + list(context[:max(1, budget)])


# --------------------------------------------------------------------------------------------------
# The gate


def _finite(numbers: dict[str, Any] | None, key: str) -> float | None:
    value = (numbers or {}).get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def gate(base: dict[str, Any] | None, finetuned: dict[str, Any] | None, thresholds: dict[str, Any]) -> dict[str, Any]:
    """Decide whether the fine-tuned model may go on to conversion and serving. Fails closed: a number that is
    missing or not finite fails the check that needs it."""
    min_improvement = float(thresholds["min_loss_improvement_percent"])
    max_drop = float(thresholds["max_exact_match_drop"])
    reasons: list[str] = []
    improvement = drop = None
    base_loss, ft_loss = _finite(base, "loss"), _finite(finetuned, "loss")
    base_em, ft_em = _finite(base, "exact_match"), _finite(finetuned, "exact_match")

    if base is None:
        reasons.append("the base model's numbers are missing, so the fine-tuned model cannot be compared with it "
                       "(the gate fails closed)")
    else:
        if base_loss is None or base_loss <= 0:
            reasons.append(f"the base model's validation loss is missing or unusable ({(base or {}).get('loss')!r}); "
                           "the loss improvement cannot be computed (the gate fails closed)")
        if base_em is None:
            reasons.append(f"the base model's exact match is missing ({(base or {}).get('exact_match')!r}); "
                           "the exact-match drop cannot be computed (the gate fails closed)")
    if ft_loss is None:
        reasons.append(f"the fine-tuned model's validation loss is missing or not finite "
                       f"({(finetuned or {}).get('loss')!r})")
    if ft_em is None:
        reasons.append(f"the fine-tuned model's exact match is missing ({(finetuned or {}).get('exact_match')!r})")

    if base_loss is not None and base_loss > 0 and ft_loss is not None:
        improvement = (base_loss - ft_loss) / base_loss * 100.0
        if improvement < min_improvement - 1e-9:
            reasons.append(f"validation loss improved {improvement:.2f}% (base {base_loss:.4f} -> fine-tuned "
                           f"{ft_loss:.4f}); the gate needs at least {min_improvement:.2f}%")
    if base_em is not None and ft_em is not None:
        drop = (base_em - ft_em) * 100.0
        if drop > max_drop + 1e-9:
            reasons.append(f"exact match dropped {drop:.2f} percentage points (base {base_em:.2%} -> fine-tuned "
                           f"{ft_em:.2%}); the gate allows at most {max_drop:.2f}")
    return {"passed": not reasons, "reasons": reasons,
            "thresholds": {"min_loss_improvement_percent": min_improvement, "max_exact_match_drop": max_drop},
            "loss_improvement_percent": improvement, "exact_match_drop_points": drop}


# --------------------------------------------------------------------------------------------------
# Settings, data and the base model's cache


@dataclass(frozen=True)
class Settings:
    hf_model_id: str
    loss_samples: int
    generation_samples: int
    max_new_tokens: int
    seq_length: int
    gpus: int
    cpu_offload: bool

    @classmethod
    def from_run(cls, run: dict[str, Any]) -> "Settings":
        evaluation = run.get("evaluation")
        if not evaluation:
            raise ValueError("run.json has no evaluation section: evaluate.py needs the evaluation document "
                             "(workloads.runconfig.evaluation_document)")
        return cls(run["training"]["model"]["hf_model_id"], int(evaluation["loss_samples"]),
                   int(evaluation["generation_samples"]), int(evaluation["max_new_tokens"]),
                   int(run["training"]["batch"]["seq_length"]), int(evaluation["gpus"]),
                   bool(evaluation["cpu_offload"]))


def validation_file(run: dict[str, Any]) -> str:
    return os.path.join(run["paths"]["data_dir"], dataset.NEMO_VALIDATION_FILE)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(os.fspath(path), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_validation(path: str, limit: int) -> tuple[list[dict[str, Any]], int]:
    """The first ``limit`` examples in file order, and how many the file holds."""
    if not os.path.isfile(path):
        raise EvaluationError(f"{path}: no validation file; finetune.py --prepare writes it (was the run's data "
                              "removed?)")
    records, total = [], 0
    for number, raw in enumerate(dataset.read_lines(path), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise EvaluationError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in dataset.REQUIRED_FIELDS):
            raise EvaluationError(f"{path}:{number}: no string 'input' and 'output'")
        total += 1
        if len(records) < limit:
            records.append(record)
    if not records:
        raise EvaluationError(f"{path}: no validation examples")
    return records, total


def cache_key(hf_model_id: str, validation_sha256: str, loss_samples: int, generation_samples: int,
              max_new_tokens: int, seq_length: int) -> str:
    """What the base model's numbers depend on; the same inputs give the same key on every machine."""
    document = {"hf_model_id": hf_model_id, "validation_sha256": validation_sha256, "loss_samples": loss_samples,
                "generation_samples": generation_samples, "max_new_tokens": max_new_tokens,
                "seq_length": seq_length, "method": METHOD_VERSION}
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def cache_path(run: dict[str, Any], key: str) -> str:
    return os.path.join(run["paths"]["base_eval_cache_dir"], f"{key}.json")


def read_cache(path: str, key: str) -> dict[str, Any] | None:
    """The cached base numbers, or None when absent or unusable (then they are computed again)."""
    try:
        with open(path, encoding="utf-8") as handle:
            cached = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        print(f"ignoring the unreadable base cache {path}: {exc}", flush=True)
        return None
    numbers = cached.get("numbers") if isinstance(cached, dict) else None
    if cached.get("key") != key or not isinstance(numbers, dict) or _finite(numbers, "loss") is None:
        print(f"ignoring the base cache {path}: not the numbers for key {key}", flush=True)
        return None
    return cached


def write_json(path: str, document: Any) -> None:
    """Atomic, with a writer-unique partial name: two runs may fill the same base cache at once."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{os.getpid()}.partial"
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
    os.replace(partial, path)


def write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{os.getpid()}.partial"
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(partial, path)


# --------------------------------------------------------------------------------------------------
# Memory placement (pure: the model calls pass in what torch reports)


def host_memory_available(meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup") -> int | None:
    """Bytes this pod can still use: MemAvailable, bounded by the container's cgroup limit (v2 or v1), since
    /proc/meminfo shows the whole node's memory inside a container."""
    candidates = []
    try:
        with open(meminfo, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            with open(os.path.join(cgroup, limit_file), encoding="utf-8") as handle:
                limit = handle.read().strip()
            with open(os.path.join(cgroup, usage_file), encoding="utf-8") as handle:
                usage = int(handle.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # v1 reports "no limit" as a huge number, v2 as "max"
            candidates.append(max(0, int(limit) - usage))
        break
    return min(candidates) if candidates else None


def offload_max_memory(gpu_totals: Sequence[int], host_available: int | None) -> dict[Any, int]:
    """``max_memory`` for ``from_pretrained(device_map="auto")`` with CPU offload: each GPU keeps
    GPU_HEADROOM_FRACTION free for activations, the KV cache and logits; the rest of the weights go to the CPU,
    within HOST_MEMORY_FRACTION of what the pod has left."""
    plan: dict[Any, int] = {index: int(total * (1 - GPU_HEADROOM_FRACTION)) for index, total in enumerate(gpu_totals)}
    if host_available:
        plan["cpu"] = int(host_available * HOST_MEMORY_FRACTION)
    return plan


# --------------------------------------------------------------------------------------------------
# Model calls: the only code that touches torch and transformers (transformers 4.57, the NeMo 26.02 image's)


@dataclass
class LoadedModel:
    path: str
    model: Any
    tokenizer: Any
    space_sensitive: bool
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    stop_ids: list[int]


def load_model(model_dir: str, settings: Settings) -> LoadedModel:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The fast tokenizer, as NeMo's AutoTokenizer wrapper used it in training (use_fast=True).
    tokenizer = AutoTokenizer.from_pretrained(model_dir, use_fast=True)
    # from_pretrained's dtype argument is `dtype` from transformers 4.56 (`torch_dtype` before, now deprecated);
    # an older version would take an unknown `dtype` for a config attribute and load float32 weights
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    dtype_argument = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    kwargs: dict[str, Any] = {dtype_argument: getattr(torch, MODEL_DTYPE), "device_map": "auto"}
    if torch.cuda.device_count() != settings.gpus:
        print(f"warning: {torch.cuda.device_count()} GPU(s) visible, the plan has {settings.gpus}", flush=True)
    if settings.cpu_offload:
        gpus = [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
        kwargs["max_memory"] = offload_max_memory(gpus, host_memory_available())
    print(f"loading {model_dir} ({MODEL_DTYPE}, device_map=auto"
          + (f", max_memory={kwargs['max_memory']}" if "max_memory" in kwargs else "") + ")", flush=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.eval()
    placement = getattr(model, "hf_device_map", None) or {}
    if placement:
        counts: dict[str, int] = {}
        for device in placement.values():
            counts[str(device)] = counts.get(str(device), 0) + 1
        print(f"placement (modules per device): {counts}", flush=True)
    space_sensitive = tokenizer.tokenize("x y") != tokenizer.tokenize("x") + tokenizer.tokenize("y")
    eos_id = tokenizer.eos_token_id
    stop_ids = {eos_id} if eos_id is not None else set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    stop_ids |= set(configured if isinstance(configured, (list, tuple)) else [configured] if configured is not None
                    else [])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_id if eos_id is not None else 0)
    return LoadedModel(model_dir, model, tokenizer, space_sensitive, tokenizer.bos_token_id, eos_id, pad_id,
                       sorted(stop_ids))


def _token_ids(loaded: LoadedModel, text: str) -> list[int]:
    # NeMo's AutoTokenizer.text_to_ids: tokenize, then look the tokens up (no special tokens added)
    return list(loaded.tokenizer.convert_tokens_to_ids(loaded.tokenizer.tokenize(text))) if text else []


def loss_terms(loaded: LoadedModel, records: Sequence[dict[str, Any]], seq_length: int) -> list[tuple[float, int]]:
    """Per example: (summed negative log-likelihood of the scored tokens, their count), one forward pass each,
    with logits only for the scored positions (``logits_to_keep``: a 128k vocabulary x 4k tokens would not fit)."""
    import inspect

    import torch
    import torch.nn.functional as F

    model = loaded.model
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    terms: list[tuple[float, int]] = []
    start_time = time.monotonic()
    with torch.inference_mode():
        for index, record in enumerate(records, start=1):
            context_text, answer_text = prompt_texts(record, loaded.space_sensitive)
            sequence, start = training_sequence(_token_ids(loaded, context_text), _token_ids(loaded, answer_text),
                                                loaded.bos_id, loaded.eos_id, seq_length)
            scored = len(sequence) - start  # tokens sequence[start:], predicted at positions start-1 .. len-2
            if scored <= 0:
                terms.append((0.0, 0))
                continue
            inputs = torch.tensor([sequence[:-1]], dtype=torch.long, device=model.device)
            if keeps_logits:
                logits = model(input_ids=inputs, use_cache=False, logits_to_keep=scored).logits[0, -scored:]
            else:
                logits = model(input_ids=inputs, use_cache=False).logits[0, -scored:]
            targets = torch.tensor(sequence[start:], dtype=torch.long, device=logits.device)
            nll = F.cross_entropy(logits.float(), targets, reduction="sum")
            terms.append((float(nll.item()), scored))
            if index % PROGRESS_EVERY == 0 or index == len(records):
                print(f"  loss: {index}/{len(records)} examples ({time.monotonic() - start_time:.0f} s)", flush=True)
    return terms


def generate_answers(loaded: LoadedModel, records: Sequence[dict[str, Any]], seq_length: int, max_new_tokens: int,
                     batch_size: int = GENERATION_BATCH_SIZE) -> list[str]:
    """Greedy answers, prompts left-padded in batches; each answer ends at the first stop token."""
    import torch

    model = loaded.model
    prompts = [generation_prompt(_token_ids(loaded, prompt_texts(r, loaded.space_sensitive)[0]), loaded.bos_id,
                                 seq_length, max_new_tokens) for r in records]
    answers: list[str] = []
    start_time = time.monotonic()
    with torch.inference_mode():
        for first in range(0, len(prompts), batch_size):
            batch = prompts[first:first + batch_size]
            width = max(len(p) for p in batch)
            input_ids = torch.tensor([[loaded.pad_id] * (width - len(p)) + p for p in batch], dtype=torch.long,
                                     device=model.device)
            attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], dtype=torch.long,
                                     device=model.device)
            output = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                    do_sample=False, num_beams=1, pad_token_id=loaded.pad_id,
                                    eos_token_id=loaded.stop_ids or None)
            for row in output[:, width:].tolist():
                cut = next((i for i, token in enumerate(row) if token in loaded.stop_ids), len(row))
                answers.append(loaded.tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
            done = min(first + batch_size, len(prompts))
            print(f"  generation: {done}/{len(prompts)} examples ({time.monotonic() - start_time:.0f} s)", flush=True)
    return answers


def release_model(loaded: LoadedModel) -> None:
    import gc

    import torch

    loaded.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# Measuring one model


def measure(model_dir: str, records: Sequence[dict[str, Any]], settings: Settings) -> tuple[dict[str, Any], list[str]]:
    """Loss and perplexity on the first loss_samples records, generation scores on the first generation_samples;
    returns the numbers and the generated answers."""
    started = time.monotonic()
    loaded = load_model(model_dir, settings)
    try:
        terms = loss_terms(loaded, records[:settings.loss_samples], settings.seq_length)
        generated = records[:settings.generation_samples]
        predictions = generate_answers(loaded, generated, settings.seq_length, settings.max_new_tokens)
    finally:
        release_model(loaded)
    numbers = {**aggregate_loss(terms), **generation_scores(predictions, [r["output"] for r in generated])}
    numbers["seconds"] = round(time.monotonic() - started, 1)
    return numbers, predictions


MODEL_NUMBERS = ("loss", "perplexity", "exact_match", "rouge_l")
COUNTS = ("loss_examples", "loss_tokens", "generation_examples", "exact_matches")


def model_entry(path: str, numbers: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"path": path, **{k: numbers.get(k) for k in MODEL_NUMBERS},
            "counts": {k: numbers.get(k) for k in COUNTS}, **extra}


def _clip(text: str) -> str:
    return text if len(text) <= SAMPLE_TEXT_LIMIT else text[:SAMPLE_TEXT_LIMIT] + " [...]"


def build_report(run: dict[str, Any]) -> dict[str, Any]:
    """Measure (or reuse the cached base numbers), apply the gate and return the report document."""
    settings = Settings.from_run(run)
    paths = run["paths"]
    for directory in (paths["base_hf_dir"], paths["export_dir"]):
        if not os.path.exists(layout.done_marker(directory)):
            raise RuntimeError(f"{directory} is not complete ({layout.done_marker(directory)} is missing): the base "
                               "download is made by finetune.py --prepare, the export by export.py before this")
    source = validation_file(run)
    digest = file_sha256(source) if os.path.isfile(source) else ""
    records, total = read_validation(source, max(settings.loss_samples, settings.generation_samples))
    key = cache_key(settings.hf_model_id, digest, settings.loss_samples, settings.generation_samples,
                    settings.max_new_tokens, settings.seq_length)
    cached_file = cache_path(run, key)
    generated = records[:settings.generation_samples]

    cached = read_cache(cached_file, key)
    if cached is not None:
        print(f"base model: reusing {cached_file}", flush=True)
        base_numbers, base_samples = cached["numbers"], list(cached.get("samples") or [])
    else:
        print(f"base model: evaluating {paths['base_hf_dir']}", flush=True)
        base_numbers, base_predictions = measure(paths["base_hf_dir"], records, settings)
        base_samples = base_predictions[:REPORT_SAMPLES]
        write_json(cached_file, {"key": key, "hf_model_id": settings.hf_model_id, "validation_sha256": digest,
                                 "loss_samples": settings.loss_samples,
                                 "generation_samples": settings.generation_samples,
                                 "max_new_tokens": settings.max_new_tokens, "seq_length": settings.seq_length,
                                 "method": METHOD_VERSION, "computed_by_run": run["run_id"],
                                 "computed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                 "numbers": base_numbers, "samples": base_samples})
    print(f"fine-tuned model: evaluating {paths['export_dir']}", flush=True)
    ft_numbers, ft_predictions = measure(paths["export_dir"], records, settings)

    verdict = gate(base_numbers, ft_numbers, run["evaluation"]["gate"])
    samples = [{"input": _clip(r["input"]), "reference": _clip(r["output"]),
                "base": _clip(base_samples[i]) if i < len(base_samples) else None,
                "finetuned": _clip(ft_predictions[i])}
               for i, r in enumerate(generated[:REPORT_SAMPLES])]
    return {
        "run_id": run["run_id"], "eval_id": run.get("eval_id"), "stack": run.get("stack"),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dataset": {"name": run["training"]["dataset"], "validation_file": source, "sha256": digest,
                    "examples": total},
        "settings": {"loss_samples": settings.loss_samples, "generation_samples": settings.generation_samples,
                     "max_new_tokens": settings.max_new_tokens, "seq_length": settings.seq_length,
                     "prompt_template": PROMPT_TEMPLATE, "add_bos": ADD_BOS, "add_eos": ADD_EOS,
                     "decoding": "greedy", "dtype": MODEL_DTYPE},
        "models": {
            "base": model_entry(paths["base_hf_dir"], base_numbers, hf_model_id=settings.hf_model_id,
                                cached=cached is not None, cache=cached_file, cache_key=key),
            "finetuned": model_entry(paths["export_dir"], ft_numbers, method=run["training"]["method"]),
        },
        "gate": verdict,
        "samples": samples,
    }


# --------------------------------------------------------------------------------------------------
# Report, Markdown summary and metrics


def _number(value: Any, fmt: str = ".4f") -> str:
    return "n/a" if value is None else format(value, fmt)


def _fenced(text: str) -> str:
    """A fenced block longer than any backtick run in the text, so model output cannot break the Markdown."""
    longest, run_length = 0, 0
    for char in text:
        run_length = run_length + 1 if char == "`" else 0
        longest = max(longest, run_length)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def render_markdown(report: dict[str, Any]) -> str:
    verdict, models = report["gate"], report["models"]
    thresholds = verdict["thresholds"]
    lines = [f"# Evaluation of {report['run_id']} ({report.get('eval_id')})", "",
             f"Gate: **{'PASSED' if verdict['passed'] else 'FAILED'}**"]
    lines += [f"- {reason}" for reason in verdict["reasons"]]
    lines += ["", "| model | validation loss | perplexity | exact match | ROUGE-L F1 | loss examples (tokens) "
                  "| generation examples |", "|---|---|---|---|---|---|---|"]
    for name, label in (("base", f"base ({models['base'].get('hf_model_id', '')})"), ("finetuned", "fine-tuned")):
        entry = models[name]
        counts = entry.get("counts") or {}
        em = entry.get("exact_match")
        lines.append(f"| {label} | {_number(entry.get('loss'))} | {_number(entry.get('perplexity'), '.3f')} | "
                     f"{'n/a' if em is None else format(em, '.1%')} | {_number(entry.get('rouge_l'))} | "
                     f"{counts.get('loss_examples')} ({counts.get('loss_tokens')}) | "
                     f"{counts.get('generation_examples')} |")
    improvement, drop = verdict.get("loss_improvement_percent"), verdict.get("exact_match_drop_points")
    lines += ["",
              f"Loss improvement: {_number(improvement, '.2f')}% (gate: at least "
              f"{thresholds['min_loss_improvement_percent']:.2f}%). Exact-match change: "
              f"{'n/a' if drop is None else format(-drop, '+.2f')} points (gate: a drop of at most "
              f"{thresholds['max_exact_match_drop']:.2f}).",
              "",
              f"Dataset `{report['dataset']['name']}`: {report['dataset']['examples']} validation examples "
              f"(sha256 {report['dataset']['sha256'][:12]}). Base numbers "
              f"{'reused from the cache' if models['base'].get('cached') else 'computed in this run and cached'}: "
              f"`{models['base'].get('cache')}`."]
    if report.get("samples"):
        lines += ["", "## Samples"]
        for number, sample in enumerate(report["samples"], start=1):
            lines += ["", f"### {number}", "", "Input:", _fenced(sample["input"]), "", "Reference:",
                      _fenced(sample["reference"]), "", "Base:", _fenced(sample["base"] or "(not cached)"), "",
                      "Fine-tuned:", _fenced(sample["finetuned"])]
    return "\n".join(lines) + "\n"


def _label_value(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sample_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render_metrics(report: dict[str, Any]) -> str:
    """The report's numbers in the Prometheus text exposition format (version 0.0.4), all gauges."""
    common = {"run_id": report["run_id"], "dataset": report["dataset"]["name"]}
    per_model = {"nemo_eval_validation_loss": "loss", "nemo_eval_perplexity": "perplexity",
                 "nemo_eval_exact_match_ratio": "exact_match", "nemo_eval_rouge_l_f1": "rouge_l"}
    samples: dict[str, list[tuple[dict[str, str], float]]] = {name: [] for name in METRICS}
    for name, key in per_model.items():
        for model in ("base", "finetuned"):
            value = report["models"][model].get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                samples[name].append(({"model": model, **common}, float(value)))
    improvement = report["gate"].get("loss_improvement_percent")
    if improvement is not None:
        samples["nemo_eval_loss_improvement_percent"].append((common, float(improvement)))
    samples["nemo_eval_gate_passed"].append((common, 1.0 if report["gate"]["passed"] else 0.0))
    lines = []
    for name, help_text in METRICS.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        for labels, value in samples[name]:
            rendered = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{rendered}}} {_sample_value(value)}")
    return "\n".join(lines) + "\n"


def headline(report: dict[str, Any], report_file: str) -> dict[str, Any]:
    """The numbers the markers carry (the gatekeeper logs the marker it releases the next stage on)."""
    base, finetuned, verdict = report["models"]["base"], report["models"]["finetuned"], report["gate"]
    return {"run_id": report["run_id"], "eval_id": report.get("eval_id"), "report": report_file,
            "base_loss": base.get("loss"), "finetuned_loss": finetuned.get("loss"),
            "loss_improvement_percent": verdict.get("loss_improvement_percent"),
            "base_exact_match": base.get("exact_match"), "finetuned_exact_match": finetuned.get("exact_match"),
            "base_rouge_l": base.get("rouge_l"), "finetuned_rouge_l": finetuned.get("rouge_l")}


def write_outputs(run: dict[str, Any], report: dict[str, Any]) -> str:
    """report.json, report.md and metrics.prom in the evaluation directory; returns the metrics text."""
    paths = run["paths"]
    report_file = paths["evaluation_report"]
    metrics = render_metrics(report)
    write_json(report_file, report)
    write_text(os.path.join(os.path.dirname(report_file), "report.md"), render_markdown(report))
    write_text(os.path.join(paths["evaluation_dir"], "metrics.prom"), metrics)
    return metrics


# --------------------------------------------------------------------------------------------------
# Metrics endpoint


def start_metrics_server(text: str, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    body = text.encode("utf-8")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # scrapes every 30 s would flood the pod log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def linger(text: str, port: int, seconds: float, sleep: Callable[[float], None] = time.sleep) -> None:
    """Serve the metrics for ``seconds`` so Prometheus scrapes them at least once; a port that cannot be bound
    costs the metrics, never the verdict."""
    if seconds <= 0:
        return
    try:
        server = start_metrics_server(text, port)
    except OSError as exc:
        print(f"cannot serve metrics on port {port}: {exc}; they are in metrics.prom", flush=True)
        return
    print(f"serving metrics on :{server.server_address[1]}/metrics for {seconds:.0f} s", flush=True)
    try:
        sleep(seconds)
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------------------------------
# The stage


def termination_message(message: str) -> None:
    """What Kubernetes shows as the container's termination message (kubectl describe, the Job's status)."""
    try:
        with open(TERMINATION_LOG, "w", encoding="utf-8") as handle:
            handle.write(message.encode("utf-8")[:TERMINATION_LOG_LIMIT].decode("utf-8", "ignore"))
    except OSError:
        pass  # not in a pod


def plan(run: dict[str, Any]) -> dict[str, Any]:
    """What --dry-run prints: no model is loaded."""
    settings = Settings.from_run(run)
    paths = run["paths"]
    source = validation_file(run)
    digest = file_sha256(source) if os.path.isfile(source) else None
    key = cache_key(settings.hf_model_id, digest, settings.loss_samples, settings.generation_samples,
                    settings.max_new_tokens, settings.seq_length) if digest else None
    return {
        "run_id": run["run_id"], "eval_id": run.get("eval_id"),
        "models": {
            "base": {"path": paths["base_hf_dir"], "hf_model_id": settings.hf_model_id,
                     "cache": cache_path(run, key) if key else None,
                     "cached": bool(key) and read_cache(cache_path(run, key), key) is not None},
            "finetuned": {"path": paths["export_dir"], "method": run["training"]["method"],
                          "exported": os.path.exists(layout.done_marker(paths["export_dir"]))},
        },
        "validation": {"file": source, "sha256": digest,
                       "note": None if digest else "not found: the cache key is known once the data is laid out"},
        "samples": {"loss": settings.loss_samples, "generation": settings.generation_samples,
                    "max_new_tokens": settings.max_new_tokens, "in_report": REPORT_SAMPLES},
        "prompt": {"template": PROMPT_TEMPLATE, "add_bos": ADD_BOS, "add_eos": ADD_EOS,
                   "seq_length": settings.seq_length},
        "cache_key": key,
        "gate": run["evaluation"]["gate"],
        "placement": {"gpus": settings.gpus, "cpu_offload": settings.cpu_offload, "device_map": "auto",
                      "dtype": MODEL_DTYPE},
        "outputs": {"report": paths["evaluation_report"], "marker": paths["evaluation_marker"],
                    "failure_marker": layout.failure_marker(paths["evaluation_marker"]),
                    "metrics_port": run["evaluation"]["metrics_port"],
                    "metrics_linger_seconds": run["evaluation"]["metrics_linger_seconds"]},
    }


def _fail(failed: str, message: str, **details: Any) -> int:
    layout.write_marker(failed, error=message, **details)
    termination_message(message)
    print(message, file=sys.stderr, flush=True)
    return EXIT_GATE_FAILED


def evaluate_run(run: dict[str, Any], sleep: Callable[[float], None] = time.sleep) -> int:
    Settings.from_run(run)  # refuses a document without the evaluation section, before anything is touched
    paths, evaluation = run["paths"], run["evaluation"]
    marker = paths["evaluation_marker"]
    failed = layout.failure_marker(marker)
    if os.path.exists(marker):
        print(f"{marker} exists: this run passed its evaluation already ({paths['evaluation_report']})")
        print(json.dumps(layout.read_marker(marker), indent=2))
        return EXIT_PASSED
    if os.path.exists(failed):
        os.remove(failed)  # a new attempt: the waiting conversion must not see the last one's verdict
    try:
        report = build_report(run)
        metrics = write_outputs(run, report)
    except EvaluationError as exc:
        return _fail(failed, f"evaluation failed: {exc}")
    except Exception as exc:  # noqa: BLE001 - anything else is worth a retry
        traceback.print_exc()
        termination_message(f"evaluation error (the Job retries): {exc.__class__.__name__}: {exc}")
        return EXIT_ERROR

    summary = headline(report, paths["evaluation_report"])
    print(json.dumps({"gate": report["gate"], **summary}, indent=2), flush=True)
    if report["gate"]["passed"]:
        layout.write_marker(marker, **summary)
        code = EXIT_PASSED
    else:
        code = _fail(failed, "evaluation gate failed: " + "; ".join(report["gate"]["reasons"]), **summary)
    linger(metrics, int(evaluation["metrics_port"]), float(evaluation["metrics_linger_seconds"]), sleep)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(layout.RUN_CONFIG_FILE))
    parser.add_argument("--dry-run", action="store_true", help="print what would be evaluated and exit")
    args = parser.parse_args(argv)
    run = layout.load_run(args.config)
    if args.dry_run:
        print(json.dumps(plan(run), indent=2))
        return EXIT_PASSED
    return evaluate_run(run)


if __name__ == "__main__":
    sys.exit(main())
