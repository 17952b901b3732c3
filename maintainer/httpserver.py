"""The daemon's HTTP endpoints (SPEC §7), on the standard library's threading HTTP server.

    GET  /healthz                 process and scheduler alive (liveness)
    GET  /readyz                  configuration valid and every target reachable (readiness)
    GET  /metrics                 Prometheus text format
    POST /jobs/<name>/trigger     run a job now; needs `Authorization: Bearer <token>`
    GET  /triggers/<id>           the state and runs of an earlier trigger (same token)

The trigger endpoints exist only when `http.trigger_token_file` is set. The token is compared in
constant time and re-read from its file on each request, so a rotated secret applies at once.
A trigger answers `202 Accepted` with an id at once (maintenance runs can take hours, longer than
any HTTP client waits); `?wait=true` holds the request until the runs end and returns them like
`maintainer trigger --json`.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST

from maintainer.db import redact_dsn
from maintainer.project import NUL_IN_ARG

log = logging.getLogger("maintainer")

MAX_BODY = 64 * 1024
_TRIGGER_PATH = re.compile(r"^/jobs/([a-z0-9][a-z0-9-]*)/trigger/?$")
_STATUS_PATH = re.compile(r"^/triggers/([0-9a-f]{32})/?$")


class TriggerRejected(Exception):
    """A trigger that cannot start: unknown job (404) or a bad target or argument (400)."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class Service(Protocol):
    """What the daemon offers the HTTP layer."""

    def health(self) -> tuple[bool, dict[str, Any]]: ...

    def readiness(self) -> tuple[bool, dict[str, Any]]: ...

    def metrics_payload(self) -> bytes: ...

    def trigger_token(self) -> str | None: ...

    def start_trigger(self, job: str, target: str | None, args: dict[str, str], dry_run: bool) -> str: ...

    def trigger_state(self, trigger_id: str, wait: bool = False) -> dict[str, Any] | None: ...


def parse_listen(listen: str) -> tuple[str, int]:
    """`0.0.0.0:9188`, `[::]:9188`, `:9188`."""
    host, sep, port = listen.rpartition(":")
    # isascii: str.isdigit() also accepts digits of other scripts ('²', '٣') that int() refuses or misreads.
    if not sep or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"http.listen {listen!r} must look like 0.0.0.0:9188 (a port from 0 to 65535)")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - a daemon's port is meant to be reached


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        service = self.server.service
        if path == "/healthz":
            ok, body = service.health()
            self._json(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, body)
        elif path == "/readyz":
            ok, body = service.readiness()
            self._json(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, body)
        elif path == "/metrics":
            self._send(HTTPStatus.OK, service.metrics_payload(), CONTENT_TYPE_LATEST)
        elif match := _STATUS_PATH.match(path):
            if self._authorized():
                state = service.trigger_state(match.group(1), wait=self._wants_wait())
                if state is None:
                    self._json(HTTPStatus.NOT_FOUND, {"error": "unknown trigger id"})
                else:
                    self._json(HTTPStatus.OK, state)
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        match = _TRIGGER_PATH.match(path)
        if match is None:
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
            return
        if not self._authorized():
            return
        try:
            target, args, dry_run = self._trigger_body()
            trigger_id = self.server.service.start_trigger(match.group(1), target, args, dry_run)
        except TriggerRejected as exc:
            self._json(exc.status, {"error": str(exc)})
            return
        if self._wants_wait():
            self._json(HTTPStatus.OK, self.server.service.trigger_state(trigger_id, wait=True) or {})
        else:
            self._json(HTTPStatus.ACCEPTED, {"id": trigger_id, "job": match.group(1), "state": "running",
                                             "location": f"/triggers/{trigger_id}"})

    # -- helpers --------------------------------------------------------------------------------

    def _authorized(self) -> bool:
        """Bearer token, constant-time; the endpoints do not exist without a configured token."""
        expected = self.server.service.trigger_token()
        if expected is None:
            self._json(HTTPStatus.NOT_FOUND, {"error": "the trigger endpoint is disabled (http.trigger_token_file)"})
            return False
        header = self.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), expected.encode()):
            self._json(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong bearer token"},
                       extra_headers={"WWW-Authenticate": 'Bearer realm="pg-maintainer"'})
            return False
        return True

    def _trigger_body(self) -> tuple[str | None, dict[str, str], bool]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise TriggerRejected(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
        raw = self.rfile.read(length) if length else b""
        query = parse_qs(urlsplit(self.path).query)
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise TriggerRejected(HTTPStatus.BAD_REQUEST, "the body must be JSON") from None
        if not isinstance(body, dict) or set(body) - {"target", "args", "dry_run"}:
            raise TriggerRejected(HTTPStatus.BAD_REQUEST, 'body: {"target": name, "args": {k: v}, "dry_run": bool}')
        target = body.get("target") or next(iter(query.get("target", [])), None)
        args = body.get("args") or {}
        if not isinstance(args, dict) or not all(isinstance(v, str) for v in args.values()):
            raise TriggerRejected(HTTPStatus.BAD_REQUEST, "args must map names to strings")
        if any("\x00" in str(k) + v for k, v in args.items()):
            raise TriggerRejected(HTTPStatus.BAD_REQUEST, f"args: {NUL_IN_ARG}")
        if target is not None and not isinstance(target, str):
            raise TriggerRejected(HTTPStatus.BAD_REQUEST, "target must be a string")
        return target, {str(k): v for k, v in args.items()}, bool(body.get("dry_run", False))

    def _wants_wait(self) -> bool:
        values = parse_qs(urlsplit(self.path).query).get("wait", [])
        return bool(values) and values[0].lower() in ("1", "true", "yes")

    def _json(self, status: HTTPStatus, body: Any, extra_headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(_redacted(body), default=str) + "\n"
        self._send(status, payload.encode(), "application/json", extra_headers)

    def _send(self, status: HTTPStatus, payload: bytes, content_type: str,
              extra_headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (extra_headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)


def _redacted(body: Any) -> Any:
    """Every string of a response through the DSN redactor: /readyz answers without a token, and
    its target states quote connection errors."""
    if isinstance(body, str):
        return redact_dsn(body)
    if isinstance(body, dict):
        return {key: _redacted(value) for key, value in body.items()}
    if isinstance(body, list | tuple):
        return [_redacted(value) for value in body]
    return body


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    service: Service


class _Server6(_Server):
    address_family = socket.AF_INET6


class HttpServer:
    """Serves the endpoints on a background thread until `stop()`."""

    def __init__(self, listen: str, service: Service) -> None:
        host, port = parse_listen(listen)
        self._server = (_Server6 if ":" in host else _Server)((host, port), _Handler)
        self._server.service = service
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
