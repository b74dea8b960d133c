"""Pre-flight check of NCCL over EFA, run in every training pod of a multi-node run before torchrun.

    python3 /opt/nemo-eks/efa_check.py --config /etc/nemo-eks/run.json --efa-devices 32

It checks, in the pod as training will run:
1. the EFA devices the device plugin gave the pod (/dev/infiniband/uverbs*): as many as the pod requested;
2. libfabric sees the efa provider on as many devices (``fi_info -p efa -t FI_EP_RDM``);
3. the NCCL net plugin loads as NCCL loads it (NCCL_NET_PLUGIN resolved by NCCL's rules, dlopen with
   RTLD_NOW | RTLD_LOCAL: NVIDIA/nccl src/plugin/plugin_open.cc) and calls its network what NCCL_NET asks for.

Any failure: the pod exits 1 at once with the cause and the fix, and the run's training failure marker carries
the same text, so the stages waiting for training fail fast with it. Without this, NCCL falls back to TCP
sockets without a word (NVIDIA-NeMo/Megatron-Bridge#2824) and a run takes ten times as long.
Stdlib only: it runs in whichever image the training pods use.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import layout

FI_INFO_COMMAND = ("fi_info", "-p", "efa", "-t", "FI_EP_RDM")
DEVICE_GLOB = "/dev/infiniband/uverbs*"
# NCCL looks for the newest plugin interface first; every version's struct starts with `const char* name`.
PLUGIN_SYMBOLS = tuple(f"ncclNetPlugin_v{v}" for v in range(12, 5, -1))
DOCS = "docs/efa.md"
RUNBOOK = "docs/runbook.md"
CHECKS = ("devices", "libfabric", "plugin")  # each has a runbook entry


@dataclass(frozen=True)
class Problem:
    check: str
    cause: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.cause}\n  fix: {self.fix}\n  runbook: {RUNBOOK}#runbook-efa-{self.check}"


# --------------------------------------------------------------------------------------------------
# EFA devices and libfabric


def count_devices(pattern: str = DEVICE_GLOB) -> int:
    return len(glob.glob(pattern))


def check_devices(found: int, requested: int) -> list[Problem]:
    if found == requested:
        return []
    return [Problem("devices", f"the pod sees {found} EFA devices ({DEVICE_GLOB}) but requested {requested} "
                    "(vpc.amazonaws.com/efa)",
                    "the AWS EFA device plugin must run on the node and advertise all of its interfaces: "
                    "`kubectl describe node` should show vpc.amazonaws.com/efa allocatable = the instance type's "
                    "EFA count; a node launched without its EFA interfaces must be replaced")]


def efa_domains(fi_info_output: str) -> list[str]:
    """The EFA devices libfabric reports: distinct RDM domains of the efa provider. libfabric 2.x lists each
    device twice (fabrics ``efa`` and ``efa-direct``); libfabric 1.x once per device (AWS EC2 user guide, EFA and
    NCCL, sample output for p4d.24xlarge)."""
    domains: list[str] = []
    provider = None
    for line in fi_info_output.splitlines():
        key, _, value = line.strip().partition(":")
        value = value.strip()
        if key == "provider":
            provider = value
        elif key == "domain" and provider == "efa" and value.endswith("-rdm") and value not in domains:
            domains.append(value)
    return domains


def run_fi_info(command: Sequence[str] = FI_INFO_COMMAND) -> tuple[int, str]:
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return 127, f"{command[0]}: not found on PATH ({os.environ.get('PATH', '')})"
    except subprocess.TimeoutExpired:
        return 124, f"{' '.join(command)} did not answer within 60 s"
    return done.returncode, (done.stdout + done.stderr).strip()


def check_libfabric(returncode: int, output: str, requested: int) -> list[Problem]:
    domains = efa_domains(output)
    if returncode == 127:
        return [Problem("libfabric", output, "the image lacks the EFA software: run the training image built "
                        "from images/training/Dockerfile (images.training)")]
    if not domains:
        shown = output.strip().splitlines()[-1] if output.strip() else "(no output)"
        return [Problem("libfabric", f"`{' '.join(FI_INFO_COMMAND)}` finds no efa provider (exit {returncode}: "
                        f"{shown}); -61 is FI_ENODATA, libfabric found no EFA device",
                        "the pod must get its EFA devices from the device plugin (request vpc.amazonaws.com/efa, "
                        "never a hostPath /dev/infiniband), the node must have EFA interfaces, and the image's "
                        "libfabric must be the EFA installer's (/opt/amazon/efa)")]
    if len(domains) != requested:
        return [Problem("libfabric", f"libfabric's efa provider sees {len(domains)} devices "
                        f"({', '.join(domains)}), the pod requested {requested}",
                        "the devices the pod was given and the ones libfabric opens must agree: check the device "
                        "plugin's allocation and `fi_info -p efa` on the node")]
    return []


# --------------------------------------------------------------------------------------------------
# The NCCL net plugin


def plugin_candidates(nccl_net_plugin: str | None) -> list[str]:
    """The file names NCCL tries, in order (NVIDIA/nccl src/plugin/plugin_open.cc, openPluginLib): the value as
    given, then ``libnccl-net-<value>.so`` unless it is a path or a .so name; unset: ``libnccl-net.so``."""
    if not nccl_net_plugin:
        return ["libnccl-net.so"]
    names = [nccl_net_plugin]
    if "/" not in nccl_net_plugin and not (nccl_net_plugin.startswith("lib") and nccl_net_plugin.endswith(".so")):
        names.append(f"libnccl-net-{nccl_net_plugin}.so")
    return names


def _dlopen(name: str) -> ctypes.CDLL:
    return ctypes.CDLL(name, mode=os.RTLD_NOW | os.RTLD_LOCAL)


def plugin_network_name(library: ctypes.CDLL) -> str | None:
    for symbol in PLUGIN_SYMBOLS:
        try:
            name = ctypes.c_char_p.in_dll(library, symbol).value
        except ValueError:  # the symbol is not exported
            continue
        return name.decode() if name else None
    return None


def explain_load_error(message: str, plugin_missing: bool = False) -> str:
    """The fix for a failed dlopen, from the loader's own message. ``plugin_missing``: no candidate file exists,
    as opposed to a plugin that exists but whose dependencies do not resolve."""
    if "IBVERBS_PRIVATE" in message or "/opt/rdma-core" in message:
        return ("a second rdma-core shadows the one libefa was built against (HPC-X's /opt/rdma-core in NGC images, "
                "NVIDIA-NeMo/Megatron-Bridge#2824): run the image built from images/training/Dockerfile, which takes "
                "/opt/rdma-core off the loader path, or remove /opt/rdma-core/build/lib from LD_LIBRARY_PATH and "
                "/etc/ld.so.conf.d in your image")
    if re.search(r"version `EFA_[\d.]+' not found", message):
        return ("libfabric needs a newer libefa than the image's rdma-core: install the EFA software with "
                "efa_installer.sh in the final image so that its rdma-core replaces the system one")
    if "libfabric.so" in message:
        return "libfabric is not on the loader path: add /opt/amazon/efa/lib to LD_LIBRARY_PATH"
    if plugin_missing:
        return ("the plugin is not installed where NCCL looks: run the image built from images/training/Dockerfile "
                "(NCCL_NET_PLUGIN points at its aws-ofi-nccl), or set NCCL_NET_PLUGIN to your plugin's path")
    if "cannot open shared object file" in message:
        return ("a library the plugin needs is not on the loader path (named above): install it in the image or add "
                "its directory to LD_LIBRARY_PATH; `ldd` on the plugin lists what does not resolve")
    return "see the loader's message above; `ldd` on the plugin shows which library does not resolve"


def check_plugin(nccl_net_plugin: str | None, nccl_net: str | None,
                 load: Callable[[str], ctypes.CDLL] = _dlopen) -> tuple[list[Problem], str]:
    """(problems, what loaded). NCCL_NET must name the plugin's network: with it pinned, NCCL fails instead of
    falling back to sockets when the plugin is missing."""
    errors: list[str] = []
    missing = 0
    for name in plugin_candidates(nccl_net_plugin):
        try:
            library = load(name)
        except OSError as error:
            errors.append(str(error))
            # NCCL treats "<its own name>: ... No such file or directory" as "not there" (plugin_open.cc, ENOENT)
            missing += str(error).startswith(f"{name}: cannot open shared object file")
            continue
        network = plugin_network_name(library)
        if network is None:
            return [Problem("plugin", f"{name} loaded but exports no ncclNetPlugin_v6..v12 symbol",
                            "NCCL_NET_PLUGIN must name an NCCL net plugin (aws-ofi-nccl's libnccl-net-ofi.so)")], name
        if not nccl_net:
            return [Problem("plugin", f"NCCL_NET is not set: NCCL may fall back to sockets if {network!r} fails",
                            f"set NCCL_NET={network} in the pod (workloads/fabric.py does for multi-node runs)")], name
        if network.lower() != nccl_net.lower():
            return [Problem("plugin", f"NCCL_NET={nccl_net!r} but {name} calls its network {network!r}",
                            f"set NCCL_NET={network} (aws-ofi-nccl 1.13 and later say 'Libfabric', 1.12 and earlier "
                            "'AWS Libfabric')")], f"{name} ({network})"
        return [], f"{name} ({network})"
    message = "; ".join(errors)
    return [Problem("plugin", f"the NCCL net plugin does not load (NCCL_NET_PLUGIN={nccl_net_plugin or '<unset>'}): "
                    f"{message}", explain_load_error(message, plugin_missing=missing == len(errors)))], ""


# --------------------------------------------------------------------------------------------------


def report(problems: Sequence[Problem]) -> str:
    lines = ["EFA pre-flight check failed: NCCL would not run over EFA on this node. Training did not start.",
             *(str(p) for p in problems), f"More: {DOCS}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(layout.RUN_CONFIG_FILE))
    parser.add_argument("--efa-devices", type=int, required=True, help="vpc.amazonaws.com/efa the pod requested")
    parser.add_argument("--fi-info", default=FI_INFO_COMMAND[0], help="the fi_info to run")
    parser.add_argument("--device-glob", default=DEVICE_GLOB, help="the EFA device files the pod was given")
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ
    run = layout.load_run(args.config)

    problems = check_devices(count_devices(args.device_glob), args.efa_devices)
    returncode, output = run_fi_info((args.fi_info, *FI_INFO_COMMAND[1:]))
    problems += check_libfabric(returncode, output, args.efa_devices)
    plugin_problems, loaded = check_plugin(env.get("NCCL_NET_PLUGIN"), env.get("NCCL_NET"))
    problems += plugin_problems
    node = env.get("NODE_NAME") or env.get("HOSTNAME", "")
    if problems:
        text = report(problems)
        print(text, file=sys.stderr, flush=True)
        layout.write_marker(layout.failure_marker(run["paths"]["training_marker"]), error=text, check="efa",
                            node=node, causes=[p.check for p in problems])
        return 1
    print(f"EFA pre-flight check passed on {node}: {args.efa_devices} EFA devices, "
          f"{len(efa_domains(output))} in libfabric's efa provider, NCCL net plugin {loaded}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
