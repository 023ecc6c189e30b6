"""Shared pytest setup: make the repository root importable (`import learner...`)
however pytest is invoked; pyproject's `pythonpath = ["."]` does the same."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
