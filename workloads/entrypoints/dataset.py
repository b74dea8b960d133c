"""The fine-tuning dataset: validation, the validation split and the layout NeMo's data module reads.

Stdlib only. The same code checks a file on a laptop (``python -m tools.data validate``) and lays the data out on
FSx in the training pod (``finetune.py --prepare``), so what passed the upload is exactly what training accepts.

Format: JSONL, one object per line with non-empty string fields ``input`` and ``output`` (other fields are kept
and ignored by training). ``llm.FineTuningDataModule`` reads ``<root>/training.jsonl`` and
``<root>/validation.jsonl`` with its defaults ``prompt_template="{input} {output}"``, ``label_key="output"``,
``truncation_field="input"``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

TRAIN_FILE = "train.jsonl"  # in the datasets bucket: s3://<bucket>/<dataset>/train.jsonl
VALIDATION_FILE = "validation.jsonl"
NEMO_TRAINING_FILE = "training.jsonl"  # names FineTuningDataModule hard-codes
NEMO_VALIDATION_FILE = "validation.jsonl"
REQUIRED_FIELDS = ("input", "output")

# Llama tokenizers average about 4 characters of English per token; 3 over-estimates, so a warning fires before
# an example is really cut, not after. It is an estimate: no tokenizer ships to a laptop or an init container.
CHARS_PER_TOKEN = 3.0
VALIDATION_FRACTION = 0.05
MAX_VALIDATION_EXAMPLES = 1000  # validation runs limit_val_batches batches anyway; more only slows the split
GLOBAL_BATCH_KEY = "nemo-eks:training.globalBatchSize"
MAX_REPORTED_LINES = 20  # per problem kind, so a broken 10-GB file still gives a readable report


class DatasetError(ValueError):
    """Bad input: the message is the report a person reads."""


@dataclass
class Report:
    """What validation found, by 1-based line number."""

    path: str
    examples: int = 0
    errors: dict[str, list[int]] = field(default_factory=dict)  # problem -> line numbers
    warnings: dict[str, list[int]] = field(default_factory=dict)
    max_tokens_estimate: int = 0
    seq_length: int | None = None

    @property
    def ok(self) -> bool:
        return not self.errors and self.examples > 0

    def add(self, kind: str, problem: str, line: int) -> None:
        (self.errors if kind == "error" else self.warnings).setdefault(problem, []).append(line)

    def render(self) -> str:
        lines = [f"{self.path}: {self.examples} valid example(s)"]
        if self.examples == 0 and not self.errors:
            lines.append("  error: no examples")
        for kind, problems in (("error", self.errors), ("warning", self.warnings)):
            for problem, numbers in problems.items():
                shown = ", ".join(str(n) for n in numbers[:MAX_REPORTED_LINES])
                more = f" and {len(numbers) - MAX_REPORTED_LINES} more" if len(numbers) > MAX_REPORTED_LINES else ""
                lines.append(f"  {kind}: {problem}: {len(numbers)} line(s): {shown}{more}")
        if self.seq_length:
            lines.append(f"  longest example: ~{self.max_tokens_estimate} tokens (estimate) against a sequence "
                         f"length of {self.seq_length}")
        lines.append("  result: " + ("OK" if self.ok else "INVALID (nothing was written or uploaded)"))
        return "\n".join(lines)


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def record_key(record: dict[str, Any]) -> str:
    """Identity of an example for duplicate detection and the split: the two training fields only, so a changed
    id or metadata field does not make a duplicate look new."""
    canonical = json.dumps([record["input"], record["output"]], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class UndecodableLine:
    """A line that is not UTF-8, and where in the file its first bad byte is."""

    reason: str
    offset: int  # bytes from the start of the file


def parse(lines: Iterable[str | UndecodableLine], path: str = "<input>", seq_length: int | None = None,
          seen: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], Report]:
    """Validate JSONL text line by line; returns the good records and the report.

    ``seen`` carries duplicate detection across files (a validation example that is also a training example
    would measure memorisation, not generalisation)."""
    report = Report(path=path, seq_length=seq_length)
    records: list[dict[str, Any]] = []
    seen = {} if seen is None else seen
    not_utf8 = ""
    for number, raw in enumerate(lines, start=1):
        if isinstance(raw, UndecodableLine):
            # one problem for every such line, named by the first: the report groups lines by problem
            not_utf8 = not_utf8 or (f"not UTF-8 text ({raw.reason} at byte offset {raw.offset} of the file; "
                                    "save the file as UTF-8)")
            report.add("error", not_utf8, number)
            continue
        text = raw.strip()
        if not text:
            report.add("warning", "blank line (skipped)", number)
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            report.add("error", f"not valid JSON ({exc.msg})", number)
            continue
        if not isinstance(record, dict):
            report.add("error", "not a JSON object", number)
            continue
        bad = False
        for name in REQUIRED_FIELDS:
            value = record.get(name)
            if name not in record:
                report.add("error", f"missing field '{name}'", number)
                bad = True
            elif not isinstance(value, str):
                report.add("error", f"field '{name}' is not a string", number)
                bad = True
            elif not value.strip():
                report.add("error", f"field '{name}' is empty", number)
                bad = True
        if bad:
            continue
        key = record_key(record)
        if key in seen:
            report.add("error", "duplicate of an earlier example", number)
            continue
        seen[key] = f"{path}:{number}"
        tokens = estimate_tokens(record["input"]) + 1 + estimate_tokens(record["output"])
        report.max_tokens_estimate = max(report.max_tokens_estimate, tokens)
        if seq_length and tokens > seq_length:
            # NeMo truncates the input to fit (truncation_field="input"), so this is lost context, not a crash.
            report.add("warning", f"estimated length over the sequence length {seq_length} (input will be truncated)",
                       number)
        records.append(record)
    report.examples = len(records)
    return records, report


def read_lines(path: str | os.PathLike) -> Iterator[str]:
    with open(os.fspath(path), encoding="utf-8", errors="strict") as handle:
        yield from handle


def _decoded_lines(path: str) -> Iterator[str | UndecodableLine]:
    """Each line decoded on its own, so a bad byte is reported at its line and file offset."""
    offset = 0
    with open(path, "rb") as handle:
        for raw in handle:
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield UndecodableLine(exc.reason, offset + exc.start)
            offset += len(raw)


JSONL_FORMAT = 'one JSON object per line, e.g. {"input": "...", "output": "..."}'
# Leading bytes of the compressed formats a dataset is often shipped in.
_COMPRESSED = {b"\x1f\x8b": ("gzip", "gunzip -k"), b"PK\x03\x04": ("zip", "unzip"), b"BZh": ("bzip2", "bunzip2 -k"),
               b"\xfd7zXZ\x00": ("xz", "unxz -k"), b"\x28\xb5\x2f\xfd": ("zstd", "unzstd")}


def check_file(path: str | os.PathLike) -> None:
    """What makes a file unreadable as JSONL as a whole, said once instead of an error on every line."""
    shown = os.fspath(path)
    if not os.path.exists(shown):
        raise DatasetError(f"{shown}: no such file")
    if os.path.isdir(shown):
        raise DatasetError(f"{shown}: a directory, not a JSONL file; give the file itself "
                           f"(e.g. {os.path.join(shown, TRAIN_FILE)}): {JSONL_FORMAT}")
    with open(shown, "rb") as handle:
        head = handle.read(8)
        for magic, (kind, command) in _COMPRESSED.items():
            if head.startswith(magic):
                raise DatasetError(f"{shown}: {kind}-compressed; decompress it first (`{command} {shown}`): the "
                                   f"format is plain text, {JSONL_FORMAT}")
        handle.seek(0)
        first = next((line.strip() for line in handle if line.strip()), b"")
    if first.startswith(b"["):
        try:
            array = json.loads(first)
        except ValueError:
            array = None  # the opening line of a pretty-printed array
        if array is None or array == [] or (isinstance(array, list) and any(isinstance(i, dict) for i in array)):
            raise DatasetError(f"{shown}: a JSON array, not JSON Lines: the format is {JSONL_FORMAT}; convert it "
                               f"with `jq -c '.[]' {shown} > {os.path.splitext(shown)[0]}.jsonl`")


def parse_file(path: str | os.PathLike, seq_length: int | None = None,
               seen: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], Report]:
    check_file(path)
    return parse(_decoded_lines(os.fspath(path)), os.fspath(path), seq_length, seen)


def split(records: list[dict[str, Any]], fraction: float = VALIDATION_FRACTION,
          limit: int = MAX_VALIDATION_EXAMPLES, minimum: int = 1) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic train/validation split by content hash: the same example lands on the same side whatever
    the file order, on every machine and every re-run, so an upload and a re-prepare agree. The validation side
    gets at least ``minimum`` examples (one global batch: see ``check_validation_size``)."""
    if len(records) < 2:
        raise DatasetError(f"{len(records)} example(s): at least 2 are needed to split off a validation set")
    wanted = max(minimum, min(limit, max(1, round(len(records) * fraction))))
    if wanted > len(records) - 1:
        raise DatasetError(
            f"{len(records)} example(s): too few to split off a validation set of one global batch "
            f"({GLOBAL_BATCH_KEY} = {minimum}) and keep any for training. Add examples, give a {VALIDATION_FILE} "
            f"of its own, or lower {GLOBAL_BATCH_KEY}")
    ranked = sorted(records, key=record_key)
    chosen = {record_key(r) for r in ranked[:wanted]}
    train = [r for r in records if record_key(r) not in chosen]
    validation = [r for r in records if record_key(r) in chosen]
    return train, validation


