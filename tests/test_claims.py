"""README's promises that a quiet defect could break, each checked so that the defect fails a test:
int8's refusal with the real threshold, heads trained on the mean of the views, the softmax head's
best epoch kept, the stat index's four fields, splits by content alone, near-duplicate grouping and
class weights on the default path."""
import os

import h5py
import numpy as np
import pytest

from pipeline import layout, runtime
from pipeline import scan as dataset
from pipeline.backbones import litert
from pipeline.project import open_project
from pipeline.stages import features, train_head
from pipeline.training import heads
from pipeline.training.classifiers import softmax

from conftest import CLASS_COLOURS, cached_table, make_dataset, make_image, make_params


def test_an_int8_backbone_calibrated_on_a_degenerate_set_is_refused_with_the_real_threshold(project, monkeypatch):
    """Calibrated on black photos only, every activation range collapses: the int8 backbone's features
    really disagree with the float ones, and the check (its threshold as shipped) refuses it."""
    real = runtime.calibration_images

    def black(f):
        photos = real(f)
        return lambda: [np.zeros_like(photo) for photo in photos()]

    monkeypatch.setattr(runtime, "calibration_images", black)
    params = make_params(project, features={"precision": "int8"}, paths={"weights_dir": "cache/weights"})
    with pytest.raises(litert.BackboneError, match=r"^the int8 backbone's features differ from the float ones "
                                                   r"\(cosine similarity -?[0-9.]+ < 0.95 on a check photo\)"):
        features.run(open_project(params, project))
    assert not list((project / "cache" / "weights").glob("*-int8-*.tflite"))  # not kept
    assert not list((project / "cache" / "features").glob("*.h5"))  # nothing in the cache
    assert not list((project / "cache" / "features").glob("*.parts/*"))


def test_heads_train_on_the_mean_of_the_views(project, monkeypatch):
    """The rows a head is fitted on are the mean of the cached original and mirrored features, read here
    straight from the file: a head trained on the original view alone fails this."""
    params = make_params(project, features={"views": ["original", "hflip"]})
    features.run(open_project(params, project))
    seen = {}
    real_fit = heads.LogRegHead.fit

    def spy(self, X, y, log=None, **val):
        seen.setdefault("X", np.array(X))  # the first fit is the head; later ones are out-of-fold refits
        return real_fit(self, X, y, log=log, **val)

    monkeypatch.setattr(heads.LogRegHead, "fit", spy)
    trained = train_head.run(open_project(params, project))
    with h5py.File(layout.cache_file(params, project), "r") as f:
        names = [n for n in f if n.startswith("features")]
        assert len(names) == 2, names  # the original and the mirrored view, stored apart
        train = trained.inputs.rows("train").positions  # the rows the labelling of these params puts in train
        original, mirrored = (f[n][train.tolist()] for n in sorted(names))
    assert not np.allclose(original, mirrored)  # the views differ, so the mean is not either of them
    np.testing.assert_allclose(seen["X"], (original + mirrored) / 2, rtol=1e-6)
    assert trained.meta["n_train"] == len(train)


def test_the_softmax_head_keeps_its_best_epoch(tmp_path):
    """Val labels swapped, a high learning rate: the val loss is lowest early and rises after. The saved
    head's val loss, computed here from its probabilities, is the best epoch's, not the last one's."""
    for i in range(8):
        make_image(tmp_path / "photos" / "train" / "misty" / f"{i}.png", CLASS_COLOURS["misty"], 40_000 + i)
        make_image(tmp_path / "photos" / "train" / "tigger" / f"{i}.png", CLASS_COLOURS["tigger"], 41_000 + i)
        make_image(tmp_path / "photos" / "val" / "misty" / f"{i}.png", CLASS_COLOURS["tigger"], 50_000 + i)
        make_image(tmp_path / "photos" / "val" / "tigger" / f"{i}.png", CLASS_COLOURS["misty"], 60_000 + i)
        make_image(tmp_path / "photos" / "test" / "misty" / f"{i}.png", CLASS_COLOURS["misty"], 70_000 + i)
    params = make_params(tmp_path, train_head={"model": "softmax", "learning_rate": 0.05, "epochs": 40,
                                               "patience": 5, "l2": 0.0, "dropout": 0.0})
    features.run(open_project(params, tmp_path))
    trained = train_head.run(open_project(params, tmp_path))
    val_loss = trained.classifier.history["epochs"]["val_loss"]
    best = int(np.argmin(val_loss))
    assert best < len(val_loss) - 1 and val_loss[-1] > val_loss[best] + 0.05  # it rose after the best epoch
    inputs = trained.inputs
    rows = inputs.rows("val")
    probabilities = softmax(trained.classifier.classifier.logits(inputs.read(rows.positions)))
    loss = float(np.mean(-np.log(probabilities[np.arange(len(rows)), rows.labels])))
    assert loss == pytest.approx(val_loss[best], rel=1e-3, abs=1e-4)


