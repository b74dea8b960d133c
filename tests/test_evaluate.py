"""The evaluation entrypoint's plain-Python logic, without torch: the text metrics, the loss aggregation, the
prompt layout, the gate, the base cache key, the report, the metrics, and the stage's markers and exit codes.

Where a test runs the whole stage, the four model functions (``load_model``, ``loss_terms``,
``generate_answers``, ``release_model``) are replaced here by fakes; the real ones run in tests/nemo.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import socket
import sys
import types
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from infra import config
from tests.conftest import relocate, write_run
from tools import synth
from workloads import runconfig

ENTRYPOINTS = Path(__file__).resolve().parents[1] / "workloads" / "entrypoints"
sys.path.insert(0, str(ENTRYPOINTS))

import dataset  # noqa: E402
import evaluate  # noqa: E402
import export  # noqa: E402
import finetune  # noqa: E402
import layout  # noqa: E402


def evaluation_run(stack: str) -> dict:
    """The run.json the evaluation pods get."""
    raw, secret_keys = synth.read_stack_config(stack)
    return runconfig.evaluation_document(config.load(raw, stack, secret_keys=secret_keys))


EVAL_RUNS = {stack: evaluation_run(stack) for stack in synth.stack_names()}



# --------------------------------------------------------------------------------------------------
# Exact match and ROUGE-L


@pytest.mark.parametrize("prediction, reference, expected", [
    ("  Paris \n", "paris", True),                 # stripped, case-folded
    ("New   York\tCity", "new york city", True),    # whitespace runs collapsed
    ("STRASSE", "straße", True),                    # case-folding, not just lower(): ß folds to ss
    ("Paris.", "Paris", False),                     # punctuation is not normalized away
    ("", "Paris", False),
])
def test_exact_match(prediction, reference, expected):
    assert evaluate.exact_match(prediction, reference) is expected


# ROUGE-L (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries", section 3.1): R = LCS/m with m the
# reference length, P = LCS/n with n the candidate length, F = (1 + beta^2) R P / (R + beta^2 P), beta = 1.
@pytest.mark.parametrize("prediction, reference, expected", [
    # the paper's own example, S1 as the reference: S2 shares "police the gunman" (LCS 3 of 4 and 4)
    ("police kill the gunman", "police killed the gunman", 0.75),
    # S3 shares only "the gunman" (LCS 2 of 4 and 4): R = P = 1/2
    ("the gunman kill police", "police killed the gunman", 0.5),
    # LCS 5, m = 6, n = 5: R = 5/6, P = 1, F = 2 (5/6) / (11/6) = 10/11
    ("the cat on the mat", "the cat sat on the mat", 10 / 11),
    # LCS "a c" = 2, m = 4, n = 3: R = 1/2, P = 2/3, F = (2/3) / (7/6) = 4/7
    ("a x c", "a b c d", 4 / 7),
    ("The CAT", "the cat", 1.0),                    # lower-cased tokens
    ("dog", "the cat", 0.0),
    ("", "the cat", 0.0),
    ("", "", 1.0),
])
def test_rouge_l(prediction, reference, expected):
    assert evaluate.rouge_l(prediction, reference) == pytest.approx(expected)


def test_lcs_length():
    assert evaluate.lcs_length("ABCBDAB", "BDCABA") == 4  # CLRS's example: "BCBA"
    assert evaluate.lcs_length([], ["a"]) == 0


def test_generation_scores_average_over_examples():
    scores = evaluate.generation_scores(["Paris", "berlin", "a x c"], ["paris", "Rome", "a b c d"])
    assert scores["exact_match"] == pytest.approx(1 / 3) and scores["exact_matches"] == 1
    assert scores["rouge_l"] == pytest.approx((1 + 0 + 4 / 7) / 3)
    assert scores["generation_examples"] == 3
    with pytest.raises(ValueError):
        evaluate.generation_scores(["a"], [])


# --------------------------------------------------------------------------------------------------
# Loss and perplexity


def test_loss_is_token_weighted_and_perplexity_is_its_exponential():
    # example 1: one token with NLL 2.0; example 2: three tokens with NLL 1.0 each (sum 3.0)
    numbers = evaluate.aggregate_loss([(2.0, 1), (3.0, 3)])
    assert numbers["loss"] == pytest.approx(5.0 / 4)  # not the mean of per-example means, (2.0 + 1.0) / 2
    assert numbers["perplexity"] == pytest.approx(math.exp(1.25))
    assert (numbers["loss_examples"], numbers["loss_tokens"]) == (2, 4)
    assert evaluate.aggregate_loss([(0.0, 5)])["perplexity"] == 1.0
    assert evaluate.aggregate_loss([(1e6, 1)])["perplexity"] == math.inf
    with pytest.raises(evaluate.EvaluationError, match="no answer tokens"):
        evaluate.aggregate_loss([(0.0, 0)])


# --------------------------------------------------------------------------------------------------
# The prompt layout of training


def test_prompt_layout_follows_nemo_sft_defaults():
    assert evaluate.PROMPT_TEMPLATE == "{input} {output}"
    # what finetune.py gives FineTuningDataModule (add_eos: NeMo's default, True, unless finetune.py sets it)
    assert evaluate.ADD_BOS == finetune.DATASET_KWARGS["add_bos"]
    assert evaluate.ADD_EOS == finetune.DATASET_KWARGS.get("add_eos", True)
    assert not set(finetune.DATASET_KWARGS) - {"add_bos", "add_eos"}, "a new dataset setting evaluate.py must follow"
    record = {"input": " What is 2+2? ", "output": " 4\n"}
    assert evaluate.prompt_texts(record, space_sensitive=False) == ("What is 2+2?", "4\n")
    assert evaluate.prompt_texts(record, space_sensitive=True) == ("What is 2+2?", " 4\n")


def test_training_sequence_scores_the_answer_and_eos():
    sequence, start = evaluate.training_sequence([10, 11], [20, 21], bos_id=1, eos_id=2, seq_length=100)
    assert sequence == [1, 10, 11, 20, 21, 2] and start == 3 and sequence[start:] == [20, 21, 2]
    # no BOS token in the tokenizer: the first answer token can still be scored, position 0 never
    assert evaluate.training_sequence([], [20], bos_id=None, eos_id=2, seq_length=100) == ([20, 2], 1)


def test_truncation_cuts_the_input_first_then_the_answer():
    assert evaluate.training_sequence([10, 11, 12], [20, 21], 1, 2, seq_length=6) == ([1, 10, 11, 20, 21, 2], 3)
    assert evaluate.training_sequence([10, 11, 12], [20, 21], 1, 2, seq_length=5) == ([1, 10, 20, 21, 2], 2)
    assert evaluate.fit_to_length([10, 11], [20, 21, 22], seq_length=3, add_bos=True, add_eos=True) == ([], [20])
    assert evaluate.fit_to_length([10], [20], seq_length=1, add_bos=True, add_eos=True) == ([], [])


def test_generation_prompt_leaves_room_for_the_answer():
    assert evaluate.generation_prompt([10, 11, 12], 1, seq_length=100, max_new_tokens=10) == [1, 10, 11, 12]
    assert evaluate.generation_prompt(list(range(10, 30)), 1, seq_length=16, max_new_tokens=8) == [1] + list(
        range(10, 17))
    assert evaluate.generation_prompt([10, 11], None, seq_length=100, max_new_tokens=10) == [10, 11]


# --------------------------------------------------------------------------------------------------
# The gate

THRESHOLDS = {"min_loss_improvement_percent": 5.0, "max_exact_match_drop": 2.0}


def test_gate_passes():
    verdict = evaluate.gate({"loss": 2.0, "exact_match": 0.50}, {"loss": 1.8, "exact_match": 0.49}, THRESHOLDS)
    assert verdict["passed"] is True and verdict["reasons"] == []
    assert verdict["loss_improvement_percent"] == pytest.approx(10.0)
    assert verdict["exact_match_drop_points"] == pytest.approx(1.0)
    assert verdict["thresholds"] == THRESHOLDS


def test_gate_fails_on_loss():
    verdict = evaluate.gate({"loss": 2.0, "exact_match": 0.5}, {"loss": 1.95, "exact_match": 0.6}, THRESHOLDS)
    assert verdict["passed"] is False
    assert verdict["reasons"] == ["validation loss improved 2.50% (base 2.0000 -> fine-tuned 1.9500); the gate "
                                  "needs at least 5.00%"]


def test_gate_fails_on_exact_match():
    verdict = evaluate.gate({"loss": 2.0, "exact_match": 0.5}, {"loss": 1.0, "exact_match": 0.45}, THRESHOLDS)
    assert verdict["passed"] is False
    assert verdict["reasons"] == ["exact match dropped 5.00 percentage points (base 50.00% -> fine-tuned 45.00%); "
                                  "the gate allows at most 2.00"]


def test_gate_at_the_threshold_passes_and_negative_minimum_allows_a_worse_loss():
    exact = {"min_loss_improvement_percent": 0.0, "max_exact_match_drop": 0.0}
    assert evaluate.gate({"loss": 1.0, "exact_match": 0.25}, {"loss": 1.0, "exact_match": 0.25}, exact)["passed"]
    lenient = {"min_loss_improvement_percent": -10.0, "max_exact_match_drop": 0.0}
    assert evaluate.gate({"loss": 1.0, "exact_match": 0.0}, {"loss": 1.05, "exact_match": 0.0}, lenient)["passed"]


@pytest.mark.parametrize("base", [None, {}, {"loss": None, "exact_match": 0.5}, {"loss": float("nan"),
                                                                                   "exact_match": 0.5}])
def test_gate_fails_closed_without_base_numbers(base):
    verdict = evaluate.gate(base, {"loss": 0.1, "exact_match": 1.0}, THRESHOLDS)
    assert verdict["passed"] is False
    assert any("base model" in reason and "fails closed" in reason for reason in verdict["reasons"])
    assert verdict["loss_improvement_percent"] is None


def test_gate_fails_on_a_non_finite_finetuned_loss():
    verdict = evaluate.gate({"loss": 2.0, "exact_match": 0.0}, {"loss": float("inf"), "exact_match": 0.0}, THRESHOLDS)
    assert not verdict["passed"] and "fine-tuned model's validation loss" in verdict["reasons"][0]


# --------------------------------------------------------------------------------------------------
# The base model's cache


def test_cache_key_is_stable_and_covers_every_input():
    args = ("meta-llama/Llama-2-7b-hf", "ab" * 32, 256, 64, 256, 4096)
    key = evaluate.cache_key(*args)
    # the same inputs give the same key on every machine and every release of this code (until METHOD_VERSION):
    # the first 16 hex digits of sha256 over the canonical JSON of the inputs
    canonical = ('{"generation_samples":64,"hf_model_id":"meta-llama/Llama-2-7b-hf","loss_samples":256,'
                 '"max_new_tokens":256,"method":1,"seq_length":4096,"validation_sha256":"' + "ab" * 32 + '"}')
    assert key == hashlib.sha256(canonical.encode()).hexdigest()[:16] == "26ba87d7e164711d"
    assert evaluate.cache_key(*args) == key and len(key) == 16
    for position, other in enumerate(("meta-llama/Llama-2-13b-hf", "cd" * 32, 128, 32, 128, 2048)):
        changed = list(args)
        changed[position] = other
        assert evaluate.cache_key(*changed) != key, position


def test_cache_reader_ignores_a_foreign_or_broken_file(tmp_path):
    path = tmp_path / "k.json"
    assert evaluate.read_cache(str(path), "k") is None
    path.write_text("{not json")
    assert evaluate.read_cache(str(path), "k") is None
    evaluate.write_json(str(path), {"key": "other", "numbers": {"loss": 1.0}})
    assert evaluate.read_cache(str(path), "k") is None
    evaluate.write_json(str(path), {"key": "k", "numbers": {"loss": 1.0}})
    assert evaluate.read_cache(str(path), "k")["numbers"] == {"loss": 1.0}
    assert sorted(os.listdir(tmp_path)) == ["k.json"]  # no partial files left behind


# --------------------------------------------------------------------------------------------------
# Memory placement with CPU offload


def test_host_memory_is_bounded_by_the_cgroup(tmp_path):
    gib = 1024**3
    (tmp_path / "meminfo").write_text(f"MemTotal: {200 * gib // 1024} kB\nMemAvailable: {100 * gib // 1024} kB\n")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert evaluate.host_memory_available(str(tmp_path / "meminfo"), str(cgroup)) == 100 * gib
    (cgroup / "memory.max").write_text(f"{64 * gib}\n")
    (cgroup / "memory.current").write_text(f"{4 * gib}\n")
    assert evaluate.host_memory_available(str(tmp_path / "meminfo"), str(cgroup)) == 60 * gib
    (cgroup / "memory.max").write_text("max\n")
    assert evaluate.host_memory_available(str(tmp_path / "meminfo"), str(cgroup)) == 100 * gib
    assert evaluate.host_memory_available(str(tmp_path / "none"), str(tmp_path / "none")) is None


def test_offload_leaves_gpu_headroom_and_puts_the_rest_on_the_cpu():
    gib = 1024**3
    plan = evaluate.offload_max_memory([80 * gib, 80 * gib], 100 * gib)
    assert plan == {0: 64 * gib, 1: 64 * gib, "cpu": 80 * gib}
    assert evaluate.offload_max_memory([80 * gib], None) == {0: 64 * gib}


# --------------------------------------------------------------------------------------------------
# The stage, with fake models


class FakeModels:
    """Stand-ins for the four model functions: the base scores ``base_loss`` per token and answers wrongly, the
    fine-tuned model ``finetuned_loss`` per token and answers with the reference unless told otherwise."""

    def __init__(self, base_loss=2.0, finetuned_loss=1.0, base_right=False, finetuned_right=True, error=None):
        self.per_token = {"base": base_loss, "finetuned": finetuned_loss}
        self.right = {"base": base_right, "finetuned": finetuned_right}
        self.error = error
        self.loaded: list[str] = []
        self.released: list[str] = []

    @staticmethod
    def which(path: str) -> str:
        return "base" if path.endswith("/hf") and "/models/base/" in path else "finetuned"

    def load_model(self, model_dir, settings):
        self.loaded.append(model_dir)
        return types.SimpleNamespace(path=model_dir)

    def loss_terms(self, loaded, records, seq_length):
        if self.error:
            raise self.error
        return [(self.per_token[self.which(loaded.path)] * 3, 3) for _ in records]

    def generate_answers(self, loaded, records, seq_length, max_new_tokens):
        right = self.right[self.which(loaded.path)]
        return [r["output"].upper() if right else "no idea" for r in records]

    def release_model(self, loaded):
        self.released.append(loaded.path)

    def install(self, monkeypatch):
        for name in ("load_model", "loss_terms", "generate_answers", "release_model"):
            monkeypatch.setattr(evaluate, name, getattr(self, name))
        return self


@pytest.fixture
def termination_log(tmp_path, monkeypatch):
    path = tmp_path / "termination-log"
    monkeypatch.setattr(evaluate, "TERMINATION_LOG", str(path))
    return path


def staged_run(tmp_path: Path, stack: str = "dev", validation: int = 10, **evaluation) -> dict:
    """An evaluation run under tmp_path with its inputs in place: validation data, the base download and the
    export (their .complete markers), no metrics lingering."""
    run = relocate(EVAL_RUNS[stack], tmp_path / "fsx")
    run["evaluation"].update({"loss_samples": 6, "generation_samples": 4, "metrics_linger_seconds": 0,
                              **evaluation})
    paths = run["paths"]
    records = [{"input": f"question {i}", "output": f"answer {i}"} for i in range(validation)]
    dataset.write_jsonl(Path(paths["data_dir"], "validation.jsonl"), records)
    for directory in (paths["base_hf_dir"], paths["export_dir"]):
        os.makedirs(directory, exist_ok=True)
        layout.write_marker(layout.done_marker(directory))
    return run


def test_a_passing_evaluation_writes_report_marker_cache_and_metrics(tmp_path, monkeypatch, termination_log):
    fake = FakeModels().install(monkeypatch)
    run = staged_run(tmp_path)
    paths = run["paths"]
    assert evaluate.evaluate_run(run) == evaluate.EXIT_PASSED
    assert fake.loaded == [paths["base_hf_dir"], paths["export_dir"]] and fake.released == fake.loaded

    report = json.loads(Path(paths["evaluation_report"]).read_text())
    base, finetuned = report["models"]["base"], report["models"]["finetuned"]
    assert (report["run_id"], report["eval_id"]) == (run["run_id"], run["eval_id"])
    assert report["dataset"]["name"] == "default" and report["dataset"]["examples"] == 10
    assert report["dataset"]["sha256"] == evaluate.file_sha256(Path(paths["data_dir"], "validation.jsonl"))
    assert (base["loss"], finetuned["loss"]) == (pytest.approx(2.0), pytest.approx(1.0))
    assert finetuned["perplexity"] == pytest.approx(math.e)
    assert (base["exact_match"], finetuned["exact_match"]) == (0.0, 1.0)  # "ANSWER 3" matches "answer 3"
    assert finetuned["rouge_l"] == 1.0 and base["rouge_l"] == 0.0
    assert finetuned["counts"] == {"loss_examples": 6, "loss_tokens": 18, "generation_examples": 4,
                                   "exact_matches": 4}
    assert base["cached"] is False and base["hf_model_id"] == run["training"]["model"]["hf_model_id"]
    assert report["gate"]["passed"] is True and report["gate"]["loss_improvement_percent"] == pytest.approx(50.0)
    assert report["gate"]["thresholds"] == run["evaluation"]["gate"]
    assert len(report["samples"]) == 4 and report["samples"][0] == {
        "input": "question 0", "reference": "answer 0", "base": "no idea", "finetuned": "ANSWER 0"}

    marker = layout.read_marker(paths["evaluation_marker"])
    assert marker["finetuned_loss"] == pytest.approx(1.0) and marker["base_loss"] == pytest.approx(2.0)
    assert marker["loss_improvement_percent"] == pytest.approx(50.0) and marker["report"] == paths["evaluation_report"]
    assert not os.path.exists(layout.failure_marker(paths["evaluation_marker"]))
    assert not termination_log.exists()

    cache = json.loads(Path(base["cache"]).read_text())
    assert Path(base["cache"]).parent == Path(paths["base_eval_cache_dir"])
    assert cache["key"] == base["cache_key"] and cache["numbers"]["loss"] == pytest.approx(2.0)
    assert cache["samples"] == ["no idea"] * 4

    evaluation_dir = Path(paths["evaluation_dir"])
    assert sorted(p.name for p in evaluation_dir.iterdir()) == ["EVALUATION_COMPLETE", "metrics.prom", "report.json",
                                                                "report.md"]
    assert evaluation_dir.parent.parent == Path(paths["run_dir"])  # under the run dir: exported to the bucket


def test_the_base_numbers_are_cached_per_model_and_data(tmp_path, monkeypatch, termination_log):
    fake = FakeModels().install(monkeypatch)
    run = staged_run(tmp_path)
    assert evaluate.evaluate_run(run) == 0
    # another evaluation of the same data (a new eval id): the base model is not loaded again
    again = copy.deepcopy(run)
    for key in ("evaluation_dir", "evaluation_report", "evaluation_marker"):
        again["paths"][key] = run["paths"][key].replace(run["eval_id"], "eval-other")
    fake.loaded.clear()
    assert evaluate.evaluate_run(again) == 0
    assert fake.loaded == [run["paths"]["export_dir"]]
    report = json.loads(Path(again["paths"]["evaluation_report"]).read_text())
    assert report["models"]["base"]["cached"] is True and report["models"]["base"]["loss"] == pytest.approx(2.0)
    assert report["samples"][0]["base"] == "no idea"
    # new data: a new key, the base is evaluated again
    with open(Path(run["paths"]["data_dir"], "validation.jsonl"), "a") as handle:
        handle.write(json.dumps({"input": "one more", "output": "example"}) + "\n")
    os.remove(again["paths"]["evaluation_marker"])
    fake.loaded.clear()
    assert evaluate.evaluate_run(again) == 0
    assert fake.loaded == [run["paths"]["base_hf_dir"], run["paths"]["export_dir"]]
    assert len(os.listdir(run["paths"]["base_eval_cache_dir"])) == 2


def test_a_finished_evaluation_is_not_redone(tmp_path, monkeypatch, termination_log, capsys):
    fake = FakeModels().install(monkeypatch)
    run = staged_run(tmp_path)
    layout.write_marker(run["paths"]["evaluation_marker"], finetuned_loss=1.0)
    assert evaluate.evaluate_run(run) == 0
    assert fake.loaded == [] and "passed its evaluation already" in capsys.readouterr().out


def test_a_failed_gate_writes_the_failure_marker_and_exits_3(tmp_path, monkeypatch, termination_log, capsys):
    FakeModels(base_loss=2.0, finetuned_loss=2.5).install(monkeypatch)
    run = staged_run(tmp_path)
    paths = run["paths"]
    assert evaluate.evaluate_run(run) == evaluate.EXIT_GATE_FAILED == 3
    failed = layout.read_marker(layout.failure_marker(paths["evaluation_marker"]))
    expected = ("evaluation gate failed: validation loss improved -25.00% (base 2.0000 -> fine-tuned 2.5000); the "
                "gate needs at least 0.00%")
    assert failed["error"] == expected and failed["finetuned_loss"] == pytest.approx(2.5)
    assert termination_log.read_text() == expected
    assert expected in capsys.readouterr().err
    assert not os.path.exists(paths["evaluation_marker"])
    report = json.loads(Path(paths["evaluation_report"]).read_text())
    assert report["gate"]["passed"] is False and report["gate"]["reasons"] == [expected.split(": ", 1)[1]]
    assert "Gate: **FAILED**" in Path(paths["evaluation_dir"], "report.md").read_text()
    assert "nemo_eval_gate_passed{" in Path(paths["evaluation_dir"], "metrics.prom").read_text()


def test_an_exact_match_drop_fails_the_gate(tmp_path, monkeypatch, termination_log):
    FakeModels(base_right=True, finetuned_right=False).install(monkeypatch)
    run = staged_run(tmp_path)
    run["evaluation"]["gate"]["max_exact_match_drop"] = 10.0
    assert evaluate.evaluate_run(run) == 3
    assert "exact match dropped 100.00 percentage points" in termination_log.read_text()


def test_a_new_attempt_clears_the_previous_failure(tmp_path, monkeypatch, termination_log):
    FakeModels().install(monkeypatch)
    run = staged_run(tmp_path)
    failed = layout.failure_marker(run["paths"]["evaluation_marker"])
    layout.write_marker(failed, error="evaluation gate failed: an older verdict")
    assert evaluate.evaluate_run(run) == 0
    assert not os.path.exists(failed) and os.path.exists(run["paths"]["evaluation_marker"])


def test_other_errors_exit_1_without_a_verdict(tmp_path, monkeypatch, termination_log):
    FakeModels(error=RuntimeError("CUDA out of memory")).install(monkeypatch)
    run = staged_run(tmp_path)
    assert evaluate.evaluate_run(run) == evaluate.EXIT_ERROR == 1
    paths = run["paths"]
    assert not os.path.exists(paths["evaluation_marker"])
    assert not os.path.exists(layout.failure_marker(paths["evaluation_marker"]))  # a retry may still pass
    assert termination_log.read_text() == "evaluation error (the Job retries): RuntimeError: CUDA out of memory"


def test_a_missing_export_is_an_error_not_a_verdict(tmp_path, monkeypatch, termination_log):
    fake = FakeModels().install(monkeypatch)
    run = staged_run(tmp_path)
    os.remove(layout.done_marker(run["paths"]["export_dir"]))
    assert evaluate.evaluate_run(run) == 1 and fake.loaded == []
    assert "export.py" in termination_log.read_text()


def test_missing_validation_data_fails_the_stage(tmp_path, monkeypatch, termination_log):
    fake = FakeModels().install(monkeypatch)
    run = staged_run(tmp_path)
    os.remove(Path(run["paths"]["data_dir"], "validation.jsonl"))
    assert evaluate.evaluate_run(run) == 3 and fake.loaded == []
    failed = layout.read_marker(layout.failure_marker(run["paths"]["evaluation_marker"]))
    assert "no validation file" in failed["error"] and "no validation file" in termination_log.read_text()


def test_fewer_examples_than_samples_counts_what_there_is(tmp_path, monkeypatch, termination_log):
    FakeModels().install(monkeypatch)
    run = staged_run(tmp_path, validation=3)
    assert evaluate.evaluate_run(run) == 0
    counts = json.loads(Path(run["paths"]["evaluation_report"]).read_text())["models"]["finetuned"]["counts"]
    assert (counts["loss_examples"], counts["generation_examples"]) == (3, 3)


def test_gate_exit_code_matches_the_job_failure_policy():
    from workloads import evaluation

    assert evaluate.EXIT_GATE_FAILED == evaluation.GATE_FAILED_EXIT_CODE


# --------------------------------------------------------------------------------------------------
# Report, Markdown and metrics


@pytest.fixture
def evaluated(tmp_path, monkeypatch, termination_log):
    FakeModels().install(monkeypatch)
    run = staged_run(tmp_path)
    assert evaluate.evaluate_run(run) == 0
    return run, json.loads(Path(run["paths"]["evaluation_report"]).read_text())


@pytest.fixture
def report(evaluated):
    return evaluated[1]


def test_report_markdown(report):
    text = evaluate.render_markdown(report)
    assert text.startswith(f"# Evaluation of {report['run_id']} ({report['eval_id']})\n\nGate: **PASSED**\n")
    assert "| model | validation loss | perplexity | exact match | ROUGE-L F1 | loss examples (tokens) |" in text
    assert (f"| base ({report['models']['base']['hf_model_id']}) | 2.0000 | 7.389 | 0.0% | 0.0000 | 6 (18) | 4 |"
            in text)
    assert "| fine-tuned | 1.0000 | 2.718 | 100.0% | 1.0000 | 6 (18) | 4 |" in text
    assert "Loss improvement: 50.00% (gate: at least 0.00%). Exact-match change: +100.00 points" in text
    assert "computed in this run and cached" in text
    assert "## Samples" in text and "### 4" in text and "```text\nANSWER 0\n```" in text


def test_markdown_fences_survive_model_output():
    fenced = evaluate._fenced("a ```` b")
    assert fenced.startswith("`````text\n") and fenced.endswith("\n`````")


def test_metrics_parse_as_prometheus_text(report):
    text = evaluate.render_metrics(report)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) == set(evaluate.METRICS)
    assert all(f.type == "gauge" and f.documentation for f in families.values())
    values = {(s.name, s.labels.get("model")): s for f in families.values() for s in f.samples}
    common = {"run_id": report["run_id"], "dataset": "default"}
    assert values[("nemo_eval_validation_loss", "base")].value == pytest.approx(2.0)
    assert values[("nemo_eval_validation_loss", "finetuned")].labels == {"model": "finetuned", **common}
    assert values[("nemo_eval_perplexity", "finetuned")].value == pytest.approx(math.e)
    assert values[("nemo_eval_exact_match_ratio", "finetuned")].value == 1.0
    assert values[("nemo_eval_rouge_l_f1", "base")].value == 0.0
    assert values[("nemo_eval_loss_improvement_percent", None)].value == pytest.approx(50.0)
    assert values[("nemo_eval_loss_improvement_percent", None)].labels == common
    assert values[("nemo_eval_gate_passed", None)].value == 1.0
    assert len(values) == 10


def test_metrics_escape_labels_and_skip_missing_numbers(report):
    odd = copy.deepcopy(report)
    odd["dataset"]["name"] = 'a "quoted"\\ name'
    odd["models"]["base"]["loss"] = None
    odd["models"]["finetuned"]["perplexity"] = math.inf
    odd["gate"].update(passed=False, loss_improvement_percent=None)
    samples = [s for f in text_string_to_metric_families(evaluate.render_metrics(odd)) for s in f.samples]
    assert {s.labels["dataset"] for s in samples} == {'a "quoted"\\ name'}
    names = [(s.name, s.labels.get("model")) for s in samples]
    assert ("nemo_eval_validation_loss", "base") not in names
    assert ("nemo_eval_loss_improvement_percent", None) not in names
    assert next(s.value for s in samples if s.name == "nemo_eval_perplexity" and s.labels["model"] == "finetuned") \
        == math.inf
    assert next(s.value for s in samples if s.name == "nemo_eval_gate_passed") == 0.0


def test_metrics_file_and_report_md_are_written_from_the_report(evaluated):
    run, report = evaluated
    evaluation_dir = Path(run["paths"]["evaluation_dir"])
    assert (evaluation_dir / "metrics.prom").read_text() == evaluate.render_metrics(report)
    assert (evaluation_dir / "report.md").read_text() == evaluate.render_markdown(report)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_metrics_are_served_while_lingering(report):
    text = evaluate.render_metrics(report)
    port = free_port()
    seen = {}

    def sleep(seconds):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            seen["type"] = response.headers["Content-Type"]
            seen["body"] = response.read().decode()
        seen["seconds"] = seconds

    evaluate.linger(text, port, 600, sleep=sleep)
    assert seen == {"type": "text/plain; version=0.0.4; charset=utf-8", "body": text, "seconds": 600}
    with pytest.raises(OSError):  # shut down after the linger
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1)


def test_linger_survives_a_busy_port(capsys):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        evaluate.linger("x 1\n", busy.getsockname()[1], 5, sleep=lambda s: pytest.fail("should not linger"))
    assert "cannot serve metrics" in capsys.readouterr().out
    evaluate.linger("x 1\n", 0, 0, sleep=lambda s: pytest.fail("no linger configured"))


def test_stage_lingers_with_the_configured_port(tmp_path, monkeypatch, termination_log):
    FakeModels().install(monkeypatch)
    run = staged_run(tmp_path, metrics_linger_seconds=30)
    served = []
    monkeypatch.setattr(evaluate, "linger", lambda text, port, seconds, sleep: served.append((text, port, seconds)))
    assert evaluate.evaluate_run(run) == 0
    assert served == [(Path(run["paths"]["evaluation_dir"], "metrics.prom").read_text(), 9400, 30.0)]


# --------------------------------------------------------------------------------------------------
# --dry-run and the evaluation documents of every stack


@pytest.mark.parametrize("stack", sorted(EVAL_RUNS))
def test_dry_run_for_every_stack(stack, tmp_path, monkeypatch, capsys):
    fake = FakeModels().install(monkeypatch)
    run = relocate(EVAL_RUNS[stack], tmp_path)
    assert "serving" not in run and run["evaluation"]["metrics_port"] == 9400
    assert evaluate.main(["--config", write_run(run, tmp_path), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["models"]["base"]["path"] == run["paths"]["base_hf_dir"]
    assert plan["models"]["finetuned"] == {"path": run["paths"]["export_dir"], "method": run["training"]["method"],
                                           "exported": False}
    assert plan["cache_key"] is None and plan["validation"]["sha256"] is None  # no data laid out yet
    assert plan["samples"]["loss"] == run["evaluation"]["loss_samples"]
    assert plan["gate"] == run["evaluation"]["gate"]
    assert plan["placement"]["gpus"] == run["evaluation"]["gpus"]
    assert plan["placement"]["cpu_offload"] == run["evaluation"]["cpu_offload"]
    assert plan["prompt"]["seq_length"] == run["training"]["batch"]["seq_length"]
    assert fake.loaded == []


def test_dry_run_names_the_cache_key_once_data_exists(tmp_path, monkeypatch, capsys, termination_log):
    FakeModels().install(monkeypatch)
    run = staged_run(tmp_path)
    path = write_run(run, tmp_path)
    assert evaluate.main(["--config", path, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    settings = evaluate.Settings.from_run(run)
    expected = evaluate.cache_key(settings.hf_model_id,
                                  evaluate.file_sha256(Path(run["paths"]["data_dir"], "validation.jsonl")),
                                  6, 4, run["evaluation"]["max_new_tokens"], run["training"]["batch"]["seq_length"])
    assert plan["cache_key"] == expected and plan["models"]["base"]["cached"] is False
    assert evaluate.evaluate_run(run) == 0
    capsys.readouterr()
    assert evaluate.main(["--config", path, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["models"]["base"]["cached"] is True


def test_the_training_document_is_refused():
    training_only = {k: v for k, v in EVAL_RUNS["dev"].items() if k not in ("evaluation", "eval_id")}
    with pytest.raises(ValueError, match="no evaluation section"):
        evaluate.Settings.from_run(training_only)


# --------------------------------------------------------------------------------------------------
# export.py with the evaluation document (the evaluation Job's init container)


@pytest.mark.parametrize("stack", sorted(EVAL_RUNS))
def test_export_accepts_the_evaluation_document(stack, tmp_path):
    run = relocate(EVAL_RUNS[stack], tmp_path)
    assert export.stage_marker(run) == run["paths"]["evaluation_marker"]
    path = write_run(run, tmp_path)
    # training not finished: reported through the evaluation's failure marker (the conversion waits on it)
    assert export.main(["--config", path]) == 1
    failed = layout.read_marker(layout.failure_marker(run["paths"]["evaluation_marker"]))
    assert "training has not finished" in failed["error"]
    # the export exists (an earlier attempt): reused without NeMo, and the stale failure marker is cleared
    layout.write_marker(layout.done_marker(run["paths"]["export_dir"]))
    assert export.main(["--config", path]) == 0
    assert not os.path.exists(layout.failure_marker(run["paths"]["evaluation_marker"]))
    assert export.export(run) == {"export": "reused", "export_dir": run["paths"]["export_dir"]}


def test_export_in_the_conversion_job_reports_through_the_conversion_marker():
    raw, secret_keys = synth.read_stack_config("dev")
    full = runconfig.run_document(config.load(raw, "dev", secret_keys=secret_keys))
    assert export.stage_marker(full) == full["paths"]["conversion_marker"]
    assert full["paths"]["export_dir"] == EVAL_RUNS["dev"]["paths"]["export_dir"]  # one export, read by both
