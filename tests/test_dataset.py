import shutil

import pytest

from pipeline import scan as dataset
from pipeline.scan import DatasetError

from conftest import CLASS_COLOURS, make_dataset, make_image, make_params


def scan(project, **data):
    return dataset.scan(make_params(project, data=data).data, project)


def splits_by_path(ds):
    return {r.path: r.split for r in ds.records}


def test_hash_split_follows_the_fractions_roughly(tmp_path):
    make_dataset(tmp_path / "photos", per_class=100, classes=("misty", "tigger"))
    ds = scan(tmp_path)
    counts = {s: sum(r.split == s for r in ds.records) for s in ("train", "val", "test")}
    assert 90 <= counts["train"] <= 150 and 20 <= counts["val"] <= 60 and 20 <= counts["test"] <= 60


def test_split_is_stable_and_adding_images_moves_none(project):
    before = splits_by_path(scan(project))
    assert before == splits_by_path(scan(project))
    for i in range(20):
        make_image(project / "photos" / "misty" / f"new_{i}.png", CLASS_COLOURS["misty"], 90_000 + i)
    after = splits_by_path(scan(project))
    assert {p: after[p] for p in before} == before
    assert len(after) == len(before) + 20


def test_same_bytes_same_split_and_duplicates_collapse(project):
    source = project / "photos" / "misty" / "misty_00.png"
    shutil.copy(source, project / "photos" / "misty" / "zz_copy.png")
    ds = scan(project)
    record = next(r for r in ds.records if r.path == "misty/misty_00.png")
    assert record.duplicates == ("misty/zz_copy.png",)
    assert all(r.path != "misty/zz_copy.png" for r in ds.records)
    # the split depends on content only: the same file elsewhere gets the same split
    other = scan(project, train_fraction=0.6, val_fraction=0.2, test_fraction=0.2)
    assert {r.sha256: r.split for r in other.records}[record.sha256] == record.split


def test_same_image_in_two_classes_is_a_label_conflict(project):
    shutil.copy(project / "photos" / "misty" / "misty_03.png", project / "photos" / "tigger" / "odd.png")
    ds = scan(project)
    conflicted = {s.path for s in ds.skipped if s.reason.startswith("label conflict")}
    assert conflicted == {"misty/misty_03.png", "tigger/odd.png"}
    assert all(r.path not in conflicted for r in ds.records)


def test_explicit_split_folders_override_the_hash(tmp_path):
    for split in ("train", "val", "test"):
        make_dataset(tmp_path / "photos" / split, per_class=3, classes=("misty", "tigger"), seed=len(split))
    ds = scan(tmp_path)
    assert ds.split_mode == "folders"
    assert ds.classes == ("misty", "tigger")
    assert all(r.path.split("/")[0] == r.split for r in ds.records)


def test_split_csv_overrides_the_hash(project):
    rows = ["path,split"] + [f"{c}/{c}_{i:02d}.png,{'test' if i < 4 else 'train'}"
                             for c in ("misty", "tigger", "neither") for i in range(12) if i != 11]
    (project / "splits.csv").write_text("\n".join(rows) + "\n")
    ds = scan(project, split_csv="splits.csv")
    assert ds.split_mode == "csv"
    assert {r.split for r in ds.records if int(r.path[-6:-4]) < 4} == {"test"}
    assert {r.split for r in ds.records if int(r.path[-6:-4]) >= 4} == {"train"}
    assert {s.path for s in ds.skipped} == {f"{c}/{c}_11.png" for c in ("misty", "tigger", "neither")}


def test_content_not_extension_decides(project):
    folder = project / "photos" / "misty"
    make_image(folder / "really_png.jpg", CLASS_COLOURS["misty"], 501, fmt="PNG")
    make_image(folder / "really_webp.png", CLASS_COLOURS["misty"], 502, fmt="WEBP")
    make_image(folder / "no_extension", CLASS_COLOURS["misty"], 503, fmt="BMP")
    make_image(folder / "anim.gif", CLASS_COLOURS["misty"], 504, fmt="GIF")
    (folder / "notes.jpg").write_text("not a picture")
    (folder / "empty.png").write_bytes(b"")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / "readme.txt").write_text("photos of misty")
    ds = scan(project)
    formats = {r.path: r.format for r in ds.records}
    assert formats["misty/really_png.jpg"] == "PNG"
    assert formats["misty/really_webp.png"] == "WEBP"
    assert formats["misty/no_extension"] == "BMP"
    assert formats["misty/anim.gif"] == "GIF"
    assert {s.path: s.reason for s in ds.skipped} == {
        "misty/notes.jpg": "not an image (unrecognised content)", "misty/empty.png": "empty file"}


def test_missing_root_names_the_folder(tmp_path):
    with pytest.raises(DatasetError, match=r"data.root: no folder at .*nowhere"):
        dataset.scan(make_params(tmp_path, data={"root": "nowhere"}).data, tmp_path)


def test_one_class_is_an_error(tmp_path):
    make_dataset(tmp_path / "photos", per_class=3, classes=("misty",))
    with pytest.raises(DatasetError, match="has 1 class folder"):
        scan(tmp_path)


def test_empty_class_names_the_folder(project):
    (project / "photos" / "ghost").mkdir()
    (project / "photos" / "ghost" / "notes.txt").write_text("no pictures yet")
    with pytest.raises(DatasetError, match=r"class folder .*ghost has no usable images"):
        scan(project)


def test_unchanged_files_are_not_read_again(project):
    index = project / "index.json"
    params = make_params(project).data
    first = dataset.scan(params, project, index_path=index)
    assert first.files_read == 36
    second = dataset.scan(params, project, index_path=index)
    assert second.files_read == 0
    assert [(r.sha256, r.path, r.split) for r in second.records] == [(r.sha256, r.path, r.split) for r in first.records]
    # rewritten with other pixels (another size, a new mtime) and one photo added: those two are read again;
    # same-size edits and atomic replaces are in tests/test_claims.py
    target = project / "photos" / "misty" / "misty_00.png"
    make_image(target, CLASS_COLOURS["tigger"], 5555)
    make_image(project / "photos" / "misty" / "added.png", CLASS_COLOURS["misty"], 5556)
    third = dataset.scan(params, project, index_path=index)
    assert third.files_read == 2
    assert {r.path: r.sha256 for r in third.records}["misty/misty_00.png"] != \
        {r.path: r.sha256 for r in first.records}["misty/misty_00.png"]


def test_a_damaged_index_costs_only_a_rehash(project):
    index = project / "index.json"
    params = make_params(project).data
    dataset.scan(params, project, index_path=index)
    index.write_text("{ not json")
    assert dataset.scan(params, project, index_path=index).files_read == 36
