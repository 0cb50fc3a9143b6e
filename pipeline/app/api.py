"""The app's JSON API (``/api``): what the pages call, and what scripts may call. Validation is in the types
(``Query(ge=, le=)``, ``Field(pattern=)``, ``Literal``); a state-changing route needs the same-origin token."""
from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import AsyncIterable
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from fastapi.sse import EventSourceResponse
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from pipeline.app import exports
from pipeline.app.folder import ClassExists, LayoutRefused, NameRefused, NoSuchClass
from pipeline.app.jobs import JobRunning
from pipeline.app.model import DecisionRefused, NoModel, NotTrainable, UnknownPhoto
from pipeline.app.state import AppState, app_state, same_origin

# the app's refusals, as HTTP: each says what to do in its one line
STATUS_OF = {NameRefused: 400, LayoutRefused: 400, NotTrainable: 400, DecisionRefused: 400, NoSuchClass: 404,
             UnknownPhoto: 404, ClassExists: 409, JobRunning: 409, NoModel: 409, exports.NotExported: 409}


class ErrorBody(BaseModel):
    """Every error the API sends: one line saying what was wrong and what to do."""

    error: str


def _errors(*codes: int) -> dict:
    """The error responses a route sends, documented with their one body (JSON, whatever the route's own
    answers are: the event stream's errors too)."""
    reasons = {400: "the photo, name or decision cannot be used", 403: "not from this app's pages (token, origin)",
               404: "no such photo, class or job", 409: "a training is running, a class exists, or no model yet",
               413: "request body over serve.max_upload_mb", 422: "a parameter or body field outside its type"}
    return {code: {"model": ErrorBody, "description": reasons[code], "content": {"application/json": {}}}
            for code in codes}


# the photos /api/predict takes: multipart files, or one photo's bytes as the body
_PHOTOS_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}

router = APIRouter(prefix="/api", responses=_errors(422))


class Decision(BaseModel):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="the photo, by the sha256 of its bytes")
    action: Literal["relabel", "exclude", "keep"]
    label: str = Field("", max_length=200, description="the class, for relabel")


@router.get("/health", summary="the model, backbone and classes served")
def health(state: AppState = Depends(app_state)):
    return state.served.health()


@router.post("/predict", summary="top-k labels of uploaded photos, as predict --format json gives them",
             responses=_errors(400, 409, 413), openapi_extra=_PHOTOS_BODY)
async def predict(request: Request, top_k: int | None = Query(None, ge=1, le=1000),
                  neighbours: int = Query(0, ge=0, le=20), state: AppState = Depends(app_state)):
    uploads = await _uploads(request)
    answers = await _call(state.served.predict, uploads, top_k, neighbours)
    failed = [a for a in answers if a["error"]]
    if len(failed) == len(answers):
        raise HTTPException(400, "; ".join(f"{a['path']}: {a['error']}" for a in failed))
    return answers


@router.get("/review", summary="inspect's findings not decided yet, with the photos' neighbours: the first "
            "`limit` of each kind, most certain first, and how many each kind has in all; while they are computed "
            "(once per model, in the background), `computing` and the seconds so far", responses=_errors(409))
def review(limit: int = Query(100, ge=1, le=5000), state: AppState = Depends(app_state)):
    served = state.served
    key = _sync(served.model).inputs.identity
    with state.review_lock:
        cache = state.review_cache
        if cache.get("key") != key:  # a new model: its findings, computed once, behind the page's notice
            cache.clear()
            cache.update(key=key, started=time.monotonic(), findings=None, error=None)
            threading.Thread(target=_find, args=(state, served, key), name="findings", daemon=True).start()
        found, error, started = cache["findings"], cache["error"], cache["started"]
    if error:
        raise HTTPException(409, f"inspect could not run on this model: {error}")
    if found is None:
        return {"computing": True, "seconds": round(time.monotonic() - started, 1), "classes": served.classes}
    decided = served.decisions()
    left = {kind: [f for f in items if f["sha256"] not in decided] for kind, items in found.items()}
    # a page of each kind: at 9,000 photos inspect finds thousands of near-duplicate pairs, 7 MB in one answer
    return {"computing": False, "classes": served.classes, **{kind: items[:limit] for kind, items in left.items()},
            "totals": {kind: len(items) for kind, items in left.items()}, "decided": len(decided)}


