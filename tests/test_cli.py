"""The command line: one-line errors with a non-zero exit, and the stages end to end."""
import json
import subprocess
import sys

from conftest import ROOT, make_dataset

ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TQDM_DISABLE": "1"}


def cli(cwd, *args):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          env=ENV, timeout=300)


PARAMS = """
data: {root: photos, train_fraction: 0.6, val_fraction: 0.2, test_fraction: 0.2}
features: {backbone: tiny}
"""


def test_misspelt_key_is_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "params.yaml").write_text(PARAMS)
    make_dataset(tmp_path / "photos", per_class=4)
    out = cli(tmp_path, "features", "--set", "features.batchsize=4")
    assert out.returncode == 2
    assert out.stderr.strip() == ("error: --set features.batchsize=4 (over params.yaml): "
                                  "features.batchsize: unknown key (misspelt?)")
    assert not (tmp_path / "cache").exists()


def test_missing_data_root(tmp_path):
    (tmp_path / "params.yaml").write_text(PARAMS)
    out = cli(tmp_path, "features")
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: data.root: no folder at ")
    assert "photos" in out.stderr


def test_train_head_before_features(tmp_path):
    (tmp_path / "params.yaml").write_text(PARAMS)
    out = cli(tmp_path, "train-head")
    assert out.returncode == 2 and "run 'make features' first" in out.stderr


def test_all_stages_from_another_directory(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(PARAMS)
    make_dataset(project / "photos", per_class=8)
    out = cli(tmp_path, "all", "--params", "project/params.yaml")  # paths are relative to the params file
    assert out.returncode == 0, out.stderr
    assert "balanced accuracy" in out.stdout
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert metrics["n_test"] > 0
    again = cli(project, "features")
    assert "features: cache hit (24 images, 0 new)" in again.stderr
