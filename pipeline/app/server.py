"""The local app (``python -m pipeline serve``): FastAPI routers over ``app.model.Served``.

Pages (``app/pages.py``: a route and a Jinja2 template each, one layout and navigation for all):
``/`` try photos, ``/review`` inspect's findings one at a time, ``/label`` unlabelled photos in the
order that teaches most, ``/report`` the evaluation report with its confusion cells and class rows
linked to ``/photos``. Assets under ``/static`` (Starlette's ``StaticFiles``); no outside host is
named anywhere.

API (``app/api.py``): ``POST /api/predict`` (multipart files or raw image bytes: what ``predict
--format json`` gives), ``GET /api/health``, ``GET /api/review``, ``GET /api/label``, ``POST
/api/decide``, ``POST /api/retrain``, ``GET /api/openapi.json``. Photos are named by the sha256 of
their bytes (``/photo/<sha256>``): no endpoint takes a path from the client. What the routes share
(the model served, the token, the locks) is a dependency (``app/state.py``), not a closure.

Safety (``app.safety``): the Host header must be the one served (DNS rebinding), state-changing
requests carry this server's token and come from its origin (CSRF), request bodies stop at
``serve.max_upload_mb`` (413).
"""
from __future__ import annotations

import logging
import secrets

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from pipeline.app import api, pages, safety
from pipeline.app.model import Served
from pipeline.app.state import AppState
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.serve")
STATIC = pages.STATIC


class ServeError(PipelineError, OSError):
    """The app cannot start (its port is taken, ...)."""


class Assets(StaticFiles):
    """The pages' scripts, style and icon, with the pages' headers (nothing from another origin)."""

    async def get_response(self, path: str, scope):
        response = await super().get_response(path, scope)
        response.headers.update(safety.PAGE_HEADERS)
        return response


def create_app(project, served: Served | None = None) -> FastAPI:
    params = project.params
    app = FastAPI(title="photohead", version="1", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json",
                  description="Try the model on photos, review what inspect found, label photos, retrain. "
                              "Local only: every asset is served from here.")
    app.state.app = AppState(served or Served(project), secrets.token_urlsafe(32))
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=safety.allowed_hosts(params.serve))
    app.add_middleware(safety.BodyLimit, max_bytes=int(params.serve.max_upload_mb * 1024 * 1024))
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.include_router(pages.router)
    app.include_router(api.router)
    app.mount("/static", Assets(directory=STATIC), name="static")
    return app


async def _http_error(request: Request, error: HTTPException):
    # the headers it carries stay; 405's Allow lists every method of the path, not only its first route's
    headers = dict(error.headers or {})
    if error.status_code == 405:
        headers["Allow"] = ", ".join(_methods_of(request))
    return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=headers or None)


def _methods_of(request: Request) -> list[str]:
    from starlette.routing import Match

    methods = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match == Match.PARTIAL and getattr(route, "methods", None):
            methods |= route.methods
    return sorted(methods)


async def _invalid(request: Request, error: RequestValidationError):
    """422, as the API's description documents it, with the API's one-line error body."""
    first = error.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return JSONResponse({"error": f"{where}: {first.get('msg')}"}, status_code=422)


def _first_training(state: AppState) -> None:
    """A project with no model: train it now, behind the page's progress, when its photos can train one."""
    from pipeline.app.model import NotTrainable

    served = state.served
    if served.ready:
        return
    try:
        job = state.trainer.start(served.retrain, served.trainable)
    except NotTrainable as error:
        print(f"no model yet: {error}. Add classes and photos on the Train page, then Train.", flush=True)
        return
    print(f"no model yet: training (job {job.id}; its progress is on the Train page)", flush=True)


def listen(serve_params):
    """A socket listening on serve.host:serve.port, or an error naming the setting to change."""
    import socket

    host, port = serve_params.host, serve_params.port
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)  # connections wait from now on, while the app starts
    except OSError as error:
        sock.close()
        raise ServeError(f"serve: cannot listen on {host}:{port} ({error.strerror}); set serve.port to a free port "
                         "(0: any)") from None
    return sock


def serve(project, sock) -> None:
    """Serve the app on ``sock`` (``listen``) until interrupted."""
    import uvicorn

    from pipeline.backbones.litert import one_heap

    one_heap()  # before the request threads start: memory stays flat however many requests come
    params = project.params
    app = create_app(project)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving on http://{shown}:{port}  (Ctrl+C stops)", flush=True)
    _first_training(app.state.app)
    if not safety.is_loopback(params.serve.host):
        log.warning("serve: listening on %s: reachable from the network, not only this machine", params.serve.host)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])
