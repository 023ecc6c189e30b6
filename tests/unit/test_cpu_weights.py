"""The in-place loader's pure parts (actors/cpu_weights.py): joining a fused layer's parts
without a copy when they lie next to each other in a bucket, and the loading-path switch."""

from __future__ import annotations

import pytest
import torch

from actors.cpu_weights import LOAD_ENV, _joined, load_mode


def _bucket_views(shapes, gap: int = 0):
    """Views of one flat buffer, one per shape, laid out in order with `gap` elements between."""
    total = sum(r * c for r, c in shapes) + gap * len(shapes)
    flat = torch.arange(total, dtype=torch.float32)
    views, offset = [], 0
    for rows, cols in shapes:
        views.append(flat[offset : offset + rows * cols].view(rows, cols))
        offset += rows * cols + gap
    return flat, views


def test_adjacent_parts_join_as_a_view_of_the_bucket():
    # q (4 x 3), k (2 x 3), v (2 x 3) back to back: rows 0..7 of one (8, 3) matrix.
    flat, parts = _bucket_views([(4, 3), (2, 3), (2, 3)])
    joined = _joined(parts)
    assert joined.shape == (8, 3)
    assert joined.data_ptr() == parts[0].data_ptr()  # no copy
    torch.testing.assert_close(joined, torch.cat(parts), rtol=0, atol=0)
    flat[0] = -1.0  # it is the bucket itself
    assert joined[0, 0] == -1.0


def test_parts_apart_are_copied_in_row_order():
    _, parts = _bucket_views([(4, 3), (2, 3)], gap=5)  # alignment padding between them
    joined = _joined(parts)
    assert joined.data_ptr() != parts[0].data_ptr()
    torch.testing.assert_close(joined, torch.cat(parts), rtol=0, atol=0)
    # Out of order in memory (v before k) is not adjacency either.
    _, (q, k, v) = _bucket_views([(4, 3), (2, 3), (2, 3)])
    torch.testing.assert_close(_joined([q, v, k]), torch.cat([q, v, k]), rtol=0, atol=0)


def test_a_single_part_is_used_as_it_is():
    _, (w,) = _bucket_views([(5, 2)])
    assert _joined([w]) is w


def test_load_mode_names_the_variable_and_its_values(monkeypatch):
    monkeypatch.delenv(LOAD_ENV, raising=False)
    assert load_mode() == "auto"
    monkeypatch.setenv(LOAD_ENV, "Reload")
    assert load_mode() == "reload"
    monkeypatch.setenv(LOAD_ENV, "fast")
    with pytest.raises(ValueError, match=f"{LOAD_ENV} must be 'auto' or 'reload', got 'fast'"):
        load_mode()
