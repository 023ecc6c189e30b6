"""A pipeline of stages in one command: `run.stages: [sft, reward_model, ppo]`.

Each stage runs as its own launch would (`cluster/stages.py` or the PPO driver)
in `run.output_dir/<stage>`, and reads the previous stage's output as it is:
every stage after `sft` (or `dpo`) starts from that stage's policy, which PPO
also keeps as its KL reference; `ppo` after `reward_model` scores with the
judge that stage saved, served over HTTP by the reward service. A stage that
fails stops the pipeline; the stages before it keep their outputs.
"""

from __future__ import annotations

import copy
import json
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from cluster.config import FlywheelConfig, check_config

log = logging.getLogger("flywheel.pipeline")


def stage_config(cfg: FlywheelConfig, stage: str, done: dict[str, str]) -> FlywheelConfig:
    """The config of one stage: its own output directory and the models the earlier stages saved."""
    out = copy.deepcopy(cfg)
    out.run.stages = []
    out.run.stage = stage
    out.run.output_dir = str(Path(cfg.run.output_dir) / stage)
    policy = done.get("dpo") or done.get("sft")
    if policy and stage != "reward_model":
        out.model.path = policy
    if policy and stage == "reward_model" and cfg.reward_model.backbone == "policy":
        out.model.path = policy  # the judge starts from the fine-tuned policy, as in InstructGPT
    if stage == "ppo" and "reward_model" in done:
        out.reward.rule, out.reward.model_path = None, done["reward_model"]
    check_config(out)
    return out


def run_pipeline(cfg: FlywheelConfig) -> dict[str, Any]:
    """Run `run.stages` in order; returns the summary also written to output_dir/pipeline.json."""
    from cluster.driver import run, start_ray
    from cluster.stages import run_stage

    done: dict[str, str] = {}
    summaries: dict[str, Any] = {}
    total = 0.0
    with ExitStack() as stack:
        # One Ray for all the stages (each stage joins it rather than starting and stopping its own).
        start_ray(cfg, stack)
        for stage in cfg.run.stages:
            stage_cfg = stage_config(cfg, stage, done)
            log.info("pipeline: %s in %s", stage, stage_cfg.run.output_dir)
            summary = run(stage_cfg) if stage == "ppo" else run_stage(stage_cfg)
            if summary.get("model"):
                done[stage] = summary["model"]
            summaries[stage] = {k: v for k, v in summary.items() if k != "machine"}
            total += summary["total_s"]
    result = {"stages": cfg.run.stages, "summaries": summaries, "total_s": total}
    Path(cfg.run.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.run.output_dir) / "pipeline.json").write_text(json.dumps(result, indent=2))
    return result
