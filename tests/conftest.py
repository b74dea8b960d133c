"""Shared fixtures: whole-stack runs under Pulumi's mock monitor, cached per stack for the session."""

from __future__ import annotations

import copy
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from moto.server import ThreadedMotoServer

from tools import synth

BASE_CONFIG: dict[str, Any] = {
    "aws:region": "us-east-1",
    "nemo-eks:gpuNodeGroups": [{"name": "train", "instanceType": "p4d.24xlarge"}],
}


def raw_config(overrides: dict[str, Any] | None = None, base: dict[str, Any] | None = None) -> dict[str, str]:
    """Config as the Pulumi CLI passes it: every value a string, objects as JSON."""
    merged = {**(BASE_CONFIG if base is None else base), **(overrides or {})}
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in merged.items()}


_cache: dict[str, synth.Synth] = {}


def synth_stack(stack: str) -> synth.Synth:
    if stack not in _cache:
        _cache[stack] = synth.synthesize(stack)
    return _cache[stack]


def synth_config(name: str, overrides: dict[str, Any], stack: str = "test",
                 secret_keys: list[str] | None = None) -> synth.Synth:
    key = f"{stack}/{name}"
    if key not in _cache:
        _cache[key] = synth.synthesize(stack, raw_config(overrides), secret_keys)
    return _cache[key]


@pytest.fixture(params=synth.stack_names())
def stack_synth(request) -> synth.Synth:
    return synth_stack(request.param)


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real moto server on 127.0.0.1, reached through AWS_ENDPOINT_URL as the CLIs would reach AWS."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def relocate(run: dict[str, Any], root: Path) -> dict[str, Any]:
    """A run.json with its /fsx paths under a temporary directory, for running entrypoints here."""
    moved = copy.deepcopy(run)
    moved["paths"] = {k: str(root) + v[len("/fsx"):] for k, v in run["paths"].items()}
    return moved


def write_run(run: dict[str, Any], root: Path) -> str:
    path = root / "run.json"
    path.write_text(json.dumps(run))
    return str(path)
