"""The Helm chart rendered by the real Helm engine, offline, in its three forms.

`helm-python-sdk` bundles Helm v4 as a library: the chart is loaded, its values checked against
values.schema.json and its templates rendered exactly as `helm install` would, without a cluster.
Every rendered object is validated against Kubernetes' own schemas (`kubernetes-validate`, strict:
unknown fields are errors) for the oldest Kubernetes the chart supports and the newest known, plus
the pod rules the API server adds (names, ports, mounts that point at volumes). The Prometheus
Operator's objects (ServiceMonitor, PrometheusRule) are not in Kubernetes' schemas, and no package
on the registries this project installs from ships the operator's CRD schemas without also
installing a pytest plugin of its own (the pydantic models of `cloudcoil-models-prometheus-operator`
do), so they skip the schema step; their fields are checked one by one instead, against the
operator's documented shapes (`check_service_monitor`, `check_prometheus_rule`). The rendered
maintainer.yaml and jobs are loaded by the real configuration loader.

The sidecar form is tested as an SRE uses it: a small application chart, written here, lists this
chart as a dependency and includes the sidecar templates beside its own container.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from maintainer.project import load_project

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "maintainer"
RULES = Path("files") / "prometheus-rules.yaml"
DASHBOARD = Path("files") / "dashboard.json"
RELEASE, NAMESPACE = "pgm", "ops"

# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest the schemas know.
KUBE_VERSIONS = ("1.27", kubernetes_validate.latest_version())
SPEC_ALERTS = {
    "MaintainerJobFailing", "MaintainerJobNotSucceeding", "MaintainerSequenceExhaustion",
    "MaintainerPartitionsRunningOut", "MaintainerDefaultPartitionRows", "MaintainerWraparound",
    "MaintainerIndexBloat", "MaintainerThrottledTooLong", "MaintainerConfigInvalid",
}
# Custom resources: no schema offline (see the module's docstring); checked field by field.
CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
# The operator's duration format (monitoring.coreos.com/v1 Duration).
PROM_DURATION = re.compile(r"^(0|([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?)$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
PORT_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # IANA_SVC_NAME, at most 15
DSN_TEXT = re.compile(r"postgres(ql)?://|password=", re.IGNORECASE)

# Stand-ins for the generated files, used only in a temporary copy of the chart while the repository
# does not have them yet: the smallest documents of the right shape.
STAND_IN_RULES = {
    "groups": [{
        "name": "pg-maintainer",
        "rules": [{
            "alert": "MaintainerJobFailing",
            "expr": 'increase(maintainer_job_runs_total{status="failed"}[1h]) > 0',
            "for": "5m",
            "labels": {"severity": "warning"},
            "annotations": {"summary": "{{ $labels.job }} fails on {{ $labels.target }}"},
        }],
    }],
}
STAND_IN_DASHBOARD = {
    "title": "pg-maintainer",
    "uid": "pg-maintainer",
    "schemaVersion": 39,
    "panels": [{"type": "timeseries", "title": "Runs",
                "targets": [{"expr": "sum(rate(maintainer_job_runs_total[5m]))"}]}],
}


# -- the chart, rendering and validation ----------------------------------------------------------------


@pytest.fixture(scope="module")
def chart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the chart with the generated rules and dashboard: the real files when the repository
    has them, stand-ins otherwise (written into the copy only)."""
    target = tmp_path_factory.mktemp("chart") / "maintainer"
    shutil.copytree(CHART, target)
    (target / "files").mkdir(exist_ok=True)
    if not (target / RULES).exists():
        (target / RULES).write_text(yaml.safe_dump(STAND_IN_RULES, sort_keys=False))
    if not (target / DASHBOARD).exists():
        (target / DASHBOARD).write_text(json.dumps(STAND_IN_DASHBOARD, indent=2))
    return target


@pytest.fixture(scope="module")
def chart(chart_dir: Path) -> Iterator[helm.Chart]:
    with helm.Chart.load(chart_dir) as loaded:
        yield loaded


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """The objects of a render, in template order (NOTES.txt is not an object)."""
    docs: list[dict[str, Any]] = []
    for name in sorted(rendered):
        if name.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(rendered[name]) if d)
    return docs


def render(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    return manifests(chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True))


def the(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} objects of kind {kind} {name or ''}"
    return found[0]


