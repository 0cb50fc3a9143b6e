"""The project's photo folder, as the app changes it: classes (``data.root/<class>/``) created, renamed and
deleted, photos written into them.

Every write is atomic and never replaces a file:
- a photo is written to ``data.root/.incoming/`` (hidden: the scan never sees it), flushed to disk, then
  moved to ``data.root/<class>/<sha256><suffix>`` with ``os.link`` (which fails rather than replace a
  file), so a reader sees the whole photo or none; a kill leaves at most a file in ``.incoming``, which the
  next start removes;
- a class is renamed with one ``os.rename``; the corrections that name its photos follow it, written
  before the folder moves (the old names stay until after, so no decision is lost whenever a kill comes);
- a deleted class moves, whole, to ``data.root/.trash/`` (inside the project, where nothing reads it).

Photos are named by the sha256 of their bytes; the same bytes anywhere in the project are a duplicate,
counted and not written again. Names are refused when they could name a path or another thing than a class
(``check_name``).
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import scan
from pipeline.data import corrections
from pipeline.data.decode import DECODERS, ImageError, decode_rgb, sniff
from pipeline.errors import PipelineError

INCOMING = ".incoming"
TRASH = ".trash"
MAX_NAME = 100
THUMBNAILS = 12  # photos shown per class
_RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?$", re.IGNORECASE)  # Windows device names
_SPLITS = {"train", "training", "val", "valid", "validation", "test", "testing"}  # the scan reads these as splits


class NameRefused(PipelineError, ValueError):
    """A class name that cannot be a class folder."""


class NoSuchClass(PipelineError, LookupError):
    pass


class ClassExists(PipelineError, FileExistsError):
    pass


class LayoutRefused(PipelineError, ValueError):
    """A project whose classes the app cannot change (splits in folders or in a CSV)."""


def check_name(name: str, reject_label: str = "unknown") -> str:
    """``name`` if it can be a class folder's name, or NameRefused saying why."""
    if not isinstance(name, str) or not name.strip():
        raise NameRefused("a class name cannot be empty")
    if name != name.strip():
        raise NameRefused(f"class name {name.strip()!r} has spaces around it; remove them")
    if len(name) > MAX_NAME:
        raise NameRefused(f"a class name has at most {MAX_NAME} characters ({len(name)} given)")
    if name.lower() == reject_label.lower():
        raise NameRefused(f"{name!r} is the answer for photos like none of the classes (reject.label); "
                          "choose another name")
    if any(c in name for c in "/\\\x00") or ".." in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise NameRefused(f"class name {name!r} could name a path (/, \\, .., control characters); choose another")
    if name.startswith("."):
        raise NameRefused(f"class name {name!r} starts with '.': a hidden folder, which the scan never reads")
    if name.endswith((".", " ")) or _RESERVED.match(name) or any(c in name for c in '<>:"|?*'):
        raise NameRefused(f"class name {name!r} cannot be a folder name on Windows; choose another")
    if name.lower() in _SPLITS or name.lower() in scan._IGNORED_NAMES:
        raise NameRefused(f"class name {name!r} is read as a split or ignored by the scan; choose another")
    return name


@dataclass(frozen=True)
class Added:
    added: int
    duplicates: int
    skipped: list[dict]  # [{"name", "reason"}]
    photos: list[dict]  # [{"name", "sha256", "duplicate"}]


