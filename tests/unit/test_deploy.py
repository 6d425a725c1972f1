"""deploy/ checked against the code it deploys: no server, no mock, only the files.

Every YAML file parses; the probes, the Services and Prometheus use the admin address
(TRACKER_ADMIN_LISTEN) and the right paths; the spool's folder is on a claim per pod; every
TRACKER_* variable named in deploy/ exists in tracker/settings.py; every metric and label the
alert rules and the dashboard use is declared in tracker/metrics.py; the PrometheusRule is the
rules file; and, where promtool is installed (Debian's `prometheus` package), promtool checks
the rules and the configuration and runs the alerts against made-up series. Without promtool
those checks skip, unless TRACKER_REQUIRE_TOOLS=1 (CI) makes them fail.

The scaled form (compose.scale.yaml, kubernetes-scale/) is checked the same way: its instances,
Redis Cluster nodes, PgBouncer, load balancer and Prometheus agree with each other and with the
image; nginx -t checks the balancer (nginx-light, required like promtool), and kubectl
kustomize renders the kustomizations where kubectl is installed. (tests/db/
test_redis_cluster_deploy.py runs the Redis Cluster configuration on real servers.)
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tracker.serve import STOP_GRACE_SECONDS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
PROMETHEUS = DEPLOY / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
DOCKERFILE = ROOT / "Dockerfile"
# The scaled form: N instances, a Redis Cluster, PgBouncer (compose and a kustomize overlay).
COMPOSE_SCALE = DEPLOY / "compose.scale.yaml"
KUBERNETES_SCALE = DEPLOY / "kubernetes-scale"

# Labels Prometheus adds to every series of a target (compose and Kubernetes scrapes).
TARGET_LABELS = {"job", "instance", "namespace", "pod"}
SEVERITIES = {"critical", "warning"}
REQUIRED_ALERTS = {
    "TrackerRedisDown", "TrackerPostgresDown", "TrackerWriteBacklogGrowing",
    "TrackerWriteBacklogStale", "TrackerWriteBacklogOverLimit", "TrackerWriteLagHigh",
    "TrackerDeadLetters",
    "TrackerEventsLostBufferUnavailable", "TrackerSpoolNotReplayed", "TrackerMetricsAbsent",
}


# -- reading the files ---------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml") and p.is_file())


def documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kubernetes_objects() -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        for doc in documents(path):
            if doc.get("kind") == "Kustomization":
                continue
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{key} defined twice"
            found[key] = doc
    return found


def statefulset() -> dict[str, Any]:
    return kubernetes_objects()[("StatefulSet", "tracker")]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = workload["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "tracker")


def env_values(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def container_port(c: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port, by name or number, as the container's port number."""
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in c["ports"] if p["name"] == port)


def dockerfile_env() -> dict[str, str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    found: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            found.update(re.findall(r"(\w+)=(\S+)", line))
    return found


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"]
            for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]


# -- what the code declares ----------------------------------------------------------------------


def settings_variables() -> set[str]:
    source = (ROOT / "tracker" / "settings.py").read_text()
    return set(re.findall(r'"((?:TRACKER_[A-Z0-9_]+)|DATABASE_URL|REDIS_URL)"', source))


def declared_metrics() -> dict[str, set[str]]:
    """Series name → label names, from tracker/metrics.py's Counter/Gauge/Histogram calls:
    a counter exposes `<name>_total`, a histogram `_bucket` (with `le`), `_sum` and `_count`;
    a GlobalGauge (exported by one instance at a time) is a gauge without labels."""
    tree = ast.parse((ROOT / "tracker" / "metrics.py").read_text())
    series: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("Counter", "Gauge", "GlobalGauge", "Histogram")):
            continue
        name = ast.literal_eval(node.args[0])
        labels: list[str] = []
        if len(node.args) > 2:
            labels = ast.literal_eval(node.args[2])
        for keyword in node.keywords:
            if keyword.arg == "labelnames":
                labels = ast.literal_eval(keyword.value)
        if node.func.id == "Counter":
            series[name.removesuffix("_total") + "_total"] = set(labels)
        elif node.func.id in ("Gauge", "GlobalGauge"):
            series[name] = set(labels)
        else:
            series[name + "_bucket"] = set(labels) | {"le"}
            series[name + "_sum"] = set(labels)
            series[name + "_count"] = set(labels)
    return series


def string_literals() -> set[str]:
    """Every string constant in tracker/: label values are among them (closed sets)."""
    found = set()
    for path in (ROOT / "tracker").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.add(node.value)
    return found


# -- every file parses ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Path) -> None:
    assert documents(path), f"{path} holds no document"


def test_there_is_yaml_to_check() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in yaml_files()}
    assert {"compose.yaml", "prometheus/alerts.yml", "prometheus/prometheus.yml",
            "kubernetes/statefulset.yaml"} <= names


