"""The admin dashboard: a Starlette application with Jinja2 templates, mounted at ``/`` of the metrics port.

Pages and actions (``dashboard_app(config, jobs, ...)`` builds them):

=======================================  ======  ==============================================================
``/``                                    GET     the page: queue, throughput, recent jobs, dead letters,
                                                 deliveries per destination, model card
``/panels``                              GET     the page's changing part (fetched by ``static/dashboard.js``
                                                 every ``dashboard.refresh_s`` seconds)
``/jobs/{id}/thumbnail.png``             GET     the job's heat-map overlay, at most 240 px (``thumbnails``)
``/jobs/{id}/overlay.png``               GET     the overlay as the worker wrote it (at most 1024 px)
``/sign-in``, ``/sign-out``              POST    admin session (form field ``token``)
``/jobs/{id}/retry``                     POST    queue a failed or dead job again (admin)
``/jobs/retry-dead``                     POST    queue every dead job again (admin)
``/deliveries/{id}/retry``               POST    send a failed or dead delivery again (admin)
=======================================  ======  ==============================================================

Security model. Without ``dashboard.admin_token`` the page is read-only (``config.py`` refuses that
combination beyond loopback). With a token, a visitor who signs in with it gets an admin session: a
cookie signed with a key made at start-up (``HttpOnly``, ``SameSite=Strict``, 8 hours; a restart signs
everyone out). Every POST needs the session's CSRF token in the form (``csrf``, compared in constant
time) and, when the browser sends them, an ``Origin`` equal to the page's own and no cross-site
``Sec-Fetch-Site``; a script may instead send ``Authorization: Bearer <token>`` (no cookie, so no CSRF).
Every action, done or refused, goes to the audit log. Responses carry a strict Content-Security-Policy
(scripts, styles and images from the page's own origin only), ``X-Frame-Options: DENY`` and
``Cache-Control: no-store``. Patient name, patient ID and UIDs are shown only with
``dashboard.show_phi = true``, and then only to an admin (or to anyone when no token is set).
"""

from __future__ import annotations

import hmac
import io
import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pacs_ai import __version__
from pacs_ai.config import Config
from pacs_ai.dashboard.snapshot import ModelRow, load_models, overlay_path, take_snapshot
from pacs_ai.errors import JobStoreError
from pacs_ai.ops.health import HealthCheck
from pacs_ai.queue.jobstore import JobStore

__all__ = ["SESSION_COOKIE", "THUMBNAIL_PX", "dashboard_app"]

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "pacs_ai_session"
SESSION_MAX_AGE_S = 8 * 3600
THUMBNAIL_PX = 240
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)

Auditor = Callable[..., None]
"""``audit(action, peer, ok, detail="", **target)``, e.g. :meth:`pacs_ai.ops.audit.AuditLog.admin_action`."""


