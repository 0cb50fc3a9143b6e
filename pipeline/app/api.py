"""The app's JSON API (``/api``): what the pages call, and what scripts may call. Validation is in the types
(``Query(ge=, le=)``, ``Field(pattern=)``, ``Literal``); a state-changing route needs the same-origin token."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from pipeline.app.model import DecisionRefused, UnknownPhoto
from pipeline.app.state import AppState, app_state, same_origin


class ErrorBody(BaseModel):
    """Every error the API sends: one line saying what was wrong and what to do."""

    error: str


def _errors(*codes: int) -> dict:
    """The error responses a route sends, documented with their one body."""
    reasons = {400: "the photo or the decision cannot be used", 403: "not from this app's pages (token, origin)",
               404: "no such photo", 409: "a retrain is running", 413: "request body over serve.max_upload_mb",
               422: "a parameter or body field outside its type"}
    return {code: {"model": ErrorBody, "description": reasons[code]} for code in codes}


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
             responses=_errors(400, 413), openapi_extra=_PHOTOS_BODY)
async def predict(request: Request, top_k: int | None = Query(None, ge=1, le=1000),
                  neighbours: int = Query(0, ge=0, le=20), state: AppState = Depends(app_state)):
    uploads = await _uploads(request)
    answers = await run_in_threadpool(state.served.predict, uploads, top_k, neighbours)
    failed = [a for a in answers if a["error"]]
    if len(failed) == len(answers):
        raise HTTPException(400, "; ".join(f"{a['path']}: {a['error']}" for a in failed))
    return answers


@router.get("/review", summary="inspect's findings not decided yet, with the photos' neighbours: the first "
            "`limit` of each kind, most certain first, and how many each kind has in all")
def review(limit: int = Query(100, ge=1, le=5000), state: AppState = Depends(app_state)):
    from pipeline.app.findings import findings

    served = state.served
    with state.review_lock:
        key = served.trained.inputs.identity
        if state.review_cache.get("key") != key:
            state.review_cache.update(key=key, findings=findings(served))
        found = state.review_cache["findings"]
    decided = served.decisions()
    left = {kind: [f for f in items if f["sha256"] not in decided] for kind, items in found.items()}
    # a page of each kind: at 9,000 photos inspect finds thousands of near-duplicate pairs, 7 MB in one answer
    return {"classes": served.classes, **{kind: items[:limit] for kind, items in left.items()},
            "totals": {kind: len(items) for kind, items in left.items()}, "decided": len(decided)}


@router.get("/label", summary="unlabelled photos, in the order that teaches the model most")
def label(limit: int = Query(60, ge=1, le=500), state: AppState = Depends(app_state)):
    return {"classes": state.served.classes, **state.served.to_label(limit)}


@router.post("/decide", summary="relabel, exclude or keep a photo (written to data.corrections)",
             dependencies=[Depends(same_origin)], responses=_errors(400, 403, 404, 413))
def decide(decision: Decision, state: AppState = Depends(app_state)):
    try:
        return state.served.decide(decision.sha256, decision.action, decision.label)
    except UnknownPhoto:
        raise HTTPException(404, "no photo with that sha256 in the cache") from None
    except DecisionRefused as error:
        raise HTTPException(400, str(error)) from None


@router.post("/retrain", summary="apply the corrections and retrain the model (the head: seconds)",
             dependencies=[Depends(same_origin)], responses=_errors(403, 409, 413))
async def retrain(state: AppState = Depends(app_state)):
    if not state.retrain_lock.acquire(blocking=False):
        raise HTTPException(409, "a retrain is running; wait for it")
    try:
        return await run_in_threadpool(state.served.retrain)
    finally:
        state.retrain_lock.release()


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


