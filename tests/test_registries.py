"""The extension points are registries: a throwaway head and a throwaway export format, each added in a
temporary registry, work everywhere (params, the generated files, training, predict, export) with
nothing else edited, and are gone after."""
import json
from typing import Literal

import numpy as np
import pytest
from pydantic import Field

from pipeline import graph
from pipeline import params as params_mod
from pipeline.project import open_project
from pipeline.stages import features, train_head
from pipeline.training import heads
from pipeline.training.heads.base import dense_logits
from pipeline.use import export, formats, predict

from conftest import ROOT, make_params


class ThrowawayParams(heads.HeadParams):
    model: Literal["throwaway"] = "throwaway"
    sharpness: float = Field(2.0, gt=0, description="how fast a class's logit falls with the squared distance")


class ThrowawayHead(heads.Head):
    """Logits: minus ``sharpness`` times the squared distance to each class's mean feature vector."""

    Params = ThrowawayParams
    summary = "a throwaway head for the registry's test"

    def __init__(self, sharpness=2.0):
        self.sharpness = sharpness

    def fit(self, X, y, log=None):
        X = self.embed(X).astype(np.float64)
        self.n_classes_ = int(y.max()) + 1
        self.means_ = np.stack([X[y == k].mean(axis=0) for k in range(self.n_classes_)])
        self.history_ = {"sharpness": self.sharpness}
        return self

    def _linear(self):
        # -s |x - m|^2 = 2s x.m - s |m|^2 - s |x|^2, and the last term is the same for every class
        return 2 * self.sharpness * self.means_.T, -self.sharpness * np.sum(self.means_ ** 2, axis=1)

    def decision_function(self, X):
        kernel, bias = self._linear()
        return self.embed(X).astype(np.float64) @ kernel + bias

    def keras_layers(self, x, input_shape):
        return x, dense_logits(x, *self._linear())


def _write_copy(model, folder, job):
    model.save(folder / "copy.keras")


def _run_copy(path):
    import keras

    import pipeline.training.layers  # noqa: F401  (the layers inside the saved model)

    loaded = keras.saving.load_model(path)
    return lambda x: formats.split_outputs(loaded(x, training=False))


COPY = formats.ExportFormat("copy.keras", _write_copy, _run_copy)


def test_a_throwaway_head_and_format_need_no_other_edit(project):
    params_text = (ROOT / "params.yaml").read_text()
    with heads.registered(ThrowawayHead), formats.registered(COPY):
        params = make_params(project, train_head={"model": "throwaway", "sharpness": 3.0})
        assert params.train_head.head == ThrowawayParams(sharpness=3.0)
        with pytest.raises(params_mod.ParamsError, match="train_head.sharpness: Input should be greater than 0"):
            make_params(project, train_head={"model": "throwaway", "sharpness": -1.0})
        # the generated files list it: the DVC params, the params template
        dvc = graph.render_dvc_yaml()
        assert "train_head.sharpness" in dvc
        template = graph.render_params_yaml(params_text)
        assert "# throwaway only\n  sharpness: 2.0" in template and "throwaway (a throwaway head" in template
        # and it trains, answers and exports like the others
        project_ = open_project(params, project)
        features.run(project_)
        trained = train_head.run(project_)
        assert trained.meta["params"]["model"] == "throwaway" and trained.classifier.history["sharpness"] == 3.0
        answer = predict.run(project_, [project / "photos" / "misty" / "misty_03.png"])[0]
        assert answer.answer == "misty"
        result = export.run(project_)
        assert "copy.keras" in result.files and result.parity["copy.keras"]["max_abs_diff"] <= 1e-4
        assert json.loads((result.folder / "model.json").read_text())["provenance"]["model_params"]["sharpness"] == 3.0
    # gone again: the registry, the params, the generated files are as they were
    assert "throwaway" not in heads.HEADS and "copy.keras" not in formats.FORMATS
    with pytest.raises(params_mod.ParamsError, match="model 'throwaway' is not a head"):
        make_params(project, train_head={"model": "throwaway"})
    assert graph.render_params_yaml(params_text) == params_text and "sharpness" not in graph.render_dvc_yaml()


def test_a_name_registered_twice_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        heads.register(heads.LogRegHead)
    with pytest.raises(ValueError, match="registered twice"):
        formats.register(formats.FORMATS["model.tflite"])
