"""Training in the background, with its progress: ``POST /api/train`` starts a job, ``GET /api/train/{job}``
says where it is, ``GET /api/train/{job}/events`` streams the same as Server-Sent Events.

One job runs at a time (the retrain lock). Its progress comes from ``pipeline.progress``: each stage as it
starts, and the backbone's photos done of how many, from which the rate and the time left follow.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field

from pipeline import progress
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.serve")
KEPT = 20  # finished jobs remembered


class JobRunning(PipelineError, RuntimeError):
    pass


@dataclass
class Job:
    id: str
    state: str = "queued"  # queued | running | done | failed
    stage: str = ""
    done: int = 0
    total: int = 0
    message: str = ""
    photos_per_second: float | None = None
    seconds_left: float | None = None
    seconds: float = 0.0
    result: dict | None = None
    stages: dict = field(default_factory=dict)  # each stage begun: {"done", "total", "seconds"} (photos: total > 0)
    version: int = 0  # changes with every update: the event stream sends a new event then
    started: float = field(default_factory=time.perf_counter, repr=False)
    _stage_started: float = field(default=0.0, repr=False)

    def view(self) -> dict:
        out = asdict(self)
        for private in ("started", "_stage_started", "version"):
            out.pop(private)
        return out

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")


class Trainer:
    def __init__(self, lock: threading.Lock):
        self.lock = lock  # the app's retrain lock: a job and /api/retrain never run at once
        self.jobs: dict[str, Job] = {}
        self.changed = threading.Condition()

    def start(self, work, check=None) -> Job:
        """Run ``work()`` (returns the result dict) in a thread, after ``check()`` (raises to refuse)."""
        if not self.lock.acquire(blocking=False):
            raise JobRunning("a training is running; wait for it (GET /api/train/{job})")
        try:
            if check is not None:
                check()
        except BaseException:
            self.lock.release()
            raise
        job = Job(secrets.token_hex(8))
        self.jobs[job.id] = job
        for old in [j for j in self.jobs.values() if j.finished][:-KEPT]:
            self.jobs.pop(old.id, None)
        threading.Thread(target=self._run, args=(job, work), name=f"train-{job.id}", daemon=True).start()
        return job

    def _update(self, job: Job, **values) -> None:
        with self.changed:
            for name, value in values.items():
                setattr(job, name, value)
            job.seconds = round(time.perf_counter() - job.started, 2)
            job.version += 1
            self.changed.notify_all()

    def _run(self, job: Job, work) -> None:
        def listen(stage: str, done: int, total: int) -> None:
            if total == 0:  # a stage begins
                job.stages[stage] = {"done": 0, "total": 0, "seconds": 0.0}
                self._update(job, stage=stage, done=0, total=0, photos_per_second=None, seconds_left=None,
                             message=f"{stage}…", _stage_started=time.perf_counter())
                return
            elapsed = time.perf_counter() - job._stage_started
            job.stages[stage] = {"done": done, "total": total, "seconds": round(elapsed, 2)}
            if done != total and done % max(1, total // 200) and done > 1:
                return  # about 200 updates per pass, whatever its size
            rate = done / elapsed if elapsed > 0 else None
            left = (total - done) / rate if rate else None
            self._update(job, stage=stage, done=done, total=total, message=f"{stage}: {done} of {total} photos",
                         photos_per_second=round(rate, 2) if rate else None,
                         seconds_left=round(left, 1) if left is not None else None)

        try:
            self._update(job, state="running", message="starting")
            with progress.listening(listen):
                result = work()
            self._update(job, state="done", result=result, message=_summary(result), seconds_left=0.0)
        except PipelineError as error:
            self._update(job, state="failed", message=" ".join(str(error).split()))
        except Exception as error:  # the job says so; the server keeps serving
            log.exception("train job %s failed", job.id)
            self._update(job, state="failed", message=f"{type(error).__name__}: {' '.join(str(error).split())}")
        finally:
            self.lock.release()

    def wait(self, job: Job, version: int, timeout: float) -> None:
        """Until the job changes from ``version`` or ``timeout`` seconds pass."""
        with self.changed:
            self.changed.wait_for(lambda: job.version != version, timeout)


def _summary(result: dict) -> str:
    if "files" in result:  # an export
        return f"exported {len(result['files'])} formats in {result['seconds']:.1f} s, each checked for parity"
    accuracy = result.get("val_accuracy_after")
    shown = f"val accuracy {accuracy:.1%} on {result.get('val_photos_after')} photos" if accuracy is not None else ""
    return f"trained in {result.get('seconds', 0):.1f} s" + (f": {shown}" if shown else "")
