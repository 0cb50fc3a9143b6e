"""The LiteRT runtime: same features as Keras within tolerance, checked before use, its own cache."""
import numpy as np
import pytest

from pipeline.backbones import litert as litert_runtime
from pipeline.data.resize import fit_to_size
from pipeline.data.resize_layer import single_image_resizer
from pipeline.project import open_project
from pipeline.stages import features

from conftest import make_params, table_of


@pytest.mark.parametrize("shape", [(375, 500), (224, 224), (100, 60), (1, 1), (1500, 2000), (447, 449)])
@pytest.mark.parametrize("mode", ["squash", "crop"])
def test_opencv_resize_matches_the_tensorflow_one(shape, mode):
    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    expected = single_image_resizer(64, mode)(image)
    got = fit_to_size(image, 64, mode)
    assert got.shape == (64, 64, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=0.01)


def test_litert_features_equal_keras_features(project):
    keras_run = features.run(open_project(make_params(project, features={"runtime": "keras"}), project))
    litert_run = features.run(open_project(make_params(project, features={"runtime": "litert"}), project))
    assert litert_run.path != keras_run.path  # the runtime is part of the cache key
    a = table_of(keras_run)
    b = table_of(litert_run)
    assert list(a.sha256) == list(b.sha256)
    np.testing.assert_allclose(b.features, a.features, atol=1e-3)
    assert b.attrs["key_params"]["runtime"] == "litert"


def test_a_litert_backbone_that_disagrees_is_refused(project, monkeypatch):
    real = litert_runtime.LiteRTBackbone.predict
    monkeypatch.setattr(litert_runtime.LiteRTBackbone, "predict", lambda self, x: real(self, x) + 0.5)
    with pytest.raises(RuntimeError, match=r"differs from Keras by 0.5 .*set features.runtime: keras"):
        # the project's own weights folder: converted here, so checked here
        features.run(open_project(make_params(project, features={"runtime": "litert"}, paths={"weights_dir": "cache/weights"}), project))
