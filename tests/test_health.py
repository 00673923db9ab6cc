"""The one health check (model_repository/health.py) with big's stub dead behind ``on_big_failure=little``:
the cascade still answers, DEGRADED, and that must fail readiness everywhere it is used.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from littlebig.model_repository import health
from littlebig.model_repository.generate import ServeOptions
from littlebig.model_repository.server import Supervisor
from tests.helpers import infer, kill_stub, own_server, scrape

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, cwd="/")


@pytest.mark.slow
def test_a_degraded_answer_fails_readiness_everywhere(build_dir, tmp_path, test_split):
    data, _ = test_split
    # big_instances=1: the test kills the one big stub (a second instance would keep answering)
    with own_server(build_dir, tmp_path, ServeOptions(on_big_failure="little", big_instances=1)) as server:
        url = f"127.0.0.1:{server.ports.http}"
        assert run(sys.executable, str(ROOT / "model_repository" / "health.py"), "ready", "--url", url).returncode == 0
        kill_stub(server, "big")
        time.sleep(1.5)  # Triton notices a dead stub on the next call (~1 s heartbeat)
        answer = infer(f"127.0.0.1:{server.ports.grpc}", data.images[:2], 1.0)
        assert answer.as_numpy("DEGRADED").all()  # the cascade answers: a LABEL-only check would pass

        # the CLI, the deploy script and the supervisor run the same probe, and all fail on DEGRADED
        cli = run(str(Path(sys.executable).parent / "littlebig"), "health", "--http-url", url)
        lines = {line.split()[0]: line for line in cli.stdout.splitlines()}
        assert cli.returncode == 1 and lines["little"].split()[1] == "ok"
        assert "DEGRADED" in lines["littlebig"] and "FAILED" in lines["big"]
        state = tmp_path / "state"
        script = [sys.executable, str(ROOT / "model_repository" / "health.py")]
        ready = run(*script, "ready", "--url", url, "--state", str(state))
        assert ready.returncode == 1 and "answered DEGRADED" in ready.stderr
        assert run(*script, "live", "--url", url).returncode == 0  # the process lives: liveness stays cheap
        time.sleep(1.1)
        stale = run(*script, "live", "--url", url, "--state", str(state), "--max-unready", "1")
        assert stale.returncode == 1 and "no healthy ready check" in stale.stderr
        probe = Supervisor(server).probe()
        assert type(probe) is health.HealthProbe and "DEGRADED" in probe.check()["littlebig"]


def test_the_state_file_keeps_the_last_healthy_check(tmp_path):
    state = tmp_path / "state"
    assert health.unready_for(state, now=100.0) == 0.0  # no ready check yet: nothing to hold against live
    health.record_ready(state, healthy=False, now=100.0)  # failing since 100
    health.record_ready(state, healthy=False, now=130.0)
    assert health.unready_for(state, now=160.0) == 60.0
    health.record_ready(state, healthy=True, now=170.0)
    assert health.unready_for(state, now=175.0) == 5.0


def littlebig_counters(server) -> dict[tuple, float]:
    """Every sample of every ``littlebig_*`` COUNTER family on the metrics port ((name, labels) -> value)."""
    return scrape(server).series("littlebig_", kind="counter")


def test_probes_alone_move_no_littlebig_traffic_counter(server, test_split):
    """Readiness probes (health.py ready, through the cascade with threshold 1) must not look like traffic:
    two pods every 10 s would otherwise add 120 all-zero rows per 10 minutes to the drift alerts' counters.
    A real request after them moves the counters: the scrape can see a change."""
    data, _ = test_split
    before = littlebig_counters(server)
    assert any(name == "littlebig_rows_total" for name, _ in before), sorted(before)  # the families exist
    url = f"127.0.0.1:{server.ports.http}"
    script = [sys.executable, str(ROOT / "model_repository" / "health.py"), "ready", "--url", url]
    for _ in range(3):
        done = run(*script)
        assert done.returncode == 0, done.stderr  # each probe really went through little, big and littlebig
    assert Supervisor(server).probe().check() == {}  # the supervisor's probe: the same HealthProbe
    assert littlebig_counters(server) == before
    infer(f"127.0.0.1:{server.ports.grpc}", data.images[:3], 1.0)  # the control: real traffic, all to big
    after = littlebig_counters(server)
    rows = [k for k in after if k[0] == "littlebig_rows_total"]
    escalated = [k for k in after if k[0] == "littlebig_escalated_rows_total"]
    assert sum(after[k] - before.get(k, 0.0) for k in rows) == 3
    assert sum(after[k] - before.get(k, 0.0) for k in escalated) == 3


def test_the_probe_names_the_models_the_generator_serves():
    """health.py spells the names out (it must stay self-contained for the ConfigMap): they must be the served ones."""
    from littlebig.decision import CASCADE, ROLES
    from littlebig.model_repository import health

    assert health.CASCADE == CASCADE and health.MODELS == (*ROLES, CASCADE)
