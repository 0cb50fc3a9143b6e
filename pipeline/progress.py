"""Progress of long work, for whoever listens: each stage as it starts, and the backbone's photos done of
how many. A listener is set for one context (``contextvars``): the app's training job listens and streams
it to the page; the command line does not listen (tqdm shows the same on the terminal)."""
from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Listener = Callable[[str, int, int], None]  # (stage, done, total); total 0: the stage has begun
_listener: contextvars.ContextVar[Listener | None] = contextvars.ContextVar("photohead_progress", default=None)


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)


def report(stage: str, done: int = 0, total: int = 0) -> None:
    listener = _listener.get()
    if listener is not None:
        listener(stage, done, total)
