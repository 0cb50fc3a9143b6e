"""Nothing lost, nothing corrupted: killed runs, concurrent runs, damaged caches, full disks, odd files, fuzzing."""
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
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline import layout, scan
from pipeline import params as params_mod
from pipeline.data.decode import ImageError, decode_rgb
from pipeline.project import open_project
from pipeline.stages import features
from pipeline.store import parts as parts_mod
from pipeline.store import table as feature_store
from pipeline.store.table import CacheError

from conftest import CLASS_COLOURS, ROOT, CountingBackbone, cli, make_image, make_params, table_of

ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TQDM_DISABLE": "1", "TF_CPP_MIN_LOG_LEVEL": "3",
       "XDG_CACHE_HOME": os.environ["XDG_CACHE_HOME"]}
# Spatial activations (24 x 24 x 16 a photo) and photos that take a few milliseconds to decode: a run
# long enough, and a merge heavy enough, to be caught in the act.
KILL_PARAMS = {
    "data": {"root": "photos", "train_fraction": 0.6, "val_fraction": 0.2, "test_fraction": 0.2},
    "features": {"backbone": "tiny", "batch_size": 2, "commit_every": 6, "image_size": 96, "layer": "block1",
                 "workers": 1},
}
N_KILL = 120


def make_kill_dataset(root):
    rng = np.random.default_rng(5)
    for label in ("misty", "tigger"):
        (root / label).mkdir(parents=True)
        for i in range(N_KILL // 2):
            pixels = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i:03d}.png", compress_level=1)


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
        time.sleep(0.001)
    return False


def parts(project):
    return list((project / "cache" / "features").glob("*.parts/part-*.h5"))


def merging(project):
    return any((project / "cache" / "features").glob(".*.h5.*.tmp"))


@pytest.fixture(scope="module")
def kill_photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill") / "photos"
    make_kill_dataset(root)
    return root


@pytest.fixture(scope="module")
def clean_features(tmp_path_factory, kill_photos):
    """Features of the kill-test dataset from one uninterrupted run, keyed by sha256."""
    project = kill_photos.parent
    params = params_mod.build(KILL_PARAMS, "test")
    table = table_of(features.run(open_project(params, project)))
    return dict(zip(table.sha256, table.features))


@pytest.mark.parametrize("point, n_parts", [("start-up", 0), ("first part", 1), ("fifth part", 5), ("merge", None)])
def test_sigkill_mid_run_keeps_finished_rows(tmp_path, monkeypatch, point, n_parts, kill_photos, clean_features):
    os.symlink(kill_photos, tmp_path / "photos")
    (tmp_path / "params.yaml").write_text(json.dumps(KILL_PARAMS))
    process = start_features(tmp_path)
    if point == "merge":
        reached = wait_for(lambda: merging(tmp_path), process)
    else:
        reached = wait_for(lambda: len(parts(tmp_path)) >= n_parts, process)
    alive = process.poll() is None
    on_disk = len(parts(tmp_path))
    process.send_signal(signal.SIGKILL)
    process.wait()
    # the kill happened mid-run: the condition was met while the process was still working
    assert reached and alive, f"the run ended before the {point} ({process.stderr.read()[-500:]})"
    if n_parts is not None:
        assert on_disk >= n_parts
    kept = committed_rows(tmp_path)
    if point in ("first part", "fifth part"):
        assert 6 * n_parts <= kept < N_KILL  # finished parts kept, the run not finished

    params = params_mod.load(tmp_path / "params.yaml")
    counter = CountingBackbone(monkeypatch)
    result = features.run(open_project(params, tmp_path))
    assert result.n_rows == N_KILL
    assert counter.images == N_KILL - kept  # exactly the rows lost with the kill are recomputed
    table = table_of(result)
    for sha, row in zip(table.sha256, table.features):
        np.testing.assert_array_equal(row, clean_features[sha])
    assert not parts(tmp_path) and not merging(tmp_path)


