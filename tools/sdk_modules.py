"""How ``make plan`` loads the provider SDKs: only the resource modules the program uses, with the annotations
that only type checkers read left unevaluated. Only ``python -m tools.synth`` installs it: ``pulumi up`` and the
tests' own processes load the SDKs as they are, and tests/test_plan_output.py compares the plan written each way
byte for byte.

**Only the modules used.** The provider SDKs load a service lazily (``pulumi_aws/__init__.py``:
``ec2 = _utilities.lazy_import(...)``), but the service's own ``__init__.py`` then imports every module it has
(``from .vpc import *``, one line per resource, then ``from ._inputs import *`` and ``from . import outputs``). The
program (with pulumi_eks) uses 17 of the 183 modules of ``pulumi_aws.ec2``; Python cannot import
``pulumi_aws.ec2.vpc`` without running that ``__init__.py`` first, so loading the rest took a fifth of
``make plan STACK=prod-405b`` (2.4 s -> 1.85 s, median of 6 on the 2-core machine). A service package whose
``__init__.py`` is nothing but those imports (and the ``if typing.TYPE_CHECKING: ... else: v1 =
_utilities.lazy_import(...)`` blocks of pulumi_kubernetes' API groups) gets a module-level ``__getattr__``
(PEP 562) instead: the first use of a name imports the one module that binds it, later lines of ``__init__.py``
winning as they do with ``import *``. What a module binds under ``import *`` is its ``__all__``, or, without one,
every public name its top-level statements bind (pulumi_kubernetes ``helm/v3/helm.py``), read from the source
without running it. A package holding any other statement, or importing a module whose top level does
anything else, loads as the SDK wrote it.

**Annotations left as text.** The generated modules annotate every parameter and property, and declare a
``TypedDict`` twin (``VpcArgsDict``) of every input type: evaluating those annotations (``Optional[Input[...]]``
builds typing objects) was half of what importing a service's ``_inputs`` module cost, for thousands of classes
of which the program uses a few hundred. The plan compiles the SDKs' modules as if each began with
``from __future__ import annotations`` (PEP 563), so an annotation stays a string until something asks for it:
the runtime evaluates the property getters' return annotations of the classes a registration serialises
(``pulumi/_types.py`` ``_raw_return_hints``, pulumi 3.272, with ``typing.get_type_hints``, which reads strings the
same way), and nothing at runtime evaluates the others (the SDKs' ``lift_output_func`` takes a signature,
which leaves them as they are). The ``TypedDict`` twins lose their field annotations, which
``TypedDict`` would otherwise compile one by one into forward references: only type checkers read those fields
(the runtime only asks ``typing.is_typeddict`` of a union member, ``pulumi/_types.py`` ``_is_plumbing_arg`` and
``_wire_matches``). ``make plan STACK=prod-405b`` went from 1.94 s to 1.47 s (median of 8, 2-core machine,
with the helm and yaml packages loaded lazily too); the ``TypedDict`` part alone from 1.79 s to 1.63 s.

The compiled code of each module, and the index of each service package, are cached next to the SDK's own
bytecode, as ``<module>.cpython-311.opt-<tag>.pyc`` (``importlib.util.cache_from_source``), checked against the
modification time and size of the sources they were made from, as Python checks its own; they are written even
under ``PYTHONDONTWRITEBYTECODE``, since without them every plan would parse and compile the SDKs again (a plan
took some 5 s that way).
"""

from __future__ import annotations

import __future__

import ast
import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import marshal
import os
import sys
import types
from pathlib import Path
from typing import Any, Callable

# Service packages loaded lazily; modules compiled with their annotations as text (pulumi_eks too).
PACKAGES = ("pulumi_aws", "pulumi_kubernetes")
ANNOTATION_PACKAGES = (*PACKAGES, "pulumi_eks")
# Part of the cache files' names: a change to what the compiled code or the index is made of must change it.
CACHE_TAG = "plan1"

# The statements of a generated service __init__.py besides the imports of its modules (pulumi-language-python's
# and pulumigen's output, e.g. pulumi_aws 7.51.1 ec2/__init__.py, pulumi_kubernetes 4.34.2 core/__init__.py).
_HEADER_IMPORTS = {"builtins", "typing"}


