"""inspect: label issues, near-duplicates and leakage, outliers, from the cache; the report at 100 classes."""
import csv
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pipeline import layout
from pipeline.project import open_project
from pipeline.quality import near_duplicates
from pipeline.stages import features, report
from pipeline.store import labels
from pipeline.store import table as feature_store
from pipeline.store.table import CacheError
from pipeline.use import inspect

from conftest import (
    CLASS_COLOURS,
    CountingBackbone,
    cached_table,
    cli,
    make_dataset,
    make_image,
    make_params,
    shared_dataset,
)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_without_a_cache_it_says_what_to_run(project):
    with pytest.raises(CacheError, match=r"^no cached features at .*; run 'make features' first$"):
        inspect.run(open_project(make_params(project), project))


def test_photos_in_the_wrong_folder_are_the_likely_label_errors(tmp_path, monkeypatch):
    make_dataset(tmp_path / "photos", per_class=20, classes=("misty", "tigger"))
    wrong = []
    for i in range(3):  # tigger-coloured photos filed under misty
        wrong.append(make_image(tmp_path / "photos" / "misty" / f"really_tigger_{i}.png", CLASS_COLOURS["tigger"],
                                80_000 + i))
    params = make_params(tmp_path)
    features.run(open_project(params, tmp_path))
    counting = CountingBackbone(monkeypatch)
    result = inspect.run(open_project(params, tmp_path))
    assert counting.builds == 0 and counting.images == 0  # the cache alone: no backbone
    rows = read_csv(tmp_path / "reports" / "label_issues.csv")
    assert list(rows[0]) == ["path", "given", "suggested", "score"]
    flagged = {r["path"]: r for r in rows}
    assert {f"misty/{w.name}" for w in wrong} <= set(flagged)  # every planted error found
    assert len(flagged) <= 5  # and little else
    for w in wrong:
        assert flagged[f"misty/{w.name}"]["suggested"] == "tigger"
    assert [float(r["score"]) for r in rows] == sorted(float(r["score"]) for r in rows)  # most suspicious first
    assert result.summary["label_issues"] == len(rows)


def test_small_classes_get_fewer_folds_and_say_so(tmp_path, caplog):
    make_dataset(tmp_path / "photos", per_class=12, classes=("misty", "tigger"))
    for path in sorted((tmp_path / "photos" / "tigger").iterdir())[3:]:
        path.unlink()  # 3 tigger photos left
    params = make_params(tmp_path, data={"train_fraction": 0.6, "val_fraction": 0.2, "test_fraction": 0.2})
    features.run(open_project(params, tmp_path))
    caplog.set_level("INFO")
    assert inspect.run(open_project(params, tmp_path)).summary["folds"] == 3
    assert "inspect: 3 folds, not 5: the smallest class (tigger) has 3 photos" in caplog.text


def test_one_class_only_is_a_clear_error(tmp_path):
    make_dataset(tmp_path / "photos", per_class=6, classes=("misty",))
    (tmp_path / "params.yaml").write_text("data: {root: photos}\nfeatures: {backbone: tiny}\n")
    out = cli(tmp_path, "features")
    assert out.returncode == 2 and "has 1 class folder(s); a classifier needs at least 2" in out.stderr
    # a cache that holds one class (made by hand): inspect refuses it in one line
    path = tmp_path / "one.h5"
    rows = [(f"{i:064x}", f"misty/{i}.png", "misty", "train") for i in range(5)]
    feature_store.write_table(path, [r[0] for r in rows], lambda a, b: np.ones((b - a, 4), np.float32), (4,),
                              "float32", {"key": "k"})
    project = open_project(make_params(tmp_path), tmp_path)
    target = project.features_file()
    target.parent.mkdir(parents=True)
    shutil.copy(path, target)
    labels.write(project.labels_file(), rows, ["misty"], "k", project.labels_key, {})
    with pytest.raises(inspect.InspectError, match="one class only .*needs at least 2"):
        inspect.run(project)


