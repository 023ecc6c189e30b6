"""Declaring typed settings: a dataclass field that carries its one-line doc and bounds.

Each component declares the settings it reads as a dataclass built from
`setting(...)` fields (the learner's in `learner/config.py`); `cluster/config.py`
composes them into the run config, loads YAML into it and validates every field
against the bounds written here. Standard library only.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def setting(default: Any, doc: str, **bounds: Any) -> Any:
    """A dataclass field with its documentation and bounds (`min`, `gt`, `max`) attached."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc, **bounds})
    return field(default=default, metadata={"doc": doc, **bounds})