def test_a_second_concurrent_run_exits_at_once_with_a_message(tmp_path, kill_photos):
    os.symlink(kill_photos, tmp_path / "photos")
    (tmp_path / "params.yaml").write_text(json.dumps(KILL_PARAMS))
    first = start_features(tmp_path)
    assert wait_for(lambda: len(parts(tmp_path)) >= 1, first), first.communicate()
    first.send_signal(signal.SIGSTOP)  # hold the first run mid-way, lock taken
    try:
        started = time.perf_counter()
        second = subprocess.run([sys.executable, "-m", "pipeline", "features"], cwd=tmp_path, env=ENV,
                                capture_output=True, text=True, timeout=60)
        seconds = time.perf_counter() - started
    finally:
        first.send_signal(signal.SIGCONT)
    first_out = first.communicate(timeout=120)
    assert second.returncode == 2
    assert "another 'features' run is writing" in second.stderr
    assert seconds < 15  # at once: interpreter start and a scan, never a wait for the lock
    assert first.returncode == 0, first_out[1]
    assert committed_rows(tmp_path) == N_KILL


def test_features_edited_on_disk_fail_their_checksum_and_are_rebuilt(project, caplog):
    first = features.run(open_project(make_params(project), project))
    with h5py.File(first.path) as f:
        offset = f["features"].id.get_chunk_info(0).byte_offset
    with open(first.path, "r+b") as f:  # flip bytes inside the first chunk, behind HDF5's back
        f.seek(offset + 16)
        f.write(b"\x13\x37\x13\x37")
    with pytest.raises(CacheError, match="checksum"):
        table_of(first)
    caplog.set_level("WARNING")
    again = features.run(open_project(make_params(project), project))
    assert again.n_new == 36 and "rebuilding" in caplog.text


def test_a_complete_part_from_another_configuration_is_never_mixed_in(project, caplog):
    params = make_params(project)
    path = layout.cache_file(params, project)
    shas = [r.sha256 for r in scan.scan(params.data, project).records]
    # a part that is whole and readable, for these very photos, but made with another key
    parts_mod.write(path.with_suffix(".parts"), "0" * 64, {"weights_sha256": "w", "feature_shape": (16,)}, shas,
                    {"features": [np.full(16, 7.0, np.float32)] * len(shas)}, [])
    caplog.set_level("WARNING")
    result = features.run(open_project(params, project))
    assert result.n_new == 36
    assert "made with key 000000000000" in caplog.text
    table = table_of(result)
    assert not np.any(np.all(table.features == 7.0, axis=1))
    assert not path.with_suffix(".parts").exists()


def _mount_tmpfs(folder, megabytes):
    folder.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)],
                         capture_output=True, text=True)
    if out.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({out.stderr.strip() or 'not permitted'}); "
                    "the ENOSPC simulations below still run")


def test_a_really_full_disk(tmp_path, kill_photos, monkeypatch):
    """A 3 MB tmpfs as the cache: the first run fills it, fails in one line with exit code 2 and loses
    nothing committed; once the disk is bigger, the next run finishes from the committed parts."""
    cache = tmp_path / "cachefs"
    _mount_tmpfs(cache, 3)
    try:
        os.symlink(kill_photos, tmp_path / "photos")
        raw = {**KILL_PARAMS, "paths": {"cache_dir": "cachefs"}}
        (tmp_path / "params.yaml").write_text(json.dumps(raw))
        out = cli(tmp_path, "features")
        assert out.returncode == 2
        line = out.stderr.strip().splitlines()[-1]
        assert line.startswith("error: could not write ") and "(No space left on device)" in line and \
            "is the disk full?" in line, out.stderr[-1000:]
        assert not list(cache.rglob("*.tmp"))  # no half-written file left behind
        kept = sum(len(h5py.File(p)["sha256"]) for p in (cache / "features").glob("*.parts/part-*.h5"))
        assert kept > 0
        subprocess.run(["mount", "-o", "remount,size=64m", str(cache)], check=True)
        params = params_mod.load(tmp_path / "params.yaml")
        counter = CountingBackbone(monkeypatch)
        result = features.run(open_project(params, tmp_path))
        assert result.n_rows == N_KILL and counter.images == N_KILL - kept
    finally:
        subprocess.run(["umount", "-l", str(cache)], capture_output=True)


def test_disk_full_while_merging_leaves_the_cache_as_it_was(project, monkeypatch):
    params = make_params(project)
    first = features.run(open_project(params, project))
    before = first.path.read_bytes()
    make_image(project / "photos" / "misty" / "extra.png", CLASS_COLOURS["misty"], 4242)
    real_write_table = feature_store.write_table

    def full_disk(path, *args, **kwargs):
        real_write_table(path, *args, **kwargs)  # most of the file is written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(feature_store, "write_table", full_disk)
    with pytest.raises(CacheError, match=r"No space left on device.*is the disk full\? The cache is as it was"):
        features.run(open_project(params, project))
    assert first.path.read_bytes() == before
    assert not list(first.path.parent.glob(".*.tmp"))
    monkeypatch.setattr(feature_store, "write_table", real_write_table)
    counter = CountingBackbone(monkeypatch)
    assert features.run(open_project(params, project)).n_rows == 37 and counter.images == 0  # the new row was kept in a part


