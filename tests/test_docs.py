"""The documentation as a reader uses it: README at most 250 lines, every Python snippet of README.md and of the
page "Use the model in your app" run exactly as printed in a fresh process, answering as predict does; the
ONNX Runtime snippet in a virtual environment with only onnxruntime, numpy and Pillow."""
import re
import shutil
import subprocess
import sys

import pytest

from pipeline import graph
from pipeline.project import open_project
from pipeline.use import export, predict

from conftest import ROOT, make_params

PAGES = [ROOT / "README.md", ROOT / "docs" / "use.md"]


def snippets(page):
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.DOTALL)


def test_the_readme_is_short_and_links_only_pages_that_exist():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for target in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / target).is_file(), target
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f": {page.name}" in nav, f"{page.name} is not in mkdocs.yml's nav"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from conftest import make_dataset

    project = tmp_path_factory.mktemp("docs")
    make_dataset(project / "photos")
    p = open_project(make_params(project), project)
    graph.run("evaluate", p)
    export.run(p)
    shutil.copy(project / "photos" / "tigger" / "tigger_03.png", project / "photo.jpg")  # a PNG named .jpg: PIL sniffs
    return p


@pytest.mark.parametrize("page, number", [(page.name, i) for page in PAGES for i in range(len(snippets(page)))])
def test_every_snippet_runs_as_printed_and_answers_as_predict(exported, page, number):
    code = snippets(next(p for p in PAGES if p.name == page))[number]
    out = subprocess.run([sys.executable, "-c", code], cwd=exported.base, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"})  # no pipeline on the path
    assert out.returncode == 0, out.stderr[-2000:]
    expected = predict.run(exported, [exported.base / "photo.jpg"])[0].answer
    assert out.stdout.split()[0] == expected


def test_every_page_snippet_is_counted():
    """The parametrisation above sees the snippets: a page that lost its snippets would pass silently."""
    assert [len(snippets(page)) for page in PAGES] == [1, 3]


def _pinned(name: str) -> str:
    lock = (ROOT / "requirements.lock").read_text()
    return re.search(rf"(?im)^{re.escape(name)}==\S+", lock).group(0)


def test_the_onnx_snippet_needs_only_onnxruntime_numpy_and_pillow(exported, tmp_path):
    """In a new virtual environment with nothing but those three (no TensorFlow, no photohead)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              *map(_pinned, ("onnxruntime", "numpy", "pillow"))],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True)
    assert "tensorflow" not in listed.stdout.lower() and "photohead" not in listed.stdout.lower()
    code = next(c for c in snippets(ROOT / "docs" / "use.md") if "onnxruntime.InferenceSession" in c)
    out = subprocess.run([str(python), "-c", code], cwd=exported.base, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[0] == predict.run(exported, [exported.base / "photo.jpg"])[0].answer
