"""The program entry point: a bad config stops with a clean message before any resource is declared."""

from __future__ import annotations

import runpy

import pulumi
import pytest

from tools import synth
from tests.conftest import raw_config

MAIN = str(synth.ROOT / "__main__.py")


def run_main(config: dict[str, str]) -> list[synth.Registration]:
    monitor = synth.install_mocks("test", config)
    synth.run_in_runtime(lambda: runpy.run_path(MAIN, run_name="__main__"))
    return monitor.registrations


def test_bad_config_is_a_run_error_and_declares_nothing():
    config = raw_config({"nemo-eks:gpuNodeGroups": [{"name": "train", "instanceType": "p5.48xlarge", "maxSize": 0}]})
    monitor = synth.install_mocks("test", config)
    with pytest.raises(pulumi.RunError) as caught:
        synth.run_in_runtime(lambda: runpy.run_path(MAIN, run_name="__main__"))
    # RunError is what the Pulumi language host prints as a plain message, without a traceback.
    assert str(caught.value).startswith("stack config 'nemo-eks:gpuNodeGroups[0].maxSize': 0 is not valid")
    assert [r.type for r in monitor.registrations] == ["pulumi:pulumi:Stack"]


def test_good_config_declares_the_stack():
    registrations = run_main(raw_config())
    types = {r.type for r in registrations}
    assert {"eks:index:Cluster", "aws:eks/nodeGroup:NodeGroup", "aws:fsx/lustreFileSystem:LustreFileSystem"} <= types


def test_synth_cli_reports_config_errors_without_traceback(tmp_path, monkeypatch, capsys):
    (tmp_path / "Pulumi.broken.yaml").write_text(
        "config:\n  aws:region: us-east-1\n  nemo-eks:gpuNodeGroups:\n    - name: a\n      instanceType: p9.large\n")
    monkeypatch.setattr(synth, "STACKS_DIR", tmp_path)
    assert synth.main(["broken", "--out", str(tmp_path / "build")]) == 2
    err = capsys.readouterr().err
    assert "stack config 'nemo-eks:gpuNodeGroups[0].instanceType': 'p9.large' is not valid" in err
    assert "Traceback" not in err and not (tmp_path / "build").exists()


def test_synth_cli_unknown_stack(capsys):
    assert synth.main(["no-such-stack"]) == 2
    assert "no stack file" in capsys.readouterr().err