def test_disk_full_on_the_command_line_is_exit_code_2_and_keeps_the_cache(project):
    """ENOSPC from the operating system's write, in a real CLI process: one line, exit code 2, cache bytes unchanged."""
    (project / "params.yaml").write_text(json.dumps({"data": {"root": "photos", "train_fraction": 0.6,
                                                              "val_fraction": 0.2, "test_fraction": 0.2},
                                                     "features": {"backbone": "tiny"}}))
    assert cli(project, "features").returncode == 0
    cache = next((project / "cache" / "features").glob("*.h5"))
    before = cache.read_bytes()
    make_image(project / "photos" / "misty" / "extra.png", CLASS_COLOURS["misty"], 4243)
    # the disk fills during the merge: the file being written is created (truncated), then a write
    # fails; part files still fit
    hook = ("import errno, h5py; real = h5py.File\n"
            "def full(name, mode='r', *a, **k):\n"
            "    if mode == 'w' and '.parts' not in str(name):\n"
            "        real(name, mode, *a, **k).close()\n"
            "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "    return real(name, mode, *a, **k)\n"
            "h5py.File = full\n")
    (project / "sitecustomize.py").write_text(hook)
    out = cli(project, "features", env={"PYTHONPATH": f"{project}:{ROOT}"})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: could not write ")
    assert "(No space left on device); is the disk full?" in out.stderr
    assert cache.read_bytes() == before  # the merge wrote elsewhere: the cache as it was
    assert list(cache.with_suffix(".parts").glob("part-*.h5"))  # and the new row kept for the next run
    assert not list(cache.parent.glob("*.tmp"))  # the half-written file removed


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
    reads = []

    def read_bytes(self):
        if self.is_relative_to(photos):
            reads.append(self.relative_to(photos).as_posix())
        if self.name == "secret.png":  # root reads anything, so permissions are simulated
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
    result = features.run(open_project(make_params(project), project))
    table = table_of(result)
    paths = set(table.paths)
    assert {"misty/Místy on the sofa ✓.png", "neither one/a b.png", "misty/one_pixel.png"} <= paths
    assert {s.path: s.reason for s in result.skipped} == {"tigger/secret.png": "cannot read: Permission denied"}
    assert "neither one" in table.attrs["classes"]
    assert not any(r.startswith("misty/loop/") for r in reads)  # the loop was not followed
    assert reads.count("tigger/link.png") == 1  # the symlinked file was read, once
    assert len(reads) == 36 + 6  # every file once: 36 photos, 5 added files, the link
    record = next(r for r in scan.scan(make_params(project).data, project).records if r.path == "tigger/link.png")
    assert record.duplicates == ("tigger/tigger_01.png",)  # ... and recognised as the same photo


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048), prefix=st.sampled_from([b"", b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n",
                                                              b"GIF89a", b"BM", b"RIFF\0\0\0\0WEBPVP8 "]))
@example(data=b"", prefix=b"\xff\xd8\xff\xe0")
@example(data=b"\0" * 64, prefix=b"BM")
def test_random_bytes_never_crash_the_decoder(tmp_path, data, prefix):
    path = tmp_path / "fuzz.jpg"
    path.write_bytes(prefix + data)
    try:
        pixels = decode_rgb(path, 16)
    except ImageError as error:
        assert str(error) and len(str(error).splitlines()) == 1
    else:
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3


def test_a_features_run_over_random_files_reports_them(project):
    rng = np.random.default_rng(1)
    for i, prefix in enumerate([b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM" + b"\0" * 30, b""]):
        (project / "photos" / "misty" / f"random_{i}.jpg").write_bytes(prefix + rng.bytes(300))
    result = features.run(open_project(make_params(project, data={"max_bad_fraction": 0.5}), project))
    assert result.n_rows == 36
    assert {s.path for s in result.skipped} == {f"misty/random_{i}.jpg" for i in range(5)}