def test_near_duplicate_pairs_with_a_set_threshold_and_leaks_first(tmp_path):
    make_dataset(tmp_path / "photos", per_class=10, classes=("misty", "tigger"))
    params = make_params(tmp_path, inspect={"near_duplicate_threshold": 0.9999})
    features.run(open_project(params, tmp_path))
    result = inspect.run(open_project(params, tmp_path))
    table = cached_table(params, tmp_path)
    vectors = near_duplicates.unit_vectors(table.features)
    expected = {(min(a, b), max(a, b)) for a in range(len(vectors)) for b in range(len(vectors))
                if a != b and vectors[a] @ vectors[b] >= 0.9999}  # the brute-force answer
    found = {tuple(sorted((list(table.paths).index(q["path_a"]), list(table.paths).index(q["path_b"]))))
             for q in result.near_duplicates}
    assert found == expected
    leaks = [q["leak"] for q in result.near_duplicates]
    assert leaks == sorted(leaks, reverse=True)  # the pairs that straddle splits come first
    assert all(q["leak"] == (q["split_a"] != q["split_b"]) for q in result.near_duplicates)


def test_pairs_and_groups_on_known_vectors():
    vectors = near_duplicates.unit_vectors(np.array([[1, 0, 0], [0.99, 0.1, 0], [0, 1, 0], [0, 0.98, 0.15], [0, 0, 1.0]]))
    found = near_duplicates.pairs(vectors, 0.95)
    assert [(i, j) for i, j, _ in found] in ([(2, 3), (0, 1)], [(0, 1), (2, 3)])
    assert near_duplicates.groups(5, found).tolist() == [0, 0, 2, 2, 4]


def test_outliers_are_the_photos_unlike_any_class(tmp_path):
    make_dataset(tmp_path / "photos", per_class=15, classes=("misty", "tigger"))
    odd = make_image(tmp_path / "photos" / "misty" / "odd.png", (250, 250, 250), 5, size=(48, 40))
    params = make_params(tmp_path, inspect={"outliers": 0.03})
    features.run(open_project(params, tmp_path))
    rows = read_csv(tmp_path / "reports" / "outliers.csv") if inspect.run(open_project(params, tmp_path)) else []
    assert rows[0]["path"] == f"misty/{odd.name}"
    assert float(rows[0]["similarity_own_class"]) < 0.99 and rows[0]["nearest_other_class"] == "tigger"


