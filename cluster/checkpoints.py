"""Checkpoints of a PPO run and resuming from them.

A checkpoint after k steps is the folder `output_dir/checkpoints/step_00000k/`:

    manifest.json        what the folder holds, the step, policy version and reference model
    config.json          the run's config (a resume must match it in every key that changes the math)
    driver_state.json    prompt stream position, the driver's numpy / python RNG states, the
                         "before" evaluation and the sync probe sequence
    policy/, critic/     DeepSpeed engine checkpoints (weights and AdamW states, one file per
                         ZeRO partition), written by every learner rank together
    learner_rank{r}.pt   rank r's step counter (which seeds its minibatch permutations), KL
                         controller and torch / numpy / python RNG states

It is written into `step_00000k.tmp/` and renamed when whole, so a crash while
writing leaves the previous checkpoint intact and a `.tmp` folder that the next
run removes. The learner ranks write into the same folder: on a cluster of
several nodes, output_dir must be storage every node mounts at the same path.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shlex
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cluster.config import ConfigError, FlywheelConfig

log = logging.getLogger("flywheel.checkpoints")

FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Keys that may differ between a run and its resumption: they change how long it runs, where it
# writes, its deadlines and its resources, never the numbers it computes.
MAY_DIFFER = frozenset({
    "run.steps", "run.output_dir", "run.resume", "run.checkpoint_every", "run.keep_checkpoints",
    "run.step_timeout_s", "run.save_final", "run.check_sync",
    "rollout.start_timeout_s", "rollout.kv_cache_gib", "rollout.gpu_memory_utilization",
    "rollout.num_cpus_per_actor", "rollout.num_threads", "learner.num_cpus_per_rank", "learner.num_threads",
    "reward.port", "reward.timeout_s", "reward.start_timeout_s", "reward.batch_size",
    "sync.timeout_s", "sync.bucket_mb", "sync.load_threads", "sync.check_tolerance", "sync.probe_tokens", "ray.address", "ray.num_cpus",
})


@dataclass
class DriverState:
    """The driver's share of a checkpoint (JSON)."""

    step: int  # steps done; the next step to run has this index
    policy_version: int  # version of the policy the rollout actors hold
    prompts: dict[str, Any]  # PromptStream.state()
    numpy_rng: list  # np.random.get_state(), arrays as lists
    python_rng: list  # random.getstate(), tuples as lists
    before: dict[str, float]  # the held-out evaluation of the starting policy
    probe: dict[str, list[int]] | None  # the sync probe's prompt_ids / completion_ids, once chosen


@dataclass
class Checkpoint:
    path: Path
    manifest: dict[str, Any]
    driver: DriverState


def root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def step_dir(out_dir: str | Path, step: int) -> Path:
    return root(out_dir) / f"step_{step:06d}"


def is_due(steps_done: int, cfg: FlywheelConfig) -> bool:
    """Every run.checkpoint_every steps, and after the run's last step."""
    every = cfg.run.checkpoint_every
    return every > 0 and (steps_done % every == 0 or steps_done == cfg.run.steps)


def complete(out_dir: str | Path) -> list[Path]:
    """The whole checkpoints of a run (a manifest is written last), oldest first."""
    found = []
    for path in root(out_dir).glob("step_*"):
        match = _STEP_DIR.match(path.name)
        if match and (path / "manifest.json").is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def latest(out_dir: str | Path) -> Path | None:
    done = complete(out_dir)
    return done[-1] if done else None


def remove_partial(out_dir: str | Path) -> list[Path]:
    """Remove the `.tmp` folders of checkpoints whose writing was interrupted; the folders removed."""
    partial = sorted(root(out_dir).glob("step_*.tmp"))
    for path in partial:
        log.warning("removing %s: a checkpoint whose writing was interrupted", path)
        shutil.rmtree(path, ignore_errors=True)
    return partial


