"""The one layout of every page (``base.html``: the head, the navigation) and the navigation itself, shared
by the app's pages and by the evaluation report, which is a file of its own that works without the server
(its navigation shows only when the app serves it)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FOLDER = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Page:
    path: str
    label: str  # in the navigation


NAV = (Page("/train", "Train"), Page("/", "Try"), Page("/review", "Review"), Page("/label", "Label"), Page("/report", "Report"))


def render(name: str, **context) -> str:
    """A template of this folder rendered to text, every value escaped (for pages written as files)."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    environment = Environment(loader=FileSystemLoader(FOLDER), autoescape=select_autoescape(default=True),
                              keep_trailing_newline=True)
    return environment.get_template(name).render(nav=NAV, **context)