def validate(doc: dict[str, Any]) -> None:
    """Kubernetes' schemas for built-in kinds (custom resources: see CUSTOM_RESOURCES), the pod rules."""
    if (doc["apiVersion"], doc["kind"]) in CUSTOM_RESOURCES:
        assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
        assert set(doc["metadata"]) <= {"name", "labels", "annotations"}
    else:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    assert DNS_LABEL.match(doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= 63
    for value in doc["metadata"].get("labels", {}).values():
        assert isinstance(value, str) and LABEL_VALUE.match(value) and len(value) <= 63, value
    if (pod := pod_spec(doc)) is not None:
        check_pod(pod)


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    return dict(pod_template(doc)["spec"]) if doc["kind"] in ("Deployment", "CronJob") else None


def check_pod(pod: dict[str, Any]) -> None:
    """What the API server checks beyond the schema: unique names, mounts of declared volumes, probe
    ports that exist, names that are DNS labels and port names of at most 15 characters."""
    volumes = [v["name"] for v in pod.get("volumes", [])]
    assert len(volumes) == len(set(volumes)), volumes
    assert all(DNS_LABEL.match(v) and len(v) <= 63 for v in volumes), volumes
    containers = pod["containers"] + pod.get("initContainers", [])
    assert len({c["name"] for c in containers}) == len(containers)
    port_names = [p["name"] for c in containers for p in c.get("ports", []) if "name" in p]
    assert len(port_names) == len(set(port_names)), port_names
    for container in containers:
        mounts = container.get("volumeMounts", [])
        assert {m["name"] for m in mounts} <= set(volumes), (container["name"], mounts, volumes)
        assert len({m["mountPath"] for m in mounts}) == len(mounts)
        own_ports = {p.get("name") for p in container.get("ports", [])}
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe in container and "httpGet" in container[probe]:
                port = container[probe]["httpGet"]["port"]
                assert isinstance(port, int) or port in own_ports, (container["name"], probe, port)
        env = [e["name"] for e in container.get("env", [])]
        assert len(env) == len(set(env)), env
    for name in port_names:
        assert PORT_NAME.match(name) and len(name) <= 15, name


def maintainer_container(pod: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod["containers"] if c["name"] == "maintainer")


def load_rendered_config(docs: list[dict[str, Any]], where: Path, container: dict[str, Any],
                         monkeypatch: pytest.MonkeyPatch) -> Any:
    """The ConfigMap laid out as the pod sees it (volume items), loaded by the real loader, with the
    container's DSN variables set as the Secrets would set them."""
    config = the(docs, "ConfigMap", f"{RELEASE}-maintainer")["data"]
    (where / "jobs").mkdir(parents=True)
    (where / "templates").mkdir()
    for key, text in config.items():
        if key == "maintainer.yaml":
            (where / key).write_text(text)
        elif key.startswith("job-"):
            (where / "jobs" / key.removeprefix("job-")).write_text(text)
        elif key.startswith("unit-"):
            (where / "templates" / key.removeprefix("unit-")).write_text(text)
    for var in container["env"]:
        if var["name"].startswith("MAINTAINER_TARGETS__"):
            monkeypatch.setenv(var["name"], "postgresql://maintainer@db.invalid:5432/app")
    return load_project(str(where / "maintainer.yaml"))


# -- the values matrix ------------------------------------------------------------------------------------

BASE: dict[str, Any] = {"jobs": {"sequences": {"unit": "sequences", "schedule": "*/30 * * * *"}}}

VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "file-and-env-dsns": {
        "targets": {
            "app": {"existingSecret": "app-db-dsn", "key": "dsn", "mountAs": "file"},
            "billing-eu": {"existingSecret": "billing-dsn", "key": "uri", "mountAs": "env"},
            "ledger_2": {"existingSecret": "ledger-dsn", "key": "dsn", "mountAs": "env"},
        },
        "jobs": {"sequences": {"unit": "sequences", "schedule": "*/30 * * * *", "targets": ["app", "billing-eu"]}},
    },
    "pooled-target": {
        "targets": {"app": {"existingSecret": "app-db-dsn", "key": "dsn", "mountAs": "file", "pooled": True}},
    },
    "trigger-token-and-sentry": {
        "http": {"port": 9200, "triggerToken": {"existingSecret": "maintainer-trigger", "key": "token"}},
        "sentry": {"existingSecret": "sentry", "key": "dsn", "environment": "staging"},
    },
    "resources-and-placement": {
        "resources": {"requests": {"cpu": "50m", "memory": "96Mi"}, "limits": {"cpu": 1, "memory": "512Mi"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100,
            "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "maintainer"}}},
        }]}},
        "imagePullSecrets": [{"name": "registry"}],
        "podAnnotations": {"example.com/team": "dba"},
        "podLabels": {"team": "dba"},
        "extraEnv": [{"name": "TZ", "value": "UTC"}],
        "image": {"repository": "registry.example/pgm", "tag": "1.2.3", "pullPolicy": "Always"},
    },
    "jobs-and-units": {
        "jobs": {
            "sequences": {"unit": "sequences", "schedule": "@hourly"},
            "nightly-reindex": {"unit": "reindex", "schedule": "0 3 * * *", "timeouts": {"lock": "1s"}},
            "erase-user": {"unit": "anonymize", "params": {"pause": "10ms"}, "items": [
                {"table": "public.users", "where": "id = %(user_id)s", "set": {"email": None}},
            ]},
            "mine": {"unit": "my_check", "schedule": "*/5 * * * *", "params": {"limit": 5}},
        },
        "units": {"my_check": (
            "---\ndescription: a check of our own\nparams:\n  limit: {type: integer, default: 10, min: 1}\n---\n"
            "{% block discover %}SELECT relname FROM pg_class LIMIT {{ params.limit | literal }}{% endblock %}\n"
        )},
        "serviceAccount": {"create": False, "name": "shared"},
    },
}

