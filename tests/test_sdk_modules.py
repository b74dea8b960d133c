"""tools/sdk_modules.py: a service package loaded lazily binds each name to what its own __init__.py binds; a module
compiled with its annotations as text gives the runtime the same types."""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
import typing
from pathlib import Path
from typing import Optional

import pytest

from tools import sdk_modules, synth


def write_package(root: Path, init: str, modules: dict[str, str]) -> Path:
    package = root / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text(init)
    for name, text in modules.items():
        (package / f"{name}.py").write_text(text)
    return package


def test_a_later_import_star_wins(tmp_path):
    package = write_package(tmp_path, (
        "# generated\nimport builtins as _builtins\nfrom .. import _utilities\nimport typing\n"
        "from .old import *\nfrom .new import *\nfrom . import outputs\n"), {
        "old": "import x\n__all__ = ['Bucket', 'OldArgs']\n",
        "new": "__all__ = [\n    'Bucket',\n    'NewArgs',\n]\n\nclass Bucket: ...\n",
        "outputs": "__all__ = ['Out']\n",
    })
    assert sdk_modules.exports(package) == {"Bucket": "new", "OldArgs": "old", "NewArgs": "new", "outputs": None}


def test_a_module_without_all_exports_the_public_names_of_its_top_level(tmp_path):
    """What ``import *`` binds from a module without ``__all__``: every public name (pulumi_kubernetes
    helm/v3/helm.py imports, then defines its classes)."""
    module = ('"""Doc."""\nimport json\nimport pulumi.runtime\nfrom typing import Any, Optional as Opt\n'
              'from .x import _private, shared\n\nclass Chart: ...\n\ndef _parse(): ...\n\nVERSION = "1"\n')
    package = write_package(tmp_path, "from .a import *\n", {"a": module})
    public = ["json", "pulumi", "Any", "Opt", "shared", "Chart", "VERSION"]
    assert sdk_modules.exports(package) == dict.fromkeys(public, "a")


def test_an_api_group_binds_its_lazily_imported_versions(tmp_path):
    init = ("import builtins as _builtins\nfrom .. import _utilities\nimport typing\n\n"
            "if typing.TYPE_CHECKING:\n    import pkg.v1 as __v1\n    v1 = __v1\n"
            "else:\n    v1 = _utilities.lazy_import('pkg.v1')\n")
    package = write_package(tmp_path, init, {})
    (package / "v1").mkdir()
    (package / "v1" / "__init__.py").write_text("")
    assert sdk_modules.exports(package) == {"v1": None}


@pytest.mark.parametrize("init, module", [
    ("from .a import *\nFOO = 1\n", "__all__ = ['A']\n"),  # a statement other than the imports
    ("from .a import *\n", "import json\n\nif json:\n    class A: ...\n"),  # a top level that decides at runtime
    ("from .a import *\n", "from json import *\n"),  # a star import of its own
    ("from .a import A\n", "__all__ = ['A']\n"),  # a named import: not what generated packages do
    ("if typing.TYPE_CHECKING:\n    pass\nelse:\n    v1 = make('pkg.v1')\n", ""),  # not lazy_import
])
def test_a_package_that_is_not_only_imports_loads_as_written(tmp_path, init, module):
    assert sdk_modules.exports(write_package(tmp_path, init, {"a": module})) is None


@pytest.mark.parametrize("package, at_least", [
    ("pulumi_aws.s3", 100), ("pulumi_kubernetes.core.v1", 100), ("pulumi_kubernetes.helm.v3", 10),
    ("pulumi_kubernetes.yaml", 3), ("pulumi_kubernetes.core", 1),
])
def test_the_index_names_what_the_sdk_binds(package, at_least):
    """Against the package as the SDK loads it (this process never installs the finder): every exported name is
    the object the index points at. pulumi_aws.s3 keeps deprecated aliases under the names of other modules'
    classes; pulumi_kubernetes names its modules after their classes."""
    loaded = importlib.import_module(package)
    assert not isinstance(loaded, sdk_modules._ServicePackage)
    index = sdk_modules.exports(Path(loaded.__file__).parent)
    assert index and len(index) >= at_least
    for name, module in index.items():
        expected = importlib.import_module(f"{package}.{module or name}")
        assert getattr(loaded, name) is (expected if module is None else getattr(expected, name)), name
    # And nothing the SDK binds is missing from it, but the modules that importing binds by their own names.
    bound = {n for n, v in vars(loaded).items() if not n.startswith("_") and not isinstance(v, type(sys))}
    assert bound <= set(index)


