"""Cache keys and safe writes.

A stage's key is sha256 over canonical JSON of its name, its VERSION, its own params and the keys
or content hashes of what it reads. Canonical: sorted keys, no whitespace, floats by ``repr`` (so
``0.2`` and ``0.20`` are one value), tuples as lists.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give: temporary files are created 0600


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def stage_key(stage: str, version: int, params: dict, upstream: dict | None = None) -> str:
    """Hex sha256 of what determines a stage's output."""
    payload = {"stage": stage, "version": version, "params": params, "upstream": upstream or {}}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a text file so that readers see the old or the new content, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def replaced_folder(path: str | Path):
    """Yield a temporary sibling folder to fill; on success it replaces ``path`` whole, on any error
    it is removed and ``path`` stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    tmp.chmod(0o777 & ~_UMASK)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def os_reason(error: OSError) -> str:
    """The reason of a failed write in a few words: ``No space left on device``, not HDF5's whole report."""
    if error.errno:
        return os.strerror(error.errno)
    text = " ".join(str(error).split())
    return text if len(text) <= 120 else text[:117] + "..."


def temp_path_for(path: str | Path) -> Path:
    """A unique temporary sibling of ``path``, to be moved over it with ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    return Path(tmp)


def describe_changes(old: dict | None, new: dict, prefix: str = "") -> list[str]:
    """``['train_head.C: 1.0 -> 0.5']``: the leaves that differ between two JSON-like dicts."""
    if old is None:
        return []
    changes = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name, "<unset>"), new.get(name, "<unset>")
        label = f"{prefix}{name}"
        if isinstance(a, dict) and isinstance(b, dict):
            changes += describe_changes(a, b, prefix=f"{label}.")
        elif a != b:
            changes.append(f"{label}: {_short(a)} -> {_short(b)}")
    return changes


class RunRecord:
    """What a stage's last run was made from (its key's ingredients), kept in a small JSON file, so
    that a stage that recomputes can say why: ``train_head: recomputing (train_head.C: 1.0 -> 0.1)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def previous(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def reason(self, ingredients: dict, nothing: str = "nothing cached for these settings yet") -> str:
        """What changed since the last run, as one line (``nothing`` when there was no last run)."""
        # through JSON, so that tuples compare equal to the lists read back
        changes = describe_changes(self.previous(), json.loads(canonical_json(ingredients)))
        return ", ".join(changes) if changes else nothing

    def save(self, ingredients: dict) -> None:
        atomic_write_text(self.path, json.dumps(ingredients, indent=2, sort_keys=True))


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 16 else text[:12] + "..."
