"""The export panel's work: what ``export`` wrote (``export.dir``), whether it is the model served, each format's
parity figures, a format as one download (a folder as a zip), and the snippet that loads it."""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.errors import PipelineError

# how each download is used, in a few lines (docs/export.md has the whole story)
SNIPPETS = {
    "model.onnx": "import numpy as np, onnxruntime as ort\n"
                  "from PIL import Image\n"
                  "session = ort.InferenceSession('model.onnx')\n"
                  "image = np.asarray(Image.open('photo.jpg').convert('RGB'))[None]\n"
                  "probabilities, score = session.run(['probabilities', 'score'], {'image': image})",
    "model.tflite": "import numpy as np\n"
                    "from ai_edge_litert.interpreter import Interpreter\n"
                    "from PIL import Image\n"
                    "runner = Interpreter('model.tflite').get_signature_runner('serving_default')\n"
                    "image = np.asarray(Image.open('photo.jpg').convert('RGB'))[None]\n"
                    "out = runner(image=image)  # out['probabilities'], out['score']",
    "model.keras": "import keras, numpy as np\n"
                   "import pipeline.training.layers  # registers the resize and the score's layers\n"
                   "from PIL import Image\n"
                   "model = keras.saving.load_model('model.keras')\n"
                   "out = model(np.asarray(Image.open('photo.jpg').convert('RGB'))[None])",
    "saved_model": "import numpy as np, tensorflow as tf\n"
                   "from PIL import Image\n"
                   "serve = tf.saved_model.load('saved_model').signatures['serve']\n"
                   "out = serve(image=tf.constant(np.asarray(Image.open('photo.jpg').convert('RGB'))[None]))",
    "web": "python -m http.server -d web 8000   # then open http://127.0.0.1:8000: the model in a page, offline",
    "labels.txt": "labels = open('labels.txt').read().splitlines()  # in the order of the probabilities",
    "model.json": "import json; meta = json.load(open('model.json'))  # classes, threshold, parity, provenance",
}
EXTRA = ("labels.txt", "model.json")


class NotExported(PipelineError, LookupError):
    """No export of the model served yet."""


def _folder(served) -> Path:
    return served.project.base / served.params.export.dir


def _meta(served) -> dict | None:
    path = _folder(served) / "model.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def describe(served) -> dict:
    meta = _meta(served)
    served_key = served.trained.key if served.ready else None
    exported_key = meta["provenance"]["model_key"] if meta else None
    folder = _folder(served)
    formats = []
    if meta:
        for name, figures in (meta.get("parity") or {}).items():
            path = folder / name
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else \
                (path.stat().st_size if path.exists() else 0)
            formats.append({"format": name, "bytes": size, "parity": figures, "snippet": SNIPPETS.get(name, ""),
                            "zip": path.is_dir()})
        for name in ("web", *EXTRA):
            path = folder / name
            if path.exists() and name not in {f["format"] for f in formats}:
                size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else \
                    path.stat().st_size
                formats.append({"format": name, "bytes": size, "parity": None, "snippet": SNIPPETS.get(name, ""),
                                "zip": path.is_dir()})
    return {"model": served_key, "exported_model": exported_key,
            "current": exported_key is not None and exported_key == served_key,
            "tolerance": served.params.export.tolerance, "formats": formats}


def run(served) -> dict:
    from pipeline import progress
    from pipeline.use import export

    progress.report("export")
    started = time.perf_counter()
    result = export.run(served.project)
    return {"folder": result.folder.name, "files": sorted(result.files),
            "seconds": round(time.perf_counter() - started, 2)}


def file_of(served, name: str) -> tuple[Path, str, Path | None]:
    """(the file to send, its download name, the temporary folder to remove after sending, if any)."""
    meta = _meta(served)
    if meta is None:
        raise NotExported("nothing exported yet: export first (POST /api/export)")
    if not served.ready or meta["provenance"]["model_key"] != served.trained.key:
        raise NotExported(f"the export is of model {meta['provenance']['model_key'][:12]}, not the one served; "
                          "export again")
    allowed = set(meta.get("parity") or {}) | {"web", *EXTRA}
    path = _folder(served) / name
    if name not in allowed or not path.exists():
        raise LookupError(f"no exported format {name!r}; exported: {', '.join(sorted(allowed))}")
    if path.is_file():
        return path, name, None
    tmp = Path(tempfile.mkdtemp(prefix="photohead-export-"))
    archive = shutil.make_archive(str(tmp / name), "zip", root_dir=path.parent, base_dir=name)
    return Path(archive), f"{name}.zip", tmp
