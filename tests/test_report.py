"""The evaluation report: history, diff, plots, DVC files, and the page in a real browser."""
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from pipeline.project import open_project
from pipeline.stages import evaluate, features, report, train_head

from conftest import CLASS_COLOURS, make_dataset, make_image, make_params


@pytest.fixture
def evaluated(tmp_path):
    """A project whose test split has two photos in the wrong folder, so there are mistakes to show."""
    make_dataset(tmp_path / "photos" / "train", per_class=10, classes=("misty", "tigger"))
    make_dataset(tmp_path / "photos" / "test", per_class=4, classes=("misty", "tigger"), seed=3)
    for i in range(2):
        make_image(tmp_path / "photos" / "test" / "misty" / f"really_tigger_{i}.png", CLASS_COLOURS["tigger"], 777 + i,
                   size=(64, 48))
    (tmp_path / "photos" / "train" / "misty" / "broken.jpg").write_text("not an image")
    params = make_params(tmp_path)
    features.run(open_project(params, tmp_path))
    train_head.run(open_project(params, tmp_path))
    return tmp_path, params, evaluate.run(open_project(params, tmp_path))


def test_history_and_diff(evaluated):
    project, params, first = evaluated
    other = make_params(project, train_head={"C": 0.001})
    train_head.run(open_project(other, project))
    second = evaluate.run(open_project(other, project))
    history = report.read_history(project / "reports" / "history.jsonl")
    assert len(history) == 2
    assert history[1]["model_params"]["C"] == 0.001
    assert "accuracy" in second.table and "train-head settings changed: C: auto -> 0.001" in second.table
    change = history[1]["accuracy"] - history[0]["accuracy"]
    assert f"{change:+.4f}" in second.table


def test_first_evaluation_has_nothing_to_compare(evaluated):
    assert "first evaluation" in evaluated[2].table


def test_plots_are_written_beside_the_page(evaluated):
    project = evaluated[0]
    for name in ("confusion_matrix.png", "confusion_matrix_normalized.png", "training_curves.png", "history.png",
                 "reliability.png"):
        with Image.open(project / "reports" / name) as image:
            assert image.format == "PNG" and image.width > 200
    page = (project / "reports" / "index.html").read_text()
    assert "http://" not in page and "https://" not in page  # nothing fetched from a network
    rejected = round(evaluated[2].metrics["rejection"]["rejected_share"] * evaluated[2].metrics["n_test"])
    # five plots (the reliability diagram among them), two misclassified thumbnails, the rejected test photos
    assert page.count("<img") == 5 + 2 + rejected


def test_dvc_plot_file(evaluated):
    project, params, result = evaluated
    rows = (project / "reports" / "predictions.csv").read_text().splitlines()
    assert rows[0] == "path,actual,predicted,probability,score,answer" and len(rows) - 1 == result.metrics["n_test"]


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.body, self.metrics, self.images, self._metric = {}, {}, 0, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.body = attrs
        if tag == "img":
            self.images += 1
        self._metric = attrs.get("data-metric")

    def handle_data(self, data):
        if self._metric and data.strip():
            self.metrics[self._metric] = data.strip()
            self._metric = None


def chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI; .ci/run should have installed it")
        pytest.skip("chromium is not installed (.ci/run installs it)")
    return found


def test_report_in_headless_chromium(evaluated, tmp_path):
    browser = chromium()
    project, params, result = evaluated
    page = (project / "reports" / "index.html").as_uri()
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
             "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-quic", "--virtual-time-budget=5000"]
    dom = subprocess.run(flags + ["--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    shot = tmp_path / "report.png"
    subprocess.run(flags + ["--window-size=1200,2400", f"--screenshot={shot}", page], capture_output=True,
                   timeout=120, check=True)

    parsed = _Collector()
    parsed.feed(dom.stdout)
    rejected = round(result.metrics["rejection"]["rejected_share"] * result.metrics["n_test"])
    images = 7 + rejected  # five plots (the reliability diagram among them), two misclassified, the rejected
    assert parsed.images == images
    assert parsed.body.get("data-images-loaded") == f"{images}/{images}"  # every image decoded in the browser
    assert float(parsed.metrics["rejected_share"].rstrip("%")) / 100 == pytest.approx(
        json.loads((project / "reports" / "metrics.json").read_text())["rejection"]["rejected_share"], abs=5e-4)
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert float(parsed.metrics["accuracy"]) == pytest.approx(metrics["accuracy"], abs=5e-5)
    assert float(parsed.metrics["balanced_accuracy"]) == pytest.approx(metrics["balanced_accuracy"], abs=5e-5)
    assert int(parsed.metrics["n_test"]) == metrics["n_test"]
    for c, m in metrics["per_class"].items():
        assert float(parsed.metrics[f"f1.{c}"]) == pytest.approx(m["f1"], abs=5e-5)
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert image.size == (1200, 2400) and pixels.std() > 10  # something was drawn, not a blank page
