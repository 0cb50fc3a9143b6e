"""Real ImageNet weights on real photos from ../shared/datasets (skipped where it is absent)."""
import shutil

import pytest

from pipeline.project import open_project
from pipeline.stages import evaluate, features, train_head

from conftest import make_params, shared_dataset


@pytest.mark.slow
def test_lite0_features_separate_dogs_from_cats(tmp_path):
    source = shared_dataset("dogs_vs_cats_1k")
    for label in ("cats", "dogs"):
        files = sorted((source / label).iterdir())[:60]
        (tmp_path / "photos" / label).mkdir(parents=True)
        for f in files:
            shutil.copy(f, tmp_path / "photos" / label / f.name)
    params = make_params(tmp_path, features={"backbone": "efficientnet_lite0", "batch_size": 16},
                         data={"train_fraction": 0.5, "val_fraction": 0.0, "test_fraction": 0.5})
    features.run(open_project(params, tmp_path))
    train_head.run(open_project(params, tmp_path))
    metrics = evaluate.run(open_project(params, tmp_path)).metrics
    assert metrics["n_test"] > 40
    assert metrics["accuracy"] >= 0.95  # FACTS.md: about 98% with 50 training images per class
