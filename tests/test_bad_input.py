"""Every bad input a new user is likely to give, run as the user runs it: the CLIs as subprocesses. Each case must
exit non-zero with a message naming the file or key, the value and the fix, without a traceback, and declare
(or write, or upload) nothing."""

from __future__ import annotations

import os
import runpy
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pulumi
import pytest

from tests.conftest import raw_config
from tools import synth

ROOT = synth.ROOT
EXAMPLE_DATA = ROOT / "examples" / "data" / "train.jsonl"

# A valid stack (the dev stack's shape); each case adds or changes one thing.
BASE = """\
config:
  aws:region: us-east-1
  nemo-eks:kubernetesVersion: "1.34"
  nemo-eks:gpuNodeGroups:
    - name: train
      instanceType: p4d.24xlarge
"""


def no_aws_environment(**extra: str) -> dict[str, str]:
    """The environment without any AWS setting of the machine running the tests: nothing reaches a real account."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"AWS_CONFIG_FILE": "/nonexistent/aws-config", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-creds",
                "AWS_EC2_METADATA_DISABLED": "true", "PYTHONPATH": str(ROOT), **extra})
    return env


def run(module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env=env or no_aws_environment(), timeout=timeout)


def assert_clean_error(result: subprocess.CompletedProcess, status: int, *words: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == status, output
    assert "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in output, (word, output)
    return output


def stack_file(tmp_path: Path, text: str, name: str = "case") -> Path:
    path = tmp_path / f"Pulumi.{name}.yaml"
    path.write_text(text)
    return path


def plan(tmp_path: Path, text: str, *words: str) -> str:
    """`make plan` of a stack file with ``text``: exit status 2, the words, nothing written."""
    path = stack_file(tmp_path, text)
    out = tmp_path / "build"
    output = assert_clean_error(run("tools.synth", path, "--out", out), 2, *words)
    assert not out.exists()
    return output


# --------------------------------------------------------------------------------------------------
# Stack files: `make plan` (python -m tools.synth)


def test_a_key_under_a_misspelt_project_namespace(tmp_path):
    plan(tmp_path, BASE + "  nemo_eks:training:\n    nodes: 2\n",
         "Pulumi.case.yaml:7:3", "'nemo_eks:training'", "'nemo_eks' is not valid", "namespaces nemo-eks, aws, pulumi",
         "Did you mean 'nemo-eks:training'?")


def test_a_key_under_the_namespace_of_a_provider_the_program_does_not_configure(tmp_path):
    plan(tmp_path, BASE + "  kubernetes:kubeconfig: ~/.kube/config\n",
         "Pulumi.case.yaml:7:3", "'kubernetes' is not valid", "would be ignored", "its own provider")


def test_a_key_written_twice(tmp_path):
    plan(tmp_path, BASE + "  nemo-eks:training:\n    method: sft\n    method: lora\n",
         "Pulumi.case.yaml:9:5", "key 'method' is written twice", "first at line 8", "Keep one of them")


def test_a_yaml_syntax_error(tmp_path):
    plan(tmp_path, BASE + "  nemo-eks:model: {variant: 7b\n",
         "Pulumi.case.yaml:8:1", "not valid YAML", "unclosed quote or bracket")


def test_tab_indentation(tmp_path):
    plan(tmp_path, BASE + "  nemo-eks:model:\n\tvariant: 7b\n",
         "Pulumi.case.yaml:8:", "not valid YAML", "indent with spaces")


def test_a_file_that_is_a_list(tmp_path):
    plan(tmp_path, "- aws:region: us-east-1\n", "Pulumi.case.yaml", "the file is a list, not a mapping", "config:")


def test_config_that_is_a_list(tmp_path):
    plan(tmp_path, "config:\n  - aws:region: us-east-1\n",
         "Pulumi.case.yaml:2:3", "`config:` is a list, not a mapping", "<namespace>:<key>: value")


def test_a_misspelt_top_level_key(tmp_path):
    plan(tmp_path, BASE.replace("config:", "confg:"),
         "Pulumi.case.yaml:1:1", "unknown top-level key 'confg'", "Did you mean 'config'?")


@pytest.mark.parametrize("section, name", [("training", "nodes"), ("training", "tp"), ("training", "pp"),
                                           ("serving", "tp")])
def test_zero_is_not_a_way_to_let_the_planner_choose(tmp_path, section, name):
    plan(tmp_path, BASE + f"  nemo-eks:{section}:\n    {name}: 0\n",
         f"'nemo-eks:{section}.{name}': 0 is not valid", "allowed: >= 1",
         f"Leave nemo-eks:{section}.{name} unset to let the planner choose")


@pytest.mark.parametrize("value", [".inf", ".nan"])
def test_epochs_that_are_not_a_finite_number(tmp_path, value):
    plan(tmp_path, BASE + f"  nemo-eks:training:\n    epochs: {value}\n",
         f"'nemo-eks:training.epochs': {value} is not valid", "a finite number")


def test_infinite_epochs_with_a_dataset_size(tmp_path):
    # with datasetTokens the step count is computed from epochs: once an OverflowError
    plan(tmp_path, BASE + "  nemo-eks:training:\n    epochs: .inf\n    datasetTokens: 1000000\n",
         "'nemo-eks:training.epochs': .inf is not valid", "a finite number")


def test_a_negative_dataset_size(tmp_path):
    plan(tmp_path, BASE + "  nemo-eks:training:\n    datasetTokens: -5\n",
         "'nemo-eks:training.datasetTokens': -5 is not valid", ">= 1", "Negative numbers have no meaning here")


def test_a_negative_number_of_days(tmp_path):
    plan(tmp_path, BASE + "  nemo-eks:storage:\n    noncurrentVersionDays: -1\n",
         "'nemo-eks:storage.noncurrentVersionDays': -1 is not valid", "1..3650", "Negative")


def test_a_misspelt_section_suggests_the_section(tmp_path):
    output = plan(tmp_path, BASE + "  nemo-eks:modle:\n    variant: 70b\n",
                  "'nemo-eks:modle'", "known keys: ", "Did you mean 'model'?")
    known = output.split("known keys: ")[1].split(".")[0].split(", ")
    assert {"model", "training", "serving", "network", "storage", "gpuNodeGroups"} <= set(known)


def test_an_unquoted_kubernetes_version(tmp_path):
    plan(tmp_path, BASE.replace('"1.34"', "1.30"),
         "Pulumi.case.yaml:3:31", "nemo-eks:kubernetesVersion: 1.30 is read by YAML as the number 1.3",
         'quote it: "1.30"')


def test_a_vpc_cidr_with_host_bits(tmp_path):
    plan(tmp_path, BASE + "  nemo-eks:network:\n    vpcCidr: 10.0.0.1/16\n",
         "'nemo-eks:network.vpcCidr': '10.0.0.1/16' is not valid", "Host bits are set",
         "the network address is 10.0.0.0/16")


@pytest.mark.parametrize("key, image, backend", [
    ("triton", "nvcr.io/nvidia/tritonserver:26.13-trtllm-python-py3", "llmapi"),  # 'newer than the table' once
    ("nemo", "nvcr.io/nvidia/nemo:25.13", "engine"),
])
def test_an_image_tag_that_cannot_be_a_release(tmp_path, key, image, backend):
    plan(tmp_path, BASE + f"  nemo-eks:images:\n    {key}: {image}\n  nemo-eks:serving:\n    backend: {backend}\n",
         f"'nemo-eks:images.{key}': '{image}' is not valid", "month 01..12", "has month 13")


# --------------------------------------------------------------------------------------------------
# The same reader for every tool that reads a stack file, and for `pulumi up`

DUPLICATE = BASE + "  aws:region: us-west-2\n"


def test_the_data_cli_reads_stack_files_through_the_same_reader(tmp_path):
    path = stack_file(tmp_path, DUPLICATE)
    assert_clean_error(run("tools.data", "validate", EXAMPLE_DATA, "--stack", path), 1,
                       f"--stack {path}", "Pulumi.case.yaml:7:3", "key 'aws:region' is written twice")


def test_preflight_reads_stack_files_through_the_same_reader(tmp_path):
    path = stack_file(tmp_path, DUPLICATE)
    output = assert_clean_error(run("tools.preflight", "--stack", path), 1,
                                "FAIL  stack config", "Pulumi.case.yaml:7:3", "key 'aws:region' is written twice")
    assert "PASS" not in output  # no AWS call was made


def test_the_nemo_test_environment_reads_stack_files_through_the_same_reader():
    script = (ROOT / "tests" / "nemo" / "run.sh").read_text()
    writer = (ROOT / "tests" / "nemo" / "write_runs.py").read_text()  # what run.sh runs to write the run.json files
    assert "-m tests.nemo.write_runs" in script and "synth.read_stack_config(stack)" in writer


def project_dir(tmp_path: Path, stack_text: str | None) -> Path:
    """A copy of the project's Pulumi.yaml with one stack file, as `pulumi up` sees the project."""
    shutil.copy(ROOT / "Pulumi.yaml", tmp_path / "Pulumi.yaml")
    (tmp_path / "stacks").mkdir()
    if stack_text is not None:
        (tmp_path / "stacks" / "Pulumi.test.yaml").write_text(stack_text)
    return tmp_path


