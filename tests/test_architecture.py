"""The dependency rule, read from the source: agent, controller and tui import broker and never
each other (only the CLI wiring, controller/cli.py, may import all of them); broker imports none
of them; no package has an import circle. Imports under ``if TYPE_CHECKING:`` count for the
first rule (they still couple the packages) but not for circles (they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("broker", "agent", "controller", "tui")
# Which other packages each package may import.
ALLOWED = {"broker": set(), "agent": {"broker"}, "controller": {"broker"}, "tui": {"broker"}}
# The one place that wires every package into the `trainfleet` command.
WIRING = {"controller/cli.py": {"broker", "agent", "tui"}}


def imports_of(source: str, package: str) -> list[tuple[str, bool]]:
    """(imported trainfleet module, under TYPE_CHECKING) for every import in ``source``, at any
    depth (lazy imports inside functions count); relative imports resolve within ``package``."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            guarded = typing_only
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.body:
                    visit_stmt(stmt, True)
                for stmt in child.orelse:
                    visit_stmt(stmt, typing_only)
                continue
            visit_stmt(child, guarded)

    def visit_stmt(node: ast.AST, typing_only: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((alias.name, typing_only) for alias in node.names if alias.name.startswith("trainfleet."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = f"trainfleet.{package}" + (f".{node.module}" if node.module else "")
            else:
                base = node.module or ""
            if base.startswith("trainfleet."):
                # `from trainfleet.broker import tickets` imports a module: count it as such.
                found.extend((f"{base}.{alias.name}", typing_only) for alias in node.names)
        visit(node, typing_only)

    visit(ast.parse(source), False)
    return found


def package_of(module: str) -> str:
    return module.split(".")[1]


def module_files() -> dict[str, Path]:
    """trainfleet module name → file, for every module of the four packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).glob("*.py")):
            out[f"trainfleet.{package}.{path.stem}"] = path
    return out


def violations(files: dict[str, Path]) -> list[str]:
    """Every import of a package the importing package may not use."""
    out = []
    for module, path in files.items():
        package = package_of(module)
        rel = f"{package}/{path.name}"
        allowed = {package} | ALLOWED[package] | WIRING.get(rel, set())
        for imported, _ in imports_of(path.read_text(), package):
            if package_of(imported) in PACKAGES and package_of(imported) not in allowed:
                out.append(f"{rel} imports {imported}")
    return out


def circles(files: dict[str, Path]) -> list[list[str]]:
    """Import circles among the modules of each package (runtime imports only)."""
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = package_of(module)
        deps = set()
        for imported, typing_only in imports_of(path.read_text(), package):
            if typing_only or package_of(imported) != package:
                continue
            # `from trainfleet.broker.schema import X` names module trainfleet.broker.schema
            target = imported if imported in files else imported.rsplit(".", 1)[0]
            if target in files and target != module:
                deps.add(target)
        graph[module] = deps
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                found.append(path[path.index(dep) :] + [dep])
            elif dep not in state:
                walk(dep, [*path, dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    return found


def test_agent_controller_and_tui_import_broker_and_never_each_other():
    assert violations(module_files()) == []


def test_no_package_has_an_import_circle():
    assert circles(module_files()) == []


def test_the_checks_see_a_forbidden_import_and_a_circle(tmp_path):
    # Given an agent module that imports the controller, and two broker modules importing each other
    for package in ("agent", "broker"):
        (tmp_path / package).mkdir()
    (tmp_path / "agent" / "bad.py").write_text("def f():\n    from trainfleet.controller import ops\n")
    (tmp_path / "broker" / "a.py").write_text("from trainfleet.broker.b import x\n")
    (tmp_path / "broker" / "b.py").write_text("from trainfleet.broker import a\n")
    (tmp_path / "broker" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from trainfleet.broker.a import y\n"
    )
    files = {f"trainfleet.{p.parent.name}.{p.stem}": p for p in sorted(tmp_path.glob("*/*.py"))}
    # Then both checks report them, and a TYPE_CHECKING import makes no circle
    assert violations(files) == ["agent/bad.py imports trainfleet.controller.ops"]
    assert circles(files) == [["trainfleet.broker.a", "trainfleet.broker.b", "trainfleet.broker.a"]]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_is_checked(package):
    assert any(m.startswith(f"trainfleet.{package}.") for m in module_files())
