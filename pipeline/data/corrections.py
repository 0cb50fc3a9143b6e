"""The user's decisions about photos: ``data.corrections``, a CSV ``path,action,label``.

- ``relabel``: the photo belongs to ``label`` (a class folder's name), whatever folder it is in;
  for a photo of ``data.unlabelled``, that is its first label, and it joins the train split;
- ``exclude``: the photo is left out of every split (listed in skipped.csv);
- ``keep``: the photo is as it should be (inspect's finding was wrong); nothing changes;
- an empty action: not decided yet (``inspect --corrections-template`` writes such rows, with a note).

Paths are relative to the params file's folder, with forward slashes. The last row of a path wins.
The scan applies the file (``scan``): the photos themselves are never moved, renamed or deleted.
Writers merge their decisions under a lock and replace the file whole, so two writers lose no
decision and a writer killed mid-write leaves the old file.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from pipeline.errors import PipelineError
from pipeline.fingerprint import atomic_write_text

ACTIONS = ("relabel", "exclude", "keep")
UNLABELLED = "unlabelled"  # the split of a photo of data.unlabelled that no correction labels yet
HEADER = ["path", "action", "label", "note"]


class CorrectionsError(PipelineError, ValueError):
    """A corrections file that cannot be applied; the message names the file and line."""


@dataclass(frozen=True)
class Correction:
    path: str  # relative to the params file's folder
    action: str  # relabel | exclude | keep | "" (undecided)
    label: str = ""  # relabel's label (an undecided row may hold a suggestion)
    note: str = ""  # why the row is there (inspect's finding); ignored by the scan


def file_of(data_params, base: str | Path) -> Path | None:
    """Where ``data.corrections`` points, or None when it is off."""
    return None if not data_params.corrections else Path(base) / data_params.corrections


def key_of(file: Path, base: str | Path) -> str:
    """A photo's name in the corrections file: its path relative to ``base``, with forward slashes."""
    return Path(os.path.relpath(Path(file).absolute(), Path(base).absolute())).as_posix()


def read(path: Path | None) -> dict[str, Correction]:
    """{path: its last decision}; an empty dict when there is no file."""
    if path is None or not path.is_file():
        return {}
    decisions: dict[str, Correction] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "action"} <= set(reader.fieldnames):
            raise CorrectionsError(f"{path}: expected the columns path,action,label")
        for line, row in enumerate(reader, start=2):
            where = (row.get("path") or "").strip()
            action = (row.get("action") or "").strip().lower()
            label = (row.get("label") or "").strip()
            if not where:
                continue
            if action and action not in ACTIONS:
                raise CorrectionsError(f"{path}:{line}: action {action!r} is not one of {', '.join(ACTIONS)}")
            if action == "relabel" and not label:
                raise CorrectionsError(f"{path}:{line}: relabel needs a label (the class's folder name)")
            decisions[Path(where).as_posix()] = Correction(Path(where).as_posix(), action,
                                                           "" if action in ("exclude", "keep") else label,
                                                           (row.get("note") or "").strip())
    return decisions


def render(decisions: dict[str, Correction]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(HEADER)
    for path in sorted(decisions):
        d = decisions[path]
        writer.writerow([path, d.action, d.label, d.note])
    return buffer.getvalue()


def record(path: Path, new: list[Correction], undecided_only: bool = False) -> dict[str, Correction]:
    """Add decisions to the file (a later decision on the same photo replaces the earlier one), under
    the file's lock, written whole; returns every decision now in the file. ``undecided_only``: add
    rows for photos the file does not name yet, and change nothing else (the template)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=30):
        decisions = read(path)
        for decision in new:
            if decision.action and decision.action not in ACTIONS:
                raise CorrectionsError(f"action {decision.action!r} is not one of {', '.join(ACTIONS)}")
            if decision.action == "relabel" and not decision.label:
                raise CorrectionsError("relabel needs a label (the class's folder name)")
            if undecided_only and decision.path in decisions:
                continue
            keep_note = decisions[decision.path].note if decision.path in decisions and not decision.note else ""
            decisions[decision.path] = Correction(decision.path, decision.action, decision.label,
                                                  decision.note or keep_note)
        atomic_write_text(path, render(decisions))
    return decisions


def forget(path: Path | None, names: list[str]) -> None:
    """Remove the rows of ``names`` from the file, under its lock (a renamed class's old names)."""
    if path is None or not path.is_file() or not names:
        return
    with FileLock(str(path) + ".lock", timeout=30):
        decisions = read(path)
        for name in names:
            decisions.pop(name, None)
        atomic_write_text(path, render(decisions))


def decided(decisions: dict[str, Correction]) -> dict[str, Correction]:
    return {path: d for path, d in decisions.items() if d.action}


def summary(decisions: dict[str, Correction]) -> str:
    """A short name of the decisions made, for the 'recomputing (what changed)' line: count and digest."""
    made = decided(decisions)
    text = "".join(f"{p},{d.action},{d.label}\n" for p, d in sorted(made.items()))
    return f"{len(made)} rows {hashlib.sha256(text.encode()).hexdigest()[:6]}" if made else "none"
