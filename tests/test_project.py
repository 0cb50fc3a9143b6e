"""State is the params: the same params give the same answer whatever ran before them.

Runs with other splits, other corrections and other views are interleaved with runs of the default
params; predict, evaluate, export and the app must answer for the default params exactly as before.
"""
import csv
import json

import numpy as np
import pytest

from pipeline import graph
from pipeline.project import open_project
from pipeline.stages import ladder
from pipeline.store import labels
from pipeline.use import export, predict

from conftest import CountingBackbone, cli, make_params


def answers(project, photos):
    return [(p.answer, p.labels, np.round(p.probabilities, 6).tolist(), p.threshold)
            for p in predict.run(project, photos)]


def other_split(base, project) -> str:
    """A split file that puts every photo in another split than the hash split does."""
    rows = labels.read(project.labels_file()).rows()
    turn = {"train": "val", "val": "test", "test": "train"}
    with open(base / "other.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "split"])
        for i, (_, path, _, split) in enumerate(rows):
            writer.writerow([path, turn[split] if i % 2 else split])
    return "other.csv"


def other_corrections(base) -> str:
    (base / "relabelled.csv").write_text("path,action,label\nphotos/misty/misty_00.png,relabel,tigger\n"
                                         "photos/misty/misty_01.png,relabel,tigger\n"
                                         "photos/neither/neither_02.png,exclude,\n")
    return "relabelled.csv"


def test_interleaved_splits_corrections_and_views_never_change_the_default_answer(project, monkeypatch):
    default = open_project(make_params(project), project)
    graph.run("evaluate", default)
    photos = [project / "photos" / "misty" / "misty_03.png", project / "photos" / "tigger" / "tigger_05.png"]
    before = answers(default, photos)
    run_before = json.loads((project / "reports" / "run.json").read_text())["model"]["key"]

    variants = [make_params(project, data={"split_csv": other_split(project, default)}),
                make_params(project, data={"corrections": other_corrections(project)}),
                make_params(project, features={"views": ["original", "hflip"]})]
    counter = CountingBackbone(monkeypatch)
    for variant in variants:
        other = open_project(variant, project)
        graph.run("evaluate", other)
        assert ladder.chosen(other).find(other).key != run_before  # really another model
        assert answers(open_project(make_params(project), project), photos) == before
    assert counter.images == 36  # one new view of each photo; the other variants featurised nothing

    # the last features run was another split's: the default params still get their own model everywhere
    graph.run("features", open_project(variants[0], project))
    again = open_project(make_params(project), project)
    assert answers(again, photos) == before
    graph.run("evaluate", again)
    assert json.loads((project / "reports" / "run.json").read_text())["model"]["key"] == run_before
    from pipeline.app.model import Served

    assert Served(again).health()["model_key"] == run_before
    exported = export.run(again)
    assert json.loads((exported.folder / "model.json").read_text())["provenance"]["model_key"] == run_before


def test_the_cli_answers_with_the_params_it_is_given(project):
    (project / "params.yaml").write_text(json.dumps({"data": {"root": "photos", "train_fraction": 0.6,
                                                              "val_fraction": 0.2, "test_fraction": 0.2},
                                                     "features": {"backbone": "tiny"}}))
    photo = str(project / "photos" / "misty" / "misty_03.png")
    assert cli(project, "all").returncode == 0
    first = json.loads(cli(project, "predict", photo, "--format", "json").stdout)
    split = other_split(project, open_project(make_params(project), project))
    assert cli(project, "all", "--set", f"data.split_csv={split}").returncode == 0
    other = json.loads(cli(project, "predict", photo, "--format", "json", "--set", f"data.split_csv={split}").stdout)
    assert other[0]["threshold"] != first[0]["threshold"]  # another split, another model
    assert json.loads(cli(project, "predict", photo, "--format", "json").stdout) == first


def test_a_labelling_the_params_have_not_made_yet_is_an_error_naming_the_stage(project):
    graph.run("train-head", open_project(make_params(project), project))
    moved = open_project(make_params(project, data={"train_fraction": 0.5, "val_fraction": 0.3}), project)
    with pytest.raises(labels.CacheError, match="run 'make features'"):
        predict.run(moved, [project / "photos" / "misty" / "misty_03.png"])


def test_the_rung_is_resolved_once_per_project(project, monkeypatch):
    from pipeline import scan

    calls = []
    real = scan.scan
    monkeypatch.setattr(scan, "scan", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    auto = open_project(make_params(project, train={"strategy": "auto"}), project)
    assert calls == [1] and auto.rung_name == "head" and auto.advice is not None
    for _ in range(3):
        assert ladder.chosen(auto).name == "head" and [s.name for s in graph.chain("evaluate", auto)] == \
            ["features", "train-head", "evaluate"]
    assert calls == [1]  # the stages' own scans run when they run, never to choose the rung again
