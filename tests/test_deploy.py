"""deploy/: the k8s manifests and the compose file validate offline and agree with the generated repository.

The health check (model_repository/health.py, the one the CLI, the supervisor and both deploy files run)
is run for real against the embedded tritonserver, and the production flags of the compose file are
started on the real Triton 2.51 binary (restricted APIs need the admin key).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from littlebig.metrics import METRICS
from littlebig.model_repository.generate import BLS_NAME, generate

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
HEALTH = ROOT / "model_repository" / "health.py"
IN_CONTAINER = "/opt/littlebig/health.py"
COMPOSE = DEPLOY / "docker-compose.yml"
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
ADMIN_KEY = "test-admin-key"
DEV_BUILD = Path("/tmp/lb/build")  # a random-weight export + calibration, where build/ has none yet


def _find_build() -> Path | None:
    build = Path(os.environ.get("LITTLEBIG_BUILD", ROOT / "build"))
    for candidate in (build, DEV_BUILD):
        if (candidate / "export" / "export.json").exists() and (candidate / "calibration.json").exists():
            return candidate
    return None


@pytest.fixture(scope="module")
def gpu_repo(tmp_path_factory) -> dict[str, Any]:
    """A gpu repository generated from the build, and its summary (service size, models)."""
    build = _find_build()
    if build is None:
        pytest.skip("no build with export.json and calibration.json: run `make calibrate`")
    out = tmp_path_factory.mktemp("gpu") / "model_repository_gpu"
    return {"path": out, **generate(build, out, "gpu")}


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    """Every resource under deploy/k8s, keyed by kind/name."""
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def _container(manifests) -> dict[str, Any]:
    (container,) = manifests["Deployment/littlebig"]["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_every_manifest_validates_strictly(manifests):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    assert set(manifests) == {
        "Deployment/littlebig",
        "Service/littlebig",
        "ConfigMap/littlebig-healthcheck",
        "ConfigMap/littlebig-prometheus-adapter",
        "HorizontalPodAutoscaler/littlebig",
    }
    for key, doc in manifests.items():
        assert kubernetes_validate.validate(doc, version, strict=True), key


def test_validator_rejects_broken_manifests(manifests):
    """The validation above can fail: a wrong type and an unknown field are both caught."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    bad = json.loads(json.dumps(manifests["Deployment/littlebig"]))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)
    bad = json.loads(json.dumps(manifests["HorizontalPodAutoscaler/littlebig"]))
    bad["spec"]["metrics"][0]["pods"]["targetValue"] = "1"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)


