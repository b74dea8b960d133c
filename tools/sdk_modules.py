"""Load a provider SDK's resource modules when the program first uses them, not a whole service at once.

The provider SDKs load a service lazily (``pulumi_aws/__init__.py``: ``ec2 = _utilities.lazy_import(...)``), but
the service's own ``__init__.py`` then imports every module it has (``from .vpc import *``, one line per
resource, then ``from ._inputs import *`` and ``from . import outputs``). The program (with pulumi_eks) uses 17
of the 183 modules of ``pulumi_aws.ec2``; Python cannot import ``pulumi_aws.ec2.vpc`` without running that
``__init__.py`` first, so loading the rest took a fifth of ``make plan STACK=prod-405b`` (2.4 s -> 1.85 s, median
of 6 on the 2-core machine).

``install()`` puts a finder in front of the path finder for the service packages of ``pulumi_aws`` and
``pulumi_kubernetes`` whose ``__init__.py`` is nothing but those imports. Such a package gets a module-level
``__getattr__`` (PEP 562) instead: the first use of a name imports the one module that exports it, as the
``__all__`` of that module declares, later lines of ``__init__.py`` winning as they do with ``import *``. The
classes, their modules and what a resource registers are the SDK's own; only the unused modules are never run.
A package whose ``__init__.py`` holds anything else, or imports a module without ``__all__`` (``import *`` would
bind every public name it has), loads as the SDK wrote it: of those the program uses, ``pulumi_kubernetes.helm.v3``
(its ``helm.py``) and the packages of API versions (``pulumi_kubernetes.core``, already lazy).

Only ``python -m tools.synth`` installs it: ``pulumi up`` and the tests' own processes load the SDKs as they are,
and tests/test_plan_output.py compares the plan written each way byte for byte.
"""

from __future__ import annotations

import ast
import importlib
import importlib.abc
import importlib.machinery
import re
import sys
import types
from pathlib import Path
from typing import Any

PACKAGES = ("pulumi_aws", "pulumi_kubernetes")

# The statements a generated service __init__.py is made of (pulumi-language-python's and pulumigen's output,
# e.g. pulumi_aws 7.51.1 ec2/__init__.py, pulumi_kubernetes 4.34.2 core/v1/__init__.py).
_HEADER = re.compile(r"import builtins as _builtins|import typing|from \.+ import _utilities")
_STAR = re.compile(r"from \.(\w+) import \*")
_SUBMODULE = re.compile(r"from \. import (\w+)")


def exports(package_dir: Path) -> dict[str, str | None] | None:
    """Name -> the module of ``package_dir`` that exports it (``None``: the name is a submodule), as the package's
    ``__init__.py`` would bind them; ``None`` if that file holds any other statement."""
    names: dict[str, str | None] = {}
    for line in (package_dir / "__init__.py").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or _HEADER.fullmatch(line):
            continue
        if star := _STAR.fullmatch(line):
            module_names = _declared_all(package_dir / f"{star.group(1)}.py")
            if module_names is None:
                return None
            names.update(dict.fromkeys(module_names, star.group(1)))
        elif submodule := _SUBMODULE.fullmatch(line):
            names[submodule.group(1)] = None
        else:
            return None
    return names


def _declared_all(path: Path) -> list[str] | None:
    """The literal ``__all__ = [...]`` of a generated module (near its top), read without running the module."""
    if not path.is_file():
        return None
    lines: list[str] = []
    with path.open(encoding="utf-8") as stream:
        for line in stream:
            if lines or line.startswith("__all__ = ["):
                lines.append(line)
                if line.rstrip().endswith("]"):
                    break
            elif line.startswith(("class ", "def ", "@")):
                return None  # past the header: no __all__
    try:
        declared = ast.literal_eval("".join(lines).partition("=")[2].strip()) if lines else None
    except (SyntaxError, ValueError):
        return None
    return declared if isinstance(declared, list) and all(isinstance(n, str) for n in declared) else None


def _is_submodule(package_dir: Path, name: str) -> bool:
    return (package_dir / f"{name}.py").is_file() or (package_dir / name / "__init__.py").is_file()


class _ServicePackage(types.ModuleType):
    """A service package whose exported names are bound on first use."""

    def __getattr__(self, name: str) -> Any:
        # Called only for a name not bound yet (module attribute lookup falls back to it, as in PEP 562).
        exports = self._exports()
        if name in exports:
            module = exports[name]
        elif not name.startswith("__") and _is_submodule(Path(self.__path__[0]), name):
            module = None  # a module no line of __init__.py names (bound there once some module imported it)
        else:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        submodule = importlib.import_module(f"{self.__name__}.{module or name}")
        value = submodule if module is None else getattr(submodule, name)
        types.ModuleType.__setattr__(self, name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        # Importing a submodule binds it on its package under its own name; where __init__.py's ``import *``
        # lines bind an exported object to that name, the object wins, as it does there. pulumi_kubernetes
        # names its modules after their classes: helm/v3/Release.py exports Release, the class.
        module = self._exports().get(name)
        if isinstance(value, types.ModuleType) and module is not None and value.__name__ == f"{self.__name__}.{name}":
            if module != name:
                return  # another module's export: bound by __getattr__ when first used
            value = getattr(value, name)
        types.ModuleType.__setattr__(self, name, value)

    def __dir__(self) -> list[str]:
        return sorted({*types.ModuleType.__dir__(self), *self._exports()})

    def _exports(self) -> dict[str, str | None]:
        return self.__dict__["__service_exports__"]


class _ServiceLoader(importlib.abc.Loader):
    """Reads the package's ``__init__.py`` when the package is first used (the SDKs create some 250 service
    packages lazily at import, and use a handful), and runs it as written unless it is only imports."""

    def __init__(self, loader: importlib.abc.Loader, package_dir: Path):
        self.loader, self.package_dir = loader, package_dir

    def create_module(self, spec):
        return None  # the default module

    def exec_module(self, module: types.ModuleType) -> None:
        names = exports(self.package_dir)
        if names is None:
            self.loader.exec_module(module)
            return
        module.__dict__["__service_exports__"] = names
        module.__class__ = _ServicePackage


class _ServiceFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path, target=None):
        if fullname.partition(".")[0] not in PACKAGES or "." not in fullname:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not spec.submodule_search_locations or not spec.origin or spec.loader is None:
            return None
        spec.loader = _ServiceLoader(spec.loader, Path(spec.origin).parent)
        return spec


def install() -> None:
    """Load the service packages lazily from now on in this process (once; before the program imports them)."""
    if not any(isinstance(finder, _ServiceFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _ServiceFinder())
