"""The app's pages: one route and one template each (``app/templates``, all extending the shared
``templates/base.html``, whose navigation lists ``templates.NAV``), the report, and the photos by content
hash. A new page is a template, a route here and a line of ``NAV``."""
from __future__ import annotations

import csv
import re
from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException

from pipeline.app import safety
from pipeline.app.state import AppState, app_state
from pipeline.data.decode import ImageError, thumbnail_jpeg
from pipeline.templates import FOLDER as SHARED_TEMPLATES
from pipeline.templates import NAV

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
TEMPLATES = Jinja2Templates(directory=[HERE / "templates", SHARED_TEMPLATES])  # autoescapes every value
SHA = re.compile(r"^[0-9a-f]{64}$")
THUMBNAIL_SIZES = (96, 192, 384, 768)


router = APIRouter(include_in_schema=False)


def render(request: Request, template: str, title: str, here: str, scripts: tuple[str, ...] = (),
           status_code: int = 200, **values) -> HTMLResponse:
    state: AppState = request.app.state.app
    context = {"title": title, "here": here, "nav": NAV, "csrf": state.token, "scripts": scripts, **values}
    return TEMPLATES.TemplateResponse(request, template, context, status_code=status_code,
                                      headers=safety.PAGE_HEADERS)


@router.get("/")
def try_page(request: Request, state: AppState = Depends(app_state)):
    if not state.served.ready:  # a new project: its classes and photos first
        return RedirectResponse("/train", status_code=303)
    return render(request, "try.html", "Try", "/", ("app.js", "try.js"))


@router.get("/train")
def train_page(request: Request, state: AppState = Depends(app_state)):
    root = state.served.project.params.data.root
    return render(request, "train.html", "Train", "/train", ("app.js", "train.js"), root=root)


@router.get("/review")
def review_page(request: Request):
    return render(request, "review.html", "Review", "/review", ("app.js", "review.js"))


@router.get("/label")
def label_page(request: Request):
    return render(request, "label.html", "Label", "/label", ("app.js", "label.js"))


@router.get("/report")
def report(request: Request, state: AppState = Depends(app_state)):
    """The evaluation report evaluate wrote (a file of its own, which works without the server too)."""
    path = state.served.project.reports_dir / "index.html"
    if not path.is_file():
        return render(request, "no_report.html", "Report", "/report", status_code=404)
    return HTMLResponse(path.read_text(encoding="utf-8"), headers=safety.REPORT_HEADERS)


@router.get("/photos")
def photos(request: Request, true: str | None = Query(None, max_length=200),
           predicted: str | None = Query(None, max_length=200), cls: str | None = Query(None, max_length=200),
           state: AppState = Depends(app_state)):
    """The test photos a confusion cell (true, predicted) or a class row (cls) counts."""
    rows = _test_predictions(state.served.project.reports_dir / "predictions.csv")
    if cls is not None:
        chosen = [r for r in rows if r["actual"] == cls or r["predicted"] == cls]
        title = f"Test photos of class {cls} or predicted as {cls}"
    else:
        chosen = [r for r in rows if (true is None or r["actual"] == true) and
                  (predicted is None or r["predicted"] == predicted)]
        title = f"Test photos of {true or 'any class'} predicted as {predicted or 'anything'}"
    by_path = state.served.sha_of_path
    shown = [{**r, "sha256": by_path[r["path"]]} for r in chosen if r["path"] in by_path]
    return render(request, "photos.html", title, "/report", photos=shown)


@router.get("/photo/{sha}")
def photo(sha: str, size: int = Query(384, ge=1, le=4096), state: AppState = Depends(app_state)):
    if not SHA.match(sha):
        raise HTTPException(400, "a photo is named by the sha256 of its bytes (64 hex digits)")
    path = state.served.file_of(sha)
    if path is None or not path.is_file():
        raise HTTPException(404, "no photo with that sha256 in the cache")
    size = min(THUMBNAIL_SIZES, key=lambda s: abs(s - size))
    try:
        thumbnail = thumbnail_jpeg(path, size, quality=85, max_pixels=state.served.params.features.max_pixels)
    except (OSError, ImageError) as error:  # gone since the cache was made, or refused by the decoder
        raise HTTPException(400, f"cannot show the photo: {' '.join(str(error).split())}") from None
    return Response(thumbnail, media_type="image/jpeg",
                    headers={"Cache-Control": "private, max-age=3600", **safety.PAGE_HEADERS})


@router.get("/favicon.ico")
def favicon():
    return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")


def _test_predictions(path: Path) -> list[dict]:
    if not path.is_file():
        raise HTTPException(404, "no predictions yet: run 'make evaluate'")
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
