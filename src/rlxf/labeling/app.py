"""The labeling web app (Starlette): the page a labeler works in, the owner's page, and the JSON
API both use (docs/labeling.md#api).

Authentication: ``Authorization: Bearer TOKEN`` (API clients), or the session cookie that
``POST /api/login`` sets from a token (browsers; ``HttpOnly``, ``SameSite=Strict``, ``Secure``
over HTTPS or with ``secure_cookies``). A cookie-authenticated POST must carry the session's CSRF
token in ``X-CSRF-Token`` (403 otherwise). Every API path but ``/api/login`` answers 401 without a
valid token or session; the owner paths (``/api/owner/...``) answer 403 to labelers. POST bodies
must be JSON (415 otherwise) of at most ``max_request_bytes`` (``max_push_bytes`` for pushing
items; 413 beyond). Every response carries a strict Content-Security-Policy (scripts and styles
from this server only, no inline code, no frames) and the page writes all item text with
``textContent``, so a completion holding HTML or a script stays inert text.
"""

from __future__ import annotations

import hmac
import json
import time
from collections import deque
from importlib import resources

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from rlxf.labeling.accounts import SESSION_SECONDS, LabelingError, end_session, session_user, start_session, \
    user_for_token
from rlxf.labeling.items import push_items
from rlxf.labeling.report import FORMATS, export_rows, label_rows, queue_stats, to_csv
from rlxf.labeling.work import next_item, submit_label, undo_last
from rlxf.runtime.http import RequestError, check_content_type, decode_json, error_response, json_response, read_body

COOKIE = "rlxf_label_session"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"),
                    (b"cache-control", b"no-store")]
STATIC = {"label.js": "text/javascript", "label.css": "text/css"}
PAGES = {"/": "label.html", "/owner": "owner.html"}
LOGIN_FAILURES, LOGIN_WINDOW_S = 20, 60.0   # per client address: more failed logins in the window get 429