def run_program(config: dict[str, str]) -> tuple[str, list[str]]:
    """__main__.py under Pulumi's mock engine, with ``config`` as the CLI hands it over."""
    monitor = synth.install_mocks("test", config)
    with pytest.raises(pulumi.RunError) as caught:
        synth.run_in_runtime(lambda: runpy.run_path(str(ROOT / "__main__.py"), run_name="__main__"))
    return str(caught.value), [r.type for r in monitor.registrations]


def test_pulumi_up_rejects_a_key_written_twice(tmp_path, monkeypatch):
    # The CLI's own YAML decoder keeps the last value; the program reads the stack file again.
    monkeypatch.chdir(project_dir(tmp_path, DUPLICATE))
    message, declared = run_program(raw_config({"aws:region": "us-west-2"}))
    assert message.startswith("stacks/Pulumi.test.yaml:7:3: key 'aws:region' is written twice")
    assert declared == ["pulumi:pulumi:Stack"]


def test_pulumi_up_rejects_a_misspelt_namespace_from_the_cli_config(tmp_path, monkeypatch):
    # No stack file here (config from elsewhere, e.g. --config-file): the keys the CLI hands over are checked.
    monkeypatch.chdir(project_dir(tmp_path, None))
    message, declared = run_program(raw_config({"nemo_eks:training": {"nodes": 2}}))
    assert "'nemo_eks' is not valid" in message and "Did you mean 'nemo-eks:training'?" in message
    assert declared == ["pulumi:pulumi:Stack"]