class _SecurityHeaders:
    """Pure ASGI middleware adding the security headers to every response (static files included)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Content-Security-Policy"] = CSP
                headers["X-Frame-Options"] = "DENY"
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Referrer-Policy"] = "same-origin"  # "no-referrer" makes Chromium send "Origin: null"
                headers.setdefault("Cache-Control", "no-store")
            await send(message)

        await self.app(scope, receive, send_with_headers)


# -- template helpers -------------------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, float(seconds))
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:.0f} s"
    if seconds < 86400:
        return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} min"
    return f"{seconds // 86400:.0f} d {seconds % 86400 // 3600:.0f} h"


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "-"


def _clock(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%H:%M:%S") if value else "-"


def _percent(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100.0 * float(value):.{digits}f} %"


def _templates() -> Jinja2Templates:
    env = Environment(
        loader=FileSystemLoader(str(HERE / "templates")),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(duration=_duration, when=_when, clock=_clock, percent=_percent)
    return Jinja2Templates(env=env)


@lru_cache(maxsize=256)
def _thumbnail(path: str, mtime_ns: int, size: int) -> bytes:
    """``path`` (a PNG) scaled to fit ``size`` px, as PNG bytes (cached per file version)."""
    from PIL import Image

    with Image.open(path) as image:
        image.thumbnail((size, size))
        out = io.BytesIO()
        image.save(out, format="PNG", optimize=False)
    return out.getvalue()


# -- the application ------------------------------------------------------------------------------


def dashboard_app(
    config: Config,
    jobs: JobStore,
    *,
    health: HealthCheck | None = None,
    audit: Auditor | None = None,
    models: list[ModelRow] | None = None,
    secret_key: str | None = None,
) -> Starlette:
    """The dashboard for ``config`` over ``jobs`` (the daemon's job store, used from request threads).

    ``health`` feeds the health badge; ``audit`` records admin actions; ``models`` defaults to the cards
    of ``config.model.path``; ``secret_key`` signs session cookies (random per process by default).
    """
    settings = config.dashboard
    token = settings.admin_token
    templates = _templates()
    model_rows = models if models is not None else load_models(config.model.path)

    def peer(request: Request) -> str:
        return f"{request.client.host}:{request.client.port}" if request.client else "?"

    def record(action: str, request: Request, ok: bool, detail: str = "", **target: Any) -> None:
        if audit is not None:
            audit(action, peer(request), ok, detail, **target)
        else:
            log.info("dashboard %s %s from %s: %s", action, target, peer(request), "done" if ok else detail)

    def bearer_ok(request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())

    def is_admin(request: Request) -> bool:
        return bool(token) and (request.session.get("admin") is True or bearer_ok(request))

    def phi_visible(request: Request) -> bool:
        return settings.show_phi and (is_admin(request) or not token)

    def csrf_token(request: Request) -> str:
        value = request.session.get("csrf")
        if not isinstance(value, str) or len(value) < 32:
            value = secrets.token_urlsafe(32)
            request.session["csrf"] = value
        return value

    def csrf_problem(request: Request, form: Any) -> str:
        """Why this POST is refused as a possible cross-site request, or "" when it is fine."""
        if bearer_ok(request):
            return ""
        if request.headers.get("sec-fetch-site", "") == "cross-site":
            return "cross-site request"
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host", ""):
            return f"request from another origin ({origin})"
        expected = request.session.get("csrf")
        given = form.get("csrf")
        if not isinstance(expected, str) or not isinstance(given, str):
            return "CSRF token missing (reload the page)"
        if not hmac.compare_digest(expected.encode(), given.encode()):
            return "CSRF token does not match (reload the page)"
        return ""

    def flash(request: Request, kind: str, text: str) -> None:
        request.session["flash"] = {"kind": kind, "text": text}

    def refuse(request: Request, status: int, title: str, text: str) -> Response:
        return templates.TemplateResponse(
            request,
            "message.html",
            {"title": title, "text": text, "version": __version__},
            status_code=status,
        )

    def context(request: Request) -> dict[str, Any]:
        admin = is_admin(request)
        ctx: dict[str, Any] = {
            "version": __version__,
            "admin": admin,
            "token_set": bool(token),
            "csrf": csrf_token(request),
            "settings": settings,
            "listener": config.listener,
            "refresh_s": settings.refresh_s,
        }
        try:
            ctx["snap"] = take_snapshot(jobs, config, model_rows, show_phi=phi_visible(request))
            ctx["store_error"] = ""
        except JobStoreError as exc:
            ctx["snap"], ctx["store_error"] = None, str(exc)
        if health is not None:
            ok, report = health.check()
            ctx["health"] = {"ok": ok, "failing": report.get("failing", [])}
        else:
            ctx["health"] = None
        return ctx

    def index(request: Request) -> Response:
        ctx = context(request)
        ctx["flash"] = request.session.pop("flash", None)
        return templates.TemplateResponse(request, "index.html", ctx, status_code=200 if not ctx["store_error"] else 503)

    def panels(request: Request) -> Response:
        ctx = context(request)
        return templates.TemplateResponse(request, "_panels.html", ctx, status_code=200 if not ctx["store_error"] else 503)

    def image(request: Request, thumbnail: bool) -> Response:
        if not settings.thumbnails:
            return Response("thumbnails are turned off (dashboard.thumbnails)", status_code=404)
        path = overlay_path(config, request.path_params["job_id"])
        try:
            mtime_ns = path.stat().st_mtime_ns
            body = _thumbnail(str(path), mtime_ns, THUMBNAIL_PX) if thumbnail else path.read_bytes()
        except (OSError, ValueError):  # not written (yet), purged, or not a PNG
            return Response("no overlay for this job", status_code=404)
        return Response(body, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    def thumbnail_png(request: Request) -> Response:
        return image(request, thumbnail=True)

    def overlay_png(request: Request) -> Response:
        return image(request, thumbnail=False)

    async def sign_in(request: Request) -> Response:
        form = await request.form()
        problem = csrf_problem(request, form)
        if problem:
            record("sign_in", request, False, problem)
            return refuse(request, 403, "Request refused", problem)
        if not token:
            return refuse(request, 403, "Read-only", "No admin token is configured (dashboard.admin_token).")
        given = form.get("token")
        if not isinstance(given, str) or not hmac.compare_digest(given.strip().encode(), token.encode()):
            record("sign_in", request, False, "wrong token")
            return refuse(request, 403, "Sign-in refused", "The admin token is not right.")
        request.session["admin"] = True
        request.session["csrf"] = secrets.token_urlsafe(32)  # a new session gets a new CSRF token
        record("sign_in", request, True)
        flash(request, "ok", "Signed in as admin.")
        return RedirectResponse("/", status_code=303)

    async def sign_out(request: Request) -> Response:
        form = await request.form()
        problem = csrf_problem(request, form)
        if problem:
            return refuse(request, 403, "Request refused", problem)
        request.session.clear()
        return RedirectResponse("/", status_code=303)

    def action(
        name: str, run: Callable[[Request], str], target: Callable[[Request], dict[str, Any]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            form = await request.form()
            what = target(request)
            problem = csrf_problem(request, form)
            if problem:
                record(name, request, False, problem, **what)
                return refuse(request, 403, "Request refused", problem)
            if not is_admin(request):
                record(name, request, False, "not signed in", **what)
                detail = "Sign in with the admin token first." if token else "No admin token is configured: the page is read-only."
                return refuse(request, 403, "Admins only", detail)
            try:
                kind, text, status = "ok", run(request), 200
            except JobStoreError as exc:
                kind, text, status = "error", str(exc), 409
            record(name, request, kind == "ok", "" if kind == "ok" else text, **what)
            if bearer_ok(request):  # a script: the answer itself, no session
                return PlainTextResponse(text + "\n", status_code=status)
            flash(request, kind, text)
            return RedirectResponse("/", status_code=303)

        return endpoint

    def retry_job(request: Request) -> str:
        job_id = request.path_params["job_id"]
        jobs.retry(job_id)
        return f"Job {job_id} queued again."

    def retry_dead(request: Request) -> str:
        return f"{jobs.retry_dead()} dead job(s) queued again."

    def retry_delivery(request: Request) -> str:
        delivery_id = request.path_params["delivery_id"]
        jobs.retry_delivery(delivery_id)
        return f"Delivery {delivery_id} will be sent again."

    routes = [
        Route("/", index),
        Route("/panels", panels),
        Route("/jobs/{job_id:int}/thumbnail.png", thumbnail_png),
        Route("/jobs/{job_id:int}/overlay.png", overlay_png),
        Route("/sign-in", sign_in, methods=["POST"]),
        Route("/sign-out", sign_out, methods=["POST"]),
        Route("/jobs/retry-dead", action("retry_dead_jobs", retry_dead, lambda r: {}), methods=["POST"]),
        Route(
            "/jobs/{job_id:int}/retry",
            action("retry_job", retry_job, lambda r: {"job_id": r.path_params["job_id"]}),
            methods=["POST"],
        ),
        Route(
            "/deliveries/{delivery_id:int}/retry",
            action("retry_delivery", retry_delivery, lambda r: {"delivery_id": r.path_params["delivery_id"]}),
            methods=["POST"],
        ),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [
        Middleware(_SecurityHeaders),
        Middleware(
            SessionMiddleware,
            secret_key=secret_key or secrets.token_urlsafe(32),
            session_cookie=SESSION_COOKIE,
            max_age=SESSION_MAX_AGE_S,
            same_site="strict",
            https_only=False,
        ),
    ]
    return Starlette(routes=routes, middleware=middleware)
