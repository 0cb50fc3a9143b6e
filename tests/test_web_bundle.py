"""The browser bundle (models/web/) in the real Chromium CI installs, served by Python's own static file
server on 127.0.0.1: the page's window.photohead.classify answers as predict does, offline."""
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_browser import browser  # noqa: F401  (the module's Chromium)

from pipeline import graph
from pipeline.project import open_project
from pipeline.use import export, predict, web

from conftest import make_dataset, make_params

TOLERANCE = 1e-4  # probabilities and score, page against predict (measured: see the test's output)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    base = tmp_path_factory.mktemp("web")
    make_dataset(base / "photos", per_class=10)
    project = open_project(make_params(base, export={"web": True}), base)
    graph.run("evaluate", project)
    result = export.run(project)
    folder = result.folder / "web"
    shutil.copytree(base / "photos", folder / "photos")  # the page fetches them from its own origin
    server = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
                               "--directory", str(folder)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = server.stdout.readline()
    port = int(re.search(r"port (\d+)", line).group(1))
    yield project, folder, f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=10)


def test_the_bundle_holds_the_page_the_model_and_the_pinned_runtime(bundle):
    project, folder, _ = bundle
    names = {p.name for p in folder.iterdir()}
    assert {"index.html", "photohead.js", "model.onnx", "model.json", *web.ORT_WEB_FILES} <= names
    assert (folder / "model.onnx").read_bytes() == (folder.parent / "model.onnx").read_bytes()
    page = (folder / "index.html").read_text() + (folder / "photohead.js").read_text()
    assert not re.search(r"(src|href)=\"(https?:)?//", page) and "fetch(\"http" not in page  # nothing from another host


def test_the_page_answers_as_predict_does(browser, bundle):  # noqa: F811
    project, folder, origin = bundle
    browser.get(origin + "/index.html")
    browser.set_script_timeout(120)
    meta = browser.execute_async_script("window.photohead.ready.then(arguments[0], e => arguments[0](String(e)))")
    assert isinstance(meta, dict) and meta["classes"] == ["misty", "neither", "tigger"], meta
    test_photos = sorted(p.relative_to(folder / "photos").as_posix() for p in (folder / "photos").rglob("*.png"))
    expected = {p.path: p for p in predict.run(project, [project.base / "photos" / t for t in test_photos], 3)}
    answers = browser.execute_async_script("""
        const [paths, done] = [arguments[0], arguments[1]];
        (async () => {
          const out = {};
          for (const path of paths) {
            const started = performance.now();
            out[path] = await window.photohead.classify("photos/" + path);
            out[path].ms = performance.now() - started;
          }
          return out;
        })().then(done, e => done(String(e)));""", test_photos)
    assert isinstance(answers, dict), answers
    diffs, scores = [], []
    for path in test_photos:
        page, want = answers[path], expected[str(project.base / "photos" / path)]
        assert page["answer"] == want.answer, path
        assert page["accepted"] == (want.answer != meta["rejection"]["label"])
        assert page["label"] == want.labels[0]
        probabilities = dict(zip(want.labels, want.probabilities))
        diffs.append(max(abs(page["probabilities"][c] - probabilities[c]) for c in probabilities))
        scores.append(abs(page["score"] - want.score))
    print(f"page against predict on {len(test_photos)} photos: max |diff| probabilities {max(diffs):.2e}, "
          f"score {max(scores):.2e}; median {np.median([a['ms'] for a in answers.values()]):.1f} ms a photo")
    assert max(diffs) <= TOLERANCE and max(scores) <= TOLERANCE
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(r => r.name)")
    assert resources and all(r.startswith(origin) for r in resources), resources  # offline: nothing else fetched
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_without_npm_the_bundle_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(web.WebRuntimeError, match="no npm here; install Node.js, or set export.web: false"):
        web.runtime(tmp_path)


def test_a_runtime_that_is_not_what_the_registry_published_is_refused(tmp_path, monkeypatch):
    (tmp_path / "fake.tgz").write_bytes(b"not the package")
    with pytest.raises(web.WebRuntimeError, match="is not the onnxruntime-web"):
        web._check_integrity(tmp_path / "fake.tgz")


def test_the_docs_snippet_runs_in_the_page_as_printed(browser, bundle):  # noqa: F811
    from conftest import ROOT

    project, folder, origin = bundle
    snippet = re.search(r"```js\n(.*?)```", (ROOT / "docs" / "use.md").read_text(), re.DOTALL).group(1)
    shutil.copy(project.base / "photos" / "tigger" / "tigger_03.png", folder / "photo.jpg")
    browser.get(origin + "/index.html")
    browser.set_script_timeout(120)
    result = browser.execute_async_script(
        f"const done = arguments[0]; (async () => {{ {snippet}; return result; }})().then(done, e => done(String(e)))")
    assert isinstance(result, dict), result
    assert result["answer"] == predict.run(project, [folder / "photo.jpg"])[0].answer == "tigger"
    assert set(result) == {"answer", "label", "probabilities", "score", "accepted"}


def test_the_webcam_answers_every_frame_as_predict_answers_that_frame(browser, bundle, tmp_path):  # noqa: F811
    """Chromium's fake webcam (a moving test pattern): the page answers frame after frame, and the last
    frame's answer is predict's on the same pixels (saved losslessly by the page)."""
    import base64

    from selenium.webdriver.common.by import By

    project, folder, origin = bundle
    browser.get(origin + "/index.html")
    browser.set_script_timeout(120)
    meta = browser.execute_async_script("window.photohead.ready.then(arguments[0], e => arguments[0](String(e)))")
    browser.find_element(By.ID, "camera").click()
    frames = browser.execute_async_script("""
        const done = arguments[0];
        const poll = () => {
          const f = window.photohead.lastFrame();
          f && f.frames >= 3 ? done(f) : setTimeout(poll, 100);
        };
        setTimeout(() => done("no frame in 60 s: " + document.getElementById("status").textContent), 60000);
        poll();""")
    assert isinstance(frames, dict), frames
    assert browser.find_element(By.ID, "answer").text in {*meta["classes"], meta["rejection"]["label"]}
    photo = tmp_path / "frame.png"
    photo.write_bytes(base64.b64decode(frames["png"].split(",", 1)[1]))
    want = predict.run(project, [photo], 3)[0]
    probabilities = dict(zip(want.labels, want.probabilities))
    assert frames["answer"] == want.answer and frames["label"] == want.labels[0]
    assert max(abs(frames["probabilities"][c] - p) for c, p in probabilities.items()) <= TOLERANCE
    assert abs(frames["score"] - want.score) <= TOLERANCE
    assert not browser.find_element(By.ID, "video").get_attribute("hidden")
