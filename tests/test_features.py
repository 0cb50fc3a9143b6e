import csv

import h5py
import numpy as np
import pytest

from pipeline import layout
from pipeline.project import open_project
from pipeline.stages import features
from pipeline.stages.features import BadDataError
from pipeline.store import parts as parts_mod
from pipeline.store import table as feature_store

from conftest import CLASS_COLOURS, cached_table, make_image, make_params, table_of
from conftest import CountingBackbone as CountingBuild


def run(project, **sections):
    return features.run(open_project(make_params(project, **sections), project))


def test_first_run_writes_every_image_with_provenance(project):
    result = run(project)
    assert result.n_rows == 36 and result.n_new == 36
    table = table_of(result)
    assert table.features.shape == (36, 16)
    assert sorted(set(table.labels)) == ["misty", "neither", "tigger"]
    assert set(table.splits) <= {"train", "val", "test"}
    assert list(table.sha256) == sorted(table.sha256)
    attrs = table.attrs
    for name in ("backbone", "weights_sha256", "layer", "input_size", "resize", "decode", "preprocessing", "dtype",
                 "library_versions", "stage_version", "key", "params"):
        assert attrs[name] not in ("", None), name
    assert attrs["backbone"] == "tiny" and attrs["input_size"] == 32 and attrs["layer"] == "pooled"
    assert result.path.parent == project / "cache" / "features"


def test_second_run_does_no_backbone_work(project, monkeypatch, caplog):
    run(project)
    counter = CountingBuild(monkeypatch)
    caplog.set_level("INFO")
    result = run(project)
    assert counter.builds == 0 and result.n_new == 0
    assert "features: cache hit (36 images, 0 new)" in caplog.text


def test_incremental_add_change_remove(project, monkeypatch):
    first = run(project)
    before = table_of(first)
    photos = project / "photos"
    make_image(photos / "misty" / "added.png", CLASS_COLOURS["misty"], 7001)
    make_image(photos / "tigger" / "tigger_00.png", CLASS_COLOURS["tigger"], 7002)  # changed content
    (photos / "neither" / "neither_05.png").unlink()
    counter = CountingBuild(monkeypatch)
    result = run(project)
    assert counter.images == 2  # only the added and the changed image
    assert (result.n_new, result.n_removed, result.n_rows) == (2, 2, 36)
    after = table_of(result)
    assert "neither/neither_05.png" not in set(after.paths)
    # rows that did not change keep exactly their features
    old = dict(zip(before.sha256, before.features))
    for sha, row in zip(after.sha256, after.features):
        if sha in old:
            np.testing.assert_array_equal(row, old[sha])


def test_features_are_deterministic_and_float16_storage(project):
    a = table_of(run(project))
    half = run(project, features={"dtype": "float16"})
    with h5py.File(half.path) as f:
        assert f["features"].dtype == np.float16
    b = table_of(half)
    np.testing.assert_allclose(a.features, b.features, rtol=2e-3, atol=1e-3)
    assert half.path != run(project).path  # a cache per storage type


def test_other_stages_params_do_not_touch_the_feature_cache(project, monkeypatch):
    first = run(project)
    mtime = first.path.stat().st_mtime_ns
    counter = CountingBuild(monkeypatch)
    again = run(project, train_head={"C": 0.01, "model": "softmax"}, evaluate={"top_k": 1})
    assert again.path == first.path and counter.builds == 0
    assert first.path.stat().st_mtime_ns == mtime


def test_own_param_is_a_new_cache(project, monkeypatch):
    first = run(project)
    counter = CountingBuild(monkeypatch)
    cropped = run(project, features={"resize": "crop"})
    assert cropped.path != first.path and counter.images == 36


def test_version_bump_is_a_new_cache(project, monkeypatch):
    first = run(project)
    monkeypatch.setattr(layout, "VERSION", layout.VERSION + 1)
    assert run(project).path != first.path


def test_changing_split_fractions_rewrites_splits_without_backbone_work(project, monkeypatch):
    first = table_of(run(project))
    counter = CountingBuild(monkeypatch)
    result = run(project, data={"train_fraction": 0.2, "val_fraction": 0.2, "test_fraction": 0.6})
    second = table_of(result)
    assert counter.builds == 0
    assert (second.splits == "test").sum() > (first.splits == "test").sum()
    assert first.attrs["content_hash"] != second.attrs["content_hash"]


