"""The layers point one way (DESIGN.md section 3): the app (command line, service, line, bench,
evaluation) uses the runtime, export and calibration; export and calibration use the runtime; the
runtime uses nothing of spade-edge but itself, so that a device can install it alone.

Read from the sources with ``ast`` (nothing is imported), relative imports resolved to absolute
``spade_edge.*`` names through pyproject.toml's package-dir mapping. Every import counts for the
layers, including one inside a function (a lazy import is still a dependency); the cycle check
follows the imports made when a module is imported (module level, ``if``/``try`` included), since a
function-level import is how a cycle is broken.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10: the 'line' extra's tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "spade_edge"
# layer -> the layers it may import from ("app": every spade_edge module outside the three below)
LAYERS = ("runtime", "export", "calibration")
ALLOWED = {
    "runtime": {"runtime"},
    "export": {"export", "runtime"},
    "calibration": {"calibration", "runtime"},
    "app": {"app", "export", "calibration", "runtime"},
}


@dataclass(frozen=True)
class Import:
    target: str  # absolute module name
    line: int
    lazy: bool  # inside a function: made when it runs, not when the module is imported


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    is_package: bool
    source: str


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """spade_edge's packages and their folders, as pyproject.toml maps them."""
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {pkg: root / folder for pkg, folder in setup["package-dir"].items() if pkg.split(".")[0] == PACKAGE}
    missing = [p for p in setup["packages"] if p not in dirs]
    assert not missing, f"packages without a package-dir entry: {missing}"
    return dirs


def module_map(root: Path = ROOT) -> dict[str, Module]:
    """Every module of the distribution by its import name."""
    modules = {}
    for pkg, folder in package_dirs(root).items():
        for path in sorted(folder.glob("*.py")):
            name = pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"
            modules[name] = Module(name, path, path.stem == "__init__", path.read_text())
    return modules


def _resolve(module: Module, level: int, target: str | None) -> str:
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    parts = package.split(".")
    if level > len(parts):
        raise ValueError(f"{module.name}: relative import beyond the top-level package")
    base = ".".join(parts[: len(parts) - level + 1])
    return f"{base}.{target}" if target else base