def test_ports_agree_everywhere(manifests):
    service_ports = {p["name"]: (p["port"], p["targetPort"]) for p in manifests["Service/littlebig"]["spec"]["ports"]}
    assert service_ports == {name: (port, name) for name, port in PORTS.items()}
    container = _container(manifests)
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == PORTS
    for name, port in PORTS.items():
        assert f"--{name}-port={port}" in container["args"]
    annotations = manifests["Deployment/littlebig"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(PORTS["metrics"])


def test_probes_are_the_one_health_check(manifests, gpu_repo):
    """startup: models loaded; readiness: a real inference (health.py ready); liveness: cheap (health.py live),
    restarting only after readiness has failed for a while (the state file they share)."""
    container = _container(manifests)
    assert container["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    ready = container["readinessProbe"]["exec"]["command"]
    live = container["livenessProbe"]["exec"]["command"]
    assert ready[:3] == ["python3", IN_CONTAINER, "ready"] and live[:3] == ["python3", IN_CONTAINER, "live"]
    state = ready[ready.index("--state") + 1]
    assert live[live.index("--state") + 1] == state and float(live[live.index("--max-unready") + 1]) >= 60
    # 3 metadata + 3 inference calls, each bounded by --timeout, fit in the probe's own timeout
    assert container["readinessProbe"]["timeoutSeconds"] > 6 * float(ready[ready.index("--timeout") + 1])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in manifests["Deployment/littlebig"]["spec"]["template"]["spec"]["volumes"]}
    assert mounts["healthcheck"] == str(Path(IN_CONTAINER).parent)
    assert volumes["healthcheck"]["configMap"]["name"] == "littlebig-healthcheck"
    assert mounts["models"] == "/models" and "--model-repository=/models" in container["args"]
    # the ConfigMap carries exactly model_repository/health.py (make deploy-configmap rewrites it)
    assert manifests["ConfigMap/littlebig-healthcheck"]["data"]["health.py"] == HEALTH.read_text()
    # the probe reads the input shape from the server: nothing in the deployment has to repeat it
    assert "IMAGE_SHAPE" not in _env(container)
    assert BLS_NAME in gpu_repo["models"] and BLS_NAME == "littlebig"
    config = (gpu_repo["path"] / BLS_NAME / "config.pbtxt").read_text()
    assert f'name: "{BLS_NAME}"' in config and 'name: "DEGRADED"' in config
    assert all((gpu_repo["path"] / role / "config.pbtxt").exists() for role in ("little", "big"))
    assert "KIND_GPU" in (gpu_repo["path"] / "big" / "config.pbtxt").read_text()


def test_the_health_check_needs_only_the_standard_library():
    """It runs with the container's python3, where littlebig is not installed."""
    tree = ast.parse(HEALTH.read_text())
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert modules and modules <= set(sys.stdlib_module_names) | {"__future__"}, modules


def test_gpu_and_admin_key_in_the_deployment(manifests):
    container = _container(manifests)
    assert container["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    key = _env(container)["LITTLEBIG_ADMIN_KEY"]["secretKeyRef"]
    assert key == {"name": "littlebig-admin", "key": "admin-key"}
    restricted = [a for a in container["args"] if "restricted" in a]
    assert len(restricted) == 2 and all(a.endswith(":admin-key=$(LITTLEBIG_ADMIN_KEY)") for a in restricted)
    (init,) = manifests["Deployment/littlebig"]["spec"]["template"]["spec"]["initContainers"]
    assert {"name": "models", "mountPath": "/models"} in init["volumeMounts"]


def test_hpa_metrics_are_defined_by_the_adapter_from_exported_series(manifests):
    hpa = manifests["HorizontalPodAutoscaler/littlebig"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "littlebig"}
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    wanted = {m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"}
    assert "littlebig_escalated_rows_per_second" in wanted
    rules = yaml.safe_load(manifests["ConfigMap/littlebig-prometheus-adapter"]["data"]["config.yaml"])["rules"]
    defined = {r["name"]["as"]: r for r in rules}
    assert wanted <= set(defined)
    escalated = defined["littlebig_escalated_rows_per_second"]
    assert escalated["seriesQuery"].startswith("littlebig_escalated_rows_total{")
    assert re.match(escalated["name"]["matches"], "littlebig_escalated_rows_total")
    assert "rate(" in escalated["metricsQuery"]
    # the counter is the one the served BLS model really exports
    assert "littlebig_escalated_rows_total" in {name for name, *_ in METRICS.values()}
    for rule in rules:
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


def _compose_binary() -> str:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (apt-get install -y docker-compose)")
    return binary


def _compose_config(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LITTLEBIG_")}
    return subprocess.run(
        [_compose_binary(), "-f", str(path), "config"], env={**clean, **env}, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def compose_services() -> dict[str, Any]:
    """`docker-compose config` (it validates the file) with the admin key set, parsed."""
    done = _compose_config(COMPOSE, {"LITTLEBIG_ADMIN_KEY": ADMIN_KEY})
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)["services"]


@pytest.fixture(scope="module")
def compose(compose_services) -> dict[str, Any]:
    return compose_services["triton"]


def test_compose_validates_and_serves_the_gpu_repository(compose, gpu_repo):
    assert compose["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    (device,) = compose["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert f"{ROOT / 'build' / 'model_repository_gpu'}:/models:ro" in compose["volumes"]
    assert {re.sub(r"/tcp$", "", p).split(":", 1)[1] for p in compose["ports"]} == {f"{p}:{p}" for p in PORTS.values()}
    assert compose["shm_size"]
    command = compose["command"]
    for flag in ("--model-repository=/models", "--model-control-mode=none", "--strict-readiness=true"):
        assert flag in command
    for name, port in PORTS.items():
        assert f"--{name}-port={port}" in command
    for flag in ("--grpc-restricted-protocol", "--http-restricted-api"):
        (arg,) = [a for a in command if a.startswith(flag + "=")]
        assert arg.endswith(f":admin-key={ADMIN_KEY}") and "model-repository" in arg
    test = compose["healthcheck"]["test"]
    assert test[:4] == ["CMD", "python3", IN_CONTAINER, "ready"]
    assert f"{HEALTH}:{IN_CONTAINER}:ro" in compose["volumes"]


def test_compose_restarts_an_unhealthy_server(compose_services):
    """`restart: unless-stopped` never restarts an unhealthy container: the autoheal companion does."""
    triton, autoheal = compose_services["triton"], compose_services["autoheal"]
    label = autoheal["environment"]["AUTOHEAL_CONTAINER_LABEL"]
    assert triton["labels"][label] == "true"
    assert autoheal["image"].startswith("willfarrell/autoheal:") and autoheal["restart"] == "always"
    assert any(v.startswith("/var/run/docker.sock:/var/run/docker.sock") for v in autoheal["volumes"])
    assert triton["healthcheck"]["retries"] >= 2


def test_compose_and_deployment_run_the_same_server_flags(compose, manifests):
    k8s = [a.replace("$(LITTLEBIG_ADMIN_KEY)", ADMIN_KEY) for a in _container(manifests)["args"]]
    assert compose["command"] == k8s


def test_compose_needs_the_admin_key_and_rejects_unknown_keys(tmp_path):
    done = _compose_config(COMPOSE, {})
    assert done.returncode != 0 and "LITTLEBIG_ADMIN_KEY" in done.stderr
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("    shm_size: 1gb", "    shm_size: 1gb\n    shm_sise: 1gb"))
    done = _compose_config(broken, {"LITTLEBIG_ADMIN_KEY": ADMIN_KEY})
    assert done.returncode != 0 and "shm_sise" in done.stderr


def run_health(port: int, *args: str) -> subprocess.CompletedProcess:
    """health.py as the deploy files run it: a plain script, outside the source tree."""
    return subprocess.run(
        [sys.executable, str(HEALTH), *args[:1], "--url", f"http://127.0.0.1:{port}", *args[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )


def test_health_check_infers_on_the_real_server(server, tmp_path):
    done = run_health(server.ports.http, "ready")
    assert done.returncode == 0, done.stderr
    assert [line.split() for line in done.stdout.splitlines()] == [["little", "ok"], ["big", "ok"], ["littlebig", "ok"]]
    assert run_health(server.ports.http, "live").returncode == 0
    # the same check fails when it cannot be answered: unknown model, nothing listening, bad usage
    unknown = run_health(server.ports.http, "ready", "--models", "littlebig,no_such_model")
    assert unknown.returncode == 1 and "no_such_model" in unknown.stderr
    from littlebig.model_repository.server import free_port

    for check in ("ready", "live"):
        dead = run_health(free_port(), check, "--timeout", "2")
        assert dead.returncode == 1 and "no answer" in dead.stderr
    assert run_health(server.ports.http, "sideways").returncode == 2
    # liveness fails only once readiness has failed for longer than --max-unready (state file)
    state = tmp_path / "health-state"
    assert run_health(server.ports.http, "ready", "--state", str(state)).returncode == 0
    assert run_health(server.ports.http, "live", "--state", str(state), "--max-unready", "60").returncode == 0
    state.write_text(f"{float(state.read_text()) - 61}\n")  # the last healthy ready check, 61 s ago
    stale = run_health(server.ports.http, "live", "--state", str(state), "--max-unready", "60")
    assert stale.returncode == 1 and "no healthy ready check" in stale.stderr


def test_adapter_series_exist_on_the_real_server(server):
    """After a request, the metrics port exports the series the adapter rules read."""
    assert run_health(server.ports.http, "ready").returncode == 0
    with urllib.request.urlopen(f"http://127.0.0.1:{server.ports.metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    for series in ("littlebig_escalated_rows_total{", 'nv_inference_queue_duration_us{model="big"'):
        assert series in text
    assert 'nv_inference_request_success{model="big"' in text


def _status(url: str, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=b"{}", headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow
def test_production_flags_on_the_real_triton(compose, repository, tmp_path):
    """Triton 2.51 accepts the compose file's flags; the repository API needs the admin key, inference does not."""
    from littlebig.model_repository.server import Ports, TritonServer

    skip = ("tritonserver", "--model-repository=", "--http-port=", "--grpc-port=", "--metrics-port=", "--allow-gpu")
    flags = [a for a in compose["command"] if not a.startswith(skip)]
    # The compose file's own restricted-API flags replace the launcher's defaults (Triton refuses both).
    server = TritonServer(
        repository, Ports.free(), log_file=tmp_path / "triton.log", extra_args=flags, restricted_apis=()
    )
    with server.start():
        assert run_health(server.ports.http, "ready").returncode == 0
        index = f"{server.url}/v2/repository/index"
        assert _status(index) == 403
        assert _status(index, {"admin-key": "wrong"}) == 403
        assert _status(index, {"admin-key": ADMIN_KEY}) == 200
