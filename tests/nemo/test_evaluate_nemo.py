"""The evaluation entrypoint's real model code on the CPU (torch, transformers and NeMo of the NeMo 26.02 image).

A tiny random Llama (transformers ``LlamaConfig``: two layers, a 30-word vocabulary) with a word-level tokenizer
built in-process (``tokenizers`` WordLevel wrapped in ``PreTrainedTokenizerFast``) is saved as the base model's
Hugging Face download; a copy trained for a few steps on the validation answers is saved as the fine-tuned export.
``evaluate.evaluate_run`` then runs exactly as in the pod (``load_model``, ``loss_terms``, ``generate_answers``,
``release_model``, the base cache, the report and the gate), with the run.json of a real stack whose paths point
into a temporary directory. The prompt layout is checked against NeMo's own ``GPTSFTDataset``, the one training
used, and the loss against transformers' own loss with masked labels.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "workloads" / "entrypoints"))

import dataset  # noqa: E402
import evaluate  # noqa: E402
import layout  # noqa: E402

RUNS_DIR = os.environ.get("NEMO_EKS_RUNS_DIR")
RUN_FILES = sorted(Path(RUNS_DIR).glob("*.json")) if RUNS_DIR else []

pytestmark = pytest.mark.skipif(not RUNS_DIR, reason="run through tests/nemo/run.sh (sets NEMO_EKS_RUNS_DIR)")

SEQ_LENGTH = 24  # short enough that the long example below is truncated as training truncates it
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
RECORDS = [{"input": f"repeat the word {word}", "output": f"the word is {word}"} for word in WORDS] + [
    {"input": "repeat the word " + " ".join(["again"] * 30) + " one", "output": "the word is one"}]
LOSS_SAMPLES, GENERATION_SAMPLES, MAX_NEW_TOKENS = 9, 7, 6


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for r in RECORDS for w in f"{r['input']} {r['output']}".split()})
    vocab = {token: index for index, token in enumerate(["<unk>", "<s>", "</s>", "<pad>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces when decoding
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))


def fine_tune(model, tokenizer, steps: int = 40) -> None:
    """Answer-only training on the examples, batched with right padding, as a stand-in for the NeMo fine-tune."""
    import torch

    sequences = []
    for record in RECORDS:
        context, answer = evaluate.prompt_texts(record, space_sensitive=False)
        sequences.append(evaluate.training_sequence(token_ids(tokenizer, context), token_ids(tokenizer, answer),
                                                    tokenizer.bos_token_id, tokenizer.eos_token_id, SEQ_LENGTH))
    width = max(len(s) for s, _ in sequences)
    input_ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s, _ in sequences])
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in sequences])
    labels = torch.tensor([[-100] * start + s[start:] + [-100] * (width - len(s)) for s, start in sequences])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=input_ids, attention_mask=attention, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def evaluation_run(root: Path, eval_id: str = "eval-test") -> dict:
    """A real stack's training document plus the evaluation section and paths, everything under ``root``."""
    run = json.loads(RUN_FILES[0].read_text())
    model_id = run["training"]["model"]["hf_model_id"]
    paths = layout.RunPaths(run["run_id"], "unused", run["training"]["dataset"], model_id, eval_id).as_dict()
    run["eval_id"] = eval_id
    run["training"]["batch"]["seq_length"] = SEQ_LENGTH
    run["evaluation"] = {"loss_samples": LOSS_SAMPLES, "generation_samples": GENERATION_SAMPLES,
                         "max_new_tokens": MAX_NEW_TOKENS,
                         "gate": {"min_loss_improvement_percent": 0.0, "max_exact_match_drop": 0.0},
                         "gpus": 0, "cpu_offload": False, "metrics_port": 0, "metrics_linger_seconds": 0,
                         "image": run["training"]["image"]}
    serving_only = {"serving_dir", "engine_dir", "model_repository", "conversion_marker"}  # not in the document
    run["paths"] = {k: str(root) + v[len("/fsx"):] for k, v in paths.items() if k not in serving_only}
    return run


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """The base download, the fine-tuned export and the validation data of one run, on a fake /fsx."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("fsx")
    run = evaluation_run(root)
    paths = run["paths"]
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    for directory, train in ((paths["base_hf_dir"], False), (paths["export_dir"], True)):
        if train:
            fine_tune(model, tokenizer)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        layout.write_marker(layout.done_marker(directory))
    dataset.write_jsonl(Path(paths["data_dir"], "validation.jsonl"), RECORDS)
    return root, run


def test_prompt_layout_matches_nemo_sft_dataset(staged):
    """Every example laid out by evaluate.py is the token sequence NeMo's GPTSFTDataset gave training, with the
    same first scored token, the long one truncated the same way (FineTuningDataModule's dataset, finetune.py's
    dataset_kwargs, NeMo's AutoTokenizer over the same Hugging Face tokenizer)."""
    import finetune
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer
    from nemo.collections.llm.gpt.data.core import create_sft_dataset

    _, run = staged
    nemo_tokenizer = AutoTokenizer(run["paths"]["base_hf_dir"])
    sft = create_sft_dataset(Path(run["paths"]["data_dir"], "validation.jsonl"), tokenizer=nemo_tokenizer,
                             seq_length=SEQ_LENGTH, memmap_workers=1, is_test=True, **finetune.DATASET_KWARGS)
    assert len(sft) == len(RECORDS)
    for index, record in enumerate(RECORDS):
        example = sft[index]
        context, answer = evaluate.prompt_texts(record, nemo_tokenizer.space_sensitive)
        sequence, start = evaluate.training_sequence(nemo_tokenizer.text_to_ids(context),
                                                     nemo_tokenizer.text_to_ids(answer), nemo_tokenizer.bos_id,
                                                     nemo_tokenizer.eos_id, SEQ_LENGTH)
        assert sequence == example["input_ids"], index
        assert start == example["answer_start_idx"], index
        # NeMo's loss mask: the answer and the EOS
        assert [i for i, m in enumerate(example["loss_mask"]) if m] == list(range(start, len(sequence)))
    assert len(sft[len(RECORDS) - 1]["input_ids"]) == SEQ_LENGTH  # the long input was cut


def test_loss_terms_agree_with_transformers_masked_loss(staged):
    import torch

    _, run = staged
    settings = evaluate.Settings.from_run(run)
    loaded = evaluate.load_model(run["paths"]["export_dir"], settings)
    try:
        terms = evaluate.loss_terms(loaded, RECORDS, SEQ_LENGTH)
        for (nll, count), record in zip(terms, RECORDS):
            context, answer = evaluate.prompt_texts(record, loaded.space_sensitive)
            sequence, start = evaluate.training_sequence(token_ids(loaded.tokenizer, context),
                                                         token_ids(loaded.tokenizer, answer), loaded.bos_id,
                                                         loaded.eos_id, SEQ_LENGTH)
            labels = [-100] * start + sequence[start:]
            with torch.inference_mode():
                mean = loaded.model(input_ids=torch.tensor([sequence]), labels=torch.tensor([labels])).loss.item()
            assert count == len(sequence) - start
            assert nll == pytest.approx(mean * count, rel=2e-2)
    finally:
        evaluate.release_model(loaded)


def test_batched_generation_equals_one_by_one(staged, monkeypatch):
    _, run = staged
    monkeypatch.setattr(evaluate, "MODEL_DTYPE", "float32")  # no bfloat16 rounding between the two paddings
    loaded = evaluate.load_model(run["paths"]["export_dir"], evaluate.Settings.from_run(run))
    try:
        together = evaluate.generate_answers(loaded, RECORDS, SEQ_LENGTH, MAX_NEW_TOKENS, batch_size=8)
        alone = [evaluate.generate_answers(loaded, [r], SEQ_LENGTH, MAX_NEW_TOKENS)[0] for r in RECORDS]
    finally:
        evaluate.release_model(loaded)
    assert together == alone
    assert all(len(answer.split()) <= MAX_NEW_TOKENS for answer in together)


def test_evaluation_end_to_end_and_the_base_cache(staged, monkeypatch, tmp_path):
    monkeypatch.setattr(evaluate, "TERMINATION_LOG", str(tmp_path / "termination-log"))
    root, run = staged
    paths = run["paths"]
    loads = []
    real_load = evaluate.load_model
    monkeypatch.setattr(evaluate, "load_model", lambda path, settings: loads.append(path) or real_load(path, settings))

    assert evaluate.evaluate_run(run) == evaluate.EXIT_PASSED
    assert loads == [paths["base_hf_dir"], paths["export_dir"]]
    report = json.loads(Path(paths["evaluation_report"]).read_text())
    for name in ("base", "finetuned"):
        numbers = report["models"][name]
        assert math.isfinite(numbers["loss"]) and numbers["loss"] > 0
        assert numbers["perplexity"] == pytest.approx(math.exp(numbers["loss"]))
        assert numbers["counts"]["loss_examples"] == LOSS_SAMPLES
        assert numbers["counts"]["generation_examples"] == GENERATION_SAMPLES
        assert 0.0 <= numbers["exact_match"] <= 1.0 and 0.0 <= numbers["rouge_l"] <= 1.0
    base, finetuned = report["models"]["base"], report["models"]["finetuned"]
    assert finetuned["loss"] < base["loss"]  # trained on these answers
    assert report["gate"]["passed"] is True and os.path.exists(paths["evaluation_marker"])
    assert len(report["samples"]) == evaluate.REPORT_SAMPLES
    assert all(isinstance(s["base"], str) and isinstance(s["finetuned"], str) for s in report["samples"])
    cache = Path(base["cache"])
    assert cache.parent == Path(paths["base_eval_cache_dir"]) and base["cached"] is False
    assert json.loads(cache.read_text())["numbers"]["loss"] == base["loss"]

    # a second evaluation of the same run and data (another eval id): the base comes from the cache
    again = evaluation_run(root, eval_id="eval-again")
    loads.clear()
    assert evaluate.evaluate_run(again) == evaluate.EXIT_PASSED
    assert loads == [paths["export_dir"]]
    second = json.loads(Path(again["paths"]["evaluation_report"]).read_text())
    assert second["models"]["base"]["cached"] is True
    assert {k: second["models"]["base"][k] for k in evaluate.MODEL_NUMBERS} == {
        k: base[k] for k in evaluate.MODEL_NUMBERS}
    assert [s["base"] for s in second["samples"]] == [s["base"] for s in report["samples"]]
    assert second["models"]["finetuned"]["loss"] == pytest.approx(finetuned["loss"])


def test_a_stricter_gate_fails_with_exit_3(staged, monkeypatch, tmp_path):
    monkeypatch.setattr(evaluate, "TERMINATION_LOG", str(tmp_path / "termination-log"))
    root, _ = staged
    strict = evaluation_run(root, eval_id="eval-strict")
    strict["evaluation"]["gate"]["min_loss_improvement_percent"] = 100.0  # a loss of zero: never reached
    assert evaluate.evaluate_run(copy.deepcopy(strict)) == evaluate.EXIT_GATE_FAILED
    failed = layout.read_marker(layout.failure_marker(strict["paths"]["evaluation_marker"]))
    assert "the gate needs at least 100.00%" in failed["error"]
    assert (tmp_path / "termination-log").read_text() == failed["error"]