def _find(state: AppState, served, key) -> None:
    from pipeline.app.findings import findings

    try:
        found, error = findings(served), None
    except Exception as failure:  # noqa: BLE001 — said by the route, the server keeps serving
        found, error = None, " ".join(str(failure).split()) or type(failure).__name__
    with state.review_lock:
        if state.review_cache.get("key") == key:
            state.review_cache.update(findings=found, error=error)


@router.get("/label", summary="unlabelled photos, in the order that teaches the model most", responses=_errors(409))
def label(limit: int = Query(60, ge=1, le=500), state: AppState = Depends(app_state)):
    return {"classes": state.served.classes, **_sync(state.served.to_label, limit)}


@router.post("/decide", summary="relabel, exclude or keep a photo (written to data.corrections)",
             dependencies=[Depends(same_origin)], responses=_errors(400, 403, 404, 413))
def decide(decision: Decision, state: AppState = Depends(app_state)):
    try:
        return state.served.decide(decision.sha256, decision.action, decision.label)
    except UnknownPhoto:
        raise HTTPException(404, "no photo with that sha256 in the cache") from None
    except DecisionRefused as error:
        raise HTTPException(400, str(error)) from None


# ---- classes and their photos --------------------------------------------------------------------------

ClassName = PathParam(min_length=1, max_length=400, description="the class, as its folder is named")


class NewName(BaseModel):
    # the rules (no path, no hidden or reserved name, not the rejection label, ...) are checked by the folder,
    # whose 400 says which one a name breaks: a pattern's 422 would only quote the pattern
    name: str = Field(max_length=400, description="the class's name: its folder under data.root (at most 100 "
                      "characters; no /, \\, .., control characters, leading dot, Windows-reserved name)")


@router.get("/classes", summary="the classes (folders under data.root), their photo counts and newest photos")
def classes(state: AppState = Depends(app_state)):
    served = state.served
    return {"classes": served.folder.classes(), "trained_classes": served.classes if served.ready else [],
            "model": served.trained.key if served.ready else None}


@router.post("/classes", status_code=201, summary="create a class (an empty folder under data.root)",
             dependencies=[Depends(same_origin)], responses=_errors(400, 403, 409, 413))
def create_class(body: NewName, state: AppState = Depends(app_state)):
    return _sync(state.served.folder.create, body.name)


@router.patch("/classes/{name}", summary="rename a class: its folder, and the corrections that name its photos",
              dependencies=[Depends(same_origin)], responses=_errors(400, 403, 404, 409, 413))
def rename_class(body: NewName, name: str = ClassName, state: AppState = Depends(app_state)):
    with _not_training(state):
        return _sync(state.served.folder.rename, name, body.name)


@router.delete("/classes/{name}", summary="delete a class: its folder moves, whole, to data.root/.trash",
               dependencies=[Depends(same_origin)], responses=_errors(400, 403, 404, 409))
def delete_class(name: str = ClassName, state: AppState = Depends(app_state)):
    with _not_training(state):
        return _sync(state.served.folder.delete, name)


@contextmanager
def _not_training(state: AppState):
    """A class's folder moves only between trainings: a scan that saw it half-moved would lose its photos."""
    if not state.retrain_lock.acquire(blocking=False):
        raise HTTPException(409, "a training is running; rename or delete the class after it")
    try:
        yield
    finally:
        state.retrain_lock.release()


_FILES_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}}}}}}}


@router.post("/classes/{name}/photos", summary="add photos to a class: written under their content hash, "
             "atomically; the same bytes already in the project are counted as duplicates, not written",
             dependencies=[Depends(same_origin)], responses=_errors(400, 403, 404, 413), openapi_extra=_FILES_BODY)
async def add_photos(request: Request, name: str = ClassName, state: AppState = Depends(app_state)):
    uploads = await _uploads(request, multipart_only=True)
    added = await _call(state.served.folder.add, name, uploads)
    return {"added": added.added, "duplicates": added.duplicates, "skipped": added.skipped, "photos": added.photos}


# ---- training and export, in the background -------------------------------------------------------------

@router.post("/train", status_code=202, summary="train on the photos now: new photos through the backbone, then "
             "the head; returns the job to follow", dependencies=[Depends(same_origin)],
             responses=_errors(400, 403, 409, 413))
