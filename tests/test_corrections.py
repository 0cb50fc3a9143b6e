"""data.corrections and data.unlabelled: decisions applied by the scan, photos never touched, the head
alone retrains, writers lose nothing."""
import csv
import hashlib
import multiprocessing
import os
import signal
import time

import pytest

from pipeline import scan
from pipeline.data import corrections
from pipeline.project import open_project
from pipeline.stages import features, train_head
from pipeline.use import inspect

from conftest import CLASS_COLOURS, CountingBackbone, cli, make_dataset, make_image, make_params


def snapshot(folder):
    """Every file under ``folder``: its bytes' sha256 and its mtime."""
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_corrections(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "action", "label"])
        writer.writerows(rows)


def test_the_scan_applies_relabel_exclude_and_keep_and_never_touches_a_photo(project):
    before = snapshot(project / "photos")
    write_corrections(project / "corrections.csv", [("photos/misty/misty_00.png", "relabel", "tigger"),
                                                    ("photos/misty/misty_01.png", "exclude", ""),
                                                    ("photos/misty/misty_02.png", "keep", "")])
    data = scan.scan(make_params(project).data, project)
    by_path = {r.path: r for r in data.records}
    assert by_path["misty/misty_00.png"].label == "tigger"
    assert "misty/misty_01.png" not in by_path
    assert [s.reason for s in data.skipped if s.path == "misty/misty_01.png"] == ["excluded in corrections.csv"]
    assert by_path["misty/misty_02.png"].label == "misty"
    assert by_path["misty/misty_03.png"].label == "misty"
    assert snapshot(project / "photos") == before


def test_a_relabel_retrains_the_head_alone_and_says_why(project, monkeypatch, caplog):
    params = make_params(project)
    features.run(open_project(params, project))
    first = train_head.run(open_project(params, project))
    counting = CountingBackbone(monkeypatch)
    corrections.record(project / "corrections.csv", [corrections.Correction("photos/misty/misty_00.png", "relabel",
                                                                            "tigger")])
    caplog.set_level("INFO")
    result = features.run(open_project(params, project))
    assert counting.images == 0 and result.n_new == 0  # no photo through the backbone again
    second = train_head.run(open_project(params, project))
    assert second.key != first.key and second.trained_now
    assert "data.corrections: none -> 1 rows" in caplog.text  # the recomputing line names the corrections
    labels = {path: label for path, label in zip(*_column(result, "path", "label"))}
    assert labels["misty/misty_00.png"] == "tigger"
    assert counting.images == 0


def _column(result, *names):
    """Columns of the labelling a features run wrote for its params."""
    import h5py

    with h5py.File(result.labels, "r") as f:
        return [f[name].asstr()[...].tolist() for name in names]


def test_an_excluded_photo_leaves_every_split_and_a_keep_changes_no_key(project):
    params = make_params(project)
    features.run(open_project(params, project))
    first = train_head.run(open_project(params, project))
    corrections.record(project / "corrections.csv", [corrections.Correction("photos/neither/neither_05.png", "keep")])
    features.run(open_project(params, project))
    assert train_head.run(open_project(params, project)).key == first.key  # keep: nothing to retrain
    corrections.record(project / "corrections.csv", [corrections.Correction("photos/neither/neither_05.png",
                                                                            "exclude")])
    result = features.run(open_project(params, project))
    assert "neither/neither_05.png" not in _column(result, "path")[0]
    assert train_head.run(open_project(params, project)).key != first.key
    skipped = (project / "reports" / "skipped.csv").read_text()
    assert "neither/neither_05.png,,excluded in corrections.csv" in skipped


def test_unlabelled_photos_are_cached_retrain_nothing_and_join_train_when_labelled(project, monkeypatch):
    pool = project / "to_label"
    for i in range(4):
        make_image(pool / f"new_{i}.png", CLASS_COLOURS["tigger"], 70_000 + i)
    params = make_params(project)
    features.run(open_project(params, project))
    first = train_head.run(open_project(params, project))
    n_train = len(first.inputs.rows("train"))
    params = make_params(project, data={"unlabelled": "to_label"})
    untouched = snapshot(pool)
    result = features.run(open_project(params, project))
    assert result.n_new == 4  # featurised like the rest
    paths, splits, labels = _column(result, "path", "split", "label")
    pooled = {p: (s, lab) for p, s, lab in zip(paths, splits, labels) if p.startswith("../to_label/")}
    assert pooled == {f"../to_label/new_{i}.png": ("unlabelled", "") for i in range(4)}
    assert train_head.run(open_project(params, project)).key == first.key  # photos to label change no model
    assert inspect.run(open_project(params, project)).summary["photos"] == 36  # nor what inspect checks

    counting = CountingBackbone(monkeypatch)
    corrections.record(project / "corrections.csv", [corrections.Correction("to_label/new_1.png", "relabel", "tigger")])
    result = features.run(open_project(params, project))
    assert counting.images == 0  # labelling a photo runs no backbone
    paths, splits, labels = _column(result, "path", "split", "label")
    row = paths.index("../to_label/new_1.png")
    assert (splits[row], labels[row]) == ("train", "tigger")  # labelled photos teach: they join train
    trained = train_head.run(open_project(params, project))
    assert trained.key != first.key
    assert len(trained.inputs.rows("train")) == n_train + 1
    assert snapshot(pool) == untouched  # labelled in the file, not by moving the photo


