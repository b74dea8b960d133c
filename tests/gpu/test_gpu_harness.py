"""The GPU run's own logic, on the CPU: the run.json it trains with, the checkpoints it may kill after, and the
tiny model the planner estimates (the GPU run itself is tests/gpu/run.sh, on a machine with a GPU)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def documents():
    return {method: harness.run_documents(method, "/work/fsx") for method in harness.METHODS}


def test_run_json_is_the_pods_document_with_the_tiny_model_on_one_gpu(documents):
    from infra import config
    from workloads import runconfig

    raw = dict(harness.STACK_CONFIG)
    raw["nemo-eks:training"] = {**raw["nemo-eks:training"], "method": "lora"}
    cfg = config.load({k: v if isinstance(v, str) else __import__("json").dumps(v) for k, v in raw.items()},
                      harness.STACK)
    pods = runconfig.evaluation_document(cfg)
    ours = documents["lora"]["eval"]
    assert ours["training"]["model"] == tiny_model.model_section()
    assert ours["training"]["parallelism"]["gpus_per_node"] == 1 and ours["training"]["parallelism"]["tp"] == 1
    assert ours["evaluation"]["gpus"] == 1
    # everything else is what the pods get, the /fsx paths moved under the work directory
    for section in ("method", "batch", "lora", "optimizer", "schedule", "checkpointing", "precision"):
        assert ours["training"][section] == pods["training"][section]
    assert ours["paths"] == {k: "/work/fsx" + v[len("/fsx"):] for k, v in pods["paths"].items()}
    assert documents["sft"]["train"]["training"]["method"] == "sft"
    assert documents["lora"]["train"]["paths"]["run_dir"] != documents["sft"]["train"]["paths"]["run_dir"]


def test_the_kill_waits_for_a_settled_checkpoint_and_its_last_link(tmp_path):
    name = "TinyLlamaConfig--val_loss=3.10-step={}-consumed_samples={}.0"
    (tmp_path / name.format(9, 320)).mkdir()
    assert harness.finished_checkpoints(str(tmp_path)) == {}  # no "-last" yet: AutoResume would not find it
    os.symlink(tmp_path / name.format(9, 320), tmp_path / (name.format(9, 320) + "-last"))
    assert set(harness.finished_checkpoints(str(tmp_path))) == {9}
    (tmp_path / name.format(19, 640)).mkdir()
    (tmp_path / (name.format(19, 640) + "-unfinished")).touch()
    assert harness.finished_checkpoints(str(tmp_path)) == {}  # a save in flight
    (tmp_path / (name.format(19, 640) + "-unfinished")).unlink()
    assert harness.finished_checkpoints(str(tmp_path)) == {}  # step 19 saved, "-last" still names step 9
    os.remove(tmp_path / (name.format(9, 320) + "-last"))
    os.symlink(tmp_path / name.format(19, 640), tmp_path / (name.format(19, 640) + "-last"))
    assert set(harness.finished_checkpoints(str(tmp_path))) == {9, 19}


def test_the_planner_sees_the_tiny_model_as_the_hf_config_describes_it():
    spec = tiny_model.model_spec()
    kwargs = tiny_model.hf_config_kwargs(1, 2, 3)
    head_dim = kwargs["hidden_size"] // kwargs["num_attention_heads"]
    per_layer = (2 * kwargs["hidden_size"] ** 2 + 2 * kwargs["hidden_size"] * kwargs["num_key_value_heads"] * head_dim
                 + 3 * kwargs["hidden_size"] * kwargs["intermediate_size"] + 2 * kwargs["hidden_size"])
    # LlamaForCausalLM's parameters: layers, untied embedding and output layer, final norm
    expected = (kwargs["num_hidden_layers"] * per_layer + 2 * kwargs["vocab_size"] * kwargs["hidden_size"]
                + kwargs["hidden_size"])
    assert spec.params == expected
    assert spec.vocab % 128 == 0  # NeMo pads the vocabulary to a multiple of 128: none here, so shapes match


def test_generated_examples_are_valid_and_reach_the_sequence_length():
    sys.path.insert(0, harness.ENTRYPOINTS)
    import dataset

    records = harness.generated_examples(count=200)
    lines = [__import__("json").dumps(r) for r in records]
    good, report = dataset.parse(lines, seq_length=harness.STACK_CONFIG["nemo-eks:training"]["seqLength"])
    assert report.ok and len(good) == 200
    words = sorted(len(r["input"].split()) for r in records)
    assert words[len(words) // 2] > harness.STACK_CONFIG["nemo-eks:training"]["seqLength"] // 2


def test_the_kill_reaches_workers_in_sessions_of_their_own(tmp_path):
    """torchrun starts its workers with start_new_session: a kill of the launcher's process group alone left the
    training worker running to the end on the GPU machine, so no restart ever had to resume."""
    import subprocess
    import time

    pid_file = tmp_path / "worker.pid"
    launcher = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(worker.pid))\n"
        "time.sleep(60)\n")], start_new_session=True)
    deadline = time.monotonic() + 20
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    worker = int(pid_file.read_text())
    assert worker in harness.descendants(launcher.pid)
    harness.kill_tree(launcher.pid)
    launcher.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{worker}/stat", encoding="utf-8") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break  # killed, waiting for init to reap it
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the worker outlived the kill")


def test_export_vocabulary_rows_are_compared_up_to_the_tokenizer():
    # what the GPU run showed: the export keeps 547 embedding rows (its tokenizer), the base 1024 (the config)
    assert harness.comparable_rows("model.embed_tokens.weight", (1024, 512), (547, 512), 547) == 547
    assert harness.comparable_rows("lm_head.weight", (1024, 512), (1024, 512), 547) == 1024
    assert harness.comparable_rows("model.norm.weight", (512,), (512,), 547) == 512
    with pytest.raises(harness.CheckFailed):
        harness.comparable_rows("model.embed_tokens.weight", (1024, 512), (600, 512), 547)
    with pytest.raises(harness.CheckFailed):
        harness.comparable_rows("model.layers.0.mlp.down_proj.weight", (512, 1536), (512, 1024), 547)
