"""The HTTP endpoints of a daemon running in this process: probes, metrics, the token-protected trigger."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from maintainer.httpserver import parse_listen
from maintainer.project import load_project
from maintainer.scheduler import Daemon
from tests.conftest import Database, Workspace

TOKEN = "correct-horse-battery-staple"


def request(port: int, path: str, method: str = "GET", token: str | None = None,
            body: Any = None) -> tuple[int, dict[str, str], str]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:  # noqa: S310
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


@pytest.fixture
def daemon(workspace: Workspace, db: Database, tmp_path: Path) -> Iterator[Daemon]:
    db.run_script("CREATE TABLE accounts (id serial PRIMARY KEY)")
    (tmp_path / "token").write_text(TOKEN + "\n")
    workspace.job("headroom", unit="sequences", schedule="@daily")
    workspace.write_config(http={"listen": "127.0.0.1:0", "trigger_token_file": str(tmp_path / "token")},
                           scheduler={"catch_up": False})
    instance = Daemon(load_project(str(workspace.config)), str(workspace.config))
    instance.start()
    yield instance
    instance.shutdown()


def test_probes_and_metrics(daemon: Daemon) -> None:
    status, _, body = request(daemon.http.port, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, _, body = request(daemon.http.port, "/readyz")
    assert status == 200 and json.loads(body)["targets"] == {"app": "ok"}
    status, headers, body = request(daemon.http.port, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert "maintainer_config_valid 1.0" in body
    assert request(daemon.http.port, "/nope")[0] == 404


def test_trigger_needs_the_bearer_token(daemon: Daemon) -> None:
    port = daemon.http.port
    status, headers, _ = request(port, "/jobs/headroom/trigger", "POST")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert request(port, "/jobs/headroom/trigger", "POST", token="wrong")[0] == 401
    assert request(port, "/jobs/headroom/trigger", "POST", token=TOKEN + "x")[0] == 401
    assert request(port, "/jobs/headroom/trigger", "POST", token="")[0] == 401
    assert request(port, "/jobs/nope/trigger", "POST", token=TOKEN)[0] == 404
    status, _, body = request(port, "/jobs/headroom/trigger", "POST", token=TOKEN, body={"target": "elsewhere"})
    assert status == 400 and "unknown target" in body
    assert request(port, "/jobs/headroom/trigger", "POST", token=TOKEN, body=["x"])[0] == 400
    status, _, body = request(port, "/jobs/headroom/trigger", "POST", token=TOKEN, body={"args": {"x": "a\x00b"}})
    assert status == 400 and "NUL byte" in body
    # A trigger id is no secret, but its runs are: the same token is needed to read them.
    status, _, body = request(port, "/jobs/headroom/trigger", "POST", token=TOKEN)
    assert status == 202
    accepted = json.loads(body)
    assert request(port, accepted["location"])[0] == 401


def test_trigger_runs_the_job_and_reports_like_the_cli(daemon: Daemon, db: Database) -> None:
    port = daemon.http.port
    status, _, body = request(port, "/jobs/headroom/trigger", "POST", token=TOKEN)
    assert status == 202
    accepted = json.loads(body)
    status, _, body = request(port, accepted["location"] + "?wait=true", token=TOKEN)
    state = json.loads(body)
    assert status == 200 and state["state"] == "done" and state["exit_code"] == 0
    assert state["runs"][0]["status"] == "ok" and state["runs"][0]["findings"][0]["column"] == "public.accounts.id"
    status, _, body = request(port, "/jobs/headroom/trigger?wait=true", "POST", token=TOKEN, body={"dry_run": True})
    assert status == 200 and json.loads(body)["runs"][0]["status"] == "planned"
    assert db.execute("SELECT trigger, status FROM maintainer.run") == [("http", "ok")]
    metrics = request(port, "/metrics")[2]
    assert 'maintainer_job_runs_total{job="headroom",status="ok",target="app"} 1.0' in metrics
    series = ('maintainer_sequence_used_ratio{column="public.accounts.id",sequence="public.accounts_id_seq",'
              'target="app"}')
    assert series in metrics


def test_trigger_is_disabled_without_a_token_file(workspace: Workspace, db: Database) -> None:
    workspace.job("headroom", unit="sequences")
    workspace.write_config(http={"listen": "127.0.0.1:0"}, scheduler={"catch_up": False})
    instance = Daemon(load_project(str(workspace.config)))
    instance.start()
    try:
        assert request(instance.http.port, "/jobs/headroom/trigger", "POST", token="")[0] == 404
    finally:
        instance.shutdown()


def test_readyz_fails_while_a_target_is_unreachable(workspace: Workspace, db: Database) -> None:
    workspace.write_config(http={"listen": "127.0.0.1:0"}, scheduler={"catch_up": False},
                           targets={"app": {"dsn": db.dsn}, "gone": {"dsn": "postgresql://u:pw@127.0.0.1:1/x"}})
    instance = Daemon(load_project(str(workspace.config)))
    instance.start()
    try:
        status, _, body = request(instance.http.port, "/readyz")
        state = json.loads(body)
        assert status == 503 and state["targets"]["app"] == "ok" and state["targets"]["gone"].startswith("unreachable")
        assert "pw" not in body
        assert request(instance.http.port, "/healthz")[0] == 200
    finally:
        instance.shutdown()


def test_parse_listen() -> None:
    assert parse_listen("0.0.0.0:9188") == ("0.0.0.0", 9188)  # noqa: S104
    assert parse_listen(":9188") == ("0.0.0.0", 9188)  # noqa: S104
    assert parse_listen("[::]:9188") == ("::", 9188)
    with pytest.raises(ValueError):
        parse_listen("9188")
