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


LAYERS = ["core", "images", "data", "models", "inference", "training"]  # lowest first


def layer(module: str) -> int:
    """core/'s own modules (errors, files, devices) are the ground floor; each sub-package a floor."""
    parts = module.split(".")
    return LAYERS.index(parts[2]) if len(parts) > 3 and parts[2] in LAYERS else 0


def test_core_modules_import_only_their_own_layer_or_below():
    g = graph()
    public = {"napari_vlsm.core", "napari_vlsm.core.loading", "napari_vlsm.core.predictor"}  # the README's paths
    upward = [f"{m} imports {n}" for m in g if m.startswith("napari_vlsm.core.") and m not in public
              for n in g[m] if n.startswith("napari_vlsm.core") and layer(n) > layer(m)]
    assert not upward, upward
    assert {layer(m) for m in g if m.startswith("napari_vlsm.core.")} == set(range(len(LAYERS)))


def test_the_readme_s_import_paths_work():
    from napari_vlsm.core import Predictor as P0
    from napari_vlsm.core import load_model as L0
    from napari_vlsm.core.loading import load_model
    from napari_vlsm.core.predictor import Predictor

    assert load_model is L0 and Predictor is P0
    assert "from napari_vlsm.core.loading import load_model" in (PACKAGE.parent / "README.md").read_text()


DOCKS = ["napari_vlsm.plugin.segment_widget", "napari_vlsm.plugin.finetune_widget", "napari_vlsm.plugin.series_widget"]
QT = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari.qt", "napari._qt", "magicgui", "vispy")


def reachable(g: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for n in g[todo.pop()] - seen:
            seen.add(n)
            todo.append(n)
    return seen


def test_the_plugin_docks_do_not_import_each_other():
    """Each dock is layout and wiring bound to the viewer's PluginState; none reaches another
    dock's controls, not through a helper either."""
    g = graph()
    assert set(DOCKS) <= set(g)
    crossed = [f"{d} reaches {o}" for d in DOCKS for o in reachable(g, d) if o in DOCKS]
    assert not crossed, crossed
    for dock in DOCKS:
        assert "findChildren" not in (PACKAGE.parent / (dock.replace(".", "/") + ".py")).read_text(), dock


def test_the_plugin_state_imports_no_qt():
    g = graph()
    state = "napari_vlsm.plugin.state"
    for module in {state} | reachable(g, state):
        path = PACKAGE.parent / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
        bad = {i for i in imports(path) if i.startswith(QT)}
        assert not bad, f"{module} imports {bad}"
