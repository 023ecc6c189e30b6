"""The dashboard: a web page of a run's figures over steps, served by the run itself while it
goes, or afterwards from its output directory:

    python -m cluster.dashboard DIR [DIR ...] [--host 127.0.0.1] [--port 8265]

Several directories are drawn on the same charts, one line style per run; a pipeline's output
directory opens as its stages.  The page (`dashboard.html` beside this module: plain JS and SVG,
nothing fetched from outside) polls two JSON routes and redraws without reloading:

    GET /api/status                   {"runs": [{"name", "out_dir", "state", "total_steps", "steps_done",
                                                 "s_per_step", "left_s"}]}
    GET /api/metrics?run=I&since=N    {"records": [the run's metrics.jsonl lines from N on], "next": M}

`metrics.jsonl` is read incrementally (only the bytes added since the last request).  The
server runs on daemon threads; a failing request answers 500 and is logged, never reaching
the run, and the run stops the server on its way out.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("flywheel.dashboard")

PAGE = Path(__file__).with_name("dashboard.html")
POLL_INTERVAL_S = 0.5  # how often serve_forever checks for shutdown: stop() returns within this


class MetricsTail:
    """The records of a growing metrics.jsonl, reading only what was appended since the last call.
    A line still being written (no newline yet) waits for the next call."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._offset = 0
        self._lock = threading.Lock()

    def since(self, n: int) -> list[dict[str, Any]]:
        with self._lock:
            self._read_new()
            return self.records[max(n, 0):]

    def _read_new(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.decode().splitlines():
            if line.strip():
                self.records.append(json.loads(line))


@dataclass
class RunView:
    """One run the page shows: its name, its figures and a function telling its state."""

    name: str
    out_dir: Path
    status: Callable[[], dict[str, Any]]

    def __post_init__(self) -> None:
        self.tail = MetricsTail(self.out_dir / "metrics.jsonl")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "out_dir": str(self.out_dir.resolve()), **self.status()}


def saved_status(out_dir: Path) -> Callable[[], dict[str, Any]]:
    """The state of a run that is not this process's, from its files: finished once summary.json exists."""

    def status() -> dict[str, Any]:
        total = None
        try:
            run = json.loads((out_dir / "config.json").read_text())["run"]
            total = run["steps"] if run.get("stage", "ppo") == "ppo" else None  # run.steps counts PPO steps only
        except (OSError, ValueError, KeyError, TypeError):
            pass
        finished = (out_dir / "summary.json").is_file()
        return {"state": "finished" if finished else "unfinished (no summary.json yet)", "total_steps": total}

    return status


def find_runs(directory: Path) -> list[RunView]:
    """The run in `directory`, or the stages of a pipeline there (subdirectories with a metrics.jsonl,
    in the order they were written)."""
    if (directory / "metrics.jsonl").is_file() or (directory / "config.json").is_file():
        return [RunView(directory.resolve().name, directory, saved_status(directory))]
    stages = sorted((d for d in directory.iterdir() if (d / "metrics.jsonl").is_file()),
                    key=lambda d: (d / "metrics.jsonl").stat().st_mtime)
    return [RunView(f"{directory.resolve().name}/{d.name}", d, saved_status(d)) for d in stages]


class DashboardServer:
    """The page and its JSON routes on `host:port` (0: a free port), on a daemon thread."""

    def __init__(self, runs: list[RunView], host: str = "127.0.0.1", port: int = 0):
        self.runs = runs
        self._httpd = ThreadingHTTPServer((host, port), _handler_for(runs))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": POLL_INTERVAL_S},
                                        name="flywheel-dashboard", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> "DashboardServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _handler_for(runs: list[RunView]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:  # a poll every two seconds would flood the run's log
            log.debug(fmt, *args)

        def do_GET(self) -> None:
            try:
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/":
                    self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
                elif url.path == "/api/status":
                    self._json({"runs": [run.describe() for run in runs]})
                elif url.path == "/api/metrics":
                    i, since = int(query.get("run", 0)), int(query.get("since", 0))
                    if not 0 <= i < len(runs):
                        self._json({"error": f"run must be in 0..{len(runs) - 1}, got {i}"}, 404)
                        return
                    records = runs[i].tail.since(since)
                    self._json({"records": records, "next": since + len(records)})
                else:
                    self._json({"error": f"no route {url.path}; try / or /api/status"}, 404)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the browser went away
            except Exception as exc:
                log.warning("dashboard: %s failed: %s: %s", self.path, type(exc).__name__, exc)
                try:
                    self._json({"error": f"{type(exc).__name__}: {exc}"}, 500)
                except OSError:
                    pass

        def _json(self, body: dict[str, Any], status: int = 200) -> None:
            self._send(status, json.dumps(body).encode(), "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

    return Handler


@contextmanager
def live_dashboard(monitor: Any, out_dir: Path, progress: Callable[[], dict[str, Any]]
                   ) -> Iterator[DashboardServer | None]:
    """Serve the run's page while the block runs, as `monitor` (the config's MonitorConfig) says; its
    state turns to finished or failed at the end, and the server stops.  A dashboard that cannot
    start is a warning, never a failed run."""
    host, port = monitor.dashboard_host, monitor.dashboard_port
    if not monitor.dashboard:
        yield None
        return
    state = {"state": "running"}
    run = RunView(out_dir.resolve().name, out_dir, lambda: {**state, **progress()})
    try:
        server = DashboardServer([run], host, port).start()
    except OSError as exc:
        log.warning("dashboard: could not serve on %s:%s (%s); the run goes on without it "
                    "(monitor.dashboard_port / monitor.dashboard_host choose another address)", host, port, exc)
        yield None
        return
    log.info("dashboard: %s", server.url)
    try:
        yield server
        state["state"] = "finished"
    except BaseException:
        state["state"] = "failed"
        raise
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.dashboard",
                                     description="Serve the dashboard of finished (or running) runs' output directories.")
    parser.add_argument("dirs", nargs="+", type=Path, help="run output directories (several are compared)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    args = parser.parse_args(argv)
    runs = []
    for d in args.dirs:
        found = find_runs(d) if d.is_dir() else []
        if not found:
            parser.error(f"{d}: no metrics.jsonl or config.json there, nor in a stage directory below it; "
                         "pass a run's output directory (run.output_dir)")
        runs.extend(found)
    if len({r.name for r in runs}) < len(runs):  # runs/a/ppo beside runs/b/ppo: name them by their parents too
        for r in runs:
            r.name = "/".join(r.out_dir.resolve().parts[-2:])
    server = DashboardServer(runs, args.host, args.port).start()
    print(f"dashboard: {server.url} ({', '.join(r.name for r in runs)}); Ctrl-C stops it", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
