"""What the app's routes share, as a FastAPI dependency: the model served, this server's token, and the
locks and cache of the work that must not run twice at once."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from fastapi import Depends, Request

from pipeline.app import safety
from pipeline.app.jobs import Trainer


@dataclass
class AppState:
    served: object  # app.model.Served
    token: str  # the same-origin token state-changing requests carry (X-CSRF-Token)
    review_lock: threading.Lock = field(default_factory=threading.Lock)
    review_cache: dict = field(default_factory=dict)  # inspect's findings of the model served, by its inputs
    retrain_lock: threading.Lock = field(default_factory=threading.Lock)
    trainer: Trainer = field(init=False)  # training and export jobs, under the retrain lock

    def __post_init__(self):
        self.trainer = Trainer(self.retrain_lock)


def app_state(request: Request) -> AppState:
    return request.app.state.app


def same_origin(request: Request, state: AppState = Depends(app_state)) -> None:
    safety.check_same_origin(request, state.token)
