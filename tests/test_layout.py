"""The package's layout: imports run one way (model <- engine <- server; model <- training; demo and cli on
top), and no module grows past 350 lines. Read with `ast`, without importing anything."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "xfusion_serve"
MAX_LINES = 350

# What each layer may import from the package (itself always). The top-level __init__ re-exports the API.
ALLOWED = {
    "model": {"model"},
    "engine": {"model", "engine"},
    "server": {"model", "engine", "server"},
    "training": {"model", "training"},
    "demo": {"model", "engine", "server", "training", "demo"},
    "cli": {"model", "engine", "server", "training", "demo", "cli"},
    "__init__": {"model", "engine", "server", "training"},
}


def layer_of(module: str) -> str:
    """'xfusion_serve.engine.runner' -> 'engine'; 'xfusion_serve' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """Every module of the package that `path` imports, anywhere in it (functions included), as absolute
    names: `from ..model import prompts` in xfusion_serve/engine/x.py -> xfusion_serve.model.prompts."""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from pkg import name` may name a submodule: count pkg.name when it is one, else pkg
            for a in node.names:
                sub = f"{stem}.{a.name}"
                file = root.parent / sub.replace(".", "/")
                is_module = file.with_suffix(".py").is_file() or file.is_dir()
                found.append((node.lineno, sub if is_module else stem))
    return [(line, m) for line, m in found if m == "xfusion_serve" or m.startswith("xfusion_serve.")]


def violations(root: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        layer = layer_of(module_name(path, root))
        for line, target in imported_modules(path, root):
            where = f"{path.relative_to(root.parent)}:{line} imports {target}"
            if target == "xfusion_serve":
                out.append(f"{where}: the top-level package re-exports; import from the layer itself")
            elif layer_of(target) not in ALLOWED.get(layer, set()):
                out.append(f"{where}: {layer} may import only from {sorted(ALLOWED.get(layer, set()))}")
    return out


def test_imports_run_one_way():
    assert violations() == []


def test_modules_stay_small():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_every_subpackage_says_what_lives_there():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "\n" not in doc.strip(), f"{init}: a one-line docstring saying what lives there"


@pytest.mark.parametrize("layer, target, allowed", [
    ("engine", "from ..server.metrics import Metrics", False),
    ("engine", "from ..training import trainer", False),
    ("training", "from ..engine.flow_matching import guided", False),
    ("model", "from ..engine import kv_cache", False),
    ("server", "from ..demo.shapes import sample", False),
    ("engine", "import xfusion_serve.cli", False),
    ("model", "from .. import Engine", False),
    ("server", "def f():\n    from ..engine.engine import Engine", True),
    ("demo", "from ..training.trainer import train", True),
])
def test_checker_catches_upward_imports(tmp_path, layer, target, allowed):
    """The checker itself, on a copy of the package with one import planted in a module of `layer`."""
    root = tmp_path / "xfusion_serve"
    for p in PACKAGE.rglob("*.py"):
        dest = root / p.relative_to(PACKAGE)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(p.read_text())
    planted = root / layer / "planted.py"
    planted.write_text(target + "\n")
    found = [v for v in violations(root) if "planted.py" in v]
    assert (found == []) == allowed, found