@pytest.mark.slow
def test_calibrated_threshold_finds_copies_and_grouping_closes_the_leak(tmp_path):
    """Real weights: copies made differently from the calibration's (rotated 3 degrees, or shrunk to a
    third) are found, and data.group_near_duplicates puts each copy in its original's split."""
    source = shared_dataset("dogs_vs_cats_1k")
    for label in ("cats", "dogs"):
        (tmp_path / "photos" / label).mkdir(parents=True)
        for path in sorted((source / label).iterdir())[:30]:
            shutil.copy(path, tmp_path / "photos" / label / path.name)
    originals = sorted((tmp_path / "photos" / "cats").iterdir())[:6]
    for i, path in enumerate(originals):
        with Image.open(path) as image:
            copy = image.rotate(3, expand=False) if i % 2 else image.resize((image.width // 3, image.height // 3))
            copy.convert("RGB").save(path.with_name(f"copy_{path.stem}.jpg"), quality=80)
    params = make_params(tmp_path, features={"backbone": "efficientnet_lite0", "batch_size": 16})
    features.run(open_project(params, tmp_path))
    calibration = json.loads(layout.calibration_file(layout.cache_file(params, tmp_path)).read_text())
    assert calibration["recall_on_copies"] >= 0.9 and calibration["distinct_pairs_above"] <= 0.01
    result = inspect.run(open_project(params, tmp_path))
    pairs = {frozenset((q["path_a"], q["path_b"])) for q in result.near_duplicates}
    planted = {frozenset((f"cats/{p.name}", f"cats/copy_{p.stem}.jpg")) for p in originals}
    assert len(planted & pairs) >= 5  # at least 5 of the 6 planted copies found
    assert len(pairs - planted) <= 2  # few other pairs among 60 distinct photos

    grouped = make_params(tmp_path, features={"backbone": "efficientnet_lite0", "batch_size": 16},
                          data={"group_near_duplicates": True})
    features.run(open_project(grouped, tmp_path))
    split = dict(zip(*[getattr(cached_table(grouped, tmp_path), name)
                       for name in ("paths", "splits")]))
    for pair in planted & pairs:
        a, b = sorted(pair)
        assert split[a] == split[b]
    assert inspect.run(open_project(grouped, tmp_path)).summary["leaking_pairs"] == 0


def test_the_report_stays_readable_and_small_at_100_classes(tmp_path):
    """100 classes, 7,000 test photos: per class worst first, the most confused pairs, a confusion matrix
    of the 20 most confused classes, at most 60 thumbnails; the page under 3 MB."""
    rng = np.random.default_rng(0)
    classes = [f"class_{i:03d}" for i in range(100)]
    matrix = np.diag(rng.integers(40, 70, 100))
    for _ in range(400):
        matrix[rng.integers(100), rng.integers(100)] += rng.integers(1, 4)
    per_class = {c: {"precision": float(rng.uniform()), "recall": float(rng.uniform()), "f1": float(rng.uniform()),
                     "support": int(matrix[i].sum())} for i, c in enumerate(classes)}
    metrics = {"accuracy": 0.7, "balanced_accuracy": 0.69, "n_test": int(matrix.sum()), "per_class": per_class,
               "classes": classes, "confusion_matrix": matrix.tolist(), "model": "train-head"}
    photos = tmp_path / "photos"
    wrong = []
    for i in range(300):
        path = photos / f"{i}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(path, quality=90)
        wrong.append({"path": f"{i}.jpg", "true": classes[i % 100], "predicted": classes[(i + 1) % 100],
                      "p_predicted": 0.9, "p_true": 0.05})
    reports = tmp_path / "reports"
    reports.mkdir()
    page = report.write(reports, report.ReportPage(photos, metrics, wrong, {}, [], {"backbone": "x", "layer": "pooled"},
                                                   {c: {"train": 1, "val": 1, "test": 1} for c in classes}, []))
    text = page.read_text()
    assert page.stat().st_size < 3_000_000
    assert text.count("<figure>") == 60
    import re

    table = text[text.index("<h2>Per class, worst first</h2>"):text.index("<h2>Most confused pairs</h2>")]
    order = re.findall(r"<td>(class_\d+)</td><td data-metric='precision", table)
    assert order == sorted(classes, key=lambda c: per_class[c]["f1"])
    assert "Most confused pairs" in text
    with Image.open(reports / "confusion_matrix.png") as image:
        assert image.width < 2000  # 20 classes drawn, not 100


def test_the_blocked_pair_search_equals_every_pair_compared(monkeypatch):
    """Blocks of 4 rows over 11 vectors (the last block short): the pairs found are exactly those a
    full similarity matrix gives, the pairs in the last rows included."""
    monkeypatch.setattr(near_duplicates, "BLOCK", 4)
    rng = np.random.default_rng(3)
    base = rng.normal(size=(6, 16))
    raw = np.concatenate([base, base[[0, 2, 4]] + 0.05 * rng.normal(size=(3, 16)), base[[5]], base[[5]] * 2])
    vectors = near_duplicates.unit_vectors(raw)
    similarity = vectors @ vectors.T
    expected = {(i, j) for i in range(len(raw)) for j in range(i + 1, len(raw)) if similarity[i, j] >= 0.95}
    assert (9, 10) in expected and len(expected) >= 5  # the planted copies, one pair inside the last block
    assert {(min(i, j), max(i, j)) for i, j, _ in near_duplicates.pairs(vectors, 0.95)} == expected


def test_one_process_finds_the_same_label_issues_without_forking(tmp_path, monkeypatch):
    """The app runs inspect on a request thread: a fork there copies locks other threads hold, and cleanlab's
    worker pool hung the review page. With ``processes=1`` no pool starts, and the findings are the same;
    the app's review asks for that."""
    import multiprocessing

    from pipeline.app import findings

    make_dataset(tmp_path / "photos", per_class=20, classes=("misty", "tigger"))
    for i in range(3):
        make_image(tmp_path / "photos" / "misty" / f"really_tigger_{i}.png", CLASS_COLOURS["tigger"], 80_000 + i)
    params = make_params(tmp_path)
    features.run(open_project(params, tmp_path))
    pools = []
    real_pool = multiprocessing.Pool

    def pool(*args, **kwargs):
        pools.append(args)
        return real_pool(*args, **kwargs)

    monkeypatch.setattr(multiprocessing, "Pool", pool)
    forked = inspect.run(open_project(params, tmp_path), processes=2).label_issues
    assert pools  # the check sees a pool when one starts
    pools.clear()
    alone = inspect.run(open_project(params, tmp_path), processes=1).label_issues
    assert not pools and alone == forked

    asked = {}

    def spy(project, processes=None):
        asked["processes"] = processes
        raise RuntimeError("spied")

    monkeypatch.setattr(inspect, "run", spy)
    with pytest.raises(RuntimeError, match="spied"):
        findings.findings(SimpleNamespace(project=open_project(params, tmp_path)))
    assert asked == {"processes": 1}