def train(state: AppState = Depends(app_state)):
    served = state.served
    job = _sync(state.trainer.start, served.retrain, served.trainable)
    return {"job": job.id}


@router.get("/train", summary="the job running or the last one, or null")
def current_job(state: AppState = Depends(app_state)):
    jobs = list(state.trainer.jobs.values())
    return {"job": jobs[-1].view() if jobs else None}


JobId = PathParam(pattern=r"^[0-9a-f]{16}$", description="the job, as POST /api/train gave it")


def _job(job: str = JobId, state: AppState = Depends(app_state)):
    """The job named in the path (a dependency: resolved before an event stream starts, so a 404 is a 404)."""
    found = state.trainer.jobs.get(job)
    if found is None:
        raise HTTPException(404, "no such job (this server's jobs are forgotten when it stops)")
    return found


@router.get("/train/{job}", summary="where a training or export job is: state, done of total, rate, time left",
            responses=_errors(404))
def train_state(found=Depends(_job)):
    return found.view()


@router.get("/train/{job}/events", response_class=EventSourceResponse, responses=_errors(404),
            summary="the job's progress as Server-Sent Events, one per change, until it is done or failed")
async def train_events(found=Depends(_job), state: AppState = Depends(app_state)) -> AsyncIterable[dict]:
    version = -1
    while True:
        if found.version != version:
            version = found.version
            yield found.view()
            if found.finished:
                return
        await run_in_threadpool(state.trainer.wait, found, version, 1.0)
        await asyncio.sleep(0.05)  # at most 20 events a second


@router.get("/export", summary="the exported model: whether it is the model served, each format's size and "
            "parity figures, and the snippets that load it")
def export_state(state: AppState = Depends(app_state)):
    return exports.describe(state.served)


@router.post("/export", status_code=202, summary="export the model served in every format, checked for parity "
             "(a job, as training is)", dependencies=[Depends(same_origin)], responses=_errors(403, 409, 413))
def export(state: AppState = Depends(app_state)):
    served = state.served
    job = _sync(state.trainer.start, lambda: exports.run(served), served.model)
    return {"job": job.id}


@router.get("/export/{format}", summary="one exported format as a file (folders as a zip)",
            responses={**_errors(404, 409), 200: {"content": {"application/octet-stream": {}}}})
def export_file(format: str = PathParam(pattern=r"^[a-z0-9_.]{1,40}$"), state: AppState = Depends(app_state)):
    try:
        path, name, temporary = exports.file_of(state.served, format)
    except exports.NotExported as error:
        raise HTTPException(409, str(error)) from None
    except LookupError as error:
        raise HTTPException(404, str(error)) from None
    cleanup = BackgroundTask(shutil.rmtree, temporary, ignore_errors=True) if temporary else None
    return FileResponse(path, filename=name, media_type="application/octet-stream", background=cleanup)


def _refusal(error: Exception) -> HTTPException | None:
    for kind, status in STATUS_OF.items():
        if isinstance(error, kind):
            return HTTPException(status, " ".join(str(error).split()))
    return None


def _sync(function, *args):
    try:
        return function(*args)
    except Exception as error:
        refused = _refusal(error)
        if refused is None:
            raise
        raise refused from None


async def _call(function, *args):
    """``function(*args)`` in a worker thread, its refusals as HTTP errors."""
    return await run_in_threadpool(_sync, function, *args)


@router.post("/retrain", summary="apply the corrections and retrain the model (the head: seconds)",
             dependencies=[Depends(same_origin)], responses=_errors(400, 403, 409, 413))
async def retrain(state: AppState = Depends(app_state)):
    if not state.retrain_lock.acquire(blocking=False):
        raise HTTPException(409, "a retrain is running; wait for it")
    try:
        return await _call(state.served.retrain)
    finally:
        state.retrain_lock.release()


async def _uploads(request: Request, multipart_only: bool = False) -> list[tuple[str, bytes]]:
    """(name, bytes) of every photo in a multipart form or the raw body."""
    kind = request.headers.get("content-type", "")
    if multipart_only and not kind.startswith("multipart/form-data"):
        raise HTTPException(400, "send the photos as a multipart form, field files (curl -F files=@photo.jpg)")
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


