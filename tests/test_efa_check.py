"""The EFA pre-flight check (workloads/entrypoints/efa_check.py) against recorded fi_info output and loader
failures (tests/fixtures/efa/README.md says where each was recorded), and against real dlopen()s of small
libraries built here with the C compiler, including the rdma-core shadowing of NVIDIA-NeMo/Megatron-Bridge#2824
reproduced with versioned symbols."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from infra.config import load
from tests.conftest import relocate, write_run
from tools import synth
from workloads import runconfig

ENTRYPOINTS = Path(__file__).resolve().parents[1] / "workloads" / "entrypoints"
sys.path.insert(0, str(ENTRYPOINTS))

import efa_check  # noqa: E402
import layout  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "efa"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def training_run(tmp_path: Path) -> str:
    """The prod stack's training run.json (a multi-node p5 run), its /fsx paths moved under tmp_path."""
    raw, secrets = synth.read_stack_config("prod")
    return write_run(relocate(runconfig.training_document(load(raw, "prod", secret_keys=secrets)), tmp_path), tmp_path)


# ---------------------------------------------------------------------------------------------- fi_info


def test_counts_one_device_per_rdm_domain_of_the_efa_provider():
    assert efa_check.efa_domains(fixture("fi_info_p4d.txt")) == ["efa_0-rdm", "efa_1-rdm", "efa_2-rdm", "efa_3-rdm"]
    # libfabric 2.x lists a device under two fabrics (efa-direct, efa) and once more as DGRAM: still one device
    assert efa_check.efa_domains(fixture("fi_info_libfabric2_one_device.txt")) == ["rdmap47s0-rdm"]


def test_libfabric_check_passes_when_the_provider_sees_every_device():
    assert efa_check.check_libfabric(0, fixture("fi_info_p4d.txt"), 4) == []


def test_no_efa_provider_names_the_cause_and_the_fix():
    [problem] = efa_check.check_libfabric(1, fixture("fi_info_no_device.txt"), 32)
    assert problem.check == "libfabric" and "-61" in problem.cause and "FI_ENODATA" in problem.cause
    assert "vpc.amazonaws.com/efa" in problem.fix and "hostPath" in problem.fix


def test_fewer_devices_in_libfabric_than_requested_fails():
    [problem] = efa_check.check_libfabric(0, fixture("fi_info_p4d.txt"), 32)
    assert "sees 4 devices" in problem.cause and "requested 32" in problem.cause


def test_missing_fi_info_means_the_image_has_no_efa_software():
    code, output = efa_check.run_fi_info(("/nonexistent/fi_info", "-p", "efa"))
    [problem] = efa_check.check_libfabric(code, output, 4)
    assert code == 127 and "images/training/Dockerfile" in problem.fix


def _fake_devices(directory: Path, count: int) -> str:
    """``count`` EFA device nodes in ``directory``; the glob that finds them."""
    directory.mkdir(exist_ok=True)
    for index in range(count):
        (directory / f"uverbs{index}").touch()
    return str(directory / "uverbs*")


def test_device_count_must_equal_the_request(tmp_path):
    found = efa_check.count_devices(_fake_devices(tmp_path, 3))
    assert found == 3 and efa_check.check_devices(found, 3) == []
    [problem] = efa_check.check_devices(found, 4)
    assert "sees 3 EFA devices" in problem.cause and "device plugin" in problem.fix


# ---------------------------------------------------------------------------------------------- the plugin


def test_plugin_names_follow_nccls_rules():
    assert efa_check.plugin_candidates(None) == ["libnccl-net.so"]
    assert efa_check.plugin_candidates("ofi") == ["ofi", "libnccl-net-ofi.so"]
    assert efa_check.plugin_candidates("/opt/aws-ofi-nccl/lib/libnccl-net-ofi.so") == \
        ["/opt/aws-ofi-nccl/lib/libnccl-net-ofi.so"]
    assert efa_check.plugin_candidates("libnccl-net-ofi.so") == ["libnccl-net-ofi.so"]


