"""The checkpoint folder's life (atomic commit, pruning, interrupted writes), the checks a
resume makes against the config, and the driver's own state (prompt position, RNGs)."""

from __future__ import annotations

import json
import random
import shlex
from dataclasses import asdict

import numpy as np
import pytest

from cluster import checkpoints
from cluster.config import ConfigError, from_dict
from cluster.data import PromptStream


def _cfg(tmp_path, **run):
    return from_dict({"run": {"output_dir": str(tmp_path), **run}})


class _Stream:
    def state(self):
        return {"rng": {}, "order": [3, 1], "epoch": 1}


def _write(tmp_path, cfg, step: int):
    tmp = checkpoints.begin(tmp_path, step)
    (tmp / "learner_rank0.pt").write_bytes(b"rank state")
    state = checkpoints.driver_state(step, _Stream(), {"eval_gold_reward": 0.5}, None)
    return checkpoints.commit(tmp, cfg, state, {"learner_rank*.pt": "ranks"}, reference_model="/models/ref")


def test_commit_renames_whole_folders_and_keeps_the_newest(tmp_path):
    cfg = _cfg(tmp_path, keep_checkpoints=2, steps=9)
    for step in (3, 6, 9):
        _write(tmp_path, cfg, step)
    assert [p.name for p in checkpoints.complete(tmp_path)] == ["step_000006", "step_000009"]
    manifest = json.loads((checkpoints.latest(tmp_path) / "manifest.json").read_text())
    assert (manifest["step"], manifest["policy_version"], manifest["reference_model"]) == (9, 9, "/models/ref")
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_an_interrupted_write_is_ignored_then_removed(tmp_path):
    cfg = _cfg(tmp_path, steps=6)
    _write(tmp_path, cfg, 3)
    (tmp_path / "checkpoints" / "step_000006.tmp" / "policy").mkdir(parents=True)  # killed while writing
    (tmp_path / "checkpoints" / "step_000005").mkdir()  # no manifest: never finished
    assert checkpoints.latest(tmp_path).name == "step_000003"
    resumed = checkpoints.load(tmp_path, _cfg(tmp_path, steps=6, resume=str(tmp_path)))
    assert resumed.driver.step == 3 and resumed.driver.before == {"eval_gold_reward": 0.5}
    assert not (tmp_path / "checkpoints" / "step_000006.tmp").exists()


def test_a_fresh_run_clears_an_earlier_runs_checkpoints(tmp_path):
    cfg = _cfg(tmp_path, steps=30)
    for step in (20, 30):
        _write(tmp_path, cfg, step)
    checkpoints.fresh_start(tmp_path)
    _write(tmp_path, _cfg(tmp_path, steps=10), 10)
    # Kept, the earlier run's step 30 would have pruned this run's step 10 and answered --resume.
    assert [p.name for p in checkpoints.complete(tmp_path)] == ["step_000010"]


def test_resume_refuses_what_it_cannot_continue(tmp_path):
    with pytest.raises(ConfigError, match="has no complete checkpoint.*checkpoint_every > 0"):
        checkpoints.load(tmp_path, _cfg(tmp_path))
    _write(tmp_path, _cfg(tmp_path, steps=3), 3)
    # A key that changes the math is named with both values ...
    with pytest.raises(ConfigError, match=r"learner\.lr: .* written with 0\.0001, this run has 0\.001"):
        checkpoints.load(tmp_path, from_dict({"run": {"output_dir": str(tmp_path)}, "learner": {"lr": 1e-3}}))
    # ... run.steps is the total, so fewer than the checkpoint's are refused ...
    with pytest.raises(ConfigError, match="run.steps: .* at least 3, got 2"):
        checkpoints.load(tmp_path, _cfg(tmp_path, steps=2))
    # ... and length, deadlines and resources may change.
    ok = from_dict({"run": {"output_dir": str(tmp_path), "steps": 8, "step_timeout_s": 60, "checkpoint_every": 2},
                    "reward": {"timeout_s": 5}})
    assert checkpoints.load(tmp_path, ok).path.name == "step_000003"


def test_resume_must_continue_in_its_own_directory(tmp_path):
    with pytest.raises(ConfigError, match="run.resume: .* must be the same"):
        from_dict({"run": {"output_dir": str(tmp_path / "a"), "resume": str(tmp_path / "b")}})
    with pytest.raises(ConfigError, match="run.resume: only a PPO run"):
        from_dict({"run": {"output_dir": "x", "resume": "x", "stage": "sft"}})


def test_checkpoints_are_due_every_n_steps_and_after_the_last():
    cfg = from_dict({"run": {"steps": 7, "checkpoint_every": 3}})
    assert [k for k in range(1, 8) if checkpoints.is_due(k, cfg)] == [3, 6, 7]
    cfg.run.checkpoint_every = 0
    assert not any(checkpoints.is_due(k, cfg) for k in range(1, 8))


def test_metrics_of_steps_after_the_checkpoint_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "kl": s / 10}) + "\n" for s in (0, 1, 2, 3)))
    assert checkpoints.truncate_metrics(path, 2) == 2
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1]
    assert checkpoints.truncate_metrics(tmp_path / "none.jsonl", 2) == 0


def test_the_resume_command_repeats_the_overrides_and_sets_the_total():
    command = checkpoints.resume_command("configs/x.yaml", "/runs/my run", ["learner.lr=1e-5", "run.steps=3",
                                                                            "run.output_dir=/elsewhere"], 6)
    assert shlex.split(command) == ["python", "-m", "cluster.launch", "--config", "configs/x.yaml", "--output-dir",
                                    "/runs/my run", "--resume", "/runs/my run", "learner.lr=1e-5", "run.steps=6"]


def _stream(seed=0):
    prompts = [f"p{i}" for i in range(5)]
    return PromptStream(prompts, lambda p, add_special_tokens: {"input_ids": [1, 2]}, batch_size=3, seed=seed,
                        max_prompt_tokens=8, source="test")


def test_prompt_stream_continues_from_its_state_across_epochs():
    straight = _stream()
    batches = [straight.next_batch().prompts for _ in range(5)]
    first = _stream()
    for _ in range(2):
        first.next_batch()  # mid-epoch: 6 of 10 prompts drawn over two epochs
    resumed = _stream(seed=123)  # a different generator, replaced by the saved state
    resumed.restore(json.loads(json.dumps(first.state())))
    assert [resumed.next_batch().prompts for _ in range(3)] == batches[2:]


def test_driver_rngs_survive_json():
    state = checkpoints.driver_state(1, _Stream(), {}, None)
    expected = (np.random.random(3).tolist(), random.random())
    checkpoints.restore_driver_rngs(checkpoints.DriverState(**json.loads(json.dumps(asdict(state)))))
    assert (np.random.random(3).tolist(), random.random()) == expected


def test_a_stopped_run_prints_its_resume_command_once_it_has_a_checkpoint(tmp_path, capsys):
    from cluster.launch import _print_resume_command

    cfg = _cfg(tmp_path, steps=6)
    _print_resume_command(cfg, "c.yaml", ["learner.lr=1e-5"])
    assert capsys.readouterr().err == ""  # nothing to resume from yet
    _write(tmp_path, cfg, 3)
    _print_resume_command(cfg, "c.yaml", ["learner.lr=1e-5"])
    err = capsys.readouterr().err
    assert f"after step 3, is {tmp_path}/checkpoints/step_000003" in err
    assert err.rstrip().endswith(f"--resume {tmp_path} learner.lr=1e-5 run.steps=6")
