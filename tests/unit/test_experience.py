"""Padding and alignment of training tensors: completion token j of row i must be
predicted by the logits at sequence position P_i + j - 1."""

from __future__ import annotations

import numpy as np
import torch

from learner.experience import pad_batch, policy_forward, position_ids, ragged_to_padded


def test_pad_batch_layout_by_hand():
    # Row 0: prompt [5, 6], completion [7, 8, 9]; row 1: prompt [4], completion [3].
    t = pad_batch([np.array([5, 6]), np.array([4])], [np.array([7, 8, 9]), np.array([3])], pad_id=0)
    assert t.input_ids.tolist() == [[5, 6, 7, 8, 9], [4, 3, 0, 0, 0]]
    assert t.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # Token 7 sits at position 2, so position 1 predicts it; row 1's token 3 is predicted at 0.
    assert t.gather_index.tolist() == [[1, 2, 3], [0, 0, 0]]
    assert t.mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert t.completion_ids.tolist() == [[7, 8, 9], [3, 0, 0]]
    assert position_ids(t.attention_mask).tolist() == [[0, 1, 2, 3, 4], [0, 1, 1, 1, 1]]


def test_ragged_to_padded():
    out = ragged_to_padded([np.array([-1.0, -2.0]), np.array([-3.0])], width=3)
    assert out.tolist() == [[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]]


class _Bigram(torch.nn.Module):
    """logits at position t depend only on token t: row `tok` of a fixed table."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))

    def forward(self, input_ids, attention_mask, position_ids, use_cache):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_policy_forward_reads_the_predicting_position():
    model = _Bigram(10)
    t = pad_batch([np.array([5, 6]), np.array([4])], [np.array([7, 8, 9]), np.array([3])], pad_id=0)
    logprobs, entropy = policy_forward(model, t, with_entropy=True)
    table = torch.log_softmax(model.table, -1)
    # Row 0: 7 follows 6, 8 follows 7, 9 follows 8; row 1: 3 follows 4.
    expected0 = [table[6, 7], table[7, 8], table[8, 9]]
    torch.testing.assert_close(logprobs[0], torch.stack(expected0))
    torch.testing.assert_close(logprobs[1, 0], table[4, 3])
    assert entropy.shape == (2, 3)
