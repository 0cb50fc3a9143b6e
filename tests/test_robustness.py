"""Nothing lost, nothing corrupted: killed runs, concurrent runs, damaged caches, odd files, fuzzing."""
import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from pipeline import feature_store, features, params as params_mod
from pipeline.feature_store import CacheError
from pipeline.images import ImageError, decode_rgb

from conftest import CLASS_COLOURS, ROOT, make_dataset, make_image, make_params
from test_features import CountingBuild

ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TQDM_DISABLE": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
KILL_PARAMS = {
    "data": {"root": "photos", "train_fraction": 0.6, "val_fraction": 0.2, "test_fraction": 0.2},
    "features": {"backbone": "tiny", "batch_size": 2, "commit_every": 6, "image_size": 96},
}


def start_features(project):
    return subprocess.Popen([sys.executable, "-m", "pipeline", "features"], cwd=project, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def committed_rows(project) -> int:
    """Rows that survive on disk: the cache file's plus those of complete part files."""
    folder = project / "cache" / "features"
    total = 0
    for file in folder.glob("*.h5"):
        total += len(feature_store.read_index(file)[0])
    for part in folder.glob("*.parts/part-*.h5"):
        with h5py.File(part) as f:
            total += len(f["sha256"]) + len(f["bad_sha256"])
    return total


def wait_for(condition, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if condition():
            return True
        time.sleep(0.002)
    return False


def parts(project):
    return list((project / "cache" / "features").glob("*.parts/part-*.h5"))


def merging(project):
    return any((project / "cache" / "features").glob(".*.h5.*.tmp"))


@pytest.fixture(scope="module")
def clean_features(tmp_path_factory):
    """Features of the kill-test dataset from one uninterrupted run, keyed by sha256."""
    project = tmp_path_factory.mktemp("clean")
    make_dataset(project / "photos", per_class=40, classes=("misty", "tigger"))
    params = params_mod.build(KILL_PARAMS, "test")
    table = feature_store.read_table(features.run(params, project).path)
    return dict(zip(table.sha256, table.features))


@pytest.mark.parametrize("point", ["start-up", "first part", "fifth part", "merge"])
def test_sigkill_at_any_point_keeps_finished_rows(tmp_path, monkeypatch, point, clean_features):
    make_dataset(tmp_path / "photos", per_class=40, classes=("misty", "tigger"))
    (tmp_path / "params.yaml").write_text(json.dumps(KILL_PARAMS))
    process = start_features(tmp_path)
    conditions = {"start-up": lambda: True, "first part": lambda: len(parts(tmp_path)) >= 1,
                  "fifth part": lambda: len(parts(tmp_path)) >= 5, "merge": lambda: merging(tmp_path)}
    reached = wait_for(conditions[point], process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if point == "merge" and not reached:
        pytest.skip("the run finished before its merge could be caught")  # rare: the merge takes milliseconds
    kept = committed_rows(tmp_path)
    if point in ("first part", "fifth part"):
        assert kept >= {"first part": 6, "fifth part": 30}[point]

    params = params_mod.load(tmp_path / "params.yaml")
    counter = CountingBuild(monkeypatch)
    result = features.run(params, tmp_path)
    assert result.n_rows == 80
    assert counter.images == 80 - kept  # exactly the rows lost with the kill are recomputed
    table = feature_store.read_table(result.path)
    for sha, row in zip(table.sha256, table.features):
        np.testing.assert_array_equal(row, clean_features[sha])
    assert not parts(tmp_path) and not merging(tmp_path)


def test_a_second_concurrent_run_exits_with_a_message(tmp_path):
    make_dataset(tmp_path / "photos", per_class=40, classes=("misty", "tigger"))
    (tmp_path / "params.yaml").write_text(json.dumps(KILL_PARAMS))
    first = start_features(tmp_path)
    assert wait_for(lambda: len(parts(tmp_path)) >= 1, first), first.communicate()
    first.send_signal(signal.SIGSTOP)  # hold the first run mid-way, lock taken
    try:
        second = subprocess.run([sys.executable, "-m", "pipeline", "features"], cwd=tmp_path, env=ENV,
                                capture_output=True, text=True)
    finally:
        first.send_signal(signal.SIGCONT)
    first_out = first.communicate(timeout=120)
    assert second.returncode == 2
    assert "another 'features' run is writing" in second.stderr
    assert first.returncode == 0, first_out[1]
    assert committed_rows(tmp_path) == 80


def test_features_edited_on_disk_fail_their_checksum_and_are_rebuilt(project, caplog):
    first = features.run(make_params(project), project)
    with h5py.File(first.path) as f:
        offset = f["features"].id.get_chunk_info(0).byte_offset
    with open(first.path, "r+b") as f:  # flip bytes inside the first chunk, behind HDF5's back
        f.seek(offset + 16)
        f.write(b"\x13\x37\x13\x37")
    with pytest.raises(CacheError, match="checksum"):
        feature_store.read_table(first.path)
    caplog.set_level("WARNING")
    again = features.run(make_params(project), project)
    assert again.n_new == 36 and "rebuilding" in caplog.text


def test_a_part_from_another_configuration_is_never_mixed_in(project, caplog):
    params = make_params(project)
    path = features.cache_file(params, project)
    foreign = path.with_suffix(".parts") / "part-000001.h5"
    foreign.parent.mkdir(parents=True)
    with h5py.File(foreign, "w") as f:
        f.attrs["key"] = "0" * 64
        f.create_dataset("sha256", data=np.array([b"a" * 64]))
    caplog.set_level("WARNING")
    result = features.run(params, project)
    assert result.n_new == 36 and "ignoring unreadable part" in caplog.text and not foreign.exists()


def test_disk_full_while_merging_leaves_the_cache_as_it_was(project, monkeypatch):
    params = make_params(project)
    first = features.run(params, project)
    before = first.path.read_bytes()
    make_image(project / "photos" / "misty" / "extra.png", CLASS_COLOURS["misty"], 4242)
    real_write_table = feature_store.write_table

    def full_disk(path, *args, **kwargs):
        real_write_table(path, *args, **kwargs)  # most of the file is written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(feature_store, "write_table", full_disk)
    with pytest.raises(CacheError, match=r"No space left on device.*is the disk full\? The cache is as it was"):
        features.run(params, project)
    assert first.path.read_bytes() == before
    assert not list(first.path.parent.glob(".*.tmp"))
    monkeypatch.setattr(feature_store, "write_table", real_write_table)
    counter = CountingBuild(monkeypatch)
    assert features.run(params, project).n_rows == 37 and counter.images == 0  # the new row was kept in a part


def test_disk_full_while_committing_a_part(project, monkeypatch):
    real_file = h5py.File

    def full_disk(name, mode="r", *args, **kwargs):
        if mode == "w" and ".parts" in str(name):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_file(name, mode, *args, **kwargs)

    monkeypatch.setattr(features.h5py, "File", full_disk)
    with pytest.raises(CacheError, match="No space left on device.*is the disk full"):
        features.run(make_params(project), project)
    assert not list((project / "cache" / "features").rglob("*.tmp"))


def test_odd_files_and_names(project, monkeypatch):
    photos = project / "photos"
    make_image(photos / "misty" / "Místy on the sofa ✓.png", CLASS_COLOURS["misty"], 3001)
    make_image(photos / "neither one" / "a b.png", CLASS_COLOURS["neither"], 3002)
    make_image(photos / "neither one" / "c.png", CLASS_COLOURS["neither"], 3003)
    Image.new("RGB", (1, 1), (255, 0, 0)).save(photos / "misty" / "one_pixel.png")
    os.symlink(photos / "misty", photos / "misty" / "loop")  # a folder that contains itself
    os.symlink(photos / "tigger" / "tigger_01.png", photos / "tigger" / "link.png")  # a file link: same bytes
    secret = photos / "tigger" / "secret.png"
    make_image(secret, CLASS_COLOURS["tigger"], 3004)
    real_read_bytes = pathlib.Path.read_bytes

    def read_bytes(self):
        if self.name == "secret.png":  # root reads anything, so permissions are simulated
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
    result = features.run(make_params(project), project)
    table = feature_store.read_table(result.path)
    paths = set(table.paths)
    assert {"misty/Místy on the sofa ✓.png", "neither one/a b.png", "misty/one_pixel.png"} <= paths
    assert {s.path: s.reason for s in result.skipped} == {"tigger/secret.png": "cannot read: Permission denied"}
    assert "neither one" in table.attrs["classes"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048), prefix=st.sampled_from([b"", b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n",
                                                              b"GIF89a", b"BM", b"RIFF\0\0\0\0WEBPVP8 "]))
def test_random_bytes_never_crash_the_decoder(tmp_path, data, prefix):
    path = tmp_path / "fuzz.jpg"
    path.write_bytes(prefix + data)
    try:
        pixels = decode_rgb(path, 16)
    except ImageError as error:
        assert str(error)
    else:
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3


_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                       lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children,
                                                                                          max_size=3), max_leaves=6)