def imports_of(module: Module, known: set[str]) -> list[Import]:
    """The spade_edge modules ``module`` imports. ``from X import name`` counts as an import of
    ``X.name`` where that is a module (``known``), else of ``X``."""
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(a.name, child.lineno, lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(module, child.level, child.module) if child.level else child.module
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    found.append(Import(sub if sub in known else base, child.lineno, lazy))
            visit(child, inner)

    visit(ast.parse(module.source, str(module.path)), False)
    return [i for i in found if i.target == PACKAGE or i.target.startswith(PACKAGE + ".")]


def layer(name: str) -> str:
    for lay in LAYERS:
        if name == f"{PACKAGE}.{lay}" or name.startswith(f"{PACKAGE}.{lay}."):
            return lay
    return "app"


def layer_violations(modules: dict[str, Module]) -> list[str]:
    """'module:line imports target (layer -> layer)' for each import against ALLOWED."""
    out = []
    for name, m in modules.items():
        for imp in imports_of(m, set(modules)):
            src, dst = layer(name), layer(imp.target)
            if dst not in ALLOWED[src]:
                where = m.path.relative_to(ROOT) if m.path.is_relative_to(ROOT) else m.path
                out.append(
                    f"{where}:{imp.line} ({name}) imports {imp.target}: {src} -> {dst}"
                    + (" (in a function: still a dependency)" if imp.lazy else "")
                )
    return out


def import_graph(modules: dict[str, Module]) -> dict[str, set[str]]:
    """module -> modules it imports when it is imported (function-level imports left out)."""
    return {
        name: {i.target for i in imports_of(m, set(modules)) if not i.lazy and i.target in modules} - {name}
        for name, m in modules.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


# ---------------------------------------------------------------------------- the project


@pytest.fixture(scope="module")
def modules():
    return module_map()


def test_every_layer_has_its_modules(modules):
    for lay in LAYERS:
        assert f"{PACKAGE}.{lay}" in modules and sum(layer(n) == lay for n in modules) > 3, lay
    assert {
        "spade_edge.cli",
        "spade_edge.service.server",
        "spade_edge.runtime.detector",
        "spade_edge.export.engine",
        "spade_edge.calibration.int8",
    } <= set(modules)


def test_layers_point_one_way(modules):
    """runtime -> runtime only; export, calibration -> themselves and the runtime; app -> any."""
    assert layer_violations(modules) == []


def test_no_import_cycle(modules):
    """Among the imports made at module import: no cycle at all, in spade_edge.service or anywhere."""
    found = cycles(import_graph(modules))
    service = [c for c in found if any(n.startswith(f"{PACKAGE}.service") for n in c)]
    assert service == [], f"import cycles in spade_edge.service: {service}"
    assert found == [], f"import cycles: {found}"


def test_the_runtime_knows_the_version_without_importing_the_app():
    """A gallery records the distribution's version, read from its metadata (runtime/build.py once
    took it from spade_edge/__init__.py): the same version the command line reports."""
    import spade_edge
    from spade_edge.runtime.build import tool_name

    assert tool_name() == f"spade-edge {spade_edge.__version__}"


# ---------------------------------------------------------------------------- the checker itself


def _fake(**sources: str) -> dict[str, Module]:
    """A module map from ``name="source"`` (``__`` for dots; a name ending in ``__init`` is a package)."""
    out = {}
    for key, text in sources.items():
        name = key.replace("__", ".")
        is_package = name.endswith(".init")
        name = name.removesuffix(".init")
        path = ROOT / "fake" / (name.replace(".", "/") + ("/__init__.py" if is_package else ".py"))
        out[name] = Module(name, path, is_package, text)
    return out


def test_checker_resolves_relative_imports():
    mods = _fake(
        spade_edge__init="",
        spade_edge__runtime__init="from .detector import Detector\n",
        spade_edge__runtime__detector="from .. import __version__\nfrom . import errors\n",
        spade_edge__runtime__errors="",
        spade_edge__runtime__features__init="from ..errors import X\n",
        spade_edge__cli="import spade_edge.runtime.errors as e\nfrom spade_edge.runtime import errors\n",
    )
    got = {n: sorted((i.target, i.lazy) for i in imports_of(m, set(mods))) for n, m in mods.items()}
    assert got["spade_edge.runtime"] == [("spade_edge.runtime.detector", False)]
    assert got["spade_edge.runtime.detector"] == [("spade_edge", False), ("spade_edge.runtime.errors", False)]
    assert got["spade_edge.runtime.features"] == [("spade_edge.runtime.errors", False)]
    assert got["spade_edge.cli"] == [("spade_edge.runtime.errors", False)] * 2


def test_checker_fails_on_a_deliberate_violation():
    """The runtime importing export, lazily and at the top; calibration importing the app; the
    runtime reaching the app through ``from .. import``: each is reported with its line."""
    mods = _fake(
        spade_edge__init="__version__ = '0'\n",
        spade_edge__cli="from .runtime import detector\nfrom .export import engine\n",
        spade_edge__runtime__init="",
        spade_edge__runtime__detector="import numpy\n\ndef load():\n    from spade_edge.export.engine import check\n",
        spade_edge__runtime__build="from .. import __version__\n",
        spade_edge__export__init="",
        spade_edge__export__engine="from spade_edge.runtime.detector import load\n",
        spade_edge__calibration__init="",
        spade_edge__calibration__int8="from spade_edge.cli import main\nfrom ..runtime import detector\n",
    )
    found = layer_violations(mods)
    assert len(found) == 3, found
    assert any(
        "(spade_edge.runtime.detector) imports spade_edge.export.engine: runtime -> export (in a function" in v
        and "detector.py:4" in v
        for v in found
    ), found
    assert any("(spade_edge.runtime.build) imports spade_edge: runtime -> app" in v for v in found), found
    assert any("(spade_edge.calibration.int8) imports spade_edge.cli: calibration -> app" in v for v in found), found


def test_checker_finds_cycles_and_ignores_function_level_imports():
    mods = _fake(
        spade_edge__init="",
        spade_edge__service__init="from .server import make_server\n",
        spade_edge__service__server="from .inspector import Service\n",
        spade_edge__service__inspector="from . import server\n",
        spade_edge__service__cli="def serve():\n    from .server import make_server\n",
        spade_edge__line__run="from ..service.cli import serve\n",
    )
    graph = import_graph(mods)
    assert cycles(graph) == [["spade_edge.service.inspector", "spade_edge.service.server"]]
    mods["spade_edge.service.inspector"] = _fake(spade_edge__service__inspector="def f():\n    from . import server\n")[
        "spade_edge.service.inspector"
    ]
    assert cycles(import_graph(mods)) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}}) == [["a", "b", "c"]]