class Folder:
    """The classes under ``root`` and the photos in them; writes under one lock (one server per project)."""

    def __init__(self, project):
        self.project = project  # replaced by the app's next project after a retrain; the lock stays
        self.lock = threading.Lock()
        self.known: dict[str, Path] = {}  # sha256 -> file, of the photos written or shown by this app
        self.renamed: dict[str, str] = {}  # class -> its new name, for the rows of a cache made before a rename
        self._index_shas: dict[str, str] | None = None
        shutil.rmtree(self.root / INCOMING, ignore_errors=True)  # what a killed upload left
        self._reconcile()

    @property
    def root(self) -> Path:
        return self.project.data_root

    def _reconcile(self) -> None:
        """Drop the corrections a rename killed half-way left behind: a row naming no file, whose photo
        (the same file name) another row names where it is."""
        path = corrections.file_of(self.project.params.data, self.project.base)
        if path is None or not path.is_file():
            return
        base = self.project.base
        rows = corrections.read(path)
        there = {key.rsplit("/", 1)[-1] for key in rows if (base / key).is_file()}
        stale = [key for key in rows if not (base / key).exists() and key.rsplit("/", 1)[-1] in there]
        corrections.forget(path, stale)

    # ---------------------------------------------------------------- reading
    def editable(self) -> None:
        params = self.project.params.data
        if params.split_csv:
            raise LayoutRefused(f"the splits are in data.split_csv ({params.split_csv}), which names each photo's "
                                "path; change classes there and in the folders")
        if self.root.is_dir():
            top = scan._class_dirs(self.root)
            if top and all(p.name.lower() in _SPLITS for p in top):
                raise LayoutRefused(f"{self.root} has train/ val/ test/ folders; change the classes inside them")

    def _apart(self) -> Path | None:
        unlabelled = self.project.params.data.unlabelled
        return (self.project.base / unlabelled).resolve() if unlabelled else None

    def class_dirs(self) -> dict[str, Path]:
        if not self.root.is_dir():
            return {}
        apart = self._apart()
        return {p.name: p for p in scan._class_dirs(self.root) if apart is None or p.resolve() != apart}

    def classes(self) -> list[dict]:
        """Each class with its photo count and the names of its newest photos (sha256, for ``/photo``)."""
        out = []
        for name, folder in self.class_dirs().items():
            files = [f for f in scan._walk_files(folder) if sniff_suffix(f)]
            newest = sorted(files, key=lambda f: f.stat().st_mtime_ns, reverse=True)[:THUMBNAILS]
            out.append({"name": name, "photos": len(files), "thumbnails": [self._sha_of(f) for f in newest]})
        return out

    def _sha_of(self, file: Path) -> str:
        stem = file.stem
        if re.fullmatch(r"[0-9a-f]{64}", stem):  # written by this app: the name is the content's hash
            sha = stem
        else:
            sha = hashlib.sha256(file.read_bytes()).hexdigest()
        self.known[sha] = file
        return sha

    def moved(self, relative: str) -> Path:
        """Where a photo the cache knows at ``relative`` (to data.root) is now, its class renamed since."""
        path = self.root / relative
        for _ in range(len(self.renamed)):
            if path.exists():
                break
            first, _, rest = Path(relative).as_posix().partition("/")
            if first not in self.renamed:
                break
            relative = f"{self.renamed[first]}/{rest}"
            path = self.root / relative
        return path

    def file_of(self, sha: str) -> Path | None:
        file = self.known.get(sha)
        return file if file is not None and file.is_file() else None

    def _present(self) -> dict[str, str]:
        """sha256 -> the relative path of every photo the last scan read, and of every photo written since."""
        if self._index_shas is None:
            index = scan.FileIndex(self.project.file_index)
            self._index_shas = {entry[3]: rel for rel, entry in index.old.items() if entry[3]}
        return self._index_shas

    # ---------------------------------------------------------------- classes
    def create(self, name: str) -> dict:
        self.editable()
        check_name(name, self.project.params.reject.label)
        with self.lock:
            existing = {n.lower(): n for n in self.class_dirs()}
            if name.lower() in existing:  # Cat and cat are one folder on macOS and Windows
                raise ClassExists(f"class {existing[name.lower()]!r} exists")
            (self.root / name).mkdir(parents=True)
        return {"name": name, "photos": 0, "thumbnails": []}

    def _folder(self, name: str) -> Path:
        folder = self.class_dirs().get(name)
        if folder is None:
            raise NoSuchClass(f"no class {name!r}")
        return folder

    def rename(self, old: str, new: str) -> dict:
        self.editable()
        check_name(new, self.project.params.reject.label)
        with self.lock:
            folder = self._folder(old)
            existing = {n.lower(): n for n in self.class_dirs() if n != old}
            if new.lower() in existing:
                raise ClassExists(f"class {existing[new.lower()]!r} exists; choose another name")
            target = self.root / new
            moved = self._move_corrections(folder, target, old, new)
            os.rename(folder, target)
            if moved:
                self._drop_corrections(folder, moved)
            self.known = {sha: (target / f.relative_to(folder) if f.is_relative_to(folder) else f)
                          for sha, f in self.known.items()}
            self.renamed[old] = new
            self._index_shas = None
        return {"name": new, "renamed_from": old}

    def _move_corrections(self, folder: Path, target: Path, old: str, new: str) -> list[str]:
        """Copy the decisions on the folder's photos to their names after the rename, relabels to ``old``
        follow the new name; returns the old names, removed once the folder has moved."""
        path = corrections.file_of(self.project.params.data, self.project.base)
        if path is None or not path.is_file():
            return []
        base = self.project.base
        prefix = corrections.key_of(folder, base) + "/"
        decisions = corrections.read(path)
        new_prefix = corrections.key_of(target, base) + "/"
        moved = [d for key, d in decisions.items() if key.startswith(prefix)]
        relabelled = [d for d in decisions.values() if d.action == "relabel" and d.label == old]
        updates = [corrections.Correction(new_prefix + d.path[len(prefix):], d.action,
                                          new if d.label == old else d.label, d.note) for d in moved]
        updates += [corrections.Correction(d.path, d.action, new, d.note) for d in relabelled
                    if not d.path.startswith(prefix)]
        if updates:
            corrections.record(path, updates)
        return [d.path for d in moved]

    def _drop_corrections(self, folder: Path, names: list[str]) -> None:
        path = corrections.file_of(self.project.params.data, self.project.base)
        corrections.forget(path, names)

    def delete(self, name: str) -> dict:
        self.editable()
        with self.lock:
            folder = self._folder(name)
            count = sum(1 for f in scan._walk_files(folder) if sniff_suffix(f))
            (self.root / TRASH).mkdir(exist_ok=True)
            # a folder of its own in the trash: the same class deleted twice in a second keeps both
            trash = Path(tempfile.mkdtemp(dir=self.root / TRASH, prefix=time.strftime("%Y%m%d-%H%M%S-"))) / name
            os.rename(folder, trash)
            self._index_shas = None
        return {"name": name, "photos": count, "moved_to": trash.relative_to(self.project.base).as_posix()}

    # ---------------------------------------------------------------- photos
    def add(self, name: str, uploads: list[tuple[str, bytes]]) -> Added:
        """Write each (file name, bytes) that decodes as a photo into the class, once."""
        self.editable()
        f = self.project.params.features
        checked = []
        skipped = []
        for filename, data in uploads:  # decoded outside the lock: the slow part, and it writes nothing
            reason = _refusal(data, f.max_pixels)
            if reason:
                skipped.append({"name": filename, "reason": reason})
            else:
                checked.append((filename, data, hashlib.sha256(data).hexdigest()))
        added, duplicates, photos = 0, 0, []
        with self.lock:
            folder = self._folder(name)
            present = self._present()
            incoming = self.root / INCOMING
            incoming.mkdir(exist_ok=True)
            for filename, data, sha in checked:
                suffix = DECODERS[sniff(data[:32])].suffixes[0]
                target = folder / f"{sha}{suffix}"
                where = present.get(sha)
                if target.exists() or (where is not None and (self.root / where).is_file()):
                    duplicates += 1
                    photos.append({"name": filename, "sha256": sha, "duplicate": where or target.name})
                    continue
                _write_new(incoming / f"{sha}{suffix}.part", target, data)
                present[sha] = target.relative_to(self.root).as_posix()
                self.known[sha] = target
                added += 1
                photos.append({"name": filename, "sha256": sha, "duplicate": None})
        return Added(added, duplicates, skipped, photos)


def sniff_suffix(file: Path) -> bool:
    from pipeline.data.decode import image_suffixes

    return file.suffix.lower() in image_suffixes()


def _refusal(data: bytes, max_pixels: int) -> str:
    """Why these bytes cannot be a training photo, in a few words, or ''."""
    if not data:
        return "empty file"
    kind = sniff(data[:32])
    if kind not in DECODERS:
        return "not an image in a format read (JPEG, PNG, WEBP, GIF, BMP, HEIC, AVIF)"
    try:
        decode_rgb(io.BytesIO(data), draft_size=64, max_pixels=max_pixels)
    except ImageError as error:
        return " ".join(str(error).split())
    return ""


def _write_new(part: Path, target: Path, data: bytes) -> None:
    """``data`` at ``target``, whole or not at all, never over an existing file."""
    with open(part, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        try:
            os.link(part, target)  # fails if target exists: never replaces a file
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links (FAT, some network shares): checked, then moved
            if target.exists():
                raise FileExistsError(target) from None
            os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the new name survives a power cut too
    finally:
        os.close(directory)