def test_recorded_rdma_core_failure_points_at_the_training_image():
    # The loader's message as NCCL logged it in the NeMo 26.02 container (Megatron-Bridge#2824).
    recorded = fixture("plugin_load_rdma_core.txt").splitlines()[0].split("NET/Plugin: ", 1)[1]
    message = recorded.split(": ", 1)[1]

    def load(name):
        raise OSError(message)

    [problem], loaded = efa_check.check_plugin("ofi", "Libfabric", load=load)
    assert loaded == "" and "IBVERBS_PRIVATE_34" in problem.cause
    assert "/opt/rdma-core" in problem.fix and "images/training/Dockerfile" in problem.fix


@pytest.fixture(scope="module")
def libraries(tmp_path_factory) -> Path:
    """A plugin exporting ncclNetPlugin_v9 named "Libfabric", linked to a provider library that needs
    IBVERBS_PRIVATE_34 of a libibverbs stand-in; and a second libibverbs that only has IBVERBS_PRIVATE_59, as
    HPC-X's does. Built with the system C compiler."""
    root = tmp_path_factory.mktemp("dl")
    sources = {
        "plugin.c": 'struct net { const char* name; };\nextern int provider_call(void);\n'
                    'struct net ncclNetPlugin_v9 = { "Libfabric" };\nint use(void) { return provider_call(); }\n',
        "provider.c": "extern int verbs_private(void);\nint provider_call(void) { return verbs_private(); }\n",
        "verbs.c": "int verbs_private(void) { return 0; }\n",
        "notplugin.c": "int nothing(void) { return 0; }\n",
        "v34.map": "IBVERBS_PRIVATE_34 { global: verbs_private; local: *; };\n",
        "v59.map": "IBVERBS_PRIVATE_59 { global: verbs_private; local: *; };\n",
    }
    for name, text in sources.items():
        (root / name).write_text(text)
    (root / "system").mkdir()
    (root / "hpcx").mkdir()
    steps = [
        ["cc", "-shared", "-fPIC", "-o", "system/libverbs.so.1", "-Wl,-soname,libverbs.so.1",
         "-Wl,--version-script=v34.map", "verbs.c"],
        ["cc", "-shared", "-fPIC", "-o", "hpcx/libverbs.so.1", "-Wl,-soname,libverbs.so.1",
         "-Wl,--version-script=v59.map", "verbs.c"],
        ["cc", "-shared", "-fPIC", "-o", "system/libprovider.so.1", "-Wl,-soname,libprovider.so.1", "provider.c",
         "-Lsystem", "-l:libverbs.so.1"],
        ["cc", "-shared", "-fPIC", "-o", "libnccl-net-test.so", "plugin.c", "-Lsystem", "-l:libprovider.so.1"],
        ["cc", "-shared", "-fPIC", "-o", "libnotplugin.so", "notplugin.c"],
    ]
    for step in steps:
        subprocess.run(step, cwd=root, check=True, capture_output=True)
    return root