def build_app(engine, *, max_request_bytes: int = 256 * 1024, max_push_bytes: int = 32 * 1024 * 1024,
              secure_cookies: bool = False):
    """The ASGI app over the labeling database ``engine`` (:func:`rlxf.labeling.schema.open_engine`):
    the Starlette app behind the security-headers middleware."""
    for name, value in (("--max-request-bytes", max_request_bytes), ("--max-push-bytes", max_push_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1024:
            raise ValueError(f"{name} must be an integer of at least 1024 bytes, got {value!r}")
    api = _Api(engine, max_request_bytes, max_push_bytes, secure_cookies)
    routes = [Route(path, api.page, methods=["GET"]) for path in PAGES]
    routes += [Route("/static/{name}", api.static, methods=["GET"]),
               Route("/health", api.health, methods=["GET"]),
               Route("/api/login", api.login, methods=["POST"]),
               Route("/api/logout", api.logout, methods=["POST"]),
               Route("/api/me", api.me, methods=["GET"]),
               Route("/api/next", api.next, methods=["GET"]),
               Route("/api/label", api.label, methods=["POST"]),
               Route("/api/undo", api.undo, methods=["POST"]),
               Route("/api/owner/stats", api.stats, methods=["GET"]),
               Route("/api/owner/export", api.export, methods=["GET"]),
               Route("/api/owner/items", api.push, methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={RequestError: _request_error, HTTPException: _http_error,
                                                       Exception: _internal_error})
    return _SecurityHeaders(app)


class _SecurityHeaders:
    """Pure ASGI middleware: the security headers on every response, errors included."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers if scope["type"] == "http" else send)


class _Api:
    def __init__(self, engine, max_request_bytes: int, max_push_bytes: int, secure_cookies: bool):
        self.engine = engine
        self.max_request_bytes, self.max_push_bytes = max_request_bytes, max_push_bytes
        self.secure_cookies = secure_cookies
        self.files = {name: (resources.files("rlxf.labeling") / "static" / name).read_bytes()
                      for name in [*STATIC, *PAGES.values()]}
        self.failures: dict[str, deque] = {}

    async def page(self, request: Request) -> Response:
        return Response(self.files[PAGES[request.url.path]], media_type="text/html; charset=utf-8")

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            raise LabelingError(f"no static file {name!r}", status=404, code="not_found")
        return Response(self.files[name], media_type=f"{STATIC[name]}; charset=utf-8")

    async def health(self, request: Request) -> Response:
        return json_response(200, {"status": "ok"})

    async def login(self, request: Request) -> Response:
        body = await self._json(request, self.max_request_bytes)
        client = request.client.host if request.client else "?"
        self._check_login_rate(client)
        token = body.get("token") if isinstance(body, dict) else None
        user = await run_in_threadpool(user_for_token, self.engine, token) if isinstance(token, str) else None
        if user is None:
            self.failures.setdefault(client, deque()).append(time.monotonic())
            raise LabelingError("this token is not valid; ask the owner for yours (rlxf label add-user)",
                                status=401, code="invalid_token")
        cookie, csrf = await run_in_threadpool(start_session, self.engine, user)
        response = json_response(200, {"name": user.name, "role": user.role, "csrf": csrf})
        response.set_cookie(COOKIE, cookie, max_age=SESSION_SECONDS, path="/", httponly=True, samesite="strict",
                            secure=self.secure_cookies or request.url.scheme == "https")
        return response

    def _check_login_rate(self, client: str) -> None:
        if len(self.failures) > 10_000:  # many addresses: forget those with no failure in the window
            horizon = time.monotonic() - LOGIN_WINDOW_S
            self.failures = {k: v for k, v in self.failures.items() if v and v[-1] >= horizon}
        recent = self.failures.setdefault(client, deque())
        while recent and recent[0] < time.monotonic() - LOGIN_WINDOW_S:
            recent.popleft()
        if len(recent) >= LOGIN_FAILURES:
            raise LabelingError(f"too many failed logins from this address; wait {LOGIN_WINDOW_S:g} s", status=429,
                                headers={"Retry-After": str(int(LOGIN_WINDOW_S))})

    async def logout(self, request: Request) -> Response:
        await self._user(request)
        cookie = request.cookies.get(COOKIE)
        if cookie:
            await run_in_threadpool(end_session, self.engine, cookie)
        response = json_response(200, {"ok": True})
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    async def me(self, request: Request) -> Response:
        user, csrf = await self._user(request, with_csrf=True)
        return json_response(200, {"name": user.name, "role": user.role, "csrf": csrf})

    async def next(self, request: Request) -> Response:
        user = await self._user(request)
        return json_response(200, await run_in_threadpool(next_item, self.engine, user))

    async def label(self, request: Request) -> Response:
        user = await self._user(request)
        body = await self._json(request, self.max_request_bytes)
        return json_response(200, await run_in_threadpool(submit_label, self.engine, user, body))

    async def undo(self, request: Request) -> Response:
        user = await self._user(request)
        return json_response(200, await run_in_threadpool(undo_last, self.engine, user))

    async def stats(self, request: Request) -> Response:
        await self._user(request, owner=True)
        queue = request.query_params.get("queue")
        return json_response(200, {"queues": await run_in_threadpool(queue_stats, self.engine, queue)})

    async def export(self, request: Request) -> Response:
        await self._user(request, owner=True)
        fmt, queue = request.query_params.get("format", "labels"), request.query_params.get("queue")
        if fmt not in FORMATS:
            raise LabelingError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}", param="format")
        rows = await run_in_threadpool(label_rows, self.engine, queue)
        disposition = {"Content-Disposition": f'attachment; filename="labels-{fmt}.{"csv" if fmt == "csv" else "jsonl"}"'}
        if fmt == "csv":
            return Response(to_csv(rows), media_type="text/csv; charset=utf-8", headers=disposition)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in export_rows(rows, fmt))
        return Response(text, media_type="application/x-ndjson; charset=utf-8", headers=disposition)

    async def push(self, request: Request) -> Response:
        await self._user(request, owner=True)
        body = await self._json(request, self.max_push_bytes, "--max-push-bytes")
        if not isinstance(body, dict) or not isinstance(body.get("rows"), list) or not isinstance(body.get("queue"), str):
            raise LabelingError("send {\"queue\": NAME, \"rows\": [...], \"kind\", \"scale\", \"overlap\", "
                                "\"lease_seconds\", \"assign\": [names]} (rows as in rlxf label push)")
        options = {k: body[k] for k in ("kind", "scale", "overlap", "lease_seconds") if k in body}
        assign = body.get("assign") or []
        if not (isinstance(assign, list) and all(isinstance(a, str) for a in assign)):
            raise LabelingError("assign must be a list of user names", param="assign")
        result = await run_in_threadpool(lambda: push_items(self.engine, body["queue"], body["rows"],
                                                            assign=tuple(assign), **_typed_options(options)))
        return json_response(200, result)

    async def _json(self, request: Request, limit: int, flag: str = "--max-request-bytes"):
        check_content_type(request.headers.get("content-type"))
        raw = await read_body(request, limit, limit_hint=f"rlxf label serve {flag}")
        return await run_in_threadpool(decode_json, raw)  # off the event loop: a push may be megabytes

    async def _user(self, request: Request, *, owner: bool = False, with_csrf: bool = False):
        """The caller: from the Bearer token, else the session cookie (a POST then needs its CSRF token)."""
        header = request.headers.get("authorization")
        csrf = None
        if header is not None:
            scheme, _, token = header.strip().partition(" ")
            user = (await run_in_threadpool(user_for_token, self.engine, token.strip())
                    if scheme.lower() == "bearer" else None)
        else:
            found = await run_in_threadpool(session_user, self.engine, request.cookies.get(COOKIE, ""))
            user, csrf = found if found else (None, None)
            if user is not None and request.method == "POST" and not hmac.compare_digest(
                    request.headers.get("x-csrf-token", "").encode(), csrf.encode()):
                raise LabelingError("this request lacks the session's CSRF token (header X-CSRF-Token); reload the "
                                    "page", status=403, code="csrf")
        if user is None:
            raise LabelingError("log in with your token: send 'Authorization: Bearer TOKEN', or POST /api/login",
                                status=401, code="unauthorised", headers={"WWW-Authenticate": "Bearer"})
        if owner and user.role != "owner":
            raise LabelingError("only an owner may do this", status=403, code="forbidden")
        return (user, csrf) if with_csrf else user


def _typed_options(options: dict) -> dict:
    kinds = {"kind": str, "scale": str, "overlap": int, "lease_seconds": (int, float)}
    for name, value in options.items():
        if isinstance(value, bool) or not isinstance(value, kinds[name]):
            raise LabelingError(f"{name} has the wrong type: {json.dumps(value)[:40]}", param=name)
    return options


async def _request_error(request: Request, err: RequestError) -> Response:
    return error_response(err)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = {404: f"unknown path {request.url.path!r}; see docs/labeling.md for the API",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return error_response(RequestError(message, status=exc.status_code, code=code, headers=exc.headers))


async def _internal_error(request: Request, exc: Exception) -> Response:
    return error_response(RequestError(f"internal error: {type(exc).__name__}", status=500, type_="server_error"))
