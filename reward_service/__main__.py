"""Command line: start the reward service.

    python -m reward_service --rule synthetic_gold --host 127.0.0.1 --port 8123
    python -m reward_service --model /path/to/hf_reward_model --port 8123

Prints `reward service ready on http://HOST:PORT` once the socket listens.
With --parent-pid, the server exits by itself when that process is gone, so a
crashed run leaves no orphan server behind (reward_service.process uses it).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m reward_service", description="Flywheel HTTP reward service"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--rule", help="name of a rule reward (reward_service/rules.py), e.g. synthetic_gold")
    source.add_argument("--model", help="local Hugging Face directory of a sequence-classification reward model")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port", type=int, default=8123, help="TCP port to listen on")
    parser.add_argument("--max-batch", type=int, default=4096, help="largest batch one request may carry")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="reward model dtype")
    parser.add_argument("--max-length", type=int, default=1024, help="reward model: tokens kept per text")
    parser.add_argument("--batch-size", type=int, default=16, help="reward model: texts per forward pass")
    parser.add_argument("--num-threads", type=int, default=1, help="torch threads for the reward model")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    parser.add_argument("--log-level", default="warning", help="uvicorn log level")
    return parser.parse_args(argv)


def _parent_gone(parent_pid: int, original_ppid: int) -> bool:
    import psutil

    # Our parent dying reparents us at once, even while it is still a zombie.
    if parent_pid == original_ppid and os.getppid() != original_ppid:
        return True
    try:
        return psutil.Process(parent_pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _watch_parent(parent_pid: int, server) -> None:
    """Stop the server when `parent_pid` is gone; force the exit if it lingers."""
    original_ppid = os.getppid()
    while not _parent_gone(parent_pid, original_ppid):
        time.sleep(1.0)
    print(f"reward service: parent process {parent_pid} is gone, exiting", file=sys.stderr, flush=True)
    server.should_exit = True
    time.sleep(5.0)  # graceful shutdown normally finishes well before this
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    from reward_service.rules import RULES

    if args.rule is not None and args.rule not in RULES:
        print(
            f"unknown reward rule {args.rule!r}; valid rules: {', '.join(sorted(RULES))}",
            file=sys.stderr,
        )
        return 2

    import uvicorn

    from reward_service.scorers import ModelScorer, RuleScorer
    from reward_service.server import create_app

    if args.rule is not None:
        scorer = RuleScorer(args.rule)
    else:
        if not os.path.isdir(args.model):
            print(
                f"--model {args.model!r} is not a directory; give a local Hugging Face model directory",
                file=sys.stderr,
            )
            return 2
        scorer = ModelScorer(
            args.model,
            dtype=args.dtype,
            max_length=args.max_length,
            batch_size=args.batch_size,
            num_threads=args.num_threads,
        )
    app = create_app(scorer, max_batch=args.max_batch)

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                print(f"reward service ready on http://{args.host}:{args.port}", flush=True)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    server = _Server(config)
    if args.parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(args.parent_pid, server), daemon=True).start()
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
