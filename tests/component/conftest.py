"""Fixtures shared by the component tests: the embedded tiny policy, built once and cached."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def model_path() -> str:
    """Directory of the embedded tiny policy (built on first use, cached in ~/.cache/flywheel)."""
    from flywheel.tiny_model import ensure_embedded_model

    return str(ensure_embedded_model("policy"))


@pytest.fixture(scope="session")
def policy_path(model_path) -> str:
    return model_path
