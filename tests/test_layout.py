"""The shape of the code: packages on floors, each importing only from floors below it (lazy imports
included), no import circle, no module too long to read, and a command line that is a client of the
public API."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import caa

PACKAGE = Path(caa.__file__).parent
# From the bottom up; a package may import from its own floor's other modules and from any floor below.
FLOORS = ["errors", "store", "models", "core", "evaluation", "report", "stages", "serve", "api", "cli"]
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """Every caa module that ``name`` imports, at the top or inside a function."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target not in MODULES and "." in target:
                target = target.rpartition(".")[0]
            if target in MODULES and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def floor(name: str) -> float:
    """The floor of a module. The package root, ``caa`` (names only), sits between the API it names
    and the command line that uses it; ``python -m caa`` on top."""
    parts = name.split(".")
    if len(parts) == 1:
        return FLOORS.index("api") + 0.5
    if parts[1] == "__main__":
        return len(FLOORS)
    return FLOORS.index(parts[1])


def test_every_module_sits_on_a_floor() -> None:
    for name in MODULES:
        parts = name.split(".")
        assert len(parts) < 2 or parts[1] in [*FLOORS, "__main__"], name


def test_no_import_runs_up_a_floor() -> None:
    upward = [
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        for target in targets
        if floor(target) > floor(name)
    ]
    assert upward == []


def test_no_import_circle() -> None:
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                circles.append([*trail[trail.index(target) :], target])
            elif target not in state:
                visit(target, [*trail, target])
        state[name] = 2

    for name in MODULES:
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_no_module_is_longer_than_a_reader_can_hold() -> None:
    long = {n: k for n, path in MODULES.items() if (k := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_command_line_imports_only_the_public_api() -> None:
    for name, targets in GRAPH.items():
        if name.startswith("caa.cli"):
            assert {t for t in targets if not t.startswith("caa.cli")} <= {"caa", "caa.api"}, name


def test_the_api_functions_do_not_shadow_the_stage_modules() -> None:
    assert callable(caa.sweep) and callable(caa.extract) and callable(caa.ingest) and callable(caa.generate)
    for stage in ["ingest", "extract", "vectors", "sweep", "generate"]:
        module = importlib.import_module(f"caa.stages.{stage}")
        assert module.__name__ == f"caa.stages.{stage}" and not callable(module)


@pytest.mark.parametrize("name", [n for n in MODULES if n != "caa.__main__"])
def test_every_module_imports_on_its_own(name: str) -> None:
    importlib.import_module(name)


def _defined(name: str) -> set[str]:
    """The names a module defines at its top level (not those it imports)."""
    found = set()
    for node in ast.parse(MODULES[name].read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return found


# Re-exports that caa.api and caa.cli still import (their rewrite points them at the defining module).
STILL_REEXPORTED: set[tuple[str, str]] = set()


def test_names_are_imported_from_the_module_that_defines_them() -> None:
    """No re-export shims: a library module imports each caa name from where it is defined."""
    wrong = []
    for name, path in MODULES.items():
        if name in ("caa", "caa.api") or name.startswith("caa.cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("caa."):
                continue
            for alias in node.names:
                source = node.module or ""
                if f"{source}.{alias.name}" in MODULES or source not in MODULES:
                    continue
                if alias.name not in _defined(source):
                    wrong.append(f"{name} imports {alias.name} from {source}")
                elif alias.asname == alias.name and (name, alias.name) not in STILL_REEXPORTED:
                    wrong.append(f"{name} re-exports {alias.name}")
    assert wrong == []
