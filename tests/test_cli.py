"""The command line: one-line errors with a non-zero exit, and the stages end to end."""
import json

import pytest

from conftest import cli, make_dataset

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
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: no cached features at ")
    assert out.stderr.strip().endswith("; run 'make features' first") and len(out.stderr.strip().splitlines()) == 1


def test_predict_and_export_before_training_say_what_to_run(tmp_path):
    (tmp_path / "params.yaml").write_text(PARAMS)
    make_dataset(tmp_path / "photos", per_class=4)
    assert cli(tmp_path, "features").returncode == 0
    for command in (["predict", "photos"], ["export"]):
        out = cli(tmp_path, *command)
        assert out.returncode == 2
        assert out.stderr.strip().splitlines()[-1].startswith("error: no train-head model for these params in ")
        assert out.stderr.strip().endswith("run 'make train-head' first")


def test_all_stages_from_another_directory(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(PARAMS)
    make_dataset(project / "photos", per_class=8)
    out = cli(tmp_path, "all", "--params", "project/params.yaml")  # paths are relative to the params file
    assert out.returncode == 0, out.stderr
    assert "balanced accuracy" in out.stdout
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert metrics["n_test"] == sum(m["support"] for m in metrics["per_class"].values()) > 0
    again = cli(project, "features")
    assert "features: cache hit (24 images, 0 new)" in again.stderr


def test_a_full_disk_is_one_line_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    import errno

    from pipeline import cli as cli_mod

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "cache/features/x.h5")

    monkeypatch.setattr(cli_mod, "_dispatch", full)
    assert cli_mod.main(["features"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: [Errno 28] No space left on device: 'cache/features/x.h5'"]

    def bug(args):
        raise OSError("an OSError from the tool's own code")

    monkeypatch.setattr(cli_mod, "_dispatch", bug)
    with pytest.raises(OSError, match="own code"):
        cli_mod.main(["features"])
