"""The browser bundle, ``web/`` in export.dir: the page (``web_page/``), model.onnx, model.json and
onnxruntime-web at a pinned version, vendored: the page runs the model offline, from any static file server.

onnxruntime-web comes from the npm registry once (``npm pack``), is checked against the integrity the
registry published for that version, and is kept beside the converted weights; later exports copy it.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.export")

ORT_WEB = "onnxruntime-web"
ORT_WEB_VERSION = "1.31.1"
# the registry's dist.integrity for that version (npm view onnxruntime-web@1.31.1 dist.integrity)
ORT_WEB_INTEGRITY = "sha512-5GeH+bWQ+HxM10z7erGlsWqryrwMbSvm/1tkIsKTT48g0fI19VXVVC435t4t7VsPdSQeS7NmuZPXrQ73k82URw=="
# what the page loads: the WebAssembly build only (no WebGL or WebGPU), its glue module and binary
ORT_WEB_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
PAGE = Path(__file__).resolve().parent / "web_page"


class WebRuntimeError(PipelineError, RuntimeError):
    """onnxruntime-web could not be fetched or is not what the registry published."""


def runtime(cache: Path) -> Path:
    """The folder holding ``ORT_WEB_FILES`` of the pinned onnxruntime-web, fetched once into ``cache``."""
    folder = cache / f"{ORT_WEB}-{ORT_WEB_VERSION}"
    if all((folder / name).is_file() for name in ORT_WEB_FILES):
        return folder
    npm = shutil.which("npm")
    if npm is None:
        raise WebRuntimeError(f"the browser bundle needs {ORT_WEB} {ORT_WEB_VERSION} from the npm registry and "
                              "there is no npm here; install Node.js, or set export.web: false")
    log.info("export: fetching %s %s from the npm registry (once, into %s)", ORT_WEB, ORT_WEB_VERSION, folder)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        done = subprocess.run([npm, "pack", f"{ORT_WEB}@{ORT_WEB_VERSION}", "--silent", "--pack-destination", tmp],
                              capture_output=True, text=True, timeout=600)
        packed = next(Path(tmp).glob("*.tgz"), None)
        if done.returncode or packed is None:
            raise WebRuntimeError(f"npm pack {ORT_WEB}@{ORT_WEB_VERSION} failed: "
                                  f"{(done.stderr.strip().splitlines() or ['no output'])[-1]}; "
                                  "check the npm registry is reachable, or set export.web: false")
        _check_integrity(packed)
        staged = Path(tmp) / "files"
        staged.mkdir()
        with tarfile.open(packed) as archive:
            for name in ORT_WEB_FILES:
                member = archive.getmember(f"package/dist/{name}")
                with archive.extractfile(member) as source, open(staged / name, "wb") as target:
                    shutil.copyfileobj(source, target)
        shutil.rmtree(folder, ignore_errors=True)
        staged.replace(folder)
    return folder


def _check_integrity(packed: Path) -> None:
    algorithm, expected = ORT_WEB_INTEGRITY.split("-", 1)
    digest = base64.b64encode(hashlib.new(algorithm, packed.read_bytes()).digest()).decode()
    if digest != expected:
        raise WebRuntimeError(f"{packed.name} is not the {ORT_WEB} {ORT_WEB_VERSION} the registry published "
                              f"({algorithm} differs); nothing was written")


def write(web: Path, onnx: Path, cache: Path) -> None:
    """``web``: the page, the model and the runtime (export adds model.json once it is written)."""
    web.mkdir()
    for page_file in PAGE.iterdir():
        if page_file.is_file():
            shutil.copy(page_file, web / page_file.name)
    shutil.copy(onnx, web / "model.onnx")
    source = runtime(cache)
    for name in ORT_WEB_FILES:
        shutil.copy(source / name, web / name)
