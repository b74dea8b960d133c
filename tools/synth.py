"""Offline plan: run the whole Pulumi program for one stack file in-process, with no cloud, CLI or network.

    python -m tools.synth STACK [--out build]

Writes ``build/<stack>/plan.json`` (every resource with its type, parent, dependencies and inputs as the
provider would receive them), ``build/<stack>/manifests/`` (every Kubernetes object, one YAML file each),
``build/<stack>/helm/`` (each Helm release's chart, version and values), ``build/<stack>/sizing.json`` (the
sizing plan every size comes from), ``build/<stack>/triton/`` (the model repository configuration the
conversion Job writes) and ``build/<stack>/graph.mmd`` (the dependency graph), and prints a preview-like
summary.

The engine is Pulumi's own mock monitor: resources register exactly as under ``pulumi up``; a provider never
runs, so a value AWS would compute (an id, an ARN, a DNS name) is written as ``<resource-name.property>``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import importlib
import importlib.util
import json
import re
import shutil
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping

import yaml

from infra import config as stack_config
from tools import sdk_modules

ROOT = Path(__file__).resolve().parent.parent
STACKS_DIR = ROOT / "stacks"
PROJECT = "nemo-eks"
SECRET = stack_config.SECRET_PLACEHOLDER
_SIG_KEY = "4dabf18193072939515e22adb298388d"
_SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270"
_UNKNOWN = "04da6b54-80e4-46f7-96ec-b56ff0331ba9"
# Our component types and provider resources are not Kubernetes objects, even though some have that package.
_NOT_MANIFESTS = ("pulumi:providers:", "kubernetes:helm.sh/", "kubernetes:yaml/", "kubernetes:kustomize/")

# PyYAML's LibYAML-based parser and emitter (https://github.com/yaml/pyyaml README, "When LibYAML bindings are
# installed") read the 600 kB of vendored operator manifests six times faster than its pure-Python loader
# (0.08 s against 0.50 s here). Without LibYAML the pure-Python classes give the same objects and, written as
# below, the same bytes.
try:
    from yaml import CSafeDumper as _SafeDumper
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # PyYAML built without libyaml
    from yaml import SafeDumper as _SafeDumper  # type: ignore[assignment]
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]

# The two emitters fold long quoted strings at different places; with no folding they write the same bytes.
_NO_FOLDING = 2**31 - 1


class _PlanDumper(_SafeDumper):
    """Multi-line strings (entrypoint scripts, dashboards, descriptions) as literal blocks: a change to one line
    of a script is one changed line in a diff of the plan, not a rewrapped quoted string."""


def _represent_str(dumper: yaml.BaseDumper, text: str) -> yaml.Node:
    # The emitter falls back to a quoted scalar where a block cannot hold the text (trailing spaces, say).
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_PlanDumper.add_representer(str, _represent_str)


def dump_yaml(obj: Any) -> str:
    """A manifest or Helm release as the plan writes it: keys in the object's order, the same bytes with or
    without libyaml."""
    return yaml.dump(obj, Dumper=_PlanDumper, sort_keys=False, width=_NO_FOLDING)


@lru_cache(maxsize=None)
def _vendored_documents(relative_path: str) -> tuple[dict[str, Any], ...]:
    """The objects of a vendored manifest file, parsed once per process (a plan writes and counts them)."""
    with open(ROOT / relative_path, encoding="utf-8") as stream:
        return tuple(d for d in yaml.load_all(stream, Loader=_SafeLoader) if d)


# Where a plan keeps what it renders the same way on every run (git-ignored, like the plans in build/).
CACHE_DIR = ROOT / "build" / ".cache"


def _manifest_head(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What a manifest's file name is made of (``manifest_filename``)."""
    meta = obj.get("metadata") or {}
    return {"kind": obj.get("kind", "Object"),
            "metadata": {k: meta[k] for k in ("namespace", "name") if meta.get(k)}}