def begin(out_dir: str | Path, step: int) -> Path:
    """An empty folder to write the checkpoint of `step` into (absolute: learner ranks write there too)."""
    tmp = step_dir(out_dir, step).with_suffix(".tmp").resolve()
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, cfg: FlywheelConfig, driver: DriverState, holds: dict[str, str],
           reference_model: str) -> Path:
    """Add the driver's files and the manifest to `tmp`, rename it into place and prune old ones."""
    (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    (tmp / "driver_state.json").write_text(json.dumps(asdict(driver)))
    manifest = {
        "format": FORMAT, "step": driver.step, "policy_version": driver.policy_version,
        "reference_model": reference_model, "learner_world_size": cfg.learner.world_size,
        "zero_stage": cfg.learner.zero_stage, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "holds": {"config.json": "the run's config", "driver_state.json": "prompt stream position, driver RNG "
                  "states, the 'before' evaluation, the sync probe", **holds},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))  # last: it marks the folder whole
    final = tmp.with_suffix("")
    if final.exists():  # the same step written again (a resume that ran no new step)
        shutil.rmtree(final)
    tmp.rename(final)
    for old in complete(tmp.parent.parent)[: -cfg.run.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint after step %d written to %s", driver.step, final)
    return final


def driver_state(step: int, prompts, before: dict[str, float], probe) -> DriverState:
    """The driver's state after `step` steps; `prompts` a PromptStream, `probe` a SyncProbe or None."""
    np_state = np.random.get_state()
    return DriverState(
        step=step, policy_version=step, prompts=prompts.state(),
        numpy_rng=[np_state[0], np_state[1].tolist(), *np_state[2:]],
        python_rng=_lists(random.getstate()), before=before,
        probe=None if probe is None else {"prompt_ids": probe.prompt_ids, "completion_ids": probe.completion_ids},
    )


def restore_driver_rngs(state: DriverState) -> None:
    kind, keys, *rest = state.numpy_rng
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(_tuples(state.python_rng))


def _lists(value):
    return [_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def load(out_dir: str | Path, cfg: FlywheelConfig) -> Checkpoint:
    """The latest whole checkpoint of the run in `out_dir`, checked against `cfg`; or a ConfigError that says why not."""
    remove_partial(out_dir)
    path = latest(out_dir)
    if path is None:
        raise ConfigError(
            f"run.resume: {out_dir} has no complete checkpoint (looked for {root(out_dir)}/step_*/manifest.json); "
            "a run writes them when run.checkpoint_every > 0"
        )
    manifest = json.loads((path / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"run.resume: {path} is checkpoint format {manifest.get('format')}, this code reads {FORMAT}")
    check_same_math(json.loads((path / "config.json").read_text()), cfg.to_dict(), path)
    driver = DriverState(**json.loads((path / "driver_state.json").read_text()))
    if cfg.run.steps < driver.step:
        raise ConfigError(f"run.steps: the checkpoint {path} is after step {driver.step} already; "
                          f"run.steps is the total, so ask for at least {driver.step}, got {cfg.run.steps}")
    return Checkpoint(path=path, manifest=manifest, driver=driver)


def fresh_start(out_dir: str | Path) -> None:
    """A run from step 0 clears the checkpoints of an earlier run in its directory: kept, they would
    be pruned in the wrong order and a later --resume could continue the other run."""
    remove_partial(out_dir)
    earlier = complete(out_dir)
    if earlier:
        log.warning("removing %d checkpoint(s) of an earlier run in %s: this run starts from step 0 (to continue "
                    "that run instead, pass --resume %s)", len(earlier), root(out_dir), out_dir)
    for path in earlier:
        shutil.rmtree(path)


def describe_latest(out_dir: str | Path) -> str:
    """One clause for an error message: where the last whole checkpoint is, or that there is none."""
    path = latest(out_dir)
    if path is None:
        return "no checkpoint was written (run.checkpoint_every > 0 writes them)"
    step = json.loads((path / "manifest.json").read_text())["step"]
    return f"the last complete checkpoint, after step {step}, is {path}"


def check_same_math(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """Raise ConfigError naming the first key outside MAY_DIFFER whose value differs."""
    old, new = _flatten(saved), _flatten(current)
    for key in sorted(set(old) | set(new)):
        if key not in MAY_DIFFER and old.get(key) != new.get(key):
            raise ConfigError(
                f"{key}: the checkpoint {where} was written with {old.get(key)!r}, this run has {new.get(key)!r}; "
                f"a resumed run must match in every key that changes the math (only "
                f"{', '.join(sorted(MAY_DIFFER))} may differ). Pass the original config and overrides"
            )


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        flat.update(_flatten(value, name) if isinstance(value, dict) else {name: value})
    return flat


def truncate_metrics(path: Path, steps_done: int) -> int:
    """Keep the lines of steps before `steps_done` (a killed run may have logged later ones); lines dropped."""
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", -1) < steps_done]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return len(lines) - len(kept)


def resume_command(config_path: str, out_dir: str, overrides: list[str], steps: int) -> str:
    """The launch command that continues the run in `out_dir` with the same config and overrides."""
    own = ("run.steps=", "run.output_dir=", "run.resume=")
    kept = [o for o in overrides if not o.startswith(own)]
    args = ["python", "-m", "cluster.launch", "--config", config_path, "--output-dir", out_dir,
            "--resume", out_dir, *kept, f"run.steps={steps}"]
    return shlex.join(args)
