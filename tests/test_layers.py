"""The package's import graph follows the layers documented in groupmorph_pyro/__init__.py."""
import ast
import re
from pathlib import Path

import groupmorph_pyro

PACKAGE = Path(groupmorph_pyro.__file__).parent


def _imports(path: Path) -> set:
    """Package modules imported by ``path``, at top level or inside functions (lazy imports)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(a.name for a in node.names)
            elif node.module and node.module.startswith("groupmorph_pyro."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("groupmorph_pyro."))
    return found


def _layer_of() -> dict:
    return {m: i for i, layer in enumerate(groupmorph_pyro.LAYERS) for m in layer}


def test_every_module_has_exactly_one_layer():
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    listed = [m for layer in groupmorph_pyro.LAYERS for m in layer]
    assert sorted(listed) == modules, "LAYERS must list every module once"


def test_imports_point_only_to_lower_layers():
    layer = _layer_of()
    bad = []
    for m, i in layer.items():
        for dep in _imports(PACKAGE / f"{m}.py"):
            if dep not in layer:
                bad.append(f"{m} imports unknown module {dep}")
            elif layer[dep] >= i:
                bad.append(f"{m} (layer {i + 1}) imports {dep} (layer {layer[dep] + 1})")
    assert not bad, "\n".join(bad)


def test_no_private_names_cross_modules():
    bad = []
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                bad += [f"{path.stem} imports {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad, "\n".join(bad)


def test_docstring_states_the_layers():
    doc = groupmorph_pyro.__doc__
    for i, modules in enumerate(groupmorph_pyro.LAYERS, 1):
        line = re.search(rf"^{i}\. .*?(?=^\d\. |\Z)", doc, flags=re.M | re.S)
        assert line, f"docstring lacks layer {i}"
        for m in modules:
            assert f"``{m}``" in line.group(0), f"docstring layer {i} does not name {m}"


def test_no_module_shadows_the_standard_library():
    import sys

    names = {p.stem for p in PACKAGE.glob("*.py")}
    stdlib = getattr(sys, "stdlib_module_names", {"io", "json", "csv", "time", "types", "random", "math"})  # < 3.10
    assert not names & set(stdlib)


def test_the_layer_check_catches_an_upward_import(tmp_path):
    """The checker itself: a lazy import of a higher layer is reported."""
    src = tmp_path / "spatial.py"
    src.write_text("def f():\n    from .registration import register\n    return register\n")
    assert "registration" in _imports(src)