PROBE = """
import json, sys
from tools import sdk_modules
sdk_modules.install()
import pulumi_aws, pulumi_kubernetes
import pulumi_kubernetes.core.v1.Namespace
k8s = pulumi_kubernetes
print(json.dumps({
    "vpc": pulumi_aws.ec2.Vpc.__module__,
    "ec2": type(pulumi_aws.ec2).__name__,  # once used: the SDK's own lazy module loads it on first use
    "unused": "pulumi_aws.ec2.ami" in sys.modules,
    "namespace": isinstance(k8s.core.v1.Namespace, type),
    "release": isinstance(k8s.helm.v3.Release, type),
    "helm": type(k8s.helm.v3).__name__,
    "outputs": type(pulumi_aws.ec2.outputs).__name__,
    "module": pulumi_aws.ec2.vpc.__name__,
    "config_file": isinstance(k8s.yaml.v2.ConfigFile, type),
    # helm.py and yaml/yaml.py (the v3 Chart and v1 ConfigFile components) import requests; the program uses neither.
    "requests": "requests" in sys.modules,
}))
"""


def test_a_process_with_the_finder_loads_only_what_it_uses():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=synth.ROOT, check=True, capture_output=True, text=True)
    assert json.loads(result.stdout) == {
        "vpc": "pulumi_aws.ec2.vpc",
        "ec2": "_ServicePackage",
        "unused": False,
        # Importing the module Namespace binds it on core.v1 by its name: the class stays what the name means.
        "namespace": True,
        "release": True,
        # helm/v3/__init__.py imports helm.py, which has no __all__: its public names are read from its source.
        "helm": "_ServicePackage",
        "outputs": "module",
        "module": "pulumi_aws.ec2.vpc",
        "config_file": True,
        "requests": False,
    }


def test_the_plan_cli_installs_the_finder_before_the_sdks_load():
    """run_cli installs it after tools.synth is imported: were an SDK imported by then, its service packages
    would already have the path finder's loader, and the plan would load every module again (same bytes, slower)."""
    probe = "import sys, tools.synth; print(sorted(m for m in sys.modules if m.startswith(('pulumi_aws', 'pulumi_k'))))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=synth.ROOT, check=True, capture_output=True, text=True)
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------------
# Annotations as text

TYPED = '''
from typing import Optional, TypedDict

class BucketArgsDict(TypedDict):
    name: Optional[str]
    """The bucket's name."""

class EmptyDict(TypedDict):
    size: int

def make(name: Optional[str] = None) -> Optional[str]:
    return name
'''


def test_a_module_compiled_for_the_plan_keeps_its_annotations_as_text():
    namespace: dict = {}
    exec(sdk_modules.compile_module(TYPED.encode(), "typed.py"), namespace)
    assert namespace["make"].__annotations__ == {"name": "Optional[str]", "return": "Optional[str]"}
    assert typing.get_type_hints(namespace["make"], namespace) == {"name": Optional[str], "return": Optional[str]}
    # TypedDict twins keep their docstrings and lose the field annotations only type checkers read.
    assert typing.is_typeddict(namespace["BucketArgsDict"]) and namespace["BucketArgsDict"].__annotations__ == {}
    assert typing.is_typeddict(namespace["EmptyDict"]) and namespace["EmptyDict"].__annotations__ == {}