def _index_scan(project):
    return dataset.scan(make_params(project).data, project, index_path=project / "index.json")


def test_a_file_edited_in_place_to_the_same_size_with_a_new_mtime_is_read_again(project):
    _index_scan(project)
    target = project / "photos" / "misty" / "misty_00.png"
    data = bytearray(target.read_bytes())
    stat = target.stat()
    data[-20] ^= 0xFF  # one byte of the last chunk's data changed: the same size, new content
    with open(target, "r+b") as f:  # in place: the same inode
        f.write(bytes(data))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    after = target.stat()
    assert (after.st_size, after.st_ino) == (stat.st_size, stat.st_ino) and after.st_mtime_ns != stat.st_mtime_ns
    assert _index_scan(project).files_read == 1


def test_a_file_replaced_atomically_with_the_same_size_and_mtime_is_read_again(project):
    """As editors save: a new file renamed over the old one. Size and modification time kept, a new inode."""
    _index_scan(project)
    target = project / "photos" / "misty" / "misty_00.png"
    stat = target.stat()
    data = bytearray(target.read_bytes())
    data[-20] ^= 0xFF
    tmp = target.with_name(".misty_00.png.tmp")
    tmp.write_bytes(bytes(data))
    os.utime(tmp, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(tmp, target)
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns) == (stat.st_size, stat.st_mtime_ns) and after.st_ino != stat.st_ino
    assert _index_scan(project).files_read == 1


def test_the_split_of_a_photo_follows_its_content_not_its_path(project):
    params = make_params(project).data
    before = {r.sha256: r.split for r in dataset.scan(params, project).records}
    # every photo moved to a new name in a new sub-folder of its class
    for path in sorted((project / "photos").rglob("*.png")):
        target = path.parent / "moved" / f"renamed_{path.stem[::-1]}.png"
        target.parent.mkdir(exist_ok=True)
        path.rename(target)
    after = dataset.scan(params, project).records
    assert {r.sha256: r.split for r in after} == before
    assert all("/moved/renamed_" in r.path for r in after)
    assert len(set(before.values())) == 3  # the three splits are all there: the comparison means something


def test_near_duplicates_are_grouped_into_one_split(tmp_path):
    """Near-copies (re-saved smaller and as JPEG) of photos, beside their originals: with grouping every
    copy lands in its original's split, on generated photos, fast."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for c, name in enumerate(("misty", "tigger", "neither")):
        for i in range(24):
            base = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
            image = Image.fromarray(base).resize((96, 72), Image.BICUBIC)  # smooth, distinct photos
            path = tmp_path / "photos" / name / f"{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            if i < 8:
                image.resize((80, 60)).save(tmp_path / "photos" / name / f"{i:02d}_copy.jpg", quality=85)
    grouped = make_params(tmp_path, data={"group_near_duplicates": True})
    features.run(open_project(grouped, tmp_path))
    table = cached_table(grouped, tmp_path)
    split_of = dict(zip(table.paths, table.splits))
    pairs = [(p, p.replace("_copy.jpg", ".png")) for p in split_of if p.endswith("_copy.jpg")]
    assert len(pairs) == 24
    assert all(split_of[a] == split_of[b] for a, b in pairs)
    # without grouping the hash split puts some pairs apart (else the check above proves nothing)
    ungrouped = make_params(tmp_path)
    features.run(open_project(ungrouped, tmp_path))
    table = cached_table(ungrouped, tmp_path)
    split_of = dict(zip(table.paths, table.splits))
    assert any(split_of[a] != split_of[b] for a, b in pairs)


def test_class_weight_balanced_is_scikit_learns_on_the_default_path(tmp_path):
    """With 4 times more photos of one class, the default head equals a logistic regression fitted here
    with class_weight='balanced' on the same features, and differs from one without."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    make_dataset(tmp_path / "photos", per_class=8, classes=("misty", "tigger"))
    for i in range(24):
        make_image(tmp_path / "photos" / "misty" / f"more_{i}.png", CLASS_COLOURS["tigger"], 90_000 + i)
    params = make_params(tmp_path, train_head={"C": 1.0})
    assert params.train_head.class_weight == "balanced"  # the default
    features.run(open_project(params, tmp_path))
    trained = train_head.run(open_project(params, tmp_path))
    table = cached_table(params, tmp_path)
    train = table.splits == "train"
    x, y = table.features[train], np.array([trained.classes.index(c) for c in table.labels[train]])
    assert np.bincount(y)[0] > 2 * np.bincount(y)[1]
    got = trained.classifier.classifier.logits(x)

    def reference(weight):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, class_weight=weight, max_iter=2000))
        return model.fit(x, y).decision_function(x)

    np.testing.assert_allclose(got[:, 1] - got[:, 0], reference("balanced"), rtol=1e-3, atol=1e-3)
    assert not np.allclose(got[:, 1] - got[:, 0], reference(None), atol=1e-2)
