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


def _zen_layer(prepacked: bool):
    """A linear layer as vLLM's zentorch dispatch leaves it: the closure holds the (packed) weight it
    computes with, the prepacked flag is the lambda's one default, and the parameter is emptied."""
    module = torch.nn.Module()
    zen_weight = torch.zeros(8, 3)
    module.cpu_linear = lambda x, weight, bias, _p=prepacked: torch.nn.functional.linear(x, zen_weight, bias)
    module.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    return module, zen_weight


def test_a_zentorch_layer_is_repacked_into_the_tensor_it_computes_with(monkeypatch):
    import actors.cpu_weights as cpu_weights

    module, zen_weight = _zen_layer(prepacked=True)
    assert cpu_weights._linear_kind(module) == "zentorch"
    # Unpacked, zentorch caches blocked copies by address, which an in-place update would leave stale.
    assert cpu_weights._linear_kind(_zen_layer(prepacked=False)[0]) is None
    # A stand-in for zentorch's packing (which needs zentorch): any fixed rearrangement of the bytes.
    monkeypatch.setattr(cpu_weights, "_zen_prepack", lambda w: w.contiguous().flip(1))
    _, (q, k, v) = _bucket_views([(4, 3), (2, 3), (2, 3)])
    loader = cpu_weights.DirectCpuLoader([cpu_weights._Target(module, "zentorch", ["q", "k", "v"], rows=[4, 2, 2])])
    loader.load([("q", q), ("k", k)])
    assert not zen_weight.any()  # a fused layer waits for all its parts
    loader.load([("v", v)])
    torch.testing.assert_close(zen_weight, torch.cat([q, k, v]).flip(1), rtol=0, atol=0)
    assert loader.finish() == []