def check_validation_size(validation: list[dict[str, Any]], global_batch_size: int, source: str) -> None:
    """NeMo validates in whole global batches and drops an incomplete one (MegatronDataSampler builds its
    validation sampler with ``drop_last=mode not in ["test", "predict"]``,
    nemo/lightning/pytorch/plugins/data_sampler.py, and with drop_last the sampler's length counts whole global
    batches only, ``total_samples // global_batch_size``, BaseMegatronSampler.__len__ in nemo/lightning/data.py;
    nemo 2.7.3): fewer examples than one global batch and the validation loader is empty, validation never
    runs, no ``val_loss`` is logged, and the checkpoints that keep the best ``val_loss`` are never written.
    Seen on a GPU: 19 validation examples at global batch 32 trained 100 steps without one validation
    (docs/gpu-run.md)."""
    if len(validation) < global_batch_size:
        raise DatasetError(
            f"{source}: {len(validation)} validation example(s), fewer than one global batch "
            f"({GLOBAL_BATCH_KEY} = {global_batch_size}): NeMo validates in whole global batches, so validation "
            f"would never run and no val_loss would be logged. Add validation examples or lower {GLOBAL_BATCH_KEY}")


def dumps(records: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Atomic: a reader (NeMo's memmap index, a retried init container) never sees half a file."""
    target = os.fspath(path)
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    partial = f"{target}.partial"
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(dumps(records))
    os.replace(partial, target)


def load_dataset(train_path: str | os.PathLike, validation_path: str | os.PathLike | None = None,
                 seq_length: int | None = None, global_batch_size: int | None = None,
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Report]]:
    """Validate a training file and an optional validation file; split one off when none is given. With
    ``global_batch_size`` the validation set must hold at least one global batch (a derived one is made that
    large). Raises DatasetError with the full report when anything is wrong."""
    seen: dict[str, str] = {}
    train, train_report = parse_file(train_path, seq_length, seen)
    reports = [train_report]
    if validation_path is not None:
        validation, validation_report = parse_file(validation_path, seq_length, seen)
        reports.append(validation_report)
    if not all(r.ok for r in reports):
        raise DatasetError("\n".join(r.render() for r in reports))
    if validation_path is None:
        train, validation = split(train, minimum=global_batch_size or 1)
    elif global_batch_size is not None:
        check_validation_size(validation, global_batch_size, os.fspath(validation_path))
    return train, validation, reports


def layout(dataset_dir: str | os.PathLike, data_dir: str | os.PathLike,
           seq_length: int | None = None, global_batch_size: int | None = None) -> dict[str, Any]:
    """``<dataset_dir>/train.jsonl [+ validation.jsonl]`` -> ``<data_dir>/training.jsonl + validation.jsonl``.
    Re-running it rewrites the same bytes: it is safe in an init container that restarts."""
    dataset_dir, data_dir = os.fspath(dataset_dir), os.fspath(data_dir)
    train_path = os.path.join(dataset_dir, TRAIN_FILE)
    if not os.path.isfile(train_path):
        raise DatasetError(f"{train_path}: no training file. Upload one with "
                           f"`python -m tools.data upload FILE --stack <stack> --dataset {os.path.basename(dataset_dir)}`")
    validation_path = os.path.join(dataset_dir, VALIDATION_FILE)
    train, validation, _ = load_dataset(train_path, validation_path if os.path.isfile(validation_path) else None,
                                        seq_length, global_batch_size)
    write_jsonl(os.path.join(data_dir, NEMO_TRAINING_FILE), train)
    write_jsonl(os.path.join(data_dir, NEMO_VALIDATION_FILE), validation)
    return {"training_examples": len(train), "validation_examples": len(validation),
            "validation_split": "given" if os.path.isfile(validation_path) else "derived"}


def calibration_texts(training_file: str | os.PathLike, samples: int) -> list[str]:
    """FP8 calibration prompts from the run's own training data, formatted as training saw them
    (FineTuningDataModule's default ``"{input} {output}"``), first ``samples`` examples in file order."""
    texts: list[str] = []
    for raw in read_lines(training_file):
        if len(texts) >= samples:
            break
        if raw.strip():
            record = json.loads(raw)
            texts.append(f"{record['input']} {record['output']}")
    if not texts:
        raise DatasetError(f"{os.fspath(training_file)}: no examples to calibrate on")
    return texts
