"""tools/sdk_modules.py: a service package loaded lazily binds each name to what its own __init__.py binds."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.parametrize("init, module", [
    ("from .a import *\nFOO = 1\n", "__all__ = ['A']\n"),  # a statement other than the imports
    ("from .a import *\n", "import json\n\nclass A: ...\n"),  # no __all__: import * would bind every public name
])
def test_a_package_that_is_not_only_imports_loads_as_written(tmp_path, init, module):
    assert sdk_modules.exports(write_package(tmp_path, init, {"a": module})) is None


@pytest.mark.parametrize("package", ["pulumi_aws.s3", "pulumi_kubernetes.core.v1"])
def test_the_index_names_what_the_sdk_binds(package):
    """Against the package as the SDK loads it (this process never installs the finder): every exported name is
    the object the index points at. pulumi_aws.s3 keeps deprecated aliases under the names of other modules'
    classes; pulumi_kubernetes names its modules after their classes."""
    loaded = importlib.import_module(package)
    assert not isinstance(loaded, sdk_modules._ServicePackage)
    index = sdk_modules.exports(Path(loaded.__file__).parent)
    assert index and len(index) > 100
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
        # helm/v3/__init__.py imports helm.py, which has no __all__: the package loads as written.
        "release": True,
        "helm": "module",
        "outputs": "module",
        "module": "pulumi_aws.ec2.vpc",
    }


def test_the_plan_cli_installs_the_finder_before_the_sdks_load():
    """run_cli installs it after tools.synth is imported: were an SDK imported by then, its service packages
    would already have the path finder's loader, and the plan would load every module again (same bytes, slower)."""
    probe = "import sys, tools.synth; print(sorted(m for m in sys.modules if m.startswith(('pulumi_aws', 'pulumi_k'))))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=synth.ROOT, check=True, capture_output=True, text=True)
    assert result.stdout.strip() == "[]"