def test_the_compiled_code_is_cached_and_compiled_again_when_the_source_changes(tmp_path, monkeypatch):
    source = tmp_path / "typed.py"
    source.write_text(TYPED)
    compiled: list[str] = []
    real_compile = sdk_modules.compile_module
    monkeypatch.setattr(sdk_modules, "compile_module",
                        lambda data, path: compiled.append(path) or real_compile(data, path))

    def load() -> dict:
        loader = sdk_modules._AnnotationsAsTextLoader("typed", str(source))
        namespace: dict = {}
        exec(loader.get_code("typed"), namespace)
        return namespace

    assert load()["make"]("a") == "a" and len(compiled) == 1
    cache = Path(importlib.util.cache_from_source(str(source), optimization=sdk_modules.CACHE_TAG))
    assert cache.is_file() and cache.name == f"typed.{sys.implementation.cache_tag}.opt-{sdk_modules.CACHE_TAG}.pyc"
    assert "make" in load() and len(compiled) == 1  # from the cache
    source.write_text(TYPED + "\nEXTRA = 1\n")
    assert load()["EXTRA"] == 1 and len(compiled) == 2


TYPES_PROBE = """
import importlib, json, sys
if sys.argv[1] == "plan":
    from tools import sdk_modules
    sdk_modules.install()
import pulumi
from pulumi import _types
result = {}
for name in sys.argv[2:]:
    module = importlib.import_module(name)
    for attr in sorted(getattr(module, "__all__", None) or dir(module)):
        cls = getattr(module, attr)
        if not isinstance(cls, type):
            continue
        if _types.is_input_type(cls):
            result[f"{name}.{attr}"] = repr(_types.input_type_types(cls))
        elif _types.is_output_type(cls):
            result[f"{name}.{attr}"] = repr(_types.output_type_types(cls))
        elif issubclass(cls, pulumi.Resource):
            result[f"{name}.{attr}"] = repr(_types.resource_types(cls))
print(json.dumps(result, sort_keys=True))
"""


def test_the_runtime_reads_the_same_types_from_a_module_compiled_for_the_plan():
    """What the runtime evaluates to serialise inputs and translate outputs, for every input, output and resource
    class of the modules the programs uses most, in a process that loads the SDKs as written and in one that loads
    them as the plan does."""
    modules = ["pulumi_aws.ec2._inputs", "pulumi_aws.ec2.outputs", "pulumi_aws.ec2.vpc", "pulumi_aws.ec2.subnet",
               "pulumi_kubernetes.core.v1._inputs", "pulumi_kubernetes.core.v1.outputs",
               "pulumi_kubernetes.apps.v1.Deployment", "pulumi_eks._inputs", "pulumi_eks.cluster"]

    def types_in(mode: str) -> dict[str, str]:
        result = subprocess.run([sys.executable, "-c", TYPES_PROBE, mode, *modules], cwd=synth.ROOT, check=True,
                                capture_output=True, text=True)
        return json.loads(result.stdout)

    as_written, for_the_plan = types_in("as-written"), types_in("plan")
    assert len(as_written) > 1000
    assert [name for name in as_written if as_written[name] != for_the_plan.get(name)] == []


def test_a_cache_that_cannot_be_written_still_gives_the_value(tmp_path, monkeypatch):
    """A read-only install: built on every run, the same value."""
    def refuse(*args):
        raise PermissionError("read-only")

    monkeypatch.setattr(sdk_modules.os, "replace", refuse)
    source = tmp_path / "module.py"
    source.write_text("X = 1\n")
    builds: list[int] = []
    build = lambda: (builds.append(1) or {"X": 1}, [str(source)])  # noqa: E731
    cache = str(tmp_path / "__pycache__" / "module.opt.pyc")
    assert sdk_modules.cached(cache, build) == {"X": 1} and sdk_modules.cached(cache, build) == {"X": 1}
    assert len(builds) == 2 and not (tmp_path / "__pycache__" / "module.opt.pyc").exists()
    assert not list((tmp_path / "__pycache__").glob("*.tmp"))