def exports(package_dir: Path) -> dict[str, str | None] | None:
    """Name -> the module of ``package_dir`` that binds it (``None``: the name is a submodule), as the package's
    ``__init__.py`` would bind them; ``None`` if that file holds any other statement."""
    return _index(package_dir)[0]


def _index(package_dir: Path) -> tuple[dict[str, str | None] | None, list[str]]:
    """``exports`` and the files it read."""
    init = package_dir / "__init__.py"
    names: dict[str, str | None] = {}
    sources = [str(init)]
    for statement in ast.parse(init.read_bytes()).body:
        if _is_header(statement):
            continue
        if isinstance(statement, ast.ImportFrom) and statement.level == 1 and statement.module:
            if [alias.name for alias in statement.names] != ["*"]:
                return None, sources
            module = package_dir / f"{statement.module}.py"
            sources.append(str(module))
            module_names = public_names(module)
            if module_names is None:
                return None, sources
            names.update(dict.fromkeys(module_names, statement.module))
        elif isinstance(statement, ast.ImportFrom) and statement.level == 1 and not statement.module:
            if any(alias.asname for alias in statement.names):
                return None, sources
            names.update(dict.fromkeys((alias.name for alias in statement.names), None))
        elif (submodule := _lazy_submodule(statement)) and _is_submodule(package_dir, submodule):
            names[submodule] = None
        else:
            return None, sources
    return names, sources


def _is_header(statement: ast.stmt) -> bool:
    if isinstance(statement, ast.Import):
        return all(alias.name in _HEADER_IMPORTS for alias in statement.names)
    if isinstance(statement, ast.ImportFrom):  # from .. import _utilities
        return statement.level > 0 and not statement.module and [a.name for a in statement.names] == ["_utilities"]
    return isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)  # a docstring


def _lazy_submodule(statement: ast.stmt) -> str | None:
    """``v1`` for pulumi_kubernetes' ``if typing.TYPE_CHECKING: import ...v1 as __v1; v1 = __v1`` ``else:
    v1 = _utilities.lazy_import('....v1')``: the name is bound to the submodule either way."""
    if not (isinstance(statement, ast.If) and ast.unparse(statement.test) == "typing.TYPE_CHECKING"
            and len(statement.orelse) == 1 and isinstance(assign := statement.orelse[0], ast.Assign)):
        return None
    value = assign.value
    if (len(assign.targets) == 1 and isinstance(target := assign.targets[0], ast.Name)
            and isinstance(value, ast.Call) and ast.unparse(value.func) == "_utilities.lazy_import"
            and len(value.args) == 1 and isinstance(value.args[0], ast.Constant)
            and str(value.args[0].value).endswith(f".{target.id}")):
        return target.id
    return None


def public_names(path: Path) -> list[str] | None:
    """The names ``from <module> import *`` binds: its literal ``__all__`` (near its top, read without parsing the
    whole file), else the public names its top-level statements bind; ``None`` if it does anything else there."""
    if not path.is_file():
        return None
    declared = _declared_all(path)
    if declared is not None:
        return declared
    names: list[str] = []
    for statement in ast.parse(path.read_bytes()).body:
        if isinstance(statement, ast.Import):
            names += [alias.asname or alias.name.partition(".")[0] for alias in statement.names]
        elif isinstance(statement, ast.ImportFrom):
            if any(alias.name == "*" for alias in statement.names):
                return None
            names += [alias.asname or alias.name for alias in statement.names]
        elif isinstance(statement, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names.append(statement.name)
        elif isinstance(statement, ast.Assign) and all(isinstance(t, ast.Name) for t in statement.targets):
            names += [t.id for t in statement.targets]  # type: ignore[attr-defined]
        elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name) and statement.value:
            names.append(statement.target.id)
        elif not (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)):
            return None
    return list(dict.fromkeys(n for n in names if not n.startswith("_")))


