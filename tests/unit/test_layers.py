"""The house in layers: the import contracts in pyproject.toml hold.

cluster/ wires the components; actors/, learner/ and reward_service/ import
nothing from cluster/ or from each other; all stand on the bottom package
flywheel/, which imports no Ray, vLLM or DeepSpeed. `lint-imports` checks it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Contracts: 5 kept, 0 broken." in result.stdout, result.stdout[-2000:]
