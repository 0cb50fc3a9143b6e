"""The documentation as a reader uses it: README at most 250 lines, every Python snippet of README.md and of the
export page run exactly as printed in a fresh process, answering as predict does."""
import re
import shutil
import subprocess
import sys

import pytest

from pipeline import graph
from pipeline.project import open_project
from pipeline.use import export, predict

from conftest import ROOT, make_params

PAGES = [ROOT / "README.md", ROOT / "docs" / "export.md"]


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
    assert [len(snippets(page)) for page in PAGES] == [1, 2]
