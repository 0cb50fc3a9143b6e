"""features.engine: ray on a real local Ray (started here: ray.init(num_cpus=2)), against the local engine."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline import layout
from pipeline.project import open_project
from pipeline.stages import features
from pipeline.store import table as feature_store

from conftest import ROOT, cli, make_dataset, make_params, table_of

if os.environ.get("CI") and not __import__("importlib").util.find_spec("ray"):
    pytest.fail("ray is missing in CI; .ci/run should have run 'make setup-ray'", pytrace=False)
ray = pytest.importorskip("ray", reason="the Ray extra is not installed ('make setup-ray')")


@pytest.fixture(scope="module")
def cluster():
    """A local Ray of 2 CPUs for this module, with its dashboard; drivers in other processes join it by
    its address."""
    context = ray.init(num_cpus=2, include_dashboard=True, logging_level="ERROR", namespace="pipeline")
    assert context.dashboard_url, "the Ray dashboard did not start (its dependencies come with 'make setup-ray')"
    yield context.address_info["gcs_address"]
    ray.shutdown()


def workers() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ray::FeatureWorker"], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


def test_the_ray_cache_equals_the_local_cache(tmp_path, cluster):
    make_dataset(tmp_path / "photos", per_class=40, classes=("misty", "tigger"))
    (tmp_path / "photos" / "misty" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 80)  # bad on a worker
    local = features.run(open_project(make_params(tmp_path), tmp_path))
    skipped_local = (tmp_path / "reports" / "skipped.csv").read_text()
    distributed = make_params(tmp_path, features={"engine": "ray"}, paths={"cache_dir": "cache_ray"})
    result = features.run(open_project(distributed, tmp_path))
    assert layout.cache_key(distributed.features) == local.key  # the engine is not part of the key
    a, b = table_of(local), table_of(result)
    for column in ("sha256", "paths", "labels", "splits"):
        assert list(getattr(a, column)) == list(getattr(b, column)), column
    np.testing.assert_allclose(b.features, a.features, atol=1e-4)
    assert (tmp_path / "reports" / "skipped.csv").read_text() == skipped_local
    assert "misty/broken.jpg,JPEG,cannot decode: " in skipped_local
    with __import__("h5py").File(result.path) as f:
        assert f["bad_sha256"].shape == (1,)


def test_the_dashboard_shows_the_feature_workers_and_their_logs(tmp_path, cluster):
    import urllib.request

    from ray.util.state import get_log, list_actors

    make_dataset(tmp_path / "photos", per_class=8, classes=("misty", "tigger"))
    features.run(open_project(make_params(tmp_path, features={"engine": "ray"}), tmp_path))
    url = "http://" + ray.get_runtime_context().worker.node.address_info["webui_url"]
    with urllib.request.urlopen(url, timeout=30) as page:  # the web UI itself
        assert page.status == 200 and b"<html" in page.read(2000).lower()
    actors = list_actors(filters=[("class_name", "=", "FeatureWorker")], detail=True)
    assert actors, "no FeatureWorker actor in the dashboard's state API"
    log_text = "".join(get_log(actor_id=actors[-1].actor_id, tail=200, suffix="out"))
    assert "FeatureWorker: tiny pooled on LiteRT, input 32 px, ready" in log_text, log_text[-500:]


KILL_PARAMS = {
    "data": {"root": "photos", "train_fraction": 0.6, "val_fraction": 0.2, "test_fraction": 0.2},
    "features": {"backbone": "tiny", "commit_every": 32, "image_size": 96, "engine": "ray"},
}


@pytest.fixture(scope="module")
def big_photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray") / "photos"
    rng = np.random.default_rng(5)
    from PIL import Image

    for label in ("misty", "tigger"):
        (root / label).mkdir(parents=True)
        for i in range(160):
            Image.fromarray(rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)).save(root / label / f"{i:03d}.png",
                                                                                    compress_level=1)
    return root


def start_driver(project, address):
    raw = json.loads(json.dumps(KILL_PARAMS))
    raw["features"]["ray_address"] = address
    (project / "params.yaml").write_text(json.dumps(raw))
    # the environment of this process, as a user's shell has it: Ray's token authentication lives there
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen([sys.executable, "-m", "pipeline", "features"], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def parts_on_disk(project) -> int:
    return len(list((project / "cache" / "features").glob("*.parts/part-*.h5")))


def test_a_killed_worker_is_retried_and_the_run_ends_with_every_photo(tmp_path, big_photos, cluster):
    os.symlink(big_photos, tmp_path / "photos")
    driver = start_driver(tmp_path, cluster)
    deadline = time.time() + 180
    while time.time() < deadline and driver.poll() is None and not (workers() and parts_on_disk(tmp_path) >= 1):
        time.sleep(0.05)
    victims = workers()
    assert driver.poll() is None and victims, f"the run ended before a worker could be killed: {driver.stderr.read()[-2000:] if driver.poll() is not None else ''}"
    os.kill(victims[0], signal.SIGKILL)  # mid-run: a part is committed, shards are in flight
    out, err = driver.communicate(timeout=300)
    assert driver.returncode == 0, err[-3000:]
    assert len(feature_store.read_index(next((tmp_path / "cache" / "features").glob("*.h5")))[0]) == 320
    assert set(workers()).isdisjoint(victims)


def test_a_killed_driver_keeps_its_parts_and_the_next_run_completes(tmp_path, big_photos, cluster):
    os.symlink(big_photos, tmp_path / "photos")
    driver = start_driver(tmp_path, cluster)
    deadline = time.time() + 180
    while time.time() < deadline and driver.poll() is None and parts_on_disk(tmp_path) < 2:
        time.sleep(0.02)
    alive = driver.poll() is None
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert alive, "the run ended before it could be killed"
    kept = 0
    for part in (tmp_path / "cache" / "features").glob("*.parts/part-*.h5"):
        with __import__("h5py").File(part) as f:
            kept += len(f["sha256"])
    assert 64 <= kept < 320
    rerun = subprocess.run([sys.executable, "-m", "pipeline", "features"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{320 - kept} new image(s) to featurise ({kept} cached)" in rerun.stderr
    assert len(feature_store.read_index(next((tmp_path / "cache" / "features").glob("*.h5")))[0]) == 320


def test_an_unreachable_cluster_is_one_line_and_writes_nothing(tmp_path):
    make_dataset(tmp_path / "photos", per_class=4)
    (tmp_path / "params.yaml").write_text(
        "data: {root: photos}\nfeatures: {backbone: tiny, engine: ray, ray_address: '127.0.0.1:9'}\n")
    started = time.perf_counter()
    out = cli(tmp_path, "features", env={"PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin"})
    assert out.returncode == 2 and time.perf_counter() - started < 30
    assert out.stderr.strip() == ("error: features.ray_address 127.0.0.1:9: no Ray cluster answers there ([Errno 111] "
                                  "Connection refused); start one with 'ray start --head' or set "
                                  "features.ray_address: null")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "photos"]


def test_without_ray_installed_it_says_to_run_setup_ray(tmp_path):
    make_dataset(tmp_path / "photos", per_class=4)
    (tmp_path / "params.yaml").write_text("data: {root: photos}\nfeatures: {backbone: tiny, engine: ray}\n")
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None\n")  # as if not installed
    out = cli(tmp_path, "features", env={"PYTHONPATH": f"{tmp_path}:{ROOT}"})
    assert out.returncode == 2
    assert out.stderr.strip() == ("error: features.engine: ray needs Ray, which is not installed; "
                                  "run 'make setup-ray'")


def test_the_cluster_recipe_in_docs_passes_rays_own_validation():
    """docs/scale.md's `ray up` file, checked by the code `ray up` runs before launching anything."""
    import re

    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = (ROOT / "docs" / "scale.md").read_text()
    config = yaml.safe_load(re.search(r"```yaml\n(# cluster.yaml.*?)```", text, re.S).group(1))
    validate_config(prepare_config(config))
    broken = {**config, "head_node_type": "no_such_type"}
    with pytest.raises(ValueError):
        validate_config(prepare_config(broken))