def test_the_dashboard_is_json_with_the_trust_panels() -> None:
    board = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs = " ".join(dashboard_exprs())
    for metric in ("tracker_backend_up", "tracker_write_lag_seconds_bucket",
                   "tracker_dead_letters_total"):
        assert metric in exprs, f"no panel shows {metric}"
    provisioned = documents(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")[0]
    uids = {source["uid"] for source in provisioned["datasources"]}
    for panel in board["panels"]:
        if "datasource" in panel:
            assert panel["datasource"]["uid"] in uids


# -- variables and metrics named in deploy/ exist in the code ------------------------------------


def deploy_texts() -> Iterator[tuple[Path, str]]:
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            yield path, path.read_text()
    yield DOCKERFILE, DOCKERFILE.read_text()


def test_every_tracker_variable_in_deploy_exists_in_settings() -> None:
    known = settings_variables()
    assert {"TRACKER_ADMIN_LISTEN", "TRACKER_DATA_DIR", "DATABASE_URL"} <= known
    used: dict[str, set[str]] = {}
    for path, text in deploy_texts():
        for name in re.findall(r"\bTRACKER_[A-Z0-9_]+", text):
            used.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    assert "TRACKER_ADMIN_LISTEN" in used
    unknown = {name: sorted(paths) for name, paths in used.items() if name not in known}
    assert not unknown, f"not read by tracker/settings.py: {unknown}"
    # Every variable the containers are given, TRACKER_* or not, is one the service reads.
    given = {e["name"] for e in container(statefulset())["env"]}
    given |= set(compose()["services"]["tracker"]["environment"])
    assert given <= known, f"not read by tracker/settings.py: {sorted(given - known)}"


# A metric and its matchers; a quoted value may hold braces (route="/c/{slug}").
SELECTOR = re.compile(r'\b(tracker_[a-z0-9_]+)\b\s*(?:\{((?:[^}"]|"[^"]*")*)\})?')
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def check_expression(expr: str, series: dict[str, set[str]], literals: set[str]) -> list[str]:
    problems = []
    labels_here: set[str] = set()
    for name, matchers in SELECTOR.findall(expr):
        if name not in series:
            problems.append(f"{name} is not declared in tracker/metrics.py ({expr!r})")
            continue
        labels_here |= series[name]
        for label, op, value in MATCHER.findall(matchers or ""):
            if label not in series[name] | TARGET_LABELS:
                problems.append(f"{name} has no label {label!r}")
            elif op == "=" and label in series[name] and value not in literals:
                problems.append(f"{name}{{{label}={value!r}}}: no such value in tracker/")
    for group in GROUPING.findall(expr):
        for label in filter(None, (part.strip() for part in group.split(","))):
            if label not in labels_here | TARGET_LABELS:
                problems.append(f"grouping by {label!r}, a label of none of {expr!r}'s metrics")
    return problems


def test_alert_and_dashboard_expressions_use_declared_metrics_and_labels() -> None:
    series, literals = declared_metrics(), string_literals()
    assert "tracker_write_lag_seconds_bucket" in series and "tracker_backend_up" in series
    exprs = [rule["expr"] for rule in rules()] + dashboard_exprs()
    problems = [p for expr in exprs for p in check_expression(expr, series, literals)]
    assert not problems, "\n".join(problems)


def test_metric_names_in_rule_and_dashboard_texts_are_declared() -> None:
    """Runbook lines, panel descriptions and deploy/README.md name metrics too (a histogram
    by its family's name): they must exist."""
    series = set(declared_metrics())
    known = series | {name.removesuffix("_bucket") for name in series if name.endswith("_bucket")}
    for path in (RULES, DASHBOARD, DEPLOY / "README.md"):
        named = set(re.findall(r"\btracker_[a-z0-9_]+", path.read_text()))
        assert named, path
        assert named <= known, f"{path.name}: {sorted(named - known)}"


def test_the_expression_check_catches_mistakes() -> None:
    series, literals = declared_metrics(), string_literals()
    assert check_expression('tracker_backend_up{backend="redis"} == 0', series, literals) == []
    assert check_expression('tracker_http_requests_total{route="/c/{slug}"}', series,
                            literals) == []
    assert check_expression('tracker_http_requests_total{route="/x/{slug}"}', series, literals)
    assert check_expression("rate(tracker_write_lag_seconds[5m])", series, literals)
    assert check_expression('tracker_backend_up{backend="mysql"}', series, literals)
    assert check_expression('tracker_dead_letters_total{reason="x"}', series, literals)
    assert check_expression("sum by (campaign) (tracker_events_total)", series, literals)


# -- Kubernetes ----------------------------------------------------------------------------------


def test_the_workload_is_a_statefulset_only() -> None:
    kinds = {kind for kind, _ in kubernetes_objects()}
    assert "Deployment" not in kinds
    assert ("StatefulSet", "tracker") in kubernetes_objects()


def test_probes_use_the_admin_port_and_the_tracking_readiness() -> None:
    c = container(statefulset())
    env = env_values(c)
    admin, public = port_of(env["TRACKER_ADMIN_LISTEN"]), port_of(env["TRACKER_LISTEN"])
    assert admin != public
    readiness, liveness = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/readyz/tracking"
    assert liveness["path"] == "/healthz"
    assert container_port(c, readiness["port"]) == admin
    assert container_port(c, liveness["port"]) == admin
    assert "startupProbe" not in c or container_port(
        c, c["startupProbe"]["httpGet"]["port"]) == admin


def test_prometheus_annotations_point_at_the_admin_port() -> None:
    workload = statefulset()
    c = container(workload)
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == port_of(env_values(c)["TRACKER_ADMIN_LISTEN"])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_the_public_service_exposes_only_the_tracking_port() -> None:
    workload = statefulset()
    c = container(workload)
    public = port_of(env_values(c)["TRACKER_LISTEN"])
    service = kubernetes_objects()[("Service", "tracker")]
    assert selects(service["spec"]["selector"], workload["spec"]["template"]["metadata"]["labels"])
    targets = {container_port(c, p["targetPort"]) for p in service["spec"]["ports"]}
    assert targets == {public}


def test_the_headless_service_governs_the_statefulset_on_the_admin_port() -> None:
    workload = statefulset()
    c = container(workload)
    objects = kubernetes_objects()
    headless = objects[("Service", workload["spec"]["serviceName"])]
    assert headless["spec"]["clusterIP"] == "None"
    assert selects(headless["spec"]["selector"], workload["spec"]["template"]["metadata"]["labels"])
    admin = port_of(env_values(c)["TRACKER_ADMIN_LISTEN"])
    assert {container_port(c, p["targetPort"]) for p in headless["spec"]["ports"]} == {admin}
    monitor = objects[("ServiceMonitor", "tracker")]
    assert selects(monitor["spec"]["selector"]["matchLabels"], headless["metadata"]["labels"])
    assert not selects(monitor["spec"]["selector"]["matchLabels"],
                       objects[("Service", "tracker")]["metadata"]["labels"])
    names = {p["name"] for p in headless["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in names and endpoint["path"] == "/metrics"


def test_hpa_and_pdb_follow_the_statefulset() -> None:
    workload = statefulset()
    objects = kubernetes_objects()
    target = objects[("HorizontalPodAutoscaler", "tracker")]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", workload["metadata"]["name"])
    pdb = objects[("PodDisruptionBudget", "tracker")]
    assert selects(pdb["spec"]["selector"]["matchLabels"],
                   workload["spec"]["template"]["metadata"]["labels"])
    assert selects(workload["spec"]["selector"]["matchLabels"],
                   workload["spec"]["template"]["metadata"]["labels"])


@pytest.mark.parametrize("folder", [KUBERNETES, KUBERNETES / "monitoring", KUBERNETES_SCALE],
                         ids=["kubernetes", "monitoring", "kubernetes-scale"])
def test_kustomization_lists_every_manifest(folder: Path) -> None:
    kustomization = documents(folder / "kustomization.yaml")[0]
    # Its own files (a base elsewhere is named by its folder), resources and patches.
    listed = [r for r in kustomization["resources"] if not r.startswith("../")]
    listed += [patch["path"] for patch in kustomization.get("patches", [])]
    present = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml",
                                                          "secret.example.yaml"}
    assert sorted(listed) == sorted(present)
    for generator in kustomization.get("configMapGenerator", []):
        for name in generator["files"]:
            assert (folder / name.rpartition("=")[2]).is_file(), name


def test_the_data_dir_is_on_a_claim_per_pod_writable_by_the_image_user() -> None:
    workload = statefulset()
    spec = workload["spec"]
    pod = spec["template"]["spec"]
    c = container(workload)
    data_dir = env_values(c).get("TRACKER_DATA_DIR") or dockerfile_env()["TRACKER_DATA_DIR"]
    mounts = [m for m in c["volumeMounts"] if m["mountPath"].rstrip("/") == data_dir.rstrip("/")]
    assert len(mounts) == 1, f"nothing mounted at TRACKER_DATA_DIR {data_dir}"
    claims = {t["metadata"]["name"]: t for t in spec["volumeClaimTemplates"]}
    name = mounts[0]["name"]
    assert name in claims, "TRACKER_DATA_DIR must be a volumeClaimTemplate (the spool lives there)"
    assert name not in {v["name"] for v in pod.get("volumes", [])}
    assert "subPath" not in mounts[0]
    claim = claims[name]["spec"]
    assert "ReadWriteOnce" in claim["accessModes"] and claim["resources"]["requests"]["storage"]
    assert spec["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"
    uid = int(re.search(r"--uid (\d+)", DOCKERFILE.read_text()).group(1))  # type: ignore[union-attr]
    security = pod["securityContext"]
    assert security["runAsUser"] == uid and security["fsGroup"] == uid


def test_grace_periods_cover_the_bounded_shutdown() -> None:
    pod = statefulset()["spec"]["template"]["spec"]
    pre_stop = container(statefulset())["lifecycle"]["preStop"]["exec"]["command"]
    pause = int(pre_stop[1]) if pre_stop[0] == "sleep" else 0
    assert pod["terminationGracePeriodSeconds"] >= pause + STOP_GRACE_SECONDS + 2
    grace = compose()["services"]["tracker"]["stop_grace_period"]
    assert int(grace.removesuffix("s")) >= STOP_GRACE_SECONDS + 2
    unit = (DEPLOY / "systemd" / "tracker.service").read_text()
    timeout = int(re.search(r"^TimeoutStopSec=(\d+)", unit, re.M).group(1))  # type: ignore[union-attr]
    assert timeout >= STOP_GRACE_SECONDS + 2


# -- compose and the image -----------------------------------------------------------------------


def test_compose_runs_tracker_with_an_admin_address_and_a_data_volume() -> None:
    stack = compose()
    tracker = stack["services"]["tracker"]
    env = tracker["environment"]
    admin = port_of(env.get("TRACKER_ADMIN_LISTEN") or dockerfile_env()["TRACKER_ADMIN_LISTEN"])
    for mapping in tracker.get("ports", []):
        parts = str(mapping).split(":")
        if int(parts[-1]) == admin:
            assert parts[0] == "127.0.0.1", "the admin port is published to this host only"
    check = " ".join(tracker["healthcheck"]["test"])
    assert f":{admin}/healthz" in check
    data_dir = env.get("TRACKER_DATA_DIR") or dockerfile_env()["TRACKER_DATA_DIR"]
    volumes = {v.split(":")[1]: v.split(":")[0] for v in tracker["volumes"]}
    assert volumes.get(data_dir) in stack["volumes"], "TRACKER_DATA_DIR must be a named volume"


def test_compose_prometheus_scrapes_the_admin_port_with_the_rules_loaded() -> None:
    stack = compose()
    admin = port_of(stack["services"]["tracker"]["environment"]["TRACKER_ADMIN_LISTEN"])
    prometheus = stack["services"]["prometheus"]
    mounted = {v.split(":")[1]: (DEPLOY / v.split(":")[0]).resolve()
               for v in prometheus["volumes"] if v.startswith(".")}
    flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = Path(flag.split("=", 1)[1])
    folder = mounted[str(config_path.parent)]
    config = yaml.safe_load((folder / config_path.name).read_text())
    targets = {t for job in config["scrape_configs"] for s in job.get("static_configs", [])
               for t in s["targets"]}
    assert f"tracker:{admin}" in targets and "tracker:8080" not in targets
    assert config["rule_files"]
    for name in config["rule_files"]:
        assert (folder / name).resolve() == RULES.resolve()


def test_compose_redis_is_a_durable_buffer() -> None:
    command = " ".join(compose()["services"]["redis"]["command"])
    for setting in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        assert setting in command


def test_the_image_listens_for_admin_and_exposes_it() -> None:
    env = dockerfile_env()
    admin, public = port_of(env["TRACKER_ADMIN_LISTEN"]), port_of(env["TRACKER_LISTEN"])
    exposed = {int(p) for line in DOCKERFILE.read_text().splitlines()
               if line.startswith("EXPOSE ") for p in line.split()[1:]}
    assert {admin, public} <= exposed


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[int]:
    server = HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_the_image_healthcheck_asks_the_admin_port_when_there_is_one(health_server: int) -> None:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    line = next(l for l in text.splitlines() if l.startswith("HEALTHCHECK "))
    command = json.loads(line[line.index("CMD") + 3:].strip())
    assert command[0] == "python"
    closed = closed_port()

    def healthy(env: dict[str, str]) -> bool:
        base = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
        result = subprocess.run([sys.executable, *command[1:]], env=base | env,
                                capture_output=True, timeout=30)
        return result.returncode == 0

    assert healthy({"TRACKER_ADMIN_LISTEN": f"0.0.0.0:{health_server}",
                    "TRACKER_LISTEN": f"0.0.0.0:{closed}"})
    assert not healthy({"TRACKER_ADMIN_LISTEN": f"0.0.0.0:{closed}",
                        "TRACKER_LISTEN": f"0.0.0.0:{health_server}"})
    # Without an admin address (set empty), /healthz answers on the public port.
    assert healthy({"TRACKER_ADMIN_LISTEN": "", "TRACKER_LISTEN": f"127.0.0.1:{health_server}"})


# -- the scaled form: compose.scale.yaml -----------------------------------------------------------


def compose_scale() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_SCALE.read_text())
    return loaded


def scaled_instances() -> dict[str, dict[str, Any]]:
    """The `tracker serve` services: the image's own command, none given."""
    services = compose_scale()["services"]
    return {name: service for name, service in services.items()
            if service.get("image") == "tracker:latest" and "command" not in service}


def redis_nodes() -> dict[str, dict[str, Any]]:
    services = compose_scale()["services"]
    return {name: service for name, service in services.items()
            if "--cluster-announce-hostname" in service.get("command", [])}


def mounted(service: dict[str, Any], target: str) -> str:
    """What a service mounts at `target` (a named volume, or a path relative to deploy/)."""
    found = [v.split(":")[0] for v in service.get("volumes", []) if v.split(":")[1] == target]
    assert len(found) == 1, f"nothing (or several) mounted at {target}"
    return found[0]


def ini(path: Path) -> dict[str, dict[str, str]]:
    """A PgBouncer configuration: section → key → value (';' starts a comment line)."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith((";", "#")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current[key.strip()] = value.strip()
    return sections


def url_parts(url: str) -> tuple[str, list[str], str]:
    """(scheme, [host:port, ...], path) of a URL that may name several hosts."""
    scheme, _, rest = url.partition("://")
    hosts, _, path = rest.rpartition("@")[2].partition("/")
    return scheme, hosts.split(","), path


def test_the_scaled_compose_runs_instances_each_with_its_own_name_and_data() -> None:
    stack = compose_scale()
    instances = scaled_instances()
    assert len(instances) >= 2
    known = settings_variables()
    admin = port_of(dockerfile_env()["TRACKER_ADMIN_LISTEN"])
    data_dir = dockerfile_env()["TRACKER_DATA_DIR"]
    names, volumes = set(), set()
    for name, service in instances.items():
        env = service["environment"]
        assert set(env) <= known, sorted(set(env) - known)
        assert env["TRACKER_MIGRATE"] == "false"
        # A stable host name: the instance's writers keep their names in the consumer groups.
        names.add(service["hostname"])
        volume = mounted(service, env.get("TRACKER_DATA_DIR", data_dir))
        assert volume in stack["volumes"], "TRACKER_DATA_DIR must be a named volume"
        volumes.add(volume)
        assert f":{admin}/healthz" in " ".join(service["healthcheck"]["test"])
        assert int(service["stop_grace_period"].removesuffix("s")) >= STOP_GRACE_SECONDS + 2
        assert not service.get("ports"), f"{name}: reached through the load balancer only"
    assert len(names) == len(volumes) == len(instances), "each instance its own name and spool"


def test_the_scaled_compose_puts_every_instance_on_the_redis_cluster() -> None:
    stack = compose_scale()
    nodes = redis_nodes()
    assert len(nodes) >= 3, "a Redis Cluster needs three masters"
    conf = DEPLOY / "redis" / "cluster.conf"
    settings = dict(line.split(None, 1) for line in conf.read_text().splitlines()
                    if line.strip() and not line.startswith("#"))
    assert settings["cluster-enabled"] == "yes"
    for setting in ("appendonly yes", "appendfsync everysec", "maxmemory-policy noeviction"):
        key, value = setting.split()
        assert settings[key] == value, setting
    addresses = set()
    for name, node in nodes.items():
        command = node["command"]
        announced = command[command.index("--cluster-announce-hostname") + 1]
        assert announced == node["hostname"] == name
        assert (DEPLOY / mounted(node, command[1])).resolve() == conf.resolve()
        assert mounted(node, "/data") in stack["volumes"], "each node keeps its data (AOF)"
        addresses.add(f"{name}:6379")
    creator = stack["services"]["redis-cluster"]
    assert set(creator["command"][2:]) == addresses
    assert (DEPLOY / mounted(creator, creator["command"][1])).resolve() == (
        DEPLOY / "redis" / "create-cluster.sh").resolve()
    assert set(creator["depends_on"]) == set(nodes)
    for name, service in scaled_instances().items():
        scheme, hosts, _ = url_parts(service["environment"]["REDIS_URL"])
        assert scheme == "redis+cluster" and set(hosts) == addresses, name
        assert service["depends_on"]["redis-cluster"]["condition"] == "service_completed_successfully"


def test_the_scaled_compose_reaches_postgres_through_pgbouncer_in_transaction_mode() -> None:
    services = compose_scale()["services"]
    pgbouncer = services["pgbouncer"]
    config_path = pgbouncer["entrypoint"][-1].split()[-1]
    config = ini((DEPLOY / mounted(pgbouncer, config_path)).resolve())
    assert config["pgbouncer"]["pool_mode"] == "transaction"
    # The user list is written at start where the configuration looks for it.
    assert config["pgbouncer"]["auth_file"] in " ".join(pgbouncer["entrypoint"])
    database = dict(part.split("=") for part in config["databases"]["tracker"].split())
    assert database["host"] in services and database["host"] != "pgbouncer"
    for name, service in scaled_instances().items():
        scheme, [host], path = url_parts(service["environment"]["DATABASE_URL"])
        # Through PgBouncer the statement cache must be off (storage/db.py).
        assert scheme == "postgresql" and path == "tracker?pgbouncer=true", name
        assert host == f"pgbouncer:{config['pgbouncer']['listen_port']}", name
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    # Migrations hold a session advisory lock: they run against PostgreSQL itself.
    migrate = services["migrate"]
    assert migrate["command"] == ["tracker", "migrate"]
    _, [host], _ = url_parts(migrate["environment"]["DATABASE_URL"])
    assert host == f"{database['host']}:{database['port']}"


def test_the_scaled_compose_balances_every_instance_behind_nginx() -> None:
    stack = compose_scale()
    nginx = stack["services"]["nginx"]
    conf = (DEPLOY / mounted(nginx, "/etc/nginx/conf.d/default.conf")).resolve()
    text = conf.read_text()
    public = port_of(dockerfile_env()["TRACKER_LISTEN"])
    upstream = set(re.findall(r"^\s*server\s+(\S+?);", text, re.M))
    assert upstream == {f"{name}:{public}" for name in scaled_instances()}
    assert "$proxy_add_x_forwarded_for" in text
    for service in scaled_instances().values():
        assert service["environment"]["TRACKER_PROXY_HOPS"] == "1"
    assert set(nginx["depends_on"]) == set(scaled_instances())
    assert nginx["ports"]


def test_the_scaled_compose_prometheus_scrapes_every_instance() -> None:
    stack = compose_scale()
    prometheus = stack["services"]["prometheus"]
    flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = Path(flag.split("=", 1)[1])
    folder = (DEPLOY / mounted(prometheus, str(config_path.parent))).resolve()
    config = yaml.safe_load((folder / config_path.name).read_text())
    admin = port_of(dockerfile_env()["TRACKER_ADMIN_LISTEN"])
    targets = {t for job in config["scrape_configs"] if job["job_name"] == "tracker"
               for s in job["static_configs"] for t in s["targets"]}
    assert targets == {f"{name}:{admin}" for name in scaled_instances()}
    assert [(folder / name).resolve() for name in config["rule_files"]] == [RULES.resolve()]


def test_promtool_checks_the_scaled_prometheus_config() -> None:
    run_promtool("check", "config", str(PROMETHEUS / "prometheus.scale.yml"))


def test_nginx_checks_the_load_balancer_config(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        if os.environ.get("TRACKER_REQUIRE_TOOLS") == "1":
            pytest.fail("nginx is missing and TRACKER_REQUIRE_TOOLS=1: apt-get install nginx-light")
        pytest.skip("nginx is missing: apt-get install nginx-light")
    # The instances' names resolve on the compose network only: here, to this host.
    conf = (DEPLOY / "nginx" / "tracker.conf").read_text()
    (tmp_path / "tracker.conf").write_text(re.sub(r"(server\s+)[\w-]+:", r"\g<1>127.0.0.1:", conf))
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log stderr;\nevents {{}}\n"
        f"http {{ include {tmp_path}/tracker.conf; }}\n")
    result = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# -- the scaled form: kubernetes-scale/ ------------------------------------------------------------


def scale_object(kind: str, name: str, file: str) -> dict[str, Any]:
    """An object of the overlay by kind, name and file (a patch shares its target's name)."""
    found: dict[str, Any] = next(doc for doc in documents(KUBERNETES_SCALE / file)
                                 if (doc["kind"], doc["metadata"]["name"]) == (kind, name))
    return found


def test_the_scaled_kustomization_migrates_directly_and_serves_through_pgbouncer() -> None:
    kustomization = documents(KUBERNETES_SCALE / "kustomization.yaml")[0]
    assert (KUBERNETES_SCALE / kustomization["resources"][0]).resolve() == KUBERNETES.resolve()
    base = statefulset()
    patch = scale_object("StatefulSet", base["metadata"]["name"], "statefulset-scale.yaml")
    pod = patch["spec"]["template"]["spec"]
    assert env_values(container(patch))["TRACKER_MIGRATE"] == "false"
    [migrate] = pod["initContainers"]
    assert migrate["command"] == ["tracker", "migrate"]
    assert migrate["image"] == container(base)["image"]
    secret = scale_object("Secret", "tracker", "secret.example.yaml")["stringData"]
    [url] = migrate["env"]
    assert url["name"] == "DATABASE_URL"
    direct = secret[url["valueFrom"]["secretKeyRef"]["key"]]
    # The pods' own DATABASE_URL (from the base's Secret reference) is PgBouncer's Service.
    service = scale_object("Service", "tracker-pgbouncer", "pgbouncer.yaml")
    _, [pooled], _ = url_parts(secret["DATABASE_URL"])
    [port] = service["spec"]["ports"]
    assert pooled == f"{service['metadata']['name']}:{port['port']}"
    assert url_parts(direct)[1] != [pooled]
    config = ini(KUBERNETES_SCALE / "pgbouncer.ini")
    assert config["pgbouncer"]["pool_mode"] == "transaction"
    deployment = scale_object("Deployment", "tracker-pgbouncer", "pgbouncer.yaml")
    [box] = deployment["spec"]["template"]["spec"]["containers"]
    assert [p["containerPort"] for p in box["ports"] if p["name"] == port["targetPort"]] == [
        int(config["pgbouncer"]["listen_port"])]
    assert selects(service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    # The user list the configuration names is the Secret's key, mounted.
    auth_file = Path(config["pgbouncer"]["auth_file"])
    mounts = {m["mountPath"]: m["name"] for m in box["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    userlist = volumes[mounts[str(auth_file.parent)]]["secret"]["secretName"]
    assert auth_file.name in scale_object("Secret", userlist, "secret.example.yaml")["stringData"]
    # And the settings for the Redis Cluster.
    assert url_parts(secret["REDIS_URL"])[0] in ("redis+cluster", "rediss+cluster")


def test_the_scaled_pgbouncer_settings_are_the_same_in_compose_and_kubernetes() -> None:
    compose_ini = ini(DEPLOY / "pgbouncer" / "pgbouncer.ini")["pgbouncer"]
    kubernetes_ini = ini(KUBERNETES_SCALE / "pgbouncer.ini")["pgbouncer"]
    del compose_ini["auth_file"], kubernetes_ini["auth_file"]
    assert compose_ini == kubernetes_ini


def test_kubectl_renders_both_kustomizations() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is missing")
    for folder in (KUBERNETES, KUBERNETES / "monitoring", KUBERNETES_SCALE):
        result = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        kinds = {doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc}
        assert kinds, folder
    rendered = list(yaml.safe_load_all(result.stdout))
    [workload] = [d for d in rendered if d["kind"] == "StatefulSet"]
    assert [c["name"] for c in workload["spec"]["template"]["spec"]["initContainers"]] == ["migrate"]
    assert env_values(container(workload))["TRACKER_MIGRATE"] == "false"
    assert {("HorizontalPodAutoscaler", "tracker"), ("PodDisruptionBudget", "tracker")} <= {
        (d["kind"], d["metadata"]["name"]) for d in rendered}


# -- alert rules ---------------------------------------------------------------------------------


def test_alert_rules_cover_the_outages_and_say_what_to_do() -> None:
    found = {rule["alert"]: rule for rule in rules()}
    assert REQUIRED_ALERTS <= set(found)
    for name, rule in found.items():
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert rule["annotations"]["summary"].strip(), name
        assert "What to do:" in rule["annotations"]["description"], name


def load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("prometheusrule", PROMETHEUS / "prometheusrule.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    before, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ in deploy/
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = before
    return module


def test_the_prometheusrule_is_the_rules_file() -> None:
    committed = KUBERNETES / "monitoring" / "prometheusrule.yaml"
    assert committed.read_text() == load_generator().render(), (
        "regenerate: python deploy/prometheus/prometheusrule.py > "
        "deploy/kubernetes/monitoring/prometheusrule.yaml")
    manifest = documents(committed)[0]
    assert manifest["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("TRACKER_REQUIRE_TOOLS") == "1":
            pytest.fail("promtool is missing and TRACKER_REQUIRE_TOOLS=1: apt-get install prometheus")
        pytest.skip("promtool is missing: apt-get install prometheus")
    return path


def run_promtool(*args: str, cwd: Path = ROOT) -> str:
    result = subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True,
                            timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_promtool_checks_the_rules() -> None:
    run_promtool("check", "rules", str(RULES))


def test_promtool_checks_the_compose_prometheus_config() -> None:
    run_promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))


# The alerts against made-up series (promtool test rules). Each case: series and, at some
# times, the alerts expected (their labels besides alertname; [] = none). Per-pod alerts keep
# the target's labels (I), aggregated ones only the job (J).
T0 = 'instance="t0:9100", job="tracker"'
T1 = 'instance="t1:9100", job="tracker"'
I = {"instance": "t0:9100", "job": "tracker"}
J = {"job": "tracker"}
CASES: list[dict[str, Any]] = [
    {"alert": "TrackerRedisDown",
     "series": {f'tracker_backend_up{{backend="redis", {T0}}}': "1 1 0x10"},
     "expect": {"2m": [], "5m": [I | {"backend": "redis", "severity": "critical"}]}},
    {"alert": "TrackerRedisDown",
     "series": {f'tracker_backend_up{{backend="redis", {T0}}}': "1x10",
                f'tracker_backend_up{{backend="postgres", {T0}}}': "0x10"},
     "expect": {"8m": []}},
    {"alert": "TrackerPostgresDown",
     "series": {f'tracker_backend_up{{backend="postgres", {T0}}}': "1 0x10"},
     "expect": {"1m": [], "4m": [I | {"backend": "postgres", "severity": "critical"}]}},
    {"alert": "TrackerMetricsAbsent",
     "series": {f"tracker_backend_up{{{T0}}}": "1x20"},
     "expect": {"5m": [], "12m": [{"severity": "critical"}]}},
    {"alert": "TrackerMetricsAbsent",
     "series": {f'tracker_http_requests_total{{route="/metrics", {T0}}}': "1+1x20"},
     "expect": {"12m": []}},
    # A labelless counter is there from the start, at 0.
    {"alert": "TrackerDeadLetters",
     "series": {f"tracker_dead_letters_total{{{T0}}}": "0 0 0 2x30"},
     "expect": {"2m": [], "3m": [I | {"severity": "warning"}], "16m": [I | {"severity": "warning"}],
                "30m": []}},
    # A series born with its first dead letter (a pod that just started).
    {"alert": "TrackerDeadLetters",
     "series": {f"tracker_dead_letters_total{{{T0}}}": "_x3 1x30"},
     "expect": {"3m": [I | {"severity": "warning"}], "30m": []}},
    # A labelled counter appears only with its first increment: the alert still fires.
    {"alert": "TrackerEventsLostBufferUnavailable",
     "series": {f'tracker_events_dropped_total{{type="click", reason="buffer_unavailable", {T0}}}':
                "_x5 3x30",
                f'tracker_events_dropped_total{{type="click", reason="unknown_campaign", {T0}}}':
                "1+5x30"},
     "expect": {"4m": [], "5m": [I | {"type": "click", "reason": "buffer_unavailable",
                                  "severity": "critical"}], "30m": []}},
    {"alert": "TrackerEventsLostBufferUnavailable",
     "series": {f'tracker_events_dropped_total{{type="impression", reason="buffer_unavailable", {T0}}}':
                "1x20 4x20"},
     "expect": {"19m": [], "21m": [I | {"type": "impression", "reason": "buffer_unavailable",
                                    "severity": "critical"}]}},
    {"alert": "TrackerWriteBacklogStale",
     "series": {f"tracker_write_backlog_oldest_age_seconds{{{T0}}}": "0.1x3 200+60x20"},
     "expect": {"5m": [], "10m": [J | {"severity": "critical"}]}},
    {"alert": "TrackerWriteBacklogGrowing",
     "series": {f"tracker_write_backlog_events{{{T0}}}": "0+500x40",
                f"tracker_write_backlog_oldest_age_seconds{{{T0}}}": "30x40"},
     "expect": {"10m": [], "20m": [J | {"severity": "warning"}]}},
    # A healthy backlog comes and goes and its oldest event is fresh.
    {"alert": "TrackerWriteBacklogGrowing",
     "series": {f"tracker_write_backlog_events{{{T0}}}": "0 500 0 800 " * 10,
                f"tracker_write_backlog_oldest_age_seconds{{{T0}}}": "0.05x40"},
     "expect": {"30m": []}},
    {"alert": "TrackerWriteBacklogOverLimit",
     "series": {f"tracker_write_backlog_events{{{T0}}}": "0+100x40",
                f"tracker_write_backlog_limit_events{{{T0}}}": "1000x40"},
     "expect": {"9m": [], "12m": [J | {"severity": "critical"}]}},
    # The lease moves from t0 to t1 (t0 stops exporting) while the backlog stays over its
    # limit: one alert for the deployment, never one per pod.
    {"alert": "TrackerWriteBacklogOverLimit",
     "series": {f"tracker_write_backlog_events{{{T0}}}": "2000x10",
                f"tracker_write_backlog_limit_events{{{T0}}}": "1000x10",
                f"tracker_write_backlog_events{{{T1}}}": "_x10 2000x20",
                f"tracker_write_backlog_limit_events{{{T1}}}": "_x10 1000x20"},
     "expect": {"5m": [J | {"severity": "critical"}], "10m": [J | {"severity": "critical"}],
                "25m": [J | {"severity": "critical"}]}},
    {"alert": "TrackerWriteBacklogOverLimit",
     "series": {f"tracker_write_backlog_events{{{T0}}}": "999x40",
                f"tracker_write_backlog_limit_events{{{T0}}}": "1000x40"},
     "expect": {"30m": []}},
    {"alert": "TrackerWriteLagHigh",
     "series": {f'tracker_write_lag_seconds_bucket{{le="{le}", {T0}}}': values
                for le, values in [("0.1", "0x20"), ("1", "0x20"), ("2", "0x20"),
                                   ("5", "0+60x20"), ("+Inf", "0+60x20")]},
     "expect": {"3m": [], "12m": [J | {"severity": "warning"}]}},
    {"alert": "TrackerWriteLagHigh",
     "series": {f'tracker_write_lag_seconds_bucket{{le="{le}", {T0}}}': "0+60x20"
                for le in ("0.1", "1", "2", "5", "+Inf")},
     "expect": {"12m": []}},
    {"alert": "TrackerSpoolNotReplayed",
     "series": {f'tracker_spool_events_total{{action="written", {T0}}}': "_ 40x30",
                f'tracker_backend_up{{backend="redis", {T0}}}': "0 1x30"},
     "expect": {"5m": [], "15m": [I | {"severity": "warning"}]}},
    {"alert": "TrackerSpoolNotReplayed",
     "series": {f'tracker_spool_events_total{{action="written", {T0}}}': "_ 40x30",
                f'tracker_spool_events_total{{action="replayed", {T0}}}': "_ _ 40x30",
                f'tracker_backend_up{{backend="redis", {T0}}}': "0 1x30"},
     "expect": {"15m": []}},
    # Still away: TrackerRedisDown speaks, not this one.
    {"alert": "TrackerSpoolNotReplayed",
     "series": {f'tracker_spool_events_total{{action="written", {T0}}}': "_ 40x30",
                f'tracker_backend_up{{backend="redis", {T0}}}': "0x30"},
     "expect": {"15m": []}},
]


def test_promtool_runs_the_alerts_against_made_up_series(tmp_path: Path) -> None:
    promtool()
    path = tmp_path
    names = {rule["alert"] for rule in rules()}
    assert {case["alert"] for case in CASES} == names, "every alert has a case"
    # Annotations are checked above; promtool compares them whole, so they are left out here.
    stripped = yaml.safe_load(RULES.read_text())
    for group in stripped["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (path / "alerts.yml").write_text(yaml.safe_dump(stripped))
    tests = []
    for case in CASES:
        tests.append({
            "interval": "1m",
            "input_series": [{"series": s, "values": v.strip()} for s, v in case["series"].items()],
            "alert_rule_test": [
                {"eval_time": at, "alertname": case["alert"],
                 "exp_alerts": [{"exp_labels": labels} for labels in alerts]}
                for at, alerts in case["expect"].items()],
        })
    (path / "alerts.test.yml").write_text(yaml.safe_dump(
        {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": tests}))
    run_promtool("test", "rules", "alerts.test.yml", cwd=path)


def test_ci_runs_the_readme_test_command_with_the_tools_required() -> None:
    readme = (ROOT / "README.md").read_text()
    command = "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/pytest"
    assert command in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci
    assert "TRACKER_REQUIRE_TOOLS=1" in ci
