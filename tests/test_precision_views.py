"""features.precision: int8 and features.views: [original, hflip]."""
import json

import numpy as np
import pytest

from pipeline import layout
from pipeline.backbones import litert
from pipeline.project import open_project
from pipeline.stages import features, train_head
from pipeline.use import export, predict

from conftest import CountingBackbone, cached_table, cli, make_params, table_of


def test_int8_backbone_is_calibrated_checked_kept_and_keyed(project, monkeypatch):
    own = {"weights_dir": "cache/weights"}  # this project's own, so that this test converts
    float_run = features.run(open_project(make_params(project, paths=own), project))
    counter = CountingBackbone(monkeypatch)
    int8 = make_params(project, features={"precision": "int8"}, paths=own)
    result = features.run(open_project(int8, project))
    assert result.path != float_run.path and counter.images == 36  # its own cache
    converted = list((project / "cache" / "weights").glob("*-int8-scikit-image-v1.tflite"))
    assert len(converted) == 1
    check = json.loads(converted[0].with_name(converted[0].name.replace(".tflite", ".verified.json")).read_text())
    assert check["precision"] == "int8" and check["min_cosine"] >= litert.INT8_MIN_COSINE
    assert check["calibration_photos"] == litert.INT8_CALIBRATION_PHOTOS  # generic photos, not the project's
    a, b = table_of(float_run), table_of(result)
    cosine = np.sum(a.features * b.features, axis=1) / (np.linalg.norm(a.features, axis=1) *
                                                          np.linalg.norm(b.features, axis=1))
    assert cosine.min() >= litert.INT8_MIN_COSINE and not np.array_equal(a.features, b.features)
    assert b.attrs["precision"] == "int8" and b.attrs["key_params"]["precision"] == "int8"
    mtime = converted[0].stat().st_mtime_ns
    (project / "cache" / "features").joinpath(result.path.name).unlink()
    features.run(open_project(int8, project))
    assert converted[0].stat().st_mtime_ns == mtime  # converted once, then reused


def test_an_int8_backbone_that_drifts_is_refused_in_one_line(tmp_path):
    from conftest import make_dataset

    make_dataset(tmp_path / "photos", per_class=6)
    (tmp_path / "params.yaml").write_text("data: {root: photos, train_fraction: 0.6, val_fraction: 0.2, "
                                          "test_fraction: 0.2}\nfeatures: {backbone: tiny, precision: int8}\n"
                                          "paths: {weights_dir: cache/weights}\n")
    hook = "import pipeline.backbones.litert as l\nl.INT8_MIN_COSINE = 1.01\n"  # no int8 model can pass this
    (tmp_path / "sitecustomize.py").write_text(hook)
    from conftest import ROOT

    out = cli(tmp_path, "features", env={"PYTHONPATH": f"{tmp_path}:{ROOT}"})
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the int8 backbone's features differ from the float ones (cosine similarity ")
    assert last.endswith("< 1.01 on a check photo); set features.precision: float32")
    assert not list((tmp_path / "cache" / "weights").glob("*-int8-*.tflite"))  # not kept
    assert not list((tmp_path / "cache" / "features").glob("*.h5"))


def test_int8_needs_litert():
    from pipeline import params

    with pytest.raises(params.ParamsError, match="precision: int8 runs on LiteRT; set features.runtime: litert"):
        params.load(None, ["features.precision=int8", "features.runtime=keras"])


def test_adding_the_mirrored_view_runs_only_that_view(project, monkeypatch, caplog):
    plain = make_params(project)
    first = features.run(open_project(plain, project))
    flipped = make_params(project, features={"views": ["original", "hflip"]})
    counter = CountingBackbone(monkeypatch)
    caplog.set_level("INFO")
    second = features.run(open_project(flipped, project))
    assert second.path == first.path  # the same cache, a view more per row
    assert counter.images == 36 and "view hflip of 36 cached image(s) to featurise" in caplog.text
    import h5py

    with h5py.File(second.path) as f:
        assert json.loads(f.attrs["views"]) == ["original", "hflip"]
        assert f["features_hflip"].shape == f["features"].shape
        mirrored, plain_rows = f["features_hflip"][...], f["features"][...]
    assert not np.allclose(mirrored, plain_rows)  # really another view
    # the mirrored view is the backbone on the mirrored photo: check one row independently
    from pipeline import runtime
    from pipeline.data.decode import decode_rgb

    path = table_of(second).paths[0]  # the labelling and the cache are both in sha256 order
    with h5py.File(second.path) as f:
        row = f["features_hflip"][0]
    runner = runtime.open_backbone(flipped.features, project / "cache")
    image = runtime.resizer(flipped.features, runner.input_size)(decode_rgb(project / "photos" / path))
    np.testing.assert_allclose(runner.predict(image[:, ::-1][None])[0], row, atol=1e-5)
    counter.images = 0
    features.run(open_project(plain, project))  # back to the original only: no backbone work, the view dropped
    assert counter.images == 0


def test_heads_predict_and_export_use_the_mean_of_the_views(project):
    params = make_params(project, features={"views": ["original", "hflip"]})
    features.run(open_project(params, project))
    trained = train_head.run(open_project(params, project))
    assert trained.meta["inputs"]["identity"].endswith(":original+hflip")
    import h5py

    paths = cached_table(params, project).paths
    with h5py.File(layout.cache_file(params, project)) as f:
        mean = (f["features"][...] + f["features_hflip"][...]) / 2
    expected = trained.classifier.predict_proba(mean)
    got = predict.run(open_project(params, project), [project / "photos" / paths[0]])[0]
    order = np.argsort(-expected[0])
    assert got.labels == [trained.classes[j] for j in order]
    exported = export.run(open_project(params, project))
    assert all(entry["max_abs_diff"] <= 1e-4 for entry in exported.parity.values())
    model = json.loads((exported.folder / "model.json").read_text())
    assert model["provenance"]["features_params"]["views"] == ["original", "hflip"]


def test_views_need_the_pooled_layer():
    from pipeline import params

    with pytest.raises(params.ParamsError, match="views beyond original need layer: pooled"):
        params.load(None, ["features.views=[original, hflip]", "features.layer=block1"])
    with pytest.raises(params.ParamsError, match="starts with original"):
        params.load(None, ["features.views=[hflip]"])


def test_int8_is_calibrated_on_generic_photos_and_converted_once_per_machine(tmp_path, monkeypatch):
    """The int8 backbone depends on no project's photos: a second project with other photos finds it in
    the machine's cache and converts nothing; its cache key names the calibration set."""
    from conftest import make_dataset

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "machine"))
    first, second = tmp_path / "first", tmp_path / "second"
    make_dataset(first / "photos", per_class=6, seed=1)
    make_dataset(second / "photos", per_class=6, seed=2)
    params = {p: make_params(p, features={"precision": "int8"}) for p in (first, second)}
    features.run(open_project(params[first], first))
    converted = list((tmp_path / "machine" / "photohead" / "weights").glob("tiny-*-int8-scikit-image-v1.tflite"))
    assert len(converted) == 1 and not (first / "cache" / "weights").exists()
    mtime = converted[0].stat().st_mtime_ns

    def no_conversion(self):
        raise AssertionError("converted again")

    monkeypatch.setattr(litert.LiteRTEngine, "_convert", no_conversion)
    result = features.run(open_project(params[second], second))
    assert converted[0].stat().st_mtime_ns == mtime
    assert table_of(result).attrs["key_params"]["int8_calibration"] == "scikit-image-v1"
    assert "int8_calibration" not in layout.key_params(make_params(first).features)  # float32: not in its key