def rendered_vendored(relative_path: str) -> list[tuple[dict[str, Any], str]]:
    """Each document of a vendored manifest file as the plan writes it: its head and its YAML. Parsing and
    writing the 620 kB of operator manifests took 0.1 s, a sixth of what the plan does once its modules are
    loaded; the result is kept in ``CACHE_DIR`` under a name made of the file's bytes, this module's source and
    PyYAML's version, so that a change to any of them renders it again, and never a stale copy."""
    content = (ROOT / relative_path).read_bytes()
    key = hashlib.sha256(b"\0".join((content, Path(__file__).read_bytes(), yaml.__version__.encode(),
                                      _SafeDumper.__name__.encode()))).hexdigest()[:32]
    cache = CACHE_DIR / f"{Path(relative_path).name}.{key}.json"
    try:
        return [(head, text) for head, text in json.loads(cache.read_text(encoding="utf-8"))]
    except (OSError, ValueError):
        pass
    rendered = [(_manifest_head(obj), dump_yaml(obj)) for obj in _vendored_documents(relative_path)]
    sdk_modules.write_cache(cache, json.dumps(rendered).encode("utf-8"))
    return rendered


StackFileError = stack_config.StackFileError


# --------------------------------------------------------------------------------------------------
# Stack files


def stack_names() -> list[str]:
    return sorted(p.name[len("Pulumi."):-len(".yaml")] for p in STACKS_DIR.glob("Pulumi.*.yaml"))


def stack_file(stack: str) -> tuple[str, Path]:
    """(stack name, file) for a stack name (stacks/Pulumi.<name>.yaml) or the path of a stack file elsewhere
    (its name is taken from Pulumi.<name>.yaml)."""
    if "/" in stack or stack.endswith((".yaml", ".yml")):
        path = Path(stack)
        match = re.fullmatch(r"(?:Pulumi\.)?(.+?)(?:\.ya?ml)?", path.name)
        return match.group(1), path
    return stack, STACKS_DIR / f"Pulumi.{stack}.yaml"


def display_path(path: Path) -> str:
    absolute = path.resolve()
    return str(absolute.relative_to(ROOT)) if absolute.is_relative_to(ROOT) else str(path)


def read_stack_config(stack: str) -> tuple[dict[str, str], list[str]]:
    """The stack file's config as the Pulumi CLI hands it to the program (``infra.config.read_stack_file``, the one
    reader of stack files). ``stack`` is a name or a stack file's path."""
    _, path = stack_file(stack)
    if not path.exists() and path.parent == STACKS_DIR:
        raise StackFileError(f"no stack file {display_path(path)}; stacks: {', '.join(stack_names())}")
    return stack_config.read_stack_file(path, display_path(path))


# --------------------------------------------------------------------------------------------------
# Mocks: what a provider would have answered


@lru_cache(maxsize=None)
def _type_registry() -> dict[str, tuple[str, str]]:
    """Type token -> (python module, class name), from each provider SDK's own registration table (cached with
    the SDKs' compiled modules: pulumi_aws's table alone is 350 kB of JSON)."""
    registry: dict[str, tuple[str, str]] = {}
    for package in ("pulumi_aws", "pulumi_eks", "pulumi_kubernetes"):
        init = importlib.import_module(package).__file__
        registry.update(sdk_modules.cached(
            importlib.util.cache_from_source(init, optimization=f"{sdk_modules.CACHE_TAG}types"),
            lambda init=init: (_registered_types(Path(init)), [init])))
    return registry


def _registered_types(init: Path) -> dict[str, tuple[str, str]]:
    match = re.search(r'resource_modules="""(.*?)"""', init.read_text(), re.S)
    return {token: (module["fqn"], cls)
            for module in json.loads(match.group(1)) for token, cls in module["classes"].items()}