_keys = st.sampled_from(["root", "train_fraction", "backbone", "model", "C", "C_grid", "epochs", "learning_rate",
                         "resize", "dtype", "top_k", "quantize", "cache_dir", "bogus"])
_sections = st.sampled_from(["paths", "data", "features", "train_head", "evaluate", "predict", "export", "nope"])


@settings(max_examples=300, deadline=None)
@given(raw=st.dictionaries(_sections, st.dictionaries(_keys, _values, max_size=4) | _values, max_size=4))
def test_random_params_give_params_or_a_one_line_error(raw):
    try:
        params_mod.build(raw, "fuzz.yaml")
    except params_mod.ParamsError as error:
        assert str(error).startswith("fuzz.yaml") and "\n" not in str(error)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_random_params_files_give_params_or_a_one_line_error(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        params_mod.load(path)
    except params_mod.ParamsError as error:
        assert str(path) in str(error) and "\n" not in str(error)


def test_a_features_run_over_random_files_reports_them(project):
    rng = np.random.default_rng(1)
    for i, prefix in enumerate([b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM" + b"\0" * 30, b""]):
        (project / "photos" / "misty" / f"random_{i}.jpg").write_bytes(prefix + rng.bytes(300))
    result = features.run(make_params(project, data={"max_bad_fraction": 0.5}), project)
    assert result.n_rows == 36
    assert {s.path for s in result.skipped} == {f"misty/random_{i}.jpg" for i in range(5)}