TOGGLES = ("serviceMonitor", "podDisruptionBudget", "prometheusRule", "grafanaDashboard")
# What each mode allows (values.schema.json refuses the others): cronjob mode has no /metrics and no
# long-lived pods; the sidecar's pods and their scraping belong to the application's chart.
MODE_TOGGLES = {
    "daemon": TOGGLES,
    "cronjob": (),
    "sidecar": ("prometheusRule", "grafanaDashboard"),
}


def with_base(variant: str) -> dict[str, Any]:
    values = copy.deepcopy(BASE)
    values.update(copy.deepcopy(VARIANTS[variant]))
    if "targets" in values:
        # Helm merges maps with the chart's defaults: a release drops the default target with null.
        values["targets"] = {"app": None, **values["targets"]}
    return values


def toggled(values: dict[str, Any], on: tuple[str, ...]) -> dict[str, Any]:
    values = copy.deepcopy(values)
    for toggle in TOGGLES:
        values.setdefault(toggle, {})["enabled"] = toggle in on
    values["serviceMonitor"]["labels"] = {"release": "kube-prometheus-stack"}
    values["prometheusRule"]["labels"] = {"release": "kube-prometheus-stack"}
    return values


def toggle_sets(mode: str) -> list[tuple[str, ...]]:
    allowed = MODE_TOGGLES[mode]
    return [combo for n in range(len(allowed) + 1) for combo in itertools.combinations(allowed, n)]


