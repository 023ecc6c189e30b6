"""The driver's per-step checks: non-finite scores stop the step, and the weight-sync
probe covers every actor, fails above its tolerance and always fits the context."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cluster.driver import RunError, SyncProbe, check_scores
from flywheel.records import Rollout, ScoredRollout


def _scored(scores: list[float]) -> ScoredRollout:
    n = len(scores)
    rollout = Rollout(prompts=[f"prompt {i}" for i in range(n)], prompt_ids=[np.array([1, 2])] * n,
                      completions=[f" words {i}" for i in range(n)], completion_ids=[np.array([3])] * n,
                      logprobs=[np.zeros(1, np.float32)] * n, finish_reasons=["length"] * n, policy_version=0,
                      gen_s=0.0)
    return ScoredRollout(rollout=rollout, scores=np.array(scores, np.float32))


def test_finite_scores_pass():
    check_scores(_scored([0.1, 0.5, 1.0]), "http://127.0.0.1:1", None)


def test_nan_and_missing_scores_name_the_rows_and_the_service():
    with pytest.raises(RunError) as info:
        check_scores(_scored([0.1, float("nan"), 0.3, float("inf")]), "http://127.0.0.1:8123", None)
    msg = str(info.value)
    for part in ("http://127.0.0.1:8123", "2 of 4 samples", "rows [1, 3]", "'prompt 1'", "' words 1'",
                 "Nothing was trained"):
        assert part in msg, msg


def _services(actor_logprobs: list[list[float]], learner_logprobs: list[float]):
    rollouts = SimpleNamespace(sequence_logprobs=lambda p, c: [np.array(v, np.float32) for v in actor_logprobs])
    answer = SimpleNamespace(result=lambda: np.array(learner_logprobs, np.float32))
    learner = SimpleNamespace(start_sequence_logprobs=lambda p, c: answer)
    return SimpleNamespace(rollouts=rollouts, learner=learner)


def test_probe_checks_every_actor():
    probe = SyncProbe(np.array([1, 2, 3]), np.array([4, 5]), max_model_len=64, tolerance=0.1)
    before = [np.array([-1.0, -2.0]), np.array([-1.0, -2.0])]
    ok = probe.after(_services([[-1.5, -2.0], [-1.52, -2.01]], [-1.5, -2.0]), before)
    assert ok["sync_logprob_err"] == pytest.approx(0.02, abs=1e-6)  # the worse actor
    assert ok["sync_logprob_shift"] == pytest.approx(0.5, abs=1e-6)  # the least moved actor
    # Actor 1 kept stale weights: its logprobs still match "before", 0.5 away from the learner's.
    with pytest.raises(RunError, match=r"rollout actor 1's logprobs .* differ from the learner's by 0.5"):
        probe.after(_services([[-1.5, -2.0], [-1.0, -2.0]], [-1.5, -2.0]), before)
    # An actor that closed most of its gap (1.0 before the sync, 0.15 after: rounding on an unlikely
    # token) passes although 0.15 exceeds the tolerance.
    far = [np.array([-1.0, -2.0]), np.array([-1.0, -2.0])]
    ok = probe.after(_services([[-1.5, -2.0], [-1.65, -2.0]], [-1.5, -2.0]), [far[0], np.array([-2.5, -2.0])])
    assert ok["sync_logprob_err"] == pytest.approx(0.15, abs=1e-6)
    # Closing less than half of the gap (0.5 before, 0.3 after) fails, whatever the cause.
    with pytest.raises(RunError, match="of its gap before the sync"):
        probe.after(_services([[-1.5, -2.0], [-1.8, -2.0]], [-1.5, -2.0]), [far[0], np.array([-2.0, -2.0])])


def test_probe_fits_the_context():
    # A prompt at the limit (256 - 16 new tokens) and a full completion: vLLM needs room for one more token.
    probe = SyncProbe(np.arange(240), np.arange(16), max_model_len=256, tolerance=0.1)
    assert len(probe.prompt_ids) + len(probe.completion_ids) == 255
    assert probe.completion_ids == list(range(15)) and probe.prompt_ids == list(range(240))
    longest = SyncProbe(np.arange(255), np.arange(1), max_model_len=256, tolerance=0.1)
    assert len(longest.prompt_ids) + len(longest.completion_ids) <= 255 and longest.completion_ids == [0]


def test_probe_keeps_the_first_tokens_of_a_long_completion():
    # sync.probe_tokens caps the sequence read three times per sync: the prompt, then the completion's start.
    probe = SyncProbe(np.arange(8), np.arange(100, 300), max_model_len=512, tolerance=0.1, max_tokens=64)
    assert probe.prompt_ids == list(range(8)) and probe.completion_ids == list(range(100, 156))
    # A prompt longer than the cap keeps its end and one completion token.
    long_prompt = SyncProbe(np.arange(100), np.arange(100, 120), max_model_len=512, tolerance=0.1, max_tokens=64)
    assert long_prompt.prompt_ids == list(range(37, 100)) and long_prompt.completion_ids == [100]


def test_shared_memory_cleanup_removes_only_the_groups_own_buffers(tmp_path, monkeypatch):
    """DeepSpeed names its buffers ..._{uid}_{addr}_{port}_{rank}; a run removes its own, never others'."""
    import learner.engine as worker

    monkeypatch.setattr(worker, "shm_prefix", lambda addr, port: f"{tmp_path}/deepspeed_allreduce_buffer_0_{addr}_{port}_")
    ours = [tmp_path / f"deepspeed_allreduce_buffer_0_10.0.0.1_29500_{r}" for r in range(2)]
    theirs = [tmp_path / "deepspeed_allreduce_buffer_0_10.0.0.1_29501_0", tmp_path / "unrelated"]
    for path in ours + theirs:
        path.write_bytes(b"x")
    assert worker.remove_shm("10.0.0.1", 29500, rank=1) == [str(ours[1])]  # a rank's own shutdown
    assert worker.remove_shm("10.0.0.1", 29500) == [str(ours[0])]  # the driver's sweep of the group
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in theirs)
