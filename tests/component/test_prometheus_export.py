"""The flywheel_* gauges reach Prometheus through Ray: a local Ray of its own (never another
one on the machine), the sink sets a step's figures, and Ray's metrics export on this node
serves them, prefixed `ray_` and tagged with the run."""

from __future__ import annotations

import time
import urllib.request

import pytest

from cluster.exporters import PrometheusSink


@pytest.mark.timeout(180)
def test_gauges_appear_in_rays_prometheus_export():
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    # address="local": a new cluster even when RAY_ADDRESS names another; report every second, not every 10.
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="WARNING",
             _system_config={"metrics_report_interval_ms": 1000})
    try:
        PrometheusSink("export-probe").log({"step": 2, "rollout_tokens_per_s": 123.5, "gen_s": 1.5, "kl": 0.25,
                                            "actor_tokens_per_s": [60.0, 70.0], "score_failed_attempts": 2})
        port = ray._private.worker.global_worker.node.metrics_export_port
        wanted = {"ray_flywheel_rollout_tokens_per_s": 123.5, "ray_flywheel_kl": 0.25, "ray_flywheel_steps_done": 3.0,
                  "ray_flywheel_reward_service_failed_attempts_total": 2.0}
        found: dict[str, float] = {}
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and set(found) != set(wanted):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                text = resp.read().decode()
            for line in text.splitlines():
                name = line.split("{", 1)[0]
                if name in wanted and 'run="export-probe"' in line:
                    found[name] = float(line.rsplit(" ", 1)[1])
            time.sleep(1)
        assert found == wanted, f"Ray's export at :{port}/metrics had {found}"
        assert 'phase="generate"' in text and 'actor="1"' in text
    finally:
        ray.shutdown()
