import csv
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pipeline import export, feature_store, features, predict, train_head, trained
from pipeline.feature_store import CacheError

from conftest import CLASS_COLOURS, ROOT, make_image, make_params


@pytest.fixture
def trained_project(project):
    params = make_params(project)
    features.run(params, project)
    train_head.run(params, project)
    return project


def test_predict_before_training_says_what_to_run(project):
    with pytest.raises(CacheError, match="no trained model .*run 'make train-head' first"):
        predict.run(make_params(project), project, [project / "photos"])


def test_predict_reuses_cached_features_and_featurises_new_photos(trained_project):
    params = make_params(trained_project)
    cached = trained_project / "photos" / "misty" / "misty_01.png"
    new = make_image(trained_project / "new" / "mystery.png", CLASS_COLOURS["tigger"], 99_999)
    (trained_project / "new" / "notes.txt").write_text("not a photo")
    results = predict.run(params, trained_project, [cached, trained_project / "new", trained_project / "missing.jpg"],
                          top_k=2)
    by_name = {r.path.split("/")[-1]: r for r in results}
    assert by_name["misty_01.png"].cached and by_name["misty_01.png"].labels[0] == "misty"
    assert not by_name["mystery.png"].cached and by_name["mystery.png"].labels[0] == "tigger"
    assert by_name["notes.txt"].error == "not an image (unrecognised content)"
    assert by_name["missing.jpg"].error.startswith("cannot read")
    for r in (by_name["misty_01.png"], by_name["mystery.png"]):
        assert len(r.labels) == 2 and r.probabilities[0] >= r.probabilities[1]

    # the new photo's probabilities equal those of the same photo once it is in the cache
    shutil.copy(new, trained_project / "photos" / "tigger" / "mystery.png")
    features.run(params, trained_project)
    table = feature_store.read_table(features.cache_file(params, trained_project))
    row = table.features[list(table.paths).index("tigger/mystery.png")]
    head = trained.load_current(params, trained_project).model
    expected = head.predict_proba(row[None])[0]
    got = dict(zip(by_name["mystery.png"].labels, by_name["mystery.png"].probabilities))
    for label, p in got.items():
        assert p == pytest.approx(expected[head.classes.index(label)], abs=1e-5)


def test_predict_formats(trained_project):
    results = predict.run(make_params(trained_project), trained_project,
                          [trained_project / "photos" / "misty" / "misty_02.png", trained_project / "nope.png"])
    rows = list(csv.DictReader(io.StringIO(predict.format_predictions(results, "csv"))))
    assert rows[0]["label_1"] == "misty" and float(rows[0]["p_1"]) > 0.3 and rows[1]["error"].startswith("cannot read")
    parsed = json.loads(predict.format_predictions(results, "json"))
    assert parsed[0]["predictions"][0]["label"] == "misty" and parsed[1]["error"]
    table = predict.format_predictions(results, "table")
    assert "misty" in table and "skipped: cannot read" in table


def reference_probabilities(project, params):
    table = feature_store.read_table(features.cache_file(params, project))
    head = trained.load_current(params, project).model
    mask = table.splits == "test"
    return table.paths[mask], head.predict_proba(table.features[mask]), head.classes


ROUND_TRIP = r"""
import json, sys
import numpy as np
from PIL import Image
image = np.asarray(Image.open(sys.argv[2]).convert("RGB"))[None]
folder = sys.argv[1]
out = {}
import keras, tensorflow as tf
import pipeline.preprocessing  # registers the resize layer used inside model.keras
out["keras"] = np.asarray(keras.saving.load_model(folder + "/model.keras")(image)).tolist()
serve = tf.saved_model.load(folder + "/saved_model").signatures["serve"]
out["saved_model"] = next(iter(serve(tf.constant(image)).values())).numpy().tolist()
from ai_edge_litert.interpreter import Interpreter
it = Interpreter(model_path=folder + "/model.tflite")
index = it.get_input_details()[0]["index"]
it.resize_tensor_input(index, image.shape); it.allocate_tensors()
it.set_tensor(index, image); it.invoke()
out["tflite"] = it.get_tensor(it.get_output_details()[0]["index"]).tolist()
print(json.dumps(out))
"""


@pytest.mark.parametrize("model", ["logreg", "softmax"])
def test_export_round_trip_in_a_fresh_process(trained_project, model):
    params = make_params(trained_project, train_head={"model": model, "epochs": 20, "learning_rate": 0.05})
    train_head.run(params, trained_project)
    result = export.run(params, trained_project)
    folder = result.folder
    assert {"model.keras", "saved_model", "model.tflite", "labels.txt", "model.json"} <= set(result.files)
    assert (folder / "labels.txt").read_text().split() == ["misty", "neither", "tigger"]
    meta = json.loads((folder / "model.json").read_text())
    assert meta["classes"] == ["misty", "neither", "tigger"] and meta["provenance"]["head"] == model
    assert all(entry["max_abs_diff"] <= 1e-4 for entry in meta["parity"].values())

    paths, reference, classes = reference_probabilities(trained_project, params)
    image = trained_project / "photos" / paths[0]
    out = subprocess.run([sys.executable, "-c", ROUND_TRIP, str(folder), str(image)], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-2000:]
    for name, probabilities in json.loads(out.stdout.strip().splitlines()[-1]).items():
        np.testing.assert_allclose(probabilities[0], reference[0], atol=1e-4, err_msg=name)


def test_binary_logreg_is_folded_exactly(tmp_path):
    from conftest import make_dataset

    make_dataset(tmp_path / "photos", per_class=10, classes=("misty", "tigger"))
    params = make_params(tmp_path)
    features.run(params, tmp_path)
    head = train_head.run(params, tmp_path).head
    table = feature_store.read_table(features.cache_file(params, tmp_path))
    dense = head.as_keras(table.features.shape[1:])
    np.testing.assert_allclose(np.asarray(dense(table.features)), head.predict_proba(table.features), atol=1e-5)


def test_broken_parity_refuses_to_export(trained_project, monkeypatch):
    real_build = export.build_export_model

    def wrong_normalisation(backbone, head_model, size, resize):
        import keras

        model = real_build(backbone, head_model, size, resize)
        image = keras.Input((None, None, 3), dtype="uint8")
        darker = keras.layers.Rescaling(0.8)(keras.layers.Rescaling(1.0)(image))  # a preprocessing mismatch
        return keras.Model(image, model(keras.ops.cast(darker, "uint8")))

    monkeypatch.setattr(export, "build_export_model", wrong_normalisation)
    with pytest.raises(export.ExportError, match=r"does not answer like the pipeline.*worst: "):
        export.run(make_params(trained_project), trained_project)
    assert not (trained_project / "models").exists()
    assert not list(trained_project.glob(".models.*"))  # no temporary folder left behind


def test_dynamic_range_quantised_export_agrees_on_top1(trained_project):
    params = make_params(trained_project, export={"quantize": "dynamic"})
    result = export.run(params, trained_project)
    assert "model_dynamic.tflite" in result.files
    assert result.parity["model_dynamic.tflite"]["top1_agreement"] >= 0.99