@lru_cache(maxsize=None)
def output_names(type_token: str) -> tuple[str, ...]:
    """The engine names of every output property of a resource type."""
    if type_token.startswith("kubernetes:") and type_token not in _type_registry():
        return ("metadata", "spec", "status")  # a custom resource
    entry = _type_registry().get(type_token)
    if entry is None:
        return ()
    cls = getattr(importlib.import_module(entry[0]), entry[1])
    names = []
    for klass in cls.__mro__:
        for attr in vars(klass).values():
            pulumi_name = getattr(getattr(attr, "fget", None), "_pulumi_name", None)
            if pulumi_name:
                names.append(pulumi_name)
    return tuple(dict.fromkeys(names))


# Outputs a program reads into (not only passes on): a placeholder of their shape, leaves named by their path.
_NESTED_OUTPUTS: Mapping[str, Callable[[str], dict[str, Any]]] = {
    "aws:eks/nodeGroup:NodeGroup": lambda name: {"resources": [{"autoscalingGroups": [
        {"name": f"<{name}.resources[0].autoscalingGroups[0].name>"}]}]},
}


def _placeholders(name: str, type_token: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    state = {**(_NESTED_OUTPUTS[type_token](name) if type_token in _NESTED_OUTPUTS else {}), **inputs}
    for output in output_names(type_token):
        if output not in state and output not in ("status",):
            state[output] = f"<{name}.{output}>"
    if type_token.startswith("kubernetes:") and "metadata" in state and isinstance(state["metadata"], dict):
        state["metadata"] = {**state["metadata"], "uid": f"<{name}.uid>"}
    return state


@dataclass
class Registration:
    type: str
    name: str
    urn: str
    parent: str | None
    depends_on: list[str]
    inputs: dict[str, Any]
    custom: bool
    protect: bool
    retain_on_delete: bool
    provider: str | None
    options: dict[str, Any] = field(default_factory=dict)  # delete-before-replace, replace-on-changes, timeouts


def _make_mocks():
    import pulumi
    from pulumi.runtime import rpc
    from pulumi.runtime.mocks import MockMonitor

    class PlanMocks(pulumi.runtime.Mocks):
        def new_resource(self, args: pulumi.runtime.MockResourceArgs):
            return f"<{args.name}.id>", _placeholders(args.name, args.typ, args.inputs)

        def call(self, args: pulumi.runtime.MockCallArgs):
            raise NotImplementedError(f"the program called {args.token}, which needs a cloud; a plan must not")

    class RecordingMonitor(MockMonitor):
        def __init__(self, mocks):
            super().__init__(mocks)
            self.registrations: list[Registration] = []

        def RegisterResource(self, request):
            response = super().RegisterResource(request)
            inputs = rpc.deserialize_properties(request.object, keep_unknowns=True)
            # The SDK collects dependencies in a set of URNs (pulumi/runtime/resource.py, pulumi 3.272:
            # `dependencies: set[str]`), and propertyDependencies is a protobuf map: both iterate in an order
            # that changes from process to process (string hashing is seeded per process). Sorted, the plan
            # and the graph are the same on every run.
            dependencies = {*request.dependencies, *(u for deps in request.propertyDependencies.values() for u in deps.urns)}
            self.registrations.append(Registration(
                type=request.type, name=request.name, urn=response.urn, parent=request.parent or None,
                depends_on=sorted(dependencies),
                inputs=_readable(inputs), custom=bool(request.custom), protect=bool(request.protect),
                retain_on_delete=bool(request.retainOnDelete), provider=request.provider or None,
                options=_options(request)))
            return response

    return PlanMocks, RecordingMonitor


def _options(request) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if request.deleteBeforeReplace:
        options["deleteBeforeReplace"] = True
    if list(request.replaceOnChanges):
        options["replaceOnChanges"] = list(request.replaceOnChanges)
    if list(request.ignoreChanges):
        options["ignoreChanges"] = list(request.ignoreChanges)
    timeouts = {k: getattr(request.customTimeouts, k) for k in ("create", "update", "delete")
                if request.HasField("customTimeouts") and getattr(request.customTimeouts, k)}
    if timeouts:
        options["customTimeouts"] = timeouts
    return options


def _readable(value: Any) -> Any:
    """Secrets become a placeholder (never plain text in a plan file); unknowns a readable marker; mappings
    sorted by key. Inputs reach the monitor as a protobuf Struct, a map whose iteration order is undefined
    (https://protobuf.dev/programming-guides/proto3/#maps) and with the upb backend differs from process to
    process: the program's own key order is already lost, and sorting is the one order every run agrees on."""
    if isinstance(value, dict):
        if value.get(_SIG_KEY) == _SECRET_SIG:
            return SECRET
        return {k: _readable(value[k]) for k in sorted(value) if k != _SIG_KEY}
    if isinstance(value, list):
        return [_readable(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)  # the wire format has only floats; the providers read these as integers
    if value == _UNKNOWN:
        return "<unknown until deploy>"
    return value


# --------------------------------------------------------------------------------------------------
# Running the program


@dataclass
class Synth:
    project: str
    stack: str
    registrations: list[Registration]
    outputs: dict[str, Any]
    sizing: dict[str, Any] = field(default_factory=dict)
    triton: dict[str, str] = field(default_factory=dict)  # the model repository configuration conversion writes
    by_urn: dict[str, Registration] = field(default_factory=dict)

    def __post_init__(self):
        self.by_urn = {r.urn: r for r in self.registrations}

    def name_of(self, urn: str | None) -> str | None:
        if urn is None:
            return None
        registration = self.by_urn.get(urn)
        return registration.name if registration else urn.rsplit("::", 1)[-1]

    def resources(self, type_token: str | None = None, predicate: Callable[[Registration], bool] | None = None) -> list[Registration]:
        return [r for r in self.registrations
                if (type_token is None or r.type == type_token) and (predicate is None or predicate(r))]

    def one(self, type_token: str, name: str) -> Registration:
        matches = [r for r in self.registrations if r.type == type_token and r.name == name]
        if len(matches) != 1:
            raise KeyError(f"{len(matches)} resources of type {type_token} named {name}")
        return matches[0]

    def plan(self) -> dict[str, Any]:
        return {
            "project": self.project,
            "stack": self.stack,
            "resources": [{
                "type": r.type, "name": r.name, "parent": self.name_of(r.parent),
                "dependsOn": sorted({self.name_of(u) for u in r.depends_on}),
                **({"protect": True} if r.protect else {}),
                **({"retainOnDelete": True} if r.retain_on_delete else {}),
                **({"options": r.options} if r.options else {}),
                "inputs": r.inputs,
            } for r in self.registrations],
            "outputs": self.outputs,
        }

    def manifests(self) -> list[dict[str, Any]]:
        """Every Kubernetes object the stack declares, as it would be sent to the cluster."""
        objects = self.declared_manifests()
        for file in self.vendored_files():
            # Copies: a caller may change what it gets without changing the next caller's objects.
            objects.extend(copy.deepcopy(_vendored_documents(file)))
        return objects

    def declared_manifests(self) -> list[dict[str, Any]]:
        """The Kubernetes objects the program declares one by one."""
        objects = []
        for r in self.registrations:
            if not r.custom or not r.type.startswith("kubernetes:") or r.type.startswith(_NOT_MANIFESTS):
                continue
            first = {k: r.inputs[k] for k in ("apiVersion", "kind", "metadata") if k in r.inputs}
            objects.append({**first, **{k: v for k, v in r.inputs.items() if k not in first and k != "status"}})
        return objects

    def vendored_files(self) -> list[str]:
        """Vendored manifests applied through yaml.v2.ConfigFile: the component's children are rendered by the
        provider at deploy time, from exactly these files."""
        return [r.inputs["file"] for r in self.resources("kubernetes:yaml/v2:ConfigFile")]

    def rendered_manifests(self) -> list[tuple[dict[str, Any], str]]:
        """``manifests()`` as the plan writes them: each one's head (``manifest_filename``) and its YAML."""
        rendered = [(_manifest_head(obj), dump_yaml(obj)) for obj in self.declared_manifests()]
        for file in self.vendored_files():
            rendered.extend(rendered_vendored(file))
        return rendered

    def helm_releases(self) -> list[dict[str, Any]]:
        return [r.inputs for r in self.resources("kubernetes:helm.sh/v3:Release")]


def install_mocks(stack: str, config: Mapping[str, str], secret_keys: list[str] | None = None):
    """Point the Pulumi runtime of this process at a fresh recording mock monitor; return the monitor."""
    import pulumi
    from pulumi.runtime import settings

    PlanMocks, RecordingMonitor = _make_mocks()
    mocks = PlanMocks()
    monitor = RecordingMonitor(mocks)
    settings.ROOT.set(None)  # a fresh root stack resource for every run in this process
    pulumi.runtime.set_all_config(dict(config), secret_keys or [])
    pulumi.runtime.set_mocks(mocks, project=PROJECT, stack=stack, preview=False, monitor=monitor)
    return monitor


def run_in_runtime(fn: Callable[[], Awaitable[None] | None]) -> None:
    """Run ``fn`` (a function or a coroutine function) as a Pulumi program and wait for every registration and
    output it started."""
    from pulumi.runtime.stack import run_pulumi_func
    from pulumi.runtime.sync_await import _sync_await

    _sync_await(run_pulumi_func(fn))


def synthesize(stack: str, config: Mapping[str, str] | None = None, secret_keys: list[str] | None = None) -> Synth:
    """Run the program for ``stack`` (its stack file, or ``config`` given as raw key -> string values)."""
    import pulumi

    from infra import config as stack_config
    from infra import program

    if config is None:
        config, secret_keys = read_stack_config(stack)
    # Validation first, exactly as __main__ does: a bad config declares nothing.
    cfg = stack_config.load(config, stack, PROJECT, secret_keys or [])
    monitor = install_mocks(stack, config, secret_keys)
    outputs: dict[str, Any] = {}

    # A coroutine, awaited by the runtime's own event loop. Waiting on each output with the SDK's
    # ``_sync_await`` from inside the running program pumps the loop re-entrantly and, when it returns, pads the
    # loop's ready queue back to its old length with a cancelled handle per callback it ran
    # (pulumi/runtime/sync_await.py, pulumi 3.272): some 70,000 no-op handles for the largest stack, 40-60 ms
    # of the 0.4 s the program takes to run here once its modules are loaded.
    async def run() -> None:
        for key, value in program.build(cfg).items():
            output = pulumi.Output.from_input(value)
            secret = await output.is_secret()
            outputs[key] = SECRET if secret else _readable(await output.future(with_unknowns=True))

    run_in_runtime(run)
    # Registration order follows when inputs resolve; sorted by URN the plan is the same on every run.
    registrations = sorted(monitor.registrations, key=lambda r: (r.type != "pulumi:pulumi:Stack", r.urn))
    return Synth(PROJECT, stack, registrations, outputs, cfg.sizing.to_dict(), model_repository(cfg))


def model_repository(cfg) -> dict[str, str]:
    """Every config.pbtxt (engine backend) or model.yaml (llmapi) the stack's conversion Job will write."""
    from workloads import runconfig
    from workloads.entrypoints import triton_repo

    return triton_repo.model_repository_files(runconfig.run_document(cfg)) if cfg.pipeline.enabled else {}


# --------------------------------------------------------------------------------------------------
# Writing the plan


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def manifest_filename(index: int, obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    parts = [f"{index:03d}", obj.get("kind", "Object"), meta.get("namespace", ""), meta.get("name", "")]
    return _slug("-".join(p for p in parts if p)) + ".yaml"


def mermaid(synth: Synth) -> str:
    ids = {r.urn: f"r{i}" for i, r in enumerate(synth.registrations)}
    lines = ["graph LR"]
    for r in synth.registrations:
        short_type = r.type.split(":")[-1]
        lines.append(f'  {ids[r.urn]}["{r.name}<br/><small>{short_type}</small>"]')
    for r in synth.registrations:
        if r.parent in ids:
            lines.append(f"  {ids[r.parent]} -.-> {ids[r.urn]}")
        for dep in r.depends_on:
            if dep in ids and dep != r.parent:
                lines.append(f"  {ids[dep]} --> {ids[r.urn]}")
    return "\n".join(lines) + "\n"


def write(synth: Synth, out: Path) -> Path:
    target = out / synth.stack
    manifests_dir, helm_dir = target / "manifests", target / "helm"
    for directory in (manifests_dir, helm_dir):
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("*.yaml"):
            old.unlink()
    (target / "plan.json").write_text(json.dumps(synth.plan(), indent=2, sort_keys=False) + "\n")
    (target / "sizing.json").write_text(json.dumps(synth.sizing, indent=2) + "\n")
    for index, (head, text) in enumerate(synth.rendered_manifests()):
        (manifests_dir / manifest_filename(index, head)).write_text(text)
    for release in synth.helm_releases():
        (helm_dir / f"{_slug(release.get('name', 'release'))}.yaml").write_text(dump_yaml(release))
    triton_dir = target / "triton"
    if triton_dir.exists():
        shutil.rmtree(triton_dir)
    for relative, text in synth.triton.items():
        path = triton_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (target / "graph.mmd").write_text(mermaid(synth))
    return target


def summary(synth: Synth) -> str:
    """Resources per top-level component and type, like the tree `pulumi preview` prints."""
    def top(r: Registration) -> str:
        parent = synth.by_urn.get(r.parent) if r.parent else None
        return f"{r.name} ({r.type})" if parent is None or parent.type == "pulumi:pulumi:Stack" else top(parent)

    groups: dict[str, Counter] = defaultdict(Counter)
    for r in synth.registrations:
        groups[top(r)][r.type] += 1
    lines = [f"Plan for {synth.project}/{synth.stack}: {len(synth.registrations)} resources"]
    for component, counts in groups.items():
        lines.append(f"  + {component}: {sum(counts.values())}")
        for type_token, count in sorted(counts.items()):
            lines.append(f"      {count:3d} x {type_token}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.synth", description=__doc__.split("\n")[0])
    parser.add_argument("stack", help="stack name (stacks/Pulumi.<stack>.yaml) or the path of a stack file")
    parser.add_argument("--out", type=Path, default=ROOT / "build", help="output directory (default: build)")
    args = parser.parse_args(argv)
    try:
        name, _ = stack_file(args.stack)
        raw, secret_keys = read_stack_config(args.stack)
        synth = synthesize(name, raw, secret_keys)
    except (stack_config.ConfigError, StackFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    target = write(synth, args.out)
    # Counted from what was written: building the manifests again would copy the vendored ones again.
    manifest_count = sum(1 for _ in (target / "manifests").glob("*.yaml"))
    print(summary(synth))
    print(f"\nWrote {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}/: plan.json, sizing.json, "
          f"{manifest_count} manifests, {len(synth.helm_releases())} Helm releases, "
          f"{len(synth.triton)} model repository files, graph.mmd")
    return 0


def run_cli() -> int:
    """``main`` as the short-lived process ``make plan`` starts. Loading the SDKs creates some 270,000 objects
    that live until exit, and the cyclic garbage collector walks all of them again and again: its full passes
    during the run and the one at exit took half of the plan's time (measured with ``gc.callbacks``; peak
    memory is the same without them). Reference counting still frees everything that is not in a cycle;
    ``gc.freeze`` keeps the exit from walking what the process is about to hand back to the system
    (https://docs.python.org/3/library/gc.html#gc.freeze). The SDKs load only the resource modules the program
    uses, with the annotations only type checkers read left as text (``tools/sdk_modules.py``)."""
    gc.disable()
    sdk_modules.install()
    try:
        return main()
    finally:
        gc.freeze()


if __name__ == "__main__":
    sys.exit(run_cli())
