"""Find the labelled images under a data root and give each a split.

Layouts: ``root/<class>/...`` (split by content hash), ``root/{train,val,test}/<class>/...``
(explicit split), or ``root/<class>/...`` plus ``data.split_csv`` (explicit split).

The hash split: the first 64 bits of an image's sha256, as a fraction of 2**64, fall into
[0, train) -> train, [train, train+val) -> val, the rest -> test. The same bytes always land in
the same split, exact duplicates cannot straddle splits, and adding images never moves old ones.

``data.corrections`` (``data.corrections``) is applied here: a relabelled photo takes its new label,
an excluded one is skipped. Photos under ``data.unlabelled`` come back apart (split ``unlabelled``,
no label) unless a correction labels them: they then join the train split.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data import corrections as corrections_mod
from pipeline.data import decode
from pipeline.data.corrections import UNLABELLED
from pipeline.data.decode import image_suffixes, sniff, unread_format
from pipeline.errors import PipelineError
from pipeline.fingerprint import atomic_write_text
from pipeline.params import DataParams

UNREAD_PREFIX = "unread:"  # the file index's format of an image in a format not read
UNREAD_REASON = "an image format not read"  # the start of its skip reason
EXCLUDED = "excluded in"  # the start of the skip reason of a photo the corrections exclude
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validation": "val", "test": "test", "testing": "test"}
_IGNORED_NAMES = {"thumbs.db", "desktop.ini", "__macosx"}


class DatasetError(PipelineError, ValueError):
    """A data root that cannot be used; the message names the folder."""


@dataclass(frozen=True)
class ImageRecord:
    sha256: str
    path: str  # relative to the data root, with forward slashes
    label: str
    split: str
    format: str
    duplicates: tuple[str, ...] = ()  # other paths with the same bytes and label


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str
    format: str = ""  # the image format, where the content is one (skipped.csv's format column)


@dataclass
class Dataset:
    root: Path
    classes: tuple[str, ...]
    records: list[ImageRecord]  # one per distinct content, sorted by path
    skipped: list[Skipped] = field(default_factory=list)
    split_mode: str = "hash"
    files_read: int = 0  # files read and hashed by this scan (the rest came from the stat index)
    unlabelled: list[ImageRecord] = field(default_factory=list)  # data.unlabelled's photos without a label yet
    corrections: dict = field(default_factory=dict)  # path -> corrections.Correction, as read
    present: set = field(default_factory=set)  # sha256 of every image file found, used or skipped


def unread_summary(skipped: list[Skipped]) -> str:
    """"3 photos in formats not read: 2 JPEG XL, 1 camera RAW", or "" when there are none."""
    counts = Counter(s.format for s in skipped if s.reason.startswith(UNREAD_REASON))
    if not counts:
        return ""
    total = sum(counts.values())
    return (f"{total} photo{'s' if total > 1 else ''} in formats not read: "
            + ", ".join(f"{n} {name}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))))


def hash_split(sha256: str, params: DataParams) -> str:
    position = int(sha256[:16], 16) / 2.0**64
    if position < params.train_fraction:
        return "train"
    if position < params.train_fraction + params.val_fraction:
        return "val"
    return "test"


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in _IGNORED_NAMES


def _walk_files(folder: Path):
    """Files below ``folder``, sorted, without following directory links (no symlink loops)."""
    for current, dirs, files in os.walk(folder, followlinks=False, onerror=None):
        dirs[:] = sorted(d for d in dirs if not _ignored(d))
        for name in sorted(files):
            if not _ignored(name):
                yield Path(current) / name


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _ignored(p.name))


def scan(params: DataParams, base_dir: str | Path = ".", index_path: Path | None = None) -> Dataset:
    """Hash and sniff every file under ``params.root`` (relative to ``base_dir``). With ``index_path``,
    files whose size and modification time are unchanged since the last scan are not read again."""
    root = Path(base_dir) / params.root
    if not root.is_dir():
        raise DatasetError(f"data.root: no folder at {root}; create it with one sub-folder per class")
    top = _class_dirs(root)
    explicit = bool(top) and all(p.name.lower() in _SPLIT_ALIASES for p in top)
    if explicit and params.split_csv:
        raise DatasetError(f"{root} has train/val/test folders and data.split_csv is set; use one of them")
    csv_splits = _read_split_csv(Path(base_dir) / params.split_csv, root) if params.split_csv else None
    apart = (Path(base_dir) / params.unlabelled).resolve() if params.unlabelled else None  # not a class
    candidates, class_dirs = _candidates(root, top if explicit else [root], explicit, apart)
    skipped: list[Skipped] = []
    index = FileIndex(index_path)
    records = _records(_by_content(candidates, root, index, csv_splits, params.split_csv, skipped), params, skipped)
    classes = tuple(sorted(class_dirs))
    decisions = corrections_mod.decided(corrections_mod.read(corrections_mod.file_of(params, base_dir)))
    pool = _unlabelled(params, Path(base_dir), root, index, {r.sha256 for r in records}, skipped)
    index.save()
    records, pool = _corrected(records, pool, decisions, classes, root, Path(base_dir), params, skipped)
    labelled = {r.label for r in records}
    empty = [name for name in classes if name not in labelled]
    if empty:
        folders = ", ".join(str(d) for name in empty for d in class_dirs[name])
        raise DatasetError(f"class folder {folders} has no usable images; add some or remove the folder")
    mode = "folders" if explicit else ("csv" if csv_splits is not None else "hash")
    present = {entry[3] for entry in index.new.values() if entry[3]}
    return Dataset(root, classes, records, sorted(skipped, key=lambda s: s.path), mode, index.reads, pool, decisions,
                   present)


def _candidates(root: Path, split_dirs: list[Path], explicit: bool, apart: Path | None = None):
    """([(file, label, forced split or None)], {class: its folders}) of every file under the class folders;
    ``apart``: the data.unlabelled folder, never a class even where it sits inside data.root."""
    candidates: list[tuple[Path, str, str | None]] = []
    class_dirs: dict[str, list[Path]] = {}
    for split_dir in split_dirs:
        forced = _SPLIT_ALIASES[split_dir.name.lower()] if explicit else None
        for class_dir in _class_dirs(split_dir):
            if apart is not None and class_dir.resolve() == apart:
                continue
            class_dirs.setdefault(class_dir.name, []).append(class_dir)
            candidates += [(f, class_dir.name, forced) for f in _walk_files(class_dir)]
    if len(class_dirs) < 2:
        raise DatasetError(f"data.root {root} has {len(class_dirs)} class folder(s); a classifier needs at least 2")
    return candidates, class_dirs


def _by_content(candidates, root: Path, index: FileIndex, csv_splits: dict | None, split_csv: str | None,
                skipped: list[Skipped]) -> dict:
    """{sha256: [(path, label, forced split, format)]} of the image files among ``candidates``."""
    by_sha: dict[str, list[tuple[str, str, str | None, str]]] = {}
    for file, label, forced in candidates:
        relative = file.relative_to(root).as_posix()
        identified = _identify(index, file, relative, skipped)
        if identified is None:
            continue
        sha, image_format = identified
        if csv_splits is not None:
            forced = csv_splits.get(relative)
            if forced is None:
                skipped.append(Skipped(relative, f"not listed in {split_csv}"))
                continue
        by_sha.setdefault(sha, []).append((relative, label, forced, image_format))
    return by_sha


def _records(by_sha: dict, params: DataParams, skipped: list[Skipped]) -> list[ImageRecord]:
    """One record per distinct content, sorted by path; copies in two classes or two forced splits skipped."""
    records = []
    for sha, copies in by_sha.items():
        labels = sorted({label for _, label, _, _ in copies})
        if len(labels) > 1:
            for relative, label, _, _ in copies:
                skipped.append(Skipped(relative, f"label conflict: the same image is in {' and '.join(labels)}"))
            continue
        forced_splits = sorted({forced for _, _, forced, _ in copies if forced})
        if len(forced_splits) > 1:
            for relative, _, _, _ in copies:
                skipped.append(Skipped(relative, f"split conflict: the same image is in {' and '.join(forced_splits)}"))
            continue
        copies.sort()
        relative, label, forced, image_format = copies[0]
        split = forced or hash_split(sha, params)
        records.append(ImageRecord(sha, relative, label, split, image_format, tuple(c[0] for c in copies[1:])))
    return sorted(records, key=lambda r: r.path)


def _identify(index: FileIndex, file: Path, relative: str, skipped: list[Skipped]) -> tuple[str, str] | None:
    """(sha256, image format) of an image file; None for one that is skipped (recorded with the reason) or,
    for other files (notes, .DS_Store, ...), ignored quietly."""
    try:
        sha, image_format, size = index.identify(file, relative)
    except OSError as error:
        skipped.append(Skipped(relative, f"cannot read: {error.strerror or error}"))
        return None
    if image_format is None and sha is None:
        return None  # not an image, nor meant to be one: passed over quietly
    if image_format and image_format.startswith(UNREAD_PREFIX):
        name = image_format.removeprefix(UNREAD_PREFIX)
        skipped.append(Skipped(relative, f"{UNREAD_REASON} (convert it to JPEG, PNG, HEIC or AVIF)", name))
    elif not sha:
        skipped.append(Skipped(relative, "empty file" if not size else "not an image (unrecognised content)"))
    else:
        return sha, image_format
    return None


def _unlabelled(params: DataParams, base: Path, root: Path, index: FileIndex, labelled: set[str],
                skipped: list[Skipped]) -> list[ImageRecord]:
    """The photos of data.unlabelled (paths relative to the data root), one per content, none that is
    already labelled."""
    if not params.unlabelled:
        return []
    folder = base / params.unlabelled
    if not folder.is_dir():
        raise DatasetError(f"data.unlabelled: no folder at {folder}; create it or set data.unlabelled: null")
    by_sha: dict[str, list[tuple[str, str]]] = {}
    for file in _walk_files(folder):
        relative = Path(os.path.relpath(file, root)).as_posix()
        identified = _identify(index, file, relative, skipped)
        if identified is None:
            continue
        sha, image_format = identified
        if sha not in labelled:
            by_sha.setdefault(sha, []).append((relative, image_format))
    pool = []
    for sha, copies in by_sha.items():
        copies.sort()
        pool.append(ImageRecord(sha, copies[0][0], "", UNLABELLED, copies[0][1], tuple(c[0] for c in copies[1:])))
    return sorted(pool, key=lambda r: r.path)


def _corrected(records, pool, decisions: dict, classes, root: Path, base: Path, params: DataParams,
               skipped: list[Skipped]):
    """(labelled records, unlabelled records) with the decisions applied."""
    if not decisions:
        return records, pool
    name = params.corrections

    def decision(record: ImageRecord):
        for path in (record.path, *record.duplicates):
            found = decisions.get(corrections_mod.key_of(root / path, base))
            if found is not None:
                return found
        return None

    def checked(label: str) -> str:
        if label not in classes:
            raise corrections_mod.CorrectionsError(f"{name}: label {label!r} is not a class (the class folders: "
                                                   f"{', '.join(classes)}); fix the row or add the folder")
        return label

    kept, still_unlabelled = [], []
    for record in records + pool:
        found = decision(record)
        if found is None or found.action == "keep":
            (still_unlabelled if record.split == UNLABELLED else kept).append(record)
        elif found.action == "exclude":
            skipped += [Skipped(path, f"{EXCLUDED} {name}") for path in (record.path, *record.duplicates)]
        elif record.split == UNLABELLED:  # labelled by the user: it teaches the model, val and test stay the measure
            kept.append(dataclasses.replace(record, label=checked(found.label), split="train"))
        else:
            kept.append(dataclasses.replace(record, label=checked(found.label)))
    kept.sort(key=lambda r: r.path)
    return kept, still_unlabelled


class FileIndex:
    """Remembers each file's sha256 and format by (path, size, mtime in ns, inode), the same test
    rsync and git use: a file whose stat is unchanged is not read and hashed again. Anything that
    rewrites a file changes its mtime; a copy over it with the mtime preserved also changes the inode."""

    VERSION = 2  # 2: formats not read, and files named as images that are not

    def __init__(self, path: Path | None):
        self.path = path
        self.old: dict = {}
        self.new: dict = {}
        self.reads = 0  # files read and hashed in this scan
        if path is not None and path.is_file():
            try:
                stored = json.loads(path.read_text())
                if stored.get("version") == self.VERSION and stored.get("decoders") == _decoders():
                    self.old = stored["files"]  # another set of decoders tells images from other files anew
            except (OSError, ValueError, KeyError):
                self.old = {}  # a damaged index only costs a full rehash

    def identify(self, file: Path, relative: str) -> tuple[str | None, str | None, int]:
        """(sha256 or None, image format or None, size in bytes). The format is ``UNREAD_PREFIX`` + its name
        for an image in a format not read; None for a file that is not an image at all, and then the
        sha256 is "" when the file's name or size says it was meant to be one (reported) and None otherwise
        (notes, .DS_Store: passed over)."""
        stat = file.stat()
        signature = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        known = self.old.get(relative)
        if known is not None and known[:3] == signature:
            self.new[relative] = known
            return known[3], known[4], stat.st_size
        data = file.read_bytes()
        self.reads += 1
        image_format = sniff(data[:32])
        sha = hashlib.sha256(data).hexdigest() if image_format else None
        if image_format is None:
            unread = unread_format(data[:32], file.suffix)
            if unread:
                image_format = UNREAD_PREFIX + unread
            elif file.suffix.lower() in image_suffixes() or not data:
                sha = ""  # meant to be an image: reported
        self.new[relative] = [*signature, sha, image_format]
        return sha, image_format, len(data)

    def save(self) -> None:
        if self.path is not None and self.new != self.old:
            atomic_write_text(self.path, json.dumps({"version": self.VERSION, "decoders": _decoders(),
                                                     "files": self.new}))


def _decoders() -> list:
    """What the file index's formats depend on: the registered decoders and their version."""
    return [decode.VERSION, *sorted(decode.DECODERS)]


def _read_split_csv(path: Path, root: Path) -> dict[str, str]:
    if not path.is_file():
        raise DatasetError(f"data.split_csv: no file at {path}")
    splits = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "split"} <= set(reader.fieldnames):
            raise DatasetError(f"{path}: expected columns path,split (paths relative to {root})")
        for line, row in enumerate(reader, start=2):
            split = _SPLIT_ALIASES.get((row["split"] or "").strip().lower())
            if split is None:
                raise DatasetError(f"{path}:{line}: split {row['split']!r} is not one of train, val, test")
            splits[Path(row["path"].strip()).as_posix()] = split
    return splits
