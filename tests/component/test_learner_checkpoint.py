"""A learner checkpoint restores the update exactly, on two ranks under ZeRO-3.

Each rank (its own spawned process, one gloo group, float32) trains a step, writes
a checkpoint, and trains a second step. Then fresh workers in the same group load
the checkpoint and train the second step again: the statistics and the gathered
weights must be bit for bit those of the first workers. Without the AdamW states,
the step counter (which seeds the minibatch permutations) or the KL controller,
the second step would differ.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from dataclasses import asdict

import pytest
import torch

from flywheel.net import free_port
from tests.component.test_learner_ranks import _scored

pytestmark = pytest.mark.timeout(600)


def _rank_main(policy_path: str, folder: str, rank: int, world: int, port: int, results) -> None:
    try:
        os.environ["DS_ACCELERATOR"] = "cpu"
        torch.set_num_threads(1)
        from learner.config import LearnerConfig
        from learner.worker import LearnerSetup, LearnerWorker

        setup = LearnerSetup(model_path=policy_path, rank=rank, world_size=world, master_addr="127.0.0.1",
                             master_port=port, device="cpu", dtype="float32", zero_stage=3, seed=0,
                             dist_timeout_s=120)
        # An adaptive KL coefficient, so the controller's state matters too.
        ppo = LearnerConfig(minibatch_size=8, ppo_epochs=2, lr=1e-3, kl_coef=0.05, kl_target=0.01, kl_horizon=64)
        scored = _scored(policy_path)

        def second_step(worker):
            exp = worker.make_experience(scored)
            stats = worker.train()
            weights = {name: t.float().numpy().copy() for name, t in worker._full_parameters()}
            return asdict(exp), asdict(stats), weights

        first = LearnerWorker(setup, ppo)
        first.make_experience(scored)
        first.train()
        first.save_checkpoint(folder)
        straight = second_step(first)
        resumed_worker = LearnerWorker(setup, ppo)
        assert resumed_worker.load_checkpoint(folder) == 1
        resumed = second_step(resumed_worker)
        resumed_worker.shutdown()
        if rank == 0:
            results.put(("ok", straight, resumed))
    except BaseException:
        results.put(("crashed", traceback.format_exc(), None))


def test_two_rank_zero3_checkpoint_resumes_the_update_exactly(policy_path, tmp_path):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port, world = free_port(), 2
    procs = [ctx.Process(target=_rank_main, args=(policy_path, str(tmp_path), r, world, port, results), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        kind, straight, resumed = results.get(timeout=500)
        assert kind == "ok", straight
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    (exp_a, stats_a, w_a), (exp_b, stats_b, w_b) = straight, resumed
    timings = {"make_experience_s", "train_s"}
    assert {k: v for k, v in exp_a.items() if k not in timings} == {k: v for k, v in exp_b.items() if k not in timings}
    assert {k: v for k, v in stats_a.items() if k not in timings} == {k: v for k, v in stats_b.items() if k not in timings}
    assert exp_a["kl_coef"] != 0.05  # the adaptive controller had moved before the checkpoint
    differ = [name for name in w_a if not (w_a[name] == w_b[name]).all()]
    assert not differ, f"weights differ after the resumed step: {differ[:5]}"
    assert sorted(os.listdir(tmp_path)) == ["critic", "learner_rank0.pt", "learner_rank1.pt", "policy"]
