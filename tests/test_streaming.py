"""After training, every pass over the photos (calibration, the guard's embeddings, evaluate's answers)
holds a bounded slice of activations: a direct Keras call on R rows holds every layer's output for them,
nested models' layers included. EfficientNet-Lite2's top blocks hold 14.6 MB a row; the slice size was
once taken as 16x the input (1.1 MB a row), and train-top's guard pass peaked at 4.8 GB after a 1.1 GB
training (bench/memory_phases.py measures it)."""
import numpy as np
import pytest

from pipeline.stages import contract
from pipeline.tf_import import keras as quiet_keras
from pipeline.training import classifiers
from pipeline.training.inputs import ArrayInputs


def _expanding_model(width=64, expand=6, blocks=4):
    """Input (9, 9, width) -> a nested model of inverted-residual-like blocks (each expands 6x) -> softmax."""
    keras = quiet_keras()
    from keras import layers

    inner_in = keras.Input((9, 9, width))
    x = inner_in
    for i in range(blocks):
        y = layers.Conv2D(width * expand, 1, name=f"expand{i}")(x)
        y = layers.ReLU(name=f"relu{i}")(y)
        y = layers.Conv2D(width, 1, name=f"project{i}")(y)
        x = layers.Add(name=f"add{i}")([x, y])
    top = keras.Model(inner_in, layers.GlobalAveragePooling2D(name="pooled")(x), name="top")
    outer_in = keras.Input((9, 9, width))
    return keras.Model(outer_in, layers.Dense(3, activation="softmax", name="softmax")(top(outer_in)))


def test_every_layer_of_nested_models_is_counted():
    model = _expanding_model()
    per_block = 81 * (64 * 6 * 2 + 64 * 2)  # expand, relu, project, add
    # the outer input, the nested model's input, its blocks and pooling, the softmax
    assert classifiers._output_floats(model) == 81 * 64 + 81 * 64 + 4 * per_block + 64 + 3


def test_the_embedding_pass_calls_keras_on_slices_within_the_budget(monkeypatch):
    """The rows of each direct call times what one row holds stays within CALL_BYTES, however many rows
    the pass is given; the embeddings are those of one call on everything."""
    monkeypatch.setattr(classifiers, "CALL_BYTES", 8 << 20)  # 8 MB: a few rows a call for this model
    clf = classifiers.KerasClassifier(_expanding_model(), ["a", "b", "c"], {})
    calls = []
    held = clf.row_bytes  # every layer's output for a row, nested ones included
    embedder = clf.embedder
    clf._embedder = lambda x, training=False: (calls.append(len(x)), embedder(x, training=training))[1]
    x = np.random.default_rng(0).normal(size=(300, 9, 9, 64)).astype(np.float32)
    got = clf.embed(x)
    assert sum(calls) == 300 and max(calls) * held <= classifiers.CALL_BYTES and len(calls) > 1
    np.testing.assert_allclose(got, np.asarray(embedder(x, training=False)), rtol=1e-4, atol=1e-5)


def test_the_guard_pass_reads_the_rows_a_batch_at_a_time():
    """contract.embeddings, the guard's pass over train and val, reads the cache a batch at a time."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(700, 9, 9, 64)).astype(np.float32), np.repeat(np.arange(3), 700 // 3 + 1)[:700]
    inputs = ArrayInputs(x, y, ["a", "b", "c"])
    inputs.rows = lambda split: inputs.split_rows(700)[0]  # every row: the train split
    reads = []
    read = inputs.read
    inputs.read = lambda positions: (reads.append(len(positions)), read(positions))[1]
    clf = classifiers.KerasClassifier(_expanding_model(), ["a", "b", "c"], {})
    embedding, labels = contract.embeddings(clf, inputs, "train", batch_size=128)
    assert embedding.shape == (700, 64) and max(reads) <= 128 and sum(reads) == 700
    np.testing.assert_array_equal(labels, y)


@pytest.mark.parametrize("rows", [1, 17])
def test_a_slice_never_falls_below_one_row(rows, monkeypatch):
    monkeypatch.setattr(classifiers, "CALL_BYTES", 1)
    clf = classifiers.KerasClassifier(_expanding_model(blocks=1), ["a", "b", "c"], {})
    assert clf.embed(np.zeros((rows, 9, 9, 64), np.float32)).shape == (rows, 64)
