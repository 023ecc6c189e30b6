"""Entry point: `python -m cluster.launch --config configs/<x>.yaml [--output-dir DIR] [key=value ...]`.

Runs the same way on a laptop (starts a local Ray) and under
`ray job submit --working-dir . -- python -m cluster.launch --config ...`
(joins the job's cluster).  Exit code 0 on success, 2 for a bad config,
1 for a failure during the run, always with a one-paragraph reason on stderr.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import traceback


def _stop_on_signal(signum, frame) -> None:
    """Ctrl-C (SIGINT), and the SIGTERM of `ray job stop`, `kill` and schedulers: unwind, so every
    started process (actors, learner ranks, the reward service) is stopped on the way out."""
    raise KeyboardInterrupt(f"signal {signum}")


def _take_stop_signals() -> None:
    """Handle SIGINT and SIGTERM whatever this process inherited: a parent may start it with them
    ignored or blocked (a shell's background job ignores SIGINT; a process that blocked SIGINT
    passes the block on through exec), and then a stop request would be lost and the run go on."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop_on_signal)


def _print_resume_command(cfg, config_path: str, overrides: list[str]) -> None:
    """After a PPO run stops early: the command that continues it from its last checkpoint, if it wrote one."""
    from cluster import checkpoints

    if cfg.run.stages or cfg.run.stage != "ppo" or checkpoints.latest(cfg.run.output_dir) is None:
        return
    command = checkpoints.resume_command(config_path, cfg.run.output_dir, overrides, cfg.run.steps)
    print(f"flywheel: {checkpoints.describe_latest(cfg.run.output_dir)}; continue the run with:\n  {command}",
          file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML run config (see configs/)")
    parser.add_argument("--describe-config", action="store_true", help="list every config key with its default and doc")
    parser.add_argument("--output-dir", help="overrides run.output_dir")
    parser.add_argument("--resume", metavar="DIR", help="continue the PPO run in DIR from its latest checkpoint "
                        "up to run.steps (the total); sets run.resume, and run.output_dir unless --output-dir is given")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. run.steps=3 learner.lr=1e-5")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from cluster.config import ConfigError, describe, load_config
    from flywheel.hardware import apply_cpu_emulation

    try:
        # Before Ray starts: its workers inherit the settings that keep every library on that kind.
        if emulated := apply_cpu_emulation():
            logging.getLogger("flywheel").info("emulating an %s-only CPU (FLYWHEEL_EMULATE_CPU)", emulated)
    except ValueError as exc:
        print(f"flywheel: {exc}", file=sys.stderr)
        return 2

    if args.describe_config:
        print("\n".join(describe()))
        return 0
    if not args.config:
        parser.error("--config is required (e.g. --config configs/local_tiny_ppo.yaml)")

    overrides = list(args.overrides)
    if args.output_dir or args.resume:
        overrides.append(f"run.output_dir={args.output_dir or args.resume}")
    if args.resume:
        overrides.append(f"run.resume={args.resume}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"flywheel: bad config: {exc}", file=sys.stderr)
        return 2
    from cluster.jobs import durable_output_dir

    _take_stop_signals()

    cfg.run.output_dir, moved = durable_output_dir(cfg.run.output_dir)
    if moved:
        print(f"flywheel: {moved}", file=sys.stderr)
    if cfg.run.resume is not None:
        cfg.run.resume = cfg.run.output_dir  # the same directory (checked at load), moved alike under a job

    from cluster.driver import run
    from cluster.pipeline import run_pipeline
    from cluster.stages import run_stage

    from flywheel.data_formats import DataError

    try:
        if cfg.run.stages:
            summary = run_pipeline(cfg)
        else:
            summary = run(cfg) if cfg.run.stage == "ppo" else run_stage(cfg)
    except ConfigError as exc:
        print(f"flywheel: bad config: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:
        print(f"flywheel: bad data: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flywheel: interrupted; every started process was stopped", file=sys.stderr)
        _print_resume_command(cfg, args.config, list(args.overrides))
        return 130
    except Exception as exc:  # the run failed: say why in one paragraph
        from cluster.driver import RunError
        from cluster.groups import RemoteCallError
        from reward_service.client import RewardServiceError

        # Errors we raise ourselves already say what to do; anything else gets its traceback.
        if not isinstance(exc, (RewardServiceError, RemoteCallError, RunError)):
            traceback.print_exc(file=sys.stderr)
        print(f"flywheel: run failed: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        _print_resume_command(cfg, args.config, list(args.overrides))
        return 1
    what = " -> ".join(cfg.run.stages) or cfg.run.stage
    print(f"flywheel: {what} done in {summary['total_s']:.0f} s; outputs in {cfg.run.output_dir}")
    if cfg.run.stages:
        summary = summary["summaries"][cfg.run.stages[-1]]
    before = summary.get("before", {}).get("eval_gold_reward")
    after = summary.get("after", {}).get("eval_gold_reward")
    if "model" in summary:
        print(f"flywheel: model saved in {summary['model']}")
    if before is not None and after is not None:
        print(f"flywheel: held-out gold reward {before:.4f} -> {after:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
