"""Test tiers: every test module names its tier (unit, contract or e2e), and the conftest hook
gives every collected test exactly one, so `pytest -m unit` and friends select cleanly."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, TIERS

pytestmark = pytest.mark.unit


def _tiers_in(node: ast.AST) -> set[str]:
    """The tier marks written in `node` (pytest.mark.unit, ...)."""
    return {
        n.attr for n in ast.walk(node)
        if isinstance(n, ast.Attribute) and n.attr in TIERS
        and isinstance(n.value, ast.Attribute) and n.value.attr == "mark"
    }


def test_every_test_module_names_its_tier():
    """A module-level `pytestmark`, or a tier mark on each of its tests (mixed modules)."""
    unnamed = []
    for path in sorted((REPO_ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text(), str(path))
        module = [
            n for n in tree.body
            if isinstance(n, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "pytestmark" for t in n.targets)
        ]
        tiers = set().union(*(_tiers_in(n) for n in module))
        assert len(tiers) <= 1, f"{path.name}: pytestmark names {sorted(tiers)}"
        if tiers:
            continue
        for n in tree.body:
            if (isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name.lower().startswith("test")
                    and len(set().union(*map(_tiers_in, n.decorator_list))) != 1):
                unnamed.append(path.name)
    assert not unnamed, (
        "tests without a tier (add `pytestmark = pytest.mark.unit`, or contract or e2e, after "
        "the imports): " + ", ".join(f"{f} ({unnamed.count(f)})" for f in sorted(set(unnamed)))
    )


def _collect(tmp_path: Path, source: str, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(source)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "--co", "-q", *args, "test_sample.py"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True, text=True, timeout=120,
    )


SAMPLE = """
import pytest

def test_plain():
    pass

@pytest.mark.contract
def test_port():
    pass

@pytest.mark.e2e
@pytest.mark.slow
def test_product():
    pass
"""


@pytest.mark.parametrize(
    "expression, selected",
    [("unit", ["test_plain"]), ("contract", ["test_port"]), ("e2e", ["test_product"]),
     ("not slow", ["test_plain", "test_port"])],
)
def test_a_test_without_a_tier_is_a_unit_test(tmp_path, expression, selected):
    done = _collect(tmp_path, SAMPLE, "-m", expression)
    assert done.returncode == 0, done.stdout + done.stderr
    listed = [line.split("::")[1] for line in done.stdout.splitlines() if "::" in line]
    assert listed == selected


def test_a_test_in_two_tiers_is_refused(tmp_path):
    source = (
        "import pytest\n\npytestmark = pytest.mark.e2e\n\n\n"
        "@pytest.mark.unit\ndef test_both():\n    pass\n"
    )
    done = _collect(tmp_path, source)
    assert done.returncode == pytest.ExitCode.USAGE_ERROR
    assert "test_sample.py::test_both is marked e2e and unit: give it one tier of unit, " \
        "contract, e2e" in done.stderr