def test_pulumi_up_rejects_zero_nodes(tmp_path, monkeypatch):
    monkeypatch.chdir(project_dir(tmp_path, None))
    message, declared = run_program(raw_config({"nemo-eks:training": {"nodes": 0}}))
    assert "Leave nemo-eks:training.nodes unset to let the planner choose" in message
    assert declared == ["pulumi:pulumi:Stack"]


# --------------------------------------------------------------------------------------------------
# Data CLI (python -m tools.data)


def test_the_example_dataset_validates_on_a_fresh_clone():
    result = run("tools.data", "validate", EXAMPLE_DATA, "--stack", "dev")
    assert result.returncode == 0, result.stderr
    assert "examples/data/train.jsonl: 371 valid example(s)" in result.stdout and "result: OK" in result.stdout


def test_data_a_missing_file(tmp_path):
    assert_clean_error(run("tools.data", "validate", tmp_path / "nope.jsonl"), 1, "nope.jsonl: no such file")


def test_data_a_directory(tmp_path):
    assert_clean_error(run("tools.data", "validate", tmp_path), 1,
                       f"{tmp_path}: a directory, not a JSONL file", f"{tmp_path}/train.jsonl", "one JSON object per line")


def test_data_a_gzip_file(tmp_path):
    import gzip

    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(gzip.compress(EXAMPLE_DATA.read_bytes()))
    assert_clean_error(run("tools.data", "validate", path), 1,
                       "train.jsonl.gz: gzip-compressed", f"gunzip -k {path}", "one JSON object per line")


@pytest.mark.parametrize("text", ['[\n  {"input": "a", "output": "b"},\n  {"input": "c", "output": "d"}\n]\n',
                                  '[{"input": "a", "output": "b"}, {"input": "c", "output": "d"}]\n'],
                         ids=["pretty-printed", "one-line"])
def test_data_a_json_array(tmp_path, text):
    path = tmp_path / "data.json"
    path.write_text(text)
    assert_clean_error(run("tools.data", "validate", path), 1,
                       "data.json: a JSON array, not JSON Lines", "one JSON object per line", "jq -c '.[]'")


def test_data_bytes_that_are_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"input": "a", "output": "b"}\n{"input": "caf\xe9", "output": "d"}\n{"input": "e", "output": "f"}\n')
    # line 1 is 30 bytes with its newline; the bad byte is at offset 14 of line 2: 44 from the start of the file
    assert_clean_error(run("tools.data", "validate", path), 1,
                       "not UTF-8 text (invalid continuation byte at byte offset 44 of the file",
                       "save the file as UTF-8", "1 line(s): 2")


