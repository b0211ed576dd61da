"""The layout keeps its rooms: the core imports no Qt or napari, and no module imports one
that (directly or not) imports it back, lazy imports inside functions included."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "napari_vlsm"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module this file imports anywhere in it (absolute names)."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {i for i in imports(p) if i in files and i != m} for m, p in files.items()}


def test_the_core_imports_no_qt_and_no_napari():
    for path in (PACKAGE / "core").rglob("*.py"):
        bad = {i for i in imports(path) if i.split(".")[0] in ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2",
                                                                 "PySide6", "magicgui", "vispy")}
        assert not bad, f"{path.name} imports {bad}"


def test_no_import_cycles():
    g = graph()
    done, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in done:
            return
        stack.append(m)
        for n in sorted(g[m]):
            visit(n)
        stack.pop()
        done.add(m)

    for m in sorted(g):
        visit(m)
