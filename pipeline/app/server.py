"""The local app (``python -m pipeline serve``): FastAPI routes over ``app.model.Served``.

Pages (``app/static``, no outside host named anywhere): ``/`` try photos, ``/review`` inspect's
findings one at a time, ``/label`` unlabelled photos in the order that teaches most, ``/report`` the
evaluation report with its confusion cells and class rows linked to ``/photos``.

API: ``POST /api/predict`` (multipart files or raw image bytes: what ``predict --format json``
gives), ``GET /api/health``, ``GET /api/review``, ``GET /api/label``, ``POST /api/decide``,
``POST /api/retrain``, ``GET /api/openapi.json``. Photos are named by the sha256 of their bytes
(``/photo/<sha256>``): no endpoint takes a path from the client.

Safety (``app.safety``): the Host header must be the one served (DNS rebinding), state-changing
requests carry this server's token and come from its origin (CSRF), request bodies stop at
``serve.max_upload_mb`` (413).
"""
from __future__ import annotations

import csv
import logging
import re
import secrets
import threading
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from pipeline.app import safety
from pipeline.app.model import DecisionRefused, Served, UnknownPhoto
from pipeline.data.corrections import ACTIONS
from pipeline.data.decode import ImageError, thumbnail_jpeg
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.serve")
STATIC = Path(__file__).resolve().parent / "static"
SHA = re.compile(r"^[0-9a-f]{64}$")
PAGES = {"/": "try.html", "/review": "review.html", "/label": "label.html"}
THUMBNAIL_SIZES = (96, 192, 384, 768)


class Decision(BaseModel):
    sha256: str
    action: str
    label: str = ""


