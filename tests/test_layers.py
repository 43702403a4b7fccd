"""Layers point one way: shared/ (stage contract, storage, layout, options, models, run state)
imports nothing of workers/, producer/ or search/; workers/ nothing of producer/ or search/.
And no module of the product does two jobs (over 500 lines)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ABOVE = {"shared": ("workers", "producer", "search"), "workers": ("producer", "search")}


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("layer", sorted(ABOVE))
def test_a_layer_imports_nothing_above_it(layer):
    wrong = {f"{p.relative_to(REPO)}: {name}" for p in (REPO / layer).rglob("*.py") for name in imported(p)
             if any(name.startswith(f"clipfleet.{up}") for up in ABOVE[layer])}
    assert not wrong, sorted(wrong)


def test_no_module_of_the_product_is_over_500_lines():
    long = {str(p.relative_to(REPO)): n for folder in ("shared", "workers", "producer", "search")
            for p in (REPO / folder).rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long
