"""The sandbox's HTTP front end: routing, authentication and JSON replies.

Paths match with or without a trailing slash (and with doubled slashes,
which the SDK produces from a server URL ending in ``/``). A request is
authenticated by ``Authorization: Bearer <key>`` or by an ``api_key``
query parameter. The offer search by GET, the log result URLs and the
ledger need no key.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from vastai_pool.sandbox.faults import Reply
from vastai_pool.sandbox.market import ApiFailure, Market

logger = logging.getLogger(__name__)

JSON_TYPE = "application/json"
MAX_BODY_BYTES = 16 * 1024 * 1024
AUTH_ERROR = {"success": False, "error": "auth_error", "msg": "Invalid user key"}


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]
    body: Any
    match: re.Match[str]


Handler = Callable[[Market, Request], Any]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    needs_key: bool = True
    # The handler returns log text (None while not ready) instead of JSON.
    text_reply: bool = False


def _route(
    method: str,
    path: str,
    handler: Handler,
    *,
    needs_key: bool = True,
    text_reply: bool = False,
) -> Route:
    return Route(method, re.compile(f"^{path}$"), handler, needs_key, text_reply)


def _search_get(market: Market, request: Request) -> Any:
    text = request.params.get("q")
    try:
        query = json.loads(text) if text else {}
    except json.JSONDecodeError as error:
        raise ApiFailure.of(
            400, "invalid_request", f"q is not valid JSON: {text!r}"
        ) from error
    return market.search(query)


def _search_new(market: Market, request: Request) -> Any:
    body = request.body if isinstance(request.body, dict) else {}
    return market.search(body.get("q", {}))


ID = r"(?P<id>[^/]+)"
ROUTES: tuple[Route, ...] = (
    _route("GET", "/sandbox/ledger", lambda m, r: m.ledger(), needs_key=False),
    _route(
        "GET",
        r"/sandbox/results/(?P<id>[\w-]+)",
        lambda m, r: m.log_result(r.match["id"]),
        needs_key=False,
        text_reply=True,
    ),
    _route("POST", "/api/v0/bundles", lambda m, r: m.search(r.body)),
    _route("GET", "/api/v0/bundles", _search_get, needs_key=False),
    _route("PUT", "/api/v0/search/asks", _search_new),
    _route("POST", "/api/v0/asks/bulk", lambda m, r: m.create_many(r.body)),
    _route("PUT", f"/api/v0/asks/{ID}", lambda m, r: m.create(r.match["id"], r.body)),
    _route("GET", "/api/v1/instances", lambda m, r: m.list_v1(r.params)),
    _route("GET", "/api/v0/instances", lambda m, r: m.list_v0()),
    _route("PUT", "/api/v0/instances", lambda m, r: m.update_many(r.body)),
    _route("DELETE", "/api/v0/instances", lambda m, r: m.destroy_many(r.body)),
    _route("GET", "/api/v0/instances/filters", lambda m, r: m.filters()),
    _route(
        "PUT",
        f"/api/v0/instances/reboot/{ID}",
        lambda m, r: m.reboot(r.match["id"]),
    ),
    _route(
        "PUT",
        f"/api/v0/instances/request_logs/{ID}",
        lambda m, r: m.request_logs(r.match["id"], r.body),
    ),
    _route(
        "POST",
        f"/api/v0/instances/{ID}/ssh",
        lambda m, r: m.attach_key(r.match["id"], r.body),
    ),
    _route(
        "DELETE",
        rf"/api/v0/instances/{ID}/ssh/(?P<key>[^/]+)",
        lambda m, r: m.detach_key(r.match["id"], r.match["key"]),
    ),
    _route("GET", f"/api/v0/instances/{ID}", lambda m, r: m.show(r.match["id"])),
    _route(
        "PUT", f"/api/v0/instances/{ID}", lambda m, r: m.update(r.match["id"], r.body)
    ),
    _route("DELETE", f"/api/v0/instances/{ID}", lambda m, r: m.destroy(r.match["id"])),
    _route("GET", "/api/v0/users/current", lambda m, r: m.user()),
    _route("GET", "/api/v0/ssh", lambda m, r: m.account_keys()),
    _route("POST", "/api/v0/ssh", lambda m, r: m.add_account_key(r.body)),
    _route(
        "DELETE", f"/api/v0/ssh/{ID}", lambda m, r: m.delete_account_key(r.match["id"])
    ),
)


def normalize_path(path: str) -> str:
    """Collapse repeated slashes and drop a trailing one."""
    collapsed = re.sub("/{2,}", "/", path)
    return collapsed.rstrip("/") or "/"


class SandboxHttpServer(ThreadingHTTPServer):
    """A threading HTTP server that carries the market and the API key."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], market: Market, api_key: str) -> None:
        super().__init__(address, SandboxRequestHandler)
        self.market = market
        self.api_key = api_key


class SandboxRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: SandboxHttpServer

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("http: %s", format % args)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path = normalize_path(url.path)
        params = {key: values[-1] for key, values in parse_qs(url.query).items()}
        try:
            raw = self._read_body()
        except ValueError as error:
            self._send_error(400, "invalid_request", str(error))
            return

        market = self.server.market
        fault = market.faults.http_reply(method, path)
        if fault is not None:
            self._send_reply(fault)
            return

        route, match = self._find_route(method, path)
        if route is None or match is None:
            self._send_error(404, "not_found", f"No route {method} {path}")
            return
        if route.needs_key and not self._authenticated(params):
            self._send_json(401, AUTH_ERROR)
            return
        try:
            body = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError:
            self._send_error(400, "invalid_request", "Invalid json body")
            return
        if not isinstance(body, dict):
            self._send_error(400, "invalid_request", "JSON body must be an object")
            return

        try:
            result = route.handler(market, Request(method, path, params, body, match))
        except ApiFailure as failure:
            self._send_reply(Reply(failure.status, failure.body, failure.headers))
            return
        except Exception:
            logger.exception("sandbox API: %s %s failed", method, path)
            self._send_error(500, "server_error", "internal sandbox error; see its log")
            return
        if route.text_reply:
            self._send_log_result(result)
        else:
            self._send_json(200, result)

    def _send_error(self, status: int, code: str, msg: str) -> None:
        self._send_json(status, {"success": False, "error": code, "msg": msg})

    def _find_route(
        self, method: str, path: str
    ) -> tuple[Route | None, re.Match[str] | None]:
        for route in ROUTES:
            if route.method != method:
                continue
            match = route.pattern.match(path)
            if match:
                return route, match
        return None, None

    def _authenticated(self, params: dict[str, str]) -> bool:
        expected = self.server.api_key
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip() == expected:
            return True
        return params.get("api_key") == expected

    def _read_body(self) -> bytes:
        length_text = self.headers.get("Content-Length")
        if not length_text:
            return b""
        length = int(length_text)
        if length < 0 or length > MAX_BODY_BYTES:
            raise ValueError(f"invalid Content-Length {length_text}")
        return self.rfile.read(length)

    def _send_log_result(self, text: str | None) -> None:
        if text is None:
            self._send_bytes(404, b"Not found\n", "text/plain; charset=utf-8")
        else:
            self._send_bytes(200, text.encode(), "text/plain; charset=utf-8")

    def _send_reply(self, reply: Reply) -> None:
        if isinstance(reply.body, str):
            data, content_type = reply.body.encode(), "text/plain; charset=utf-8"
        else:
            data, content_type = json.dumps(reply.body).encode(), JSON_TYPE
        self._send_bytes(reply.status, data, content_type, reply.headers)

    def _send_json(self, status: int, body: Any) -> None:
        self._send_bytes(status, json.dumps(body).encode(), JSON_TYPE)

    def _send_bytes(
        self,
        status: int,
        data: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        # The CLI's offer search requires exactly "application/json".
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