def test_data_a_stack_without_a_stack_file():
    assert_clean_error(run("tools.data", "validate", EXAMPLE_DATA, "--stack", "no-such-stack"), 1,
                       "--stack no-such-stack: no stack file stacks/Pulumi.no-such-stack.yaml", "stacks: dev")


def test_data_a_stack_with_a_bad_config(tmp_path):
    path = stack_file(tmp_path, BASE + "  nemo-eks:training:\n    seqLength: 10\n")
    assert_clean_error(run("tools.data", "validate", EXAMPLE_DATA, "--stack", path), 1,
                       "'nemo-eks:training.seqLength': 10 is not valid", "128..4096")


@pytest.mark.parametrize("value", ["-1", "0"])
def test_data_a_sequence_length_below_one(value):
    assert_clean_error(run("tools.data", "validate", EXAMPLE_DATA, "--seq-length", value), 2,
                       f"argument --seq-length: '{value}' is not valid", "a whole number >= 1")


def test_data_upload_without_credentials(tmp_path):
    marker = tmp_path / "uploaded"
    output = assert_clean_error(run("tools.data", "upload", EXAMPLE_DATA, "--stack", "dev", "--bucket", marker.name),
                                1, "no AWS credentials found", "AWS_PROFILE", "AWS_ACCESS_KEY_ID",
                                "aws sts get-caller-identity")
    assert "uploaded s3://" not in output


# --------------------------------------------------------------------------------------------------
# Preflight (python -m tools.preflight) against an endpoint that accepts connections and never answers


@pytest.fixture
def silent_endpoint():
    """A TCP server on 127.0.0.1 that accepts every connection and never sends a byte. It stops itself after
    two minutes at most, and when the test ends."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.2)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve():
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                held.append(server.accept()[0])
            except socket.timeout:
                continue
        for connection in held:
            connection.close()
        server.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(timeout=5)


def test_preflight_says_it_cannot_reach_an_endpoint_that_never_answers(silent_endpoint):
    env = no_aws_environment(AWS_ENDPOINT_URL=silent_endpoint, AWS_ACCESS_KEY_ID="testing",
                             AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1")
    # 181 s once (three 60 s read timeouts): every call is now bounded, so this ends well within the limit.
    result = run("tools.preflight", "--stack", "dev", env=env, timeout=60)
    output = assert_clean_error(result, 1, f"FAIL  account: cannot reach {silent_endpoint}", "no answer within",
                                "nothing else was checked", "proxy", "AWS_ENDPOINT_URL")
    assert "credentials" not in output


def test_preflight_bounds_every_aws_call():
    from tools import preflight

    config = preflight.client_config({})
    assert (config.connect_timeout, config.read_timeout) == (preflight.CONNECT_TIMEOUT_S, preflight.READ_TIMEOUT_S)
    assert config.retries == {"mode": "standard", "total_max_attempts": preflight.MAX_ATTEMPTS}
    # the whole report, when the first call cannot reach AWS: every attempt timing out, plus backoff
    assert preflight.MAX_ATTEMPTS * (preflight.CONNECT_TIMEOUT_S + preflight.READ_TIMEOUT_S) <= 30
    assert preflight.client_config({"AWS_MAX_ATTEMPTS": "10"}).retries["total_max_attempts"] == preflight.MAX_ATTEMPTS
    documented = (f"{preflight.CONNECT_TIMEOUT_S} s to connect, {preflight.READ_TIMEOUT_S} s to read, "
                  f"{preflight.MAX_ATTEMPTS} attempts")
    assert documented in " ".join((ROOT / "docs" / "preflight.md").read_text().split())


# --------------------------------------------------------------------------------------------------
# Sizing CLI (python -m infra.sizing): the stack config's limits, from the same code


@pytest.mark.parametrize("flag, value, key, allowed", [
    ("--epochs", "inf", "epochs", "a finite number > 0"),
    ("--epochs", "nan", "epochs", "a finite number > 0"),
    ("--dataset-tokens", "-5", "datasetTokens", ">= 1"),
    ("--lora-rank", "100000", "loraRank", "1..512"),
    ("--nodes", "0", "nodes", ">= 1"),
])
def test_sizing_cli_applies_the_config_limits(flag, value, key, allowed):
    shown = {"inf": ".inf", "nan": ".nan"}.get(value, value)
    output = assert_clean_error(run("infra.sizing", flag, value), 2,
                                f"error: {flag} (training.{key} in a stack file): {shown} is not valid",
                                f"allowed: {allowed}")
    assert "hours" not in output and "$" not in output  # no plan was printed