def _check_in_subprocess(libraries: Path, library_path: str, plugin: str, nccl_net: str | None) -> dict:
    """The check in a fresh process: the loader reads LD_LIBRARY_PATH once, at process start."""
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(ENTRYPOINTS)!r})
        import efa_check
        problems, loaded = efa_check.check_plugin({plugin!r}, {nccl_net!r})
        print(json.dumps({{"problems": [p.__dict__ for p in problems], "loaded": loaded}}))
    """)
    env = {**os.environ, "LD_LIBRARY_PATH": library_path}
    env.pop("NCCL_NET", None)
    if nccl_net is not None:
        env["NCCL_NET"] = nccl_net
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_a_plugin_that_loads_and_names_the_pinned_network_passes(libraries):
    result = _check_in_subprocess(libraries, str(libraries / "system"), str(libraries / "libnccl-net-test.so"),
                                  "Libfabric")
    assert result == {"problems": [], "loaded": f"{libraries / 'libnccl-net-test.so'} (Libfabric)"}


def test_shadowing_libibverbs_is_caught_as_nccl_would_hit_it(libraries):
    # HPC-X's directory first on the path: the provider's IBVERBS_PRIVATE_34 does not bind, dlopen fails.
    result = _check_in_subprocess(libraries, f"{libraries / 'hpcx'}:{libraries / 'system'}",
                                  str(libraries / "libnccl-net-test.so"), "Libfabric")
    [problem] = result["problems"]
    assert "version `IBVERBS_PRIVATE_34' not found" in problem["cause"]
    assert "rdma-core" in problem["fix"] and "images/training/Dockerfile" in problem["fix"]


def test_a_dependency_off_the_loader_path_is_told_apart_from_a_missing_plugin(libraries):
    result = _check_in_subprocess(libraries, "", str(libraries / "libnccl-net-test.so"), "Libfabric")
    [problem] = result["problems"]
    assert "libprovider.so.1: cannot open shared object file" in problem["cause"]
    assert "library the plugin needs" in problem["fix"]
    missing = _check_in_subprocess(libraries, "", str(libraries / "absent" / "libnccl-net-ofi.so"), "Libfabric")
    assert "not installed where NCCL looks" in missing["problems"][0]["fix"]


def test_network_name_must_match_nccl_net(libraries):
    plugin = str(libraries / "libnccl-net-test.so")
    [wrong] = _check_in_subprocess(libraries, str(libraries / "system"), plugin, "Socket")["problems"]
    assert "calls its network 'Libfabric'" in wrong["cause"] and "NCCL_NET=Libfabric" in wrong["fix"]
    [unset] = _check_in_subprocess(libraries, str(libraries / "system"), plugin, None)["problems"]
    assert "NCCL_NET is not set" in unset["cause"]


def test_a_library_without_plugin_symbols_is_not_a_plugin(libraries):
    [problem] = _check_in_subprocess(libraries, "", str(libraries / "libnotplugin.so"), "Libfabric")["problems"]
    assert "no ncclNetPlugin_v6..v12 symbol" in problem["cause"]


# ---------------------------------------------------------------------------------------------- the whole check


def _fake_fi_info(tmp_path: Path, output: str, code: int) -> str:
    script = tmp_path / "fi_info"
    (tmp_path / "fi_info.out").write_text(output)
    script.write_text(f"#!/bin/sh\ncat {tmp_path / 'fi_info.out'}\nexit {code}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_a_failed_check_exits_at_once_and_writes_the_failure_marker(tmp_path, capsys):
    config_path = training_run(tmp_path)
    run = layout.load_run(config_path)
    argv = ["--config", config_path, "--efa-devices", "32", "--fi-info",
            _fake_fi_info(tmp_path, fixture("fi_info_no_device.txt"), 1),
            "--device-glob", _fake_devices(tmp_path / "dev", 32)]
    code = efa_check.main(argv, environ={"NCCL_NET_PLUGIN": str(tmp_path / "missing.so"), "NCCL_NET": "Libfabric",
                                         "HOSTNAME": "train-0"})
    assert code == 1
    marker = layout.read_marker(layout.failure_marker(run["paths"]["training_marker"]))
    assert marker["check"] == "efa" and marker["causes"] == ["libfabric", "plugin"] and marker["node"] == "train-0"
    assert "-61" in marker["error"] and "not installed where NCCL looks" in marker["error"]
    assert marker["error"] in capsys.readouterr().err


def test_a_passing_check_writes_no_marker(tmp_path, libraries):
    config_path = training_run(tmp_path)
    run = layout.load_run(config_path)
    argv = ["--config", config_path, "--efa-devices", "4", "--fi-info",
            _fake_fi_info(tmp_path, fixture("fi_info_p4d.txt"), 0), "--device-glob", _fake_devices(tmp_path / "dev", 4)]
    plugin = str(libraries / "libnotplugin.so")  # loads, but: not a plugin
    assert efa_check.main(argv, environ={"NCCL_NET_PLUGIN": plugin, "NCCL_NET": "Libfabric"}) == 1
    os.remove(layout.failure_marker(run["paths"]["training_marker"]))
    # A plugin without dependencies, so that this process's loader path does not matter.
    standalone = tmp_path / "standalone.c"
    standalone.write_text('struct net { const char* name; };\nstruct net ncclNetPlugin_v8 = { "Libfabric" };\n')
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(tmp_path / "libnccl-net-ok.so"), str(standalone)], check=True)
    env = {"NCCL_NET_PLUGIN": str(tmp_path / "libnccl-net-ok.so"), "NCCL_NET": "Libfabric"}
    assert efa_check.main(argv, environ=env) == 0
    assert not os.path.exists(layout.failure_marker(run["paths"]["training_marker"]))
