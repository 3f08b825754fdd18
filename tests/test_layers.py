"""The layering of trainer/__init__.py, read from the source of every module (ast, nothing
imported): trainer imports neither app nor engine; engine imports nothing of app and only the
model contract (`trainer.CONTRACT`) of trainer; the contract needs nothing else of trainer.

Every import counts: top level or inside a function, `import x`, `from x import y`, relative
imports, and `importlib.import_module("x")` / `__import__("x")` with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from trainer import CONTRACT

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def submodule(base: str, name: str) -> str:
    """`from base import name`: the module base.name when it is one of this repository's
    modules, else base (name is an attribute of it)."""
    path = REPO.joinpath(*base.split("."), name)
    return f"{base}.{name}" if path.with_suffix(".py").is_file() or path.is_dir() else base


def imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, imported module) of every import in `source`, the source of `module`."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found += [(node.lineno, submodule(base, a.name)) for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return sorted(set(found))


def within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """What `module` (its `source`) imports against the layering, one line each."""
    layer = module.split(".")[0]
    forbidden = {"trainer": ("app", "engine"), "engine": ("app",)}.get(layer, ())
    bad = []
    for line, name in imports(source, module, is_package):
        if within(name, forbidden):
            bad.append(f"{module}:{line} imports {name} ({layer} must not import {forbidden})")
        elif layer == "engine" and within(name, ("trainer",)) and not (
            within(name, CONTRACT) or name == "trainer"
        ):
            bad.append(f"{module}:{line} imports {name} (the engine uses only {CONTRACT})")
        elif within(module, CONTRACT) and within(name, ("trainer",)) and not (
            within(name, CONTRACT) or name == "trainer"
        ):
            bad.append(f"{module}:{line} imports {name} (the contract needs only {CONTRACT})")
    return bad


SOURCES = sorted(p for layer in ("trainer", "engine") for p in (REPO / layer).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_module_respects_the_layering(path: Path):
    bad = violations(path.read_text(encoding="utf-8"), module_name(path),
                     path.name == "__init__.py")
    assert not bad, "\n".join(bad)


def test_every_layer_and_the_contract_are_there():
    names = {module_name(p) for p in SOURCES}
    assert {"trainer", "engine", "engine.ops.triton_moe", "trainer.models.moe"} <= names
    assert all(c in names for c in CONTRACT)


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("trainer.models.moe", "from engine.ops.triton_moe import experts_triton"),
        ("trainer.models.moe", "def f():\n    import engine.ops.triton_moe\n"),
        ("trainer.config", "from app.config import ConfigError"),
        ("trainer.data", "import importlib\nimportlib.import_module('engine.export')"),
        ("trainer.models.vit", "from ...engine import export"),
        ("engine.backends.ort", "from app import fsutil"),
        ("engine.export", "from trainer.train import train"),
        ("engine.export", "from trainer import data"),
        ("trainer.artifact", "from trainer.augment import degrade"),
        ("trainer.models.vit", "from ..losses import router_losses"),
    ],
)
def test_an_upward_import_is_caught(module: str, source: str):
    assert violations(source, module)


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("engine.export", "from trainer.models.moe import MoEMLP\nfrom trainer import manifest"),
        ("engine.export", "from trainer import CONTRACT"),
        ("engine.build", "from engine.ops.reference import OP_NAME"),
        ("trainer.train", "from trainer.data import load\nfrom . import losses"),
        ("trainer.models.vit", "from .moe import MoEMLP\nfrom ..preprocess import CropTemplate"),
        ("app.cli", "from engine.build import build_engine\nfrom trainer.train import train"),
    ],
)
def test_allowed_imports_pass(module: str, source: str):
    assert violations(source, module) == []