def test_unreadable_images_are_skipped_and_reported(project, monkeypatch):
    photos = project / "photos"
    good = make_image(project / "good.jpg", CLASS_COLOURS["misty"], 8000, size=(200, 200))
    (photos / "misty" / "truncated.jpg").write_bytes(good.read_bytes()[:400])
    (photos / "misty" / "notes.jpg").write_text("hello")
    result = run(project)
    reasons = {s.path: s.reason for s in result.skipped}
    assert reasons["misty/truncated.jpg"].startswith("cannot decode")
    assert reasons["misty/notes.jpg"] == "not an image (unrecognised content)"
    with open(project / "reports" / "skipped.csv") as f:
        assert {row["path"] for row in csv.DictReader(f)} == {"misty/truncated.jpg", "misty/notes.jpg"}
    # the bad image is remembered: the next run neither decodes it nor runs the backbone
    counter = CountingBuild(monkeypatch)
    again = run(project)
    assert counter.builds == 0 and "misty/truncated.jpg" in {s.path for s in again.skipped}


def test_too_many_bad_images_fail_after_keeping_the_good_ones(project):
    for i in range(10):
        (project / "photos" / "tigger" / f"broken_{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 50)
    with pytest.raises(BadDataError, match=r"10 of 46 images .* are unusable .*max_bad_fraction"):
        run(project)
    assert cached_table(make_params(project), project).features.shape[0] == 36


def test_interrupted_run_keeps_committed_parts(project, monkeypatch):
    real_write_part = parts_mod.write
    calls = []

    def write_part_then_crash(*args, **kwargs):
        real_write_part(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(parts_mod, "write", write_part_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(project, features={"commit_every": 10})
    monkeypatch.setattr(parts_mod, "write", real_write_part)
    counter = CountingBuild(monkeypatch)
    result = run(project)
    assert counter.images == 36 - 20  # the two committed parts were kept
    assert result.n_rows == 36
    assert not result.path.with_suffix(".parts").exists()


def test_damaged_cache_is_set_aside_and_rebuilt(project, caplog):
    first = run(project)
    first.path.write_bytes(first.path.read_bytes()[:2000])
    caplog.set_level("WARNING")
    result = run(project)
    assert result.n_new == 36
    assert "rebuilding" in caplog.text
    assert first.path.with_name(first.path.name + ".damaged").exists()


def test_rows_edited_by_hand_are_detected(project):
    first = run(project)
    with h5py.File(first.labels, "r+") as f:
        f["label"][0] = "tigger" if f["label"][0] != b"tigger" else "misty"
    with pytest.raises(feature_store.CacheError, match="content hash"):
        table_of(first)
    with h5py.File(first.path, "r+") as f:
        f["sha256"][0] = "0" * 64
    with pytest.raises(feature_store.CacheError, match="content hash"):
        feature_store.read_index(first.path)


def test_a_second_writer_is_refused(project):
    from filelock import FileLock

    path = layout.cache_file(make_params(project), project)
    path.parent.mkdir(parents=True)
    with FileLock(str(path) + ".lock"):
        with pytest.raises(RuntimeError, match="another 'features' run"):
            run(project)


def test_top_features_are_a_cache_of_their_own_outside_the_pooled_folder(project, monkeypatch, caplog):
    params = make_params(project, train_top={"cut_point": "block0"})
    pooled = features.run(open_project(params, project))
    caplog.set_level("INFO")
    top = features.run_top(open_project(params, project))
    assert top.path.parent == project / "cache" / "top_features" and pooled.path.parent == project / "cache" / "features"
    assert "top-features: recomputing (no cache for these settings yet)" in caplog.text
    with __import__("h5py").File(top.path) as f:
        assert f["features"].dtype == np.float16 and f["features"].shape == (36, 16, 16, 8)
    counter = CountingBuild(monkeypatch)
    caplog.clear()
    features.run_top(open_project(make_params(project, train_top={"cut_point": "block1"}), project))
    assert "top-features: recomputing (train_top.cut_point: block0 -> block1)" in caplog.text
    assert counter.images == 36
    features.run_top(open_project(params, project))
    features.run(open_project(params, project))
    assert counter.builds == 1  # back to block0, and the pooled cache: both hits


def test_features_names_what_changed_when_it_recomputes(project, caplog):
    run(project)
    caplog.set_level("INFO")
    run(project, features={"resize": "crop"})
    assert "features: recomputing (features.resize: squash -> crop)" in caplog.text
