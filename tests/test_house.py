"""The house rules that a reader relies on, checked over the code (`app/`, `engine/`,
`trainer/`, `benchmarks/`): no function longer than `MAX_FUNCTION_LINES` (one that long is
several steps that want names of their own), and every non-empty module opens with a
docstring that says what it owns."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.unit
FLOORS = ("app", "engine", "trainer", "benchmarks")
MAX_FUNCTION_LINES = 120


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p)))
            for floor in FLOORS for p in sorted((REPO_ROOT / floor).rglob("*.py"))]


def long_functions(tree: ast.AST, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """(name, lines) of every function or method in `tree` longer than `limit` lines
    (signature to last line; decorators not counted)."""
    return [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            and n.end_lineno - n.lineno + 1 > limit]


def test_no_function_is_longer_than_the_limit() -> None:
    found = [f"{p.relative_to(REPO_ROOT)}: {name} ({n} lines)"
             for p, tree in _modules() for name, n in long_functions(tree)]
    assert found == [], f"functions over {MAX_FUNCTION_LINES} lines: {found}"


def test_every_module_says_what_it_owns() -> None:
    silent = [str(p.relative_to(REPO_ROOT)) for p, tree in _modules()
              if tree.body and not ast.get_docstring(tree)]
    assert silent == [], f"modules without a docstring: {silent}"


@pytest.mark.parametrize(("lines", "flagged"), [(MAX_FUNCTION_LINES, False),
                                                (MAX_FUNCTION_LINES + 1, True)])
def test_the_length_check_counts_a_function_from_its_signature(lines: int,
                                                               flagged: bool) -> None:
    body = "".join(f"    x{k} = {k}\n" for k in range(lines - 1))
    tree = ast.parse(f"@decorator\ndef f():\n{body}")
    assert bool(long_functions(tree)) is flagged