def test_bad_corrections_are_one_line_errors_naming_file_and_line(project):
    write_corrections(project / "corrections.csv", [("photos/misty/misty_00.png", "rename", "x")])
    result = cli(project, "features", "--params", _params_file(project))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {project / 'corrections.csv'}:2: action 'rename' is not one of relabel, exclude, keep")
    write_corrections(project / "corrections.csv", [("photos/misty/misty_00.png", "relabel", "tiger")])
    result = cli(project, "features", "--params", _params_file(project))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("error: corrections.csv: label 'tiger' is not a class (the class "
                                                      "folders: misty, neither, tigger); fix the row or add the folder")


def _params_file(project):
    import yaml

    path = project / "params.yaml"
    path.write_text(yaml.safe_dump({"data": {"root": "photos", "train_fraction": 0.6, "val_fraction": 0.2,
                                             "test_fraction": 0.2}, "features": {"backbone": "tiny"}}))
    return str(path)


def _decide(path, worker, n):
    for i in range(n):
        corrections.record(path, [corrections.Correction(f"photos/w{worker}/{i:03d}.png", "exclude")])


def test_two_writers_at_once_lose_no_decision(tmp_path):
    path = tmp_path / "corrections.csv"
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_decide, args=(path, w, 40)) for w in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
        assert w.exitcode == 0
    assert len(corrections.read(path)) == 80


def _write_forever(path):
    i = 0
    while True:
        corrections.record(path, [corrections.Correction(f"photos/a/{i:05d}.png", "relabel", "misty")])
        i += 1


def test_sigkill_during_writes_leaves_the_file_whole(tmp_path):
    path = tmp_path / "corrections.csv"
    for attempt in range(5):
        writer = multiprocessing.get_context("spawn").Process(target=_write_forever, args=(path,), daemon=True)
        writer.start()
        try:
            deadline = time.monotonic() + 30
            while len(corrections.read(path)) < 20 * (attempt + 1) and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            os.kill(writer.pid, signal.SIGKILL)  # also when reading failed: the writer never outlives the test
            writer.join()
        text = path.read_text()
        assert text.startswith("path,action,label,note\n") and text.endswith("\n")
        rows = corrections.read(path)  # parses: every row whole
        assert all(r.action == "relabel" and r.label == "misty" for r in rows.values())
        assert len(rows) >= 20 * (attempt + 1)  # nothing written before the kill was lost


def test_inspect_writes_a_template_that_the_scan_ignores_until_filled(tmp_path):
    make_dataset(tmp_path / "photos", per_class=20, classes=("misty", "tigger"))
    for i in range(3):
        make_image(tmp_path / "photos" / "misty" / f"really_tigger_{i}.png", CLASS_COLOURS["tigger"], 80_000 + i)
    params = make_params(tmp_path)
    features.run(open_project(params, tmp_path))
    first = train_head.run(open_project(params, tmp_path))
    path, added = inspect.corrections_template(open_project(params, tmp_path), inspect.run(open_project(params, tmp_path)))
    rows = corrections.read(path)
    assert added == len(rows) > 0
    planted = rows["photos/misty/really_tigger_0.png"]
    assert (planted.action, planted.label) == ("", "tigger") and planted.note.startswith("label issue")
    features.run(open_project(params, tmp_path))
    assert train_head.run(open_project(params, tmp_path)).key == first.key  # undecided rows change nothing
    # fill one in by hand, as a user would in a spreadsheet
    text = path.read_text().replace("photos/misty/really_tigger_0.png,,tigger", "photos/misty/really_tigger_0.png,"
                                    "relabel,tigger")
    path.write_text(text)
    assert corrections.read(path)["photos/misty/really_tigger_0.png"].action == "relabel"
    result = features.run(open_project(params, tmp_path))
    assert train_head.run(open_project(params, tmp_path)).key != first.key
    paths, labels = _column(result, "path", "label")
    assert labels[paths.index("misty/really_tigger_0.png")] == "tigger"
    inspect.corrections_template(open_project(params, tmp_path), inspect.run(open_project(params, tmp_path)))
    assert corrections.read(path)["photos/misty/really_tigger_0.png"].action == "relabel"  # decisions kept


def test_missing_unlabelled_folder_is_a_clear_error(project):
    with pytest.raises(scan.DatasetError, match=r"^data.unlabelled: no folder at .*to_label; create it or set "
                                                r"data.unlabelled: null$"):
        scan.scan(make_params(project, data={"unlabelled": "to_label"}).data, project)


def test_an_unlabelled_folder_inside_the_data_root_is_not_a_class(project):
    """data.unlabelled may sit inside data.root (photos/to_label): its photos are the ones to label, and it
    is no class (it once became one, and training stopped with an error naming none)."""
    for i in range(4):
        make_image(project / "photos" / "to_label" / f"new_{i}.png", CLASS_COLOURS["tigger"], 71_000 + i)
    params = make_params(project, data={"unlabelled": "photos/to_label"})
    data = scan.scan(params.data, project)
    assert data.classes == ("misty", "neither", "tigger")
    assert sorted(r.path for r in data.unlabelled) == [f"to_label/new_{i}.png" for i in range(4)]
    features.run(open_project(params, project))
    assert train_head.run(open_project(params, project)).classes == ["misty", "neither", "tigger"]
