"""Small helpers shared by several test modules."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

GARBAGE = 1e9  # written into padding; must never reach a result


def close(actual, expected, atol=1e-4):
    """assert_close in float64 with an absolute tolerance only."""
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=atol,
        rtol=0,
    )


def imported_modules(path: str | Path, top_level: bool = False) -> set[str]:
    """Every module a source file imports (its top-level package with top_level=True)."""
    tree = ast.parse(Path(path).read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return {n.split(".")[0] for n in names} if top_level else names