def create_app(project, served: Served | None = None) -> FastAPI:
    served = served or Served(project)
    params, base = project.params, project.base
    token = secrets.token_urlsafe(32)
    app = FastAPI(title="photohead", version="1", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json",
                  description="Try the model on photos, review what inspect found, label photos, retrain. "
                              "Local only: every asset is served from here.")
    app.state.served, app.state.token = served, token
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=safety.allowed_hosts(params.serve))
    app.add_middleware(safety.BodyLimit, max_bytes=int(params.serve.max_upload_mb * 1024 * 1024))
    review_cache: dict = {}
    review_lock = threading.Lock()

    def same_origin(request: Request) -> None:
        safety.check_same_origin(request, token)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse({"error": f"{where}: {first.get('msg')}"}, status_code=400)

    # ------------------------------------------------------------------ pages
    def page(name: str) -> HTMLResponse:
        html = (STATIC / name).read_text(encoding="utf-8").replace("{{csrf}}", token)
        return HTMLResponse(html, headers=safety.PAGE_HEADERS)

    for route, name in PAGES.items():
        app.add_api_route(route, lambda name=name: page(name), methods=["GET"], include_in_schema=False)

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str):
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file() or name.endswith(".html"):
            raise HTTPException(404, f"no asset {name}")
        return FileResponse(path, headers=safety.PAGE_HEADERS)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    @app.get("/report", include_in_schema=False)
    def report():
        path = base / params.paths.reports_dir / "index.html"
        if not path.is_file():
            raise HTTPException(404, "no report yet: run 'make evaluate'")
        return HTMLResponse(path.read_text(encoding="utf-8"), headers=safety.REPORT_HEADERS)

    @app.get("/photos", include_in_schema=False)
    def photos(true: str | None = None, predicted: str | None = None, cls: str | None = None):
        """The test photos a confusion cell (true, predicted) or a class row (cls) counts."""
        rows = _test_predictions(base / params.paths.reports_dir / "predictions.csv")
        if cls is not None:
            chosen = [r for r in rows if r["actual"] == cls or r["predicted"] == cls]
            title = f"Test photos of class {cls} or predicted as {cls}"
        else:
            chosen = [r for r in rows if (true is None or r["actual"] == true) and
                      (predicted is None or r["predicted"] == predicted)]
            title = f"Test photos of {true or 'any class'} predicted as {predicted or 'anything'}"
        by_path = served.sha_of_path
        cards = "".join(
            f"<figure><img loading=lazy src='/photo/{by_path[r['path']]}?size=192' alt=''><figcaption>"
            f"{_escape(r['path'])}<br>true <b>{_escape(r['actual'])}</b>, predicted <b>{_escape(r['predicted'])}</b>"
            "</figcaption></figure>" for r in chosen if r["path"] in by_path)
        html = (STATIC / "photos.html").read_text(encoding="utf-8").replace("{{title}}", _escape(title)).replace(
            "{{count}}", str(len(chosen))).replace("{{cards}}", cards or "<p>No photos.</p>")
        return HTMLResponse(html, headers=safety.PAGE_HEADERS)

    # ------------------------------------------------------------------ photos by content hash
    @app.get("/photo/{sha}", include_in_schema=False)
    def photo(sha: str, size: int = 384):
        if not SHA.match(sha):
            raise HTTPException(400, "a photo is named by the sha256 of its bytes (64 hex digits)")
        path = served.file_of(sha)
        if path is None or not path.is_file():
            raise HTTPException(404, "no photo with that sha256 in the cache")
        size = min(THUMBNAIL_SIZES, key=lambda s: abs(s - size))
        return Response(_thumbnail(path, size), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600", **safety.PAGE_HEADERS})

    # ------------------------------------------------------------------ API
    @app.get("/api/health", summary="the model, backbone and classes served")
    def health():
        return served.health()

    @app.post("/api/predict", summary="top-k labels of uploaded photos, as predict --format json gives them")
    async def predict(request: Request, top_k: int | None = None, neighbours: int = 0):
        uploads = await _uploads(request)
        if top_k is not None and top_k < 1:
            raise HTTPException(400, "top_k: must be at least 1")
        neighbours = max(0, min(neighbours, 20))
        answers = await _in_thread(served.predict, uploads, top_k, neighbours)
        failed = [a for a in answers if a["error"]]
        if len(failed) == len(answers):
            raise HTTPException(400, "; ".join(f"{a['path']}: {a['error']}" for a in failed))
        return answers

    @app.get("/api/review", summary="inspect's findings not decided yet, with the photos' neighbours")
    def review():
        with review_lock:
            key = served.trained.inputs.identity
            if review_cache.get("key") != key:
                review_cache.update(key=key, findings=_findings(served))
            findings = review_cache["findings"]
        decided = served.decisions()
        return {"classes": served.classes, **{kind: [f for f in items if f["sha256"] not in decided]
                                              for kind, items in findings.items()},
                "decided": len(decided)}

    @app.get("/api/label", summary="unlabelled photos, in the order that teaches the model most")
    def label(limit: int = 60):
        return {"classes": served.classes, **served.to_label(max(1, min(limit, 500)))}

    @app.post("/api/decide", summary="relabel, exclude or keep a photo (written to data.corrections)",
              dependencies=[Depends(same_origin)])
    def decide(decision: Decision):
        if not SHA.match(decision.sha256):
            raise HTTPException(400, "sha256: 64 hex digits")
        if decision.action not in ACTIONS:
            raise HTTPException(400, f"action: one of {', '.join(ACTIONS)}")
        try:
            return served.decide(decision.sha256, decision.action, decision.label)
        except UnknownPhoto:
            raise HTTPException(404, "no photo with that sha256 in the cache") from None
        except DecisionRefused as error:
            raise HTTPException(400, str(error)) from None

    retrain_lock = threading.Lock()

    @app.post("/api/retrain", summary="apply the corrections and retrain the model (the head: seconds)",
              dependencies=[Depends(same_origin)])
    async def retrain():
        if not retrain_lock.acquire(blocking=False):
            raise HTTPException(409, "a retrain is running; wait for it")
        try:
            return await _in_thread(served.retrain)
        finally:
            retrain_lock.release()

    return app


async def _in_thread(function, *args):
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(function, *args)


async def _uploads(request: Request) -> list[tuple[str, bytes]]:
    """(name, bytes) of every photo in a multipart form or the raw body."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        form = await request.form()
        uploads = []
        for name, value in form.multi_items():
            if hasattr(value, "read"):
                uploads.append((Path(value.filename or name).name, await value.read()))
        if not uploads:
            raise HTTPException(400, "no file in the form; send the photos as files (curl -F file=@photo.jpg)")
        return uploads
    body = await request.body()
    if not body:
        raise HTTPException(400, "empty body; send a photo's bytes or a multipart form")
    return [(request.query_params.get("name", "upload"), body)]


def _thumbnail(path: Path, size: int) -> bytes:
    try:
        return thumbnail_jpeg(path, size, quality=85)
    except (OSError, ImageError) as error:  # gone since the cache was made, or refused by the decoder
        raise HTTPException(400, f"cannot show the photo: {' '.join(str(error).split())}") from None


def _test_predictions(path: Path) -> list[dict]:
    if not path.is_file():
        raise HTTPException(404, "no predictions yet: run 'make evaluate'")
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _findings(served: Served) -> dict:
    """inspect's findings (run on the cache), by content hash, with neighbours of the photos in question."""
    from pipeline.use import inspect

    result = inspect.run(served.project, processes=1)  # no fork from a process with request threads
    sha_of = served.sha_of_path
    rows = served.cached_rows([sha_of[q["path"]] for q in result.label_issues if q["path"] in sha_of])
    issues = []
    for q in result.label_issues:
        sha = sha_of.get(q["path"])
        row = rows.get(sha)
        issues.append({"kind": "label_issue", "sha256": sha, "path": q["path"], "given": q["given"],
                       "suggested": q["suggested"], "score": round(q["score"], 4),
                       "neighbours_given": served.neighbours(row, 4, q["given"]),
                       "neighbours_suggested": served.neighbours(row, 4, q["suggested"])})
    pairs = [{"kind": "near_duplicate", "sha256": sha_of.get(q["path_b"]), "other": sha_of.get(q["path_a"]),
              "path": q["path_b"], "other_path": q["path_a"], "similarity": round(q["similarity"], 4),
              "leak": q["leak"], "labels_differ": q["labels_differ"], "given": q["label_b"],
              "other_label": q["label_a"], "splits": [q["split_b"], q["split_a"]]} for q in result.near_duplicates]
    outliers = [{"kind": "outlier", "sha256": sha_of.get(q["path"]), "path": q["path"], "given": q["label"],
                 "score": round(q["score"], 4), "nearest_other_class": q["nearest_other_class"]}
                for q in result.outliers]
    found = {"label_issues": issues, "near_duplicates": pairs, "outliers": outliers}
    return {kind: [f for f in items if f["sha256"]] for kind, items in found.items()}  # photos still in the cache


def _escape(text: str) -> str:
    import html

    return html.escape(str(text), quote=True)


class ServeError(PipelineError, OSError):
    """The app cannot start (its port is taken, ...)."""


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
    if not safety.is_loopback(params.serve.host):
        log.warning("serve: listening on %s: reachable from the network, not only this machine", params.serve.host)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])