def _declared_all(path: Path) -> list[str] | None:
    """The literal ``__all__ = [...]`` of a generated module (near its top), read without running the module."""
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
    packages lazily at import, and use a handful), and runs it as written unless it is only imports. What it
    reads is cached like the modules' code (``cached``)."""

    def __init__(self, loader: importlib.abc.Loader, package_dir: Path):
        self.loader, self.package_dir = loader, package_dir

    def create_module(self, spec):
        return None  # the default module

    def exec_module(self, module: types.ModuleType) -> None:
        # Reading the headers of the 183 modules of pulumi_aws.ec2 takes longer than loading the few it uses.
        init = str(self.package_dir / "__init__.py")
        names = cached(importlib.util.cache_from_source(init, optimization=f"{CACHE_TAG}exports"),
                       lambda: _index(self.package_dir))
        if names is None:
            self.loader.exec_module(module)
            return
        module.__dict__["__service_exports__"] = names
        module.__class__ = _ServicePackage


# --------------------------------------------------------------------------------------------------
# Annotations as text

_ANNOTATIONS_AS_TEXT = __future__.annotations.compiler_flag


def compile_module(source: bytes, path: str) -> types.CodeType:
    """The module's code with every annotation kept as text and the ``TypedDict`` classes of its top level
    without their field annotations (their docstrings stay: a class keeps a body)."""
    if b"TypedDict" not in source:
        return compile(source, path, "exec", flags=_ANNOTATIONS_AS_TEXT, dont_inherit=True)
    tree = ast.parse(source, path)
    for statement in tree.body:
        if isinstance(statement, ast.ClassDef) and any(_names_typed_dict(base) for base in statement.bases):
            statement.body = ([s for s in statement.body if not isinstance(s, ast.AnnAssign)]
                              or [ast.copy_location(ast.Pass(), statement)])
    return compile(tree, path, "exec", flags=_ANNOTATIONS_AS_TEXT, dont_inherit=True)


def _names_typed_dict(base: ast.expr) -> bool:
    return (isinstance(base, ast.Name) and base.id == "TypedDict") or (
        isinstance(base, ast.Attribute) and base.attr == "TypedDict")


def cached(cache_path: str, build: Callable[[], tuple[Any, list[str]]]) -> Any:
    """``build()``'s value (anything ``marshal`` writes: code, dicts, lists), kept in ``cache_path`` with the
    modification time and size of each source file ``build`` read, as Python keeps a module's bytecode with its
    source's (PEP 552); built again when any of them changed, the file is missing or unreadable, or another
    Python wrote it."""
    try:
        with open(cache_path, "rb") as stream:
            magic, stamps, value = marshal.loads(stream.read())  # marshal.load would read it piece by piece
        if magic == importlib.util.MAGIC_NUMBER and all(_stamp(path) == stamp for path, stamp in stamps.items()):
            return value
    except (OSError, EOFError, ValueError, TypeError):
        pass
    value, sources = build()
    stamps = {path: _stamp(path) for path in sources}
    write_cache(cache_path, marshal.dumps((importlib.util.MAGIC_NUMBER, stamps, value)))
    return value


def write_cache(cache_path: str | os.PathLike, data: bytes) -> None:
    """Write a cache file whole or not at all, should two plans run at once; where it cannot be written (a
    read-only install or checkout), leave nothing behind: the value is built on every run, still correct."""
    temporary = f"{cache_path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        with open(temporary, "wb") as stream:
            stream.write(data)
        os.replace(temporary, cache_path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(temporary)


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


class _AnnotationsAsTextLoader(importlib.machinery.SourceFileLoader):
    """A source module of the SDKs, compiled by ``compile_module`` and cached under its own name."""

    def get_code(self, fullname: str) -> types.CodeType:
        source_path = self.get_filename(fullname)
        return cached(importlib.util.cache_from_source(source_path, optimization=CACHE_TAG),
                      lambda: (compile_module(self.get_data(source_path), source_path), [source_path]))


class _SdkFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path, target=None):
        if fullname.partition(".")[0] not in ANNOTATION_PACKAGES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return spec
        spec.loader = _AnnotationsAsTextLoader(spec.loader.name, spec.loader.path)
        if "." in fullname and fullname.partition(".")[0] in PACKAGES and spec.submodule_search_locations:
            spec.loader = _ServiceLoader(spec.loader, Path(spec.origin).parent)
        return spec


def install() -> None:
    """Load the SDKs this way from now on in this process (once; before the program imports them)."""
    if not any(isinstance(finder, _SdkFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SdkFinder())