# -- daemon and cronjob ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("mode", ["daemon", "cronjob"])
def test_every_object_is_valid_and_safe(chart: helm.Chart, mode: str, variant: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    values = {**with_base(variant), "mode": mode}
    chart.validate_schema(values)
    docs = render(chart, values)
    for doc in docs:
        validate(doc)
    merged = chart.merge_values(values)
    workloads = [d for d in docs if d["kind"] in ("Deployment", "CronJob")]
    if mode == "daemon":
        assert [d["kind"] for d in workloads] == ["Deployment"]
        assert the(docs, "Deployment")["spec"]["replicas"] == merged["replicaCount"]
        the(docs, "Service")
    else:
        scheduled = sorted(name for name, job in merged["jobs"].items() if job and job.get("schedule"))
        assert sorted(d["metadata"]["labels"]["maintainer/job"] for d in workloads) == scheduled
        assert not [d for d in docs if d["kind"] == "Service"]
        for cronjob in workloads:
            assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
            job = cronjob["metadata"]["labels"]["maintainer/job"]
            assert cronjob["spec"]["schedule"] == merged["jobs"][job]["schedule"]
            assert maintainer_container(pod_spec(cronjob) or {})["args"] == [job]
    assert bool([d for d in docs if d["kind"] == "ServiceAccount"]) == merged["serviceAccount"]["create"]
    for workload in workloads:
        pod = pod_spec(workload)
        assert pod is not None
        check_pod_security(pod, merged, sidecar=False)
        check_secrets(pod, merged, sidecar=False)
        check_config_volume(pod, docs, merged)
        assert pod["serviceAccountName"] == (f"{RELEASE}-maintainer" if merged["serviceAccount"]["create"]
                                             else merged["serviceAccount"]["name"])
        # A changed ConfigMap rolls the pods.
        annotations = pod_template(workload)["metadata"]["annotations"]
        assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/config"])
        assert annotations.items() >= merged["podAnnotations"].items()
        container = maintainer_container(pod)
        assert container["resources"] == merged["resources"]
        probes = {p: container[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe") if p in container}
        assert probes == ({"livenessProbe": "/healthz", "readinessProbe": "/readyz"} if mode == "daemon" else {})
    check_no_dsn(docs)
    project = load_rendered_config(docs, tmp_path / "etc", maintainer_container(pod_spec(workloads[0]) or {}),
                                   monkeypatch)
    assert set(project.jobs) == set(merged["jobs"])
    assert set(project.settings.targets) == {name for name, t in merged["targets"].items() if t}
    for name, target in project.settings.targets.items():
        assert target.pooled == bool(merged["targets"][name].get("pooled"))
    if merged["http"]["triggerToken"]["existingSecret"]:
        assert str(project.settings.http.trigger_token_file) == "/var/run/secrets/maintainer/trigger/token"
    else:
        assert project.settings.http.trigger_token_file is None


def check_pod_security(pod: dict[str, Any], merged: dict[str, Any], *, sidecar: bool) -> None:
    """Non-root, read-only root filesystem, no privilege escalation, no capabilities, and no token
    for the Kubernetes API (the daemon never talks to it)."""
    container = maintainer_container(pod)
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    user = context if sidecar else pod["securityContext"]
    assert user["runAsNonRoot"] is True and user["runAsUser"] == 10001 and user["runAsGroup"] == 10001
    assert user["seccompProfile"] == {"type": "RuntimeDefault"}
    if not sidecar:
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["fsGroup"] == 10001  # makes the 0400 secret files readable
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")  # noqa: S108
    assert next(v for v in pod["volumes"] if v["name"] == tmp["name"])["emptyDir"]["sizeLimit"] == "64Mi"


def check_secrets(pod: dict[str, Any], merged: dict[str, Any], *, sidecar: bool) -> None:
    """Every DSN comes from its Secret: a read-only file at the path maintainer.yaml names, or an
    environment variable from a secretKeyRef; the trigger token and the Sentry DSN likewise."""
    container = maintainer_container(pod)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    env = {e["name"]: e for e in container["env"]}
    mode = 0o444 if sidecar else 0o400
    for name, target in merged["targets"].items():
        if not target:
            continue
        variable = f"MAINTAINER_TARGETS__{name.upper()}__DSN"
        if target["mountAs"] == "file":
            mount = mounts[f"/var/run/secrets/maintainer/targets/{name}"]
            assert mount["readOnly"] is True
            secret = volumes[mount["name"]]["secret"]
            assert secret == {"secretName": target["existingSecret"], "defaultMode": mode,
                              "items": [{"key": target["key"], "path": "dsn"}]}
            assert variable not in env
        else:
            assert env[variable] == {"name": variable, "valueFrom": {"secretKeyRef": {
                "name": target["existingSecret"], "key": target["key"]}}}
    token = merged["http"]["triggerToken"]
    if token["existingSecret"]:
        mount = mounts["/var/run/secrets/maintainer/trigger"]
        assert mount["readOnly"] is True
        assert volumes[mount["name"]]["secret"] == {"secretName": token["existingSecret"], "defaultMode": mode,
                                                    "items": [{"key": token["key"], "path": "token"}]}
    else:
        assert "/var/run/secrets/maintainer/trigger" not in mounts
    if merged["sentry"]["existingSecret"]:
        assert env["MAINTAINER_SENTRY__DSN"]["valueFrom"]["secretKeyRef"] == {
            "name": merged["sentry"]["existingSecret"], "key": merged["sentry"]["key"]}
    else:
        assert "MAINTAINER_SENTRY__DSN" not in env
    secret_mounts = [m for m in container["volumeMounts"] if "secret" in volumes[m["name"]]]
    assert secret_mounts and all(m["readOnly"] is True for m in secret_mounts)


def check_config_volume(pod: dict[str, Any], docs: list[dict[str, Any]], merged: dict[str, Any]) -> None:
    """The ConfigMap holds maintainer.yaml, every job and every unit, and the pod mounts each one
    where maintainer.yaml expects it, read-only."""
    container = maintainer_container(pod)
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/maintainer")
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])["configMap"]
    configmap = the(docs, "ConfigMap", volume["name"])
    items = {i["key"]: i["path"] for i in volume["items"]}
    jobs = {name for name, job in merged["jobs"].items() if job}
    assert items == {"maintainer.yaml": "maintainer.yaml",
                     **{f"job-{j}.yaml": f"jobs/{j}.yaml" for j in jobs},
                     **{f"unit-{u}.sql.j2": f"templates/{u}.sql.j2" for u in merged["units"]}}
    assert set(configmap["data"]) == set(items)
    for name in jobs:
        job = yaml.safe_load(configmap["data"][f"job-{name}.yaml"])
        assert job == {"name": name, **merged["jobs"][name]}
    config = yaml.safe_load(configmap["data"]["maintainer.yaml"])
    assert config["http"]["listen"] == f"0.0.0.0:{merged['http']['port']}"
    assert {"MAINTAINER_CONFIG": "/etc/maintainer/maintainer.yaml"}.items() <= {
        e["name"]: e.get("value") for e in container["env"]}.items()


def pod_template(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"] if doc["kind"] == "Deployment" else doc["spec"]["jobTemplate"]["spec"]
    return dict(spec["template"])


def check_no_dsn(docs: list[dict[str, Any]]) -> None:
    """No connection string, password or Secret value anywhere in what the chart renders."""
    text = yaml.safe_dump_all(docs)
    assert not DSN_TEXT.search(text)
    assert not [d for d in docs if d["kind"] == "Secret"]  # the chart reads Secrets, never writes them


@pytest.mark.parametrize("mode", ["daemon", "cronjob", "sidecar"])
def test_every_toggle_combination_the_schema_allows_renders_valid_objects(chart: helm.Chart, chart_dir: Path,
                                                                          mode: str) -> None:
    expected_kinds = {"serviceMonitor": "ServiceMonitor", "podDisruptionBudget": "PodDisruptionBudget",
                      "prometheusRule": "PrometheusRule"}
    for on in toggle_sets(mode):
        values = toggled({**with_base("defaults"), "mode": mode}, on)
        docs = render(chart, values)
        for doc in docs:
            validate(doc)
        kinds = sorted(d["kind"] for d in docs)
        for toggle, kind in expected_kinds.items():
            assert (kind in kinds) == (toggle in on), (on, kinds)
        dashboards = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
        assert len(dashboards) == ("grafanaDashboard" in on), (on, kinds)
        base = {"daemon": ["ConfigMap", "Deployment", "Service", "ServiceAccount"],
                "cronjob": ["ConfigMap", "CronJob", "ServiceAccount"],
                "sidecar": ["ConfigMap"]}[mode]
        assert sorted(set(kinds) - {"ServiceMonitor", "PodDisruptionBudget", "PrometheusRule"}) == base
        if "serviceMonitor" in on:
            check_service_monitor(docs)
        if "podDisruptionBudget" in on:
            pdb = the(docs, "PodDisruptionBudget")
            assert pdb["spec"]["selector"] == the(docs, "Deployment")["spec"]["selector"]
        if "prometheusRule" in on:
            check_prometheus_rule(the(docs, "PrometheusRule"), chart_dir)
        if dashboards:
            check_dashboard(dashboards[0], chart_dir)


def check_service_monitor(docs: list[dict[str, Any]]) -> None:
    """Selects the Service (the Prometheus Operator's ServiceMonitorSpec: selector, endpoints of
    port, path, interval, scrapeTimeout as Durations, honorLabels) and nothing else."""
    monitor, service = the(docs, "ServiceMonitor"), the(docs, "Service")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert set(monitor["spec"]) == {"selector", "endpoints"}
    assert monitor["spec"]["selector"] == {"matchLabels": service["spec"]["selector"]}
    [endpoint] = monitor["spec"]["endpoints"]
    assert set(endpoint) == {"port", "path", "interval", "scrapeTimeout", "honorLabels"}
    # The metrics' own `job` label (the maintainer's job) is what the alerts group by.
    assert endpoint["honorLabels"] is True
    assert endpoint["port"] == service["spec"]["ports"][0]["name"] and endpoint["path"] == "/metrics"
    assert PROM_DURATION.match(endpoint["interval"]) and PROM_DURATION.match(endpoint["scrapeTimeout"])


def check_prometheus_rule(rule: dict[str, Any], chart_dir: Path) -> None:
    """The PrometheusRule's spec is files/prometheus-rules.yaml, unchanged; with the generated file,
    every alert of the contract is there with its severity and summary."""
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == yaml.safe_load((chart_dir / RULES).read_text())
    assert set(rule["spec"]) == {"groups"}
    for group in rule["spec"]["groups"]:
        assert isinstance(group["name"], str) and group["name"] and isinstance(group["rules"], list)
        assert set(group) <= {"name", "interval", "rules", "limit", "partial_response_strategy", "query_offset",
                              "labels"}
        for item in group["rules"]:
            assert isinstance(item["expr"], str | int) and ("alert" in item) != ("record" in item)
            assert set(item) <= {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
            assert all(PROM_DURATION.match(item[k]) for k in ("for", "keep_firing_for") if k in item)
            assert all(isinstance(v, str) for k in ("labels", "annotations") for v in item.get(k, {}).values())
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert alerts
    for alert in alerts:
        assert alert["labels"]["severity"] in ("warning", "critical") and alert["annotations"]["summary"]
    if (CHART / RULES).exists():
        assert {a["alert"] for a in alerts} >= SPEC_ALERTS


def check_dashboard(configmap: dict[str, Any], chart_dir: Path) -> None:
    """A ConfigMap that Grafana's sidecar loads: its label, one JSON file, files/dashboard.json."""
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert list(configmap["data"]) == ["pg-maintainer.json"]
    dashboard = json.loads(configmap["data"]["pg-maintainer.json"])
    assert dashboard == json.loads((chart_dir / DASHBOARD).read_text())
    assert dashboard["panels"]


def test_rules_and_dashboard_options(chart: helm.Chart) -> None:
    docs = render(chart, {
        "prometheusRule": {"enabled": True, "labels": {"prometheus": "ops"}},
        "grafanaDashboard": {"enabled": True, "label": "grafana.example/dashboard", "labelValue": "pg",
                             "annotations": {"grafana_folder": "Databases"}},
    })
    for doc in docs:
        validate(doc)
    assert the(docs, "PrometheusRule")["metadata"]["labels"]["prometheus"] == "ops"
    dashboard = the(docs, "ConfigMap", f"{RELEASE}-maintainer-dashboard")
    assert dashboard["metadata"]["labels"]["grafana.example/dashboard"] == "pg"
    assert "grafana_dashboard" not in dashboard["metadata"]["labels"]
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Databases"}


def test_rules_and_dashboard_missing_from_the_chart_are_named(tmp_path: Path) -> None:
    bare = tmp_path / "maintainer"
    shutil.copytree(CHART, bare, ignore=shutil.ignore_patterns("files"))
    with helm.Chart.load(bare) as loaded:
        with pytest.raises(helm.HelmRenderError, match=r"files/prometheus-rules\.yaml is missing"):
            render(loaded, {"prometheusRule": {"enabled": True}})
        with pytest.raises(helm.HelmRenderError, match=r"files/dashboard\.json is missing"):
            render(loaded, {"grafanaDashboard": {"enabled": True}})


# -- values the schema refuses at render time ---------------------------------------------------------------

REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "bad mode": ({"mode": "statefulset"}, "/mode"),
    "unknown top-level key": ({"replicas": 2}, "additional properties 'replicas'"),
    "unknown nested key": ({"config": {"defaults": {"max_attempt": 3}}}, "max_attempt"),
    "negative replicas": ({"replicaCount": -1}, "/replicaCount"),
    "missing secret name": ({"targets": {"billing": {"key": "dsn", "mountAs": "file"}}}, "existingSecret"),
    "secret name removed": ({"targets": {"app": {"existingSecret": None}}}, "existingSecret"),
    "empty secret name": ({"targets": {"app": {"existingSecret": ""}}}, "/targets/app/existingSecret"),
    "a DSN in values": ({"targets": {"app": {"dsn": "postgresql://u:secret@db/app"}}}, "'dsn' not allowed"),
    "no target": ({"targets": {"app": None}}, "/targets"),
    "bad mountAs": ({"targets": {"app": {"mountAs": "plaintext"}}}, "/targets/app/mountAs"),
    "bad job name": ({"jobs": {"Nightly": {"unit": "sequences"}}}, "invalid propertyName 'Nightly'"),
    "job without unit": ({"jobs": {"nightly": {"schedule": "@daily"}}}, "unit"),
    "bad duration": ({"config": {"scheduler": {"misfire_grace_time": "soon"}}}, "misfire_grace_time"),
    "the chart owns http.listen": ({"config": {"http": {"listen": "0.0.0.0:1"}}}, "'http' not allowed"),
    "bad port": ({"http": {"port": 70000}}, "/http/port"),
    "bad trigger secret": ({"http": {"triggerToken": {"existingSecret": "Token!"}}}, "/http/triggerToken"),
    "writable root": ({"securityContext": {"readOnlyRootFilesystem": False}}, "readOnlyRootFilesystem"),
    "root user": ({"podSecurityContext": {"runAsNonRoot": False}}, "runAsNonRoot"),
    "bad quantity": ({"resources": {"requests": {"memory": "lots"}}}, "/resources/requests/memory"),
    "unknown resources key": ({"resources": {"request": {"cpu": "1"}}}, "'request' not allowed"),
    "bad scrape interval": ({"serviceMonitor": {"interval": "half a minute"}}, "/serviceMonitor/interval"),
    "bad dashboard label value": ({"grafanaDashboard": {"labelValue": "not ok"}}, "/grafanaDashboard/labelValue"),
    "bad rule label value": ({"prometheusRule": {"labels": {"release": "kube prometheus"}}},
                             "/prometheusRule/labels/release"),
    "rules switch not boolean": ({"prometheusRule": {"enabled": "yes"}}, "/prometheusRule/enabled"),
    "ServiceMonitor in cronjob mode": ({"mode": "cronjob", "serviceMonitor": {"enabled": True}},
                                       "/serviceMonitor/enabled"),
    "PDB in cronjob mode": ({"mode": "cronjob", "podDisruptionBudget": {"enabled": True}},
                            "/podDisruptionBudget/enabled"),
    "alerts in cronjob mode": ({"mode": "cronjob", "prometheusRule": {"enabled": True}}, "/prometheusRule/enabled"),
    "dashboard in cronjob mode": ({"mode": "cronjob", "grafanaDashboard": {"enabled": True}},
                                  "/grafanaDashboard/enabled"),
    "ServiceMonitor in sidecar mode": ({"mode": "sidecar", "serviceMonitor": {"enabled": True}},
                                       "/serviceMonitor/enabled"),
    "PDB in sidecar mode": ({"mode": "sidecar", "podDisruptionBudget": {"enabled": True}},
                            "/podDisruptionBudget/enabled"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_the_schema_refuses_wrong_values_at_render_time(chart: helm.Chart, case: str) -> None:
    values, where = REFUSED[case]
    with pytest.raises(helm.HelmValuesError) as refused:
        chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    assert where in str(refused.value)
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)


def test_a_window_in_cronjob_mode_is_refused_with_the_reason(chart: helm.Chart) -> None:
    values = {"mode": "cronjob", "jobs": {"sequences": {"unit": "sequences", "schedule": "@hourly",
                                                        "window": "01:00-05:00"}}}
    with pytest.raises(helm.HelmRenderError, match="write the window into its schedule"):
        render(chart, values)


# -- helm lint --------------------------------------------------------------------------------------------


def lint_problems(path: Path, values: dict[str, Any], **options: Any) -> list[dict[str, Any]]:
    report = helm.lint(path, values, strict=True, namespace=NAMESPACE, **options)
    assert report["total_charts_linted"] >= 1
    # Severity 1 is information (Chart.yaml "icon is recommended"); strict fails on 2 and above.
    return [m for m in report["messages"] if m["severity"] >= 2] + [{"error": e} for e in report["errors"]]


@pytest.mark.parametrize("mode", ["daemon", "cronjob", "sidecar"])
def test_helm_lint_strict_passes(chart_dir: Path, mode: str) -> None:
    assert lint_problems(CHART, {"mode": mode}) == []
    everything = toggled({**with_base("trigger-token-and-sentry"), "mode": mode}, MODE_TOGGLES[mode])
    assert lint_problems(chart_dir, everything) == []
    assert lint_problems(chart_dir, {"mode": mode, "replicaCount": -1}) != []


# -- the sidecar ------------------------------------------------------------------------------------------

APP_DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}-shop
spec:
  replicas: 3
  selector:
    matchLabels:
      app: shop
  template:
    metadata:
      labels:
        app: shop
      annotations:
        checksum/maintainer: {{ include "maintainer.sidecar.checksum" SCOPE }}
    spec:
      securityContext:
        runAsNonRoot: true
        runAsUser: 1000
      containers:
        - name: shop
          image: "shop:{{ .Chart.AppVersion }}"
          ports:
            - name: http
              containerPort: 8080
          readinessProbe:
            httpGet:
              path: /ready
              port: http
          volumeMounts:
            - name: config
              mountPath: /etc/shop
              readOnly: true
            - name: tmp
              mountPath: /tmp
        {{- include "maintainer.sidecar.container" SCOPE | nindent 8 }}
      volumes:
        - name: config
          configMap:
            name: {{ .Release.Name }}-shop
        - name: tmp
          emptyDir: {}
        {{- include "maintainer.sidecar.volumes" SCOPE | nindent 8 }}
"""
APP_CONFIGMAP = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-shop
data:
  shop.yaml: "port: 8080"
"""


def application_chart(where: Path, chart_dir: Path, alias: str | None = None) -> Path:
    """An application's chart that lists this chart as a dependency (the README's example)."""
    app = where / "shop"
    (app / "templates").mkdir(parents=True)
    (app / "charts").mkdir()
    shutil.copytree(chart_dir, app / "charts" / "maintainer")
    dependency = {"name": "maintainer", "version": "0.1.0", "repository": "file://../maintainer"}
    if alias:
        dependency["alias"] = alias
    (app / "Chart.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v2", "name": "shop", "version": "2.0.0", "appVersion": "2.3.4",
        "description": "an application with pg-maintainer beside it", "icon": "https://example.com/shop.png",
        "dependencies": [dependency],
    }))
    (app / "values.yaml").write_text(yaml.safe_dump({alias or "maintainer": {"mode": "sidecar"}}))
    # A name with a "-" is not a field name in Go templates: index reaches it.
    scope = f'(index .Subcharts "{alias}")' if alias else ".Subcharts.maintainer"
    (app / "templates" / "deployment.yaml").write_text(APP_DEPLOYMENT.replace("SCOPE", scope))
    (app / "templates" / "configmap.yaml").write_text(APP_CONFIGMAP)
    return app


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_sidecar_runs_beside_the_application_in_a_valid_pod(chart_dir: Path, variant: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    app = application_chart(tmp_path, chart_dir)
    subchart = {**with_base(variant), "mode": "sidecar",
                "prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}}
    with helm.Chart.load(app) as loaded:
        assert [d["name"] for d in loaded.dependencies] == ["maintainer"]
        docs = render(loaded, {"maintainer": subchart})
        merged = loaded.merge_values({"maintainer": subchart})["maintainer"]
    for doc in docs:
        validate(doc)
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == [("ConfigMap", f"{RELEASE}-maintainer"), ("ConfigMap", f"{RELEASE}-maintainer-dashboard"),
                     ("ConfigMap", f"{RELEASE}-shop"), ("Deployment", f"{RELEASE}-shop"),
                     ("PrometheusRule", f"{RELEASE}-maintainer")]
    deployment = the(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["shop", "maintainer"]
    assert pod["containers"][0]["image"] == "shop:2.3.4"
    # The application's pod is untouched: its own volumes, security context and service account.
    assert [v["name"] for v in pod["volumes"]][:2] == ["config", "tmp"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000}
    assert "serviceAccountName" not in pod
    container = maintainer_container(pod)
    assert container["args"] == ["run"]
    assert container["image"].endswith(":" + (merged["image"]["tag"] or "0.1.0"))
    assert [p["name"] for p in container["ports"]] == ["maintainer-http"]
    assert container["ports"][0]["containerPort"] == merged["http"]["port"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "maintainer-http"}
    # An unreachable database must not take the application out of its Service.
    assert "readinessProbe" not in container
    assert all(v["name"].startswith("maintainer-") for v in pod["volumes"][2:])
    check_pod_security(pod, merged, sidecar=True)
    check_secrets(pod, merged, sidecar=True)
    check_config_volume(pod, docs, merged)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/maintainer"])
    check_no_dsn(docs)
    project = load_rendered_config(docs, tmp_path / "etc", container, monkeypatch)
    assert set(project.jobs) == {name for name, job in merged["jobs"].items() if job}


def test_the_sidecar_checksum_follows_the_maintainer_config(chart_dir: Path, tmp_path: Path) -> None:
    app = application_chart(tmp_path, chart_dir)

    def checksum(values: dict[str, Any]) -> str:
        with helm.Chart.load(app) as loaded:
            docs = render(loaded, {"maintainer": {"mode": "sidecar", **values}})
        return str(the(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/maintainer"])

    same = checksum({})
    assert checksum({}) == same
    assert checksum({"jobs": {"nightly": {"unit": "reindex", "schedule": "@daily"}}}) != same
    assert checksum({"config": {"log_format": "text"}}) != same


def test_an_aliased_dependency_includes_the_sidecar_by_its_alias(chart_dir: Path, tmp_path: Path) -> None:
    app = application_chart(tmp_path, chart_dir, alias="db-maintainer")
    with helm.Chart.load(app) as loaded:
        docs = render(loaded, {"db-maintainer": {"mode": "sidecar", "config": {"log_format": "text"}}})
    for doc in docs:
        validate(doc)
    configmap = the(docs, "ConfigMap", f"{RELEASE}-db-maintainer")
    assert yaml.safe_load(configmap["data"]["maintainer.yaml"])["log_format"] == "text"
    volume = next(v for v in pod_spec(the(docs, "Deployment"))["volumes"] if v["name"] == "maintainer-config")  # type: ignore[index]
    assert volume["configMap"]["name"] == f"{RELEASE}-db-maintainer"


@pytest.mark.parametrize(("values", "scope", "message"), [
    ({"mode": "daemon"}, ".Subcharts.maintainer", r'in mode \\?"daemon\\?", so it would also run as a daemon'),
    ({"mode": "cronjob"}, ".Subcharts.maintainer", r"set mode: sidecar"),
    ({"mode": "sidecar"}, ".", r"the application chart's scope, not the maintainer subchart's"),
    ({"mode": "sidecar"}, ".Subcharts.maintainr", r"pass the maintainer subchart's scope"),
])
def test_a_misused_sidecar_template_fails_with_what_to_do(chart_dir: Path, tmp_path: Path, values: dict[str, Any],
                                                         scope: str, message: str) -> None:
    app = application_chart(tmp_path, chart_dir)
    deployment = app / "templates" / "deployment.yaml"
    deployment.write_text(deployment.read_text().replace(".Subcharts.maintainer", scope))
    with helm.Chart.load(app) as loaded, pytest.raises(helm.HelmRenderError, match=message):
        render(loaded, {"maintainer": values})


def test_helm_lint_strict_passes_for_the_application_chart(chart_dir: Path, tmp_path: Path) -> None:
    app = application_chart(tmp_path, chart_dir)
    values = {"maintainer": toggled({**with_base("file-and-env-dsns"), "mode": "sidecar"},
                                    MODE_TOGGLES["sidecar"])}
    assert lint_problems(app, values, with_subcharts=True) == []
