"""The files `make plan` writes: the same bytes on every run and in every process, readable in a diff."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pulumi_aws
import yaml

from tests.conftest import synth_stack
from tools import sdk_modules, synth

# The largest stack: monitoring, the whole pipeline, the vendored operator, a Triton model repository.
STACK = "prod-405b"


def plan_in_a_new_process(out: Path, hash_seed: str) -> dict[str, bytes]:
    """`make plan` as a user runs it, with its own string-hash seed (set and dict-of-set order follow it)."""
    subprocess.run([sys.executable, "-m", "tools.synth", STACK, "--out", str(out)], cwd=synth.ROOT, check=True,
                   capture_output=True, env={**os.environ, "PYTHONHASHSEED": hash_seed})
    target = out / STACK
    return {str(path.relative_to(target)): path.read_bytes() for path in sorted(target.rglob("*")) if path.is_file()}


def test_two_plans_write_the_same_bytes(tmp_path):
    first = plan_in_a_new_process(tmp_path / "first", "1")
    second = plan_in_a_new_process(tmp_path / "second", "2")
    folders = {name.split("/", 1)[0] for name in first if "/" in name}
    assert {"plan.json", "sizing.json", "graph.mmd"} <= set(first) and folders == {"manifests", "helm", "triton"}
    assert sorted(first) == sorted(second)
    assert [name for name in first if first[name] != second[name]] == []


def test_the_cli_writes_what_the_sdks_loaded_as_written_give(tmp_path):
    """`make plan` loads only the resource modules the program uses (tools/sdk_modules.py); this process loads
    the SDKs as they are. Same plan, byte for byte."""
    assert not isinstance(pulumi_aws.ec2, sdk_modules._ServicePackage)
    cli = plan_in_a_new_process(tmp_path / "cli", "1")
    target = synth.write(synth_stack(STACK), tmp_path / "here")
    here = {str(path.relative_to(target)): path.read_bytes() for path in sorted(target.rglob("*")) if path.is_file()}
    assert sorted(cli) == sorted(here)
    assert [name for name in cli if cli[name] != here[name]] == []


def test_yaml_files_are_the_same_without_libyaml():
    """A machine whose PyYAML lacks libyaml writes what the pure-Python emitter writes: the same bytes."""

    class PurePythonDumper(yaml.SafeDumper):
        pass

    PurePythonDumper.add_representer(str, synth._represent_str)
    s = synth_stack(STACK)
    for obj in [*s.manifests(), *s.helm_releases()]:
        written = synth.dump_yaml(obj)
        assert written == yaml.dump(obj, Dumper=PurePythonDumper, sort_keys=False, width=synth._NO_FOLDING)
        assert yaml.safe_load(written) == obj


def test_scripts_are_written_line_by_line():
    """A changed line of an entrypoint script is one changed line in a diff of the plan."""
    [entrypoints] = [m for m in synth_stack(STACK).manifests() if m["metadata"]["name"] == "nemo-eks-entrypoints"]
    script = entrypoints["data"]["build_engine.py"]
    written = synth.dump_yaml(entrypoints)
    assert "  build_engine.py: |\n" in written
    assert "\n    from __future__ import annotations\n" in written and "from __future__ import annotations" in script


def test_vendored_manifests_are_copies_for_each_caller():
    s = synth_stack(STACK)
    first = s.manifests()
    [crd] = [m for m in first if m["kind"] == "CustomResourceDefinition"]
    crd["spec"]["versions"].clear()
    [again] = [m for m in s.manifests() if m["kind"] == "CustomResourceDefinition"]
    assert again["spec"]["versions"]


def test_graph_edges_in_one_order():
    graph = synth.mermaid(synth_stack(STACK)).splitlines()
    ids = {r.urn: f"r{i}" for i, r in enumerate(synth_stack(STACK).registrations)}
    order = {node_id: index for index, node_id in enumerate(ids.values())}
    edges = [line.split(" --> ") for line in graph if " --> " in line]
    assert edges
    # Grouped by the dependent resource, in the plan's order; each group's dependencies in the plan's order.
    keys = [(order[target.strip()], order[source.strip()]) for source, target in edges]
    assert keys == sorted(keys)


def test_vendored_manifests_are_written_from_the_cache_as_they_would_be_rendered(tmp_path, monkeypatch):
    """The rendered operator manifests a plan keeps in build/.cache are what rendering them gives, from a cold
    cache and from a warm one, and a warm cache is read without parsing the file."""
    monkeypatch.setattr(synth, "CACHE_DIR", tmp_path)
    s = synth_stack(STACK)
    expected = [(synth._manifest_head(obj), synth.dump_yaml(obj)) for obj in s.manifests()]
    assert s.vendored_files() and len(expected) > len(s.declared_manifests())
    filenames = [synth.manifest_filename(i, obj) for i, obj in enumerate(s.manifests())]
    assert s.rendered_manifests() == expected  # cold: rendered and stored
    assert len(list(tmp_path.glob("*.json"))) == len(s.vendored_files())

    def no_parsing(path):
        raise AssertionError(f"{path} parsed again")

    monkeypatch.setattr(synth, "_vendored_documents", no_parsing)
    assert s.rendered_manifests() == expected  # warm
    assert [synth.manifest_filename(i, head) for i, (head, _) in enumerate(expected)] == filenames


def test_a_changed_vendored_file_is_rendered_again(tmp_path, monkeypatch):
    (tmp_path / "vendor").mkdir()
    manifest = tmp_path / "vendor" / "operator.yaml"
    manifest.write_text("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: first\n")
    monkeypatch.setattr(synth, "ROOT", tmp_path)
    monkeypatch.setattr(synth, "CACHE_DIR", tmp_path / "cache")
    [(head, text)] = synth.rendered_vendored("vendor/operator.yaml")
    assert head == {"kind": "Namespace", "metadata": {"name": "first"}} and "name: first" in text
    synth._vendored_documents.cache_clear()
    manifest.write_text("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: second\n")
    [(head, text)] = synth.rendered_vendored("vendor/operator.yaml")
    assert head["metadata"]["name"] == "second" and "name: second" in text
    assert len(list((tmp_path / "cache").glob("operator.yaml.*.json"))) == 2
    synth._vendored_documents.cache_clear()
