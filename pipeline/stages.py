"""The stages, declared once: their command names, params sections, inputs and outputs.

``dvc.yaml`` is generated from this table (``python -m pipeline dvc-yaml``; a test checks the
committed file is current), so DVC users get stages that mirror the Make targets, with the
params keys each one reads: ``dvc repro`` and ``dvc exp run --set-param train_head.C=0.1`` work
as they expect. The cache keys inside each stage still decide what is really recomputed.
Paths use DVC's templating from params.yaml (``${paths.cache_dir}``), so they are not written twice.
"""
from __future__ import annotations

from dataclasses import dataclass

import yaml


@dataclass(frozen=True)
class Stage:
    name: str  # the Make target and CLI command
    params: tuple[str, ...]  # params.yaml sections it reads
    deps: tuple[str, ...]
    outs: tuple[str, ...] = ()  # kept between runs: the caches are incremental
    metrics: tuple[str, ...] = ()
    plots: tuple[dict, ...] = ()


_CACHE, _REPORTS = "${paths.cache_dir}", "${paths.reports_dir}"

STAGES = (
    Stage("features", ("data", "features"),
          ("${data.root}", "pipeline/features.py", "pipeline/feature_store.py", "pipeline/dataset.py",
           "pipeline/images.py", "pipeline/preprocessing.py", "pipeline/backbones.py", "pipeline/efficientnet_lite.py"),
          outs=(f"{_CACHE}/features", f"{_REPORTS}/skipped.csv")),
    Stage("train-head", ("train_head",), (f"{_CACHE}/features", "pipeline/train_head.py"),
          outs=(f"{_CACHE}/heads",)),
    Stage("train-top", ("features", "train_top"), ("${data.root}", "pipeline/train_top.py"),
          outs=(f"{_CACHE}/tops",)),
    Stage("finetune", ("features", "finetune"), ("${data.root}", "pipeline/finetune.py"),
          outs=(f"{_CACHE}/finetuned",)),
    Stage("evaluate", ("evaluate",), (f"{_CACHE}/heads", "pipeline/evaluate.py", "pipeline/report.py"),
          outs=(f"{_REPORTS}/index.html", f"{_REPORTS}/misclassified.csv"),
          metrics=(f"{_REPORTS}/metrics.json",),
          plots=({f"{_REPORTS}/predictions.csv": {"template": "confusion", "x": "actual", "y": "predicted"}},)),
)


def render_dvc_yaml() -> str:
    stages = {}
    for stage in STAGES:
        entry: dict = {"cmd": f"python -m pipeline {stage.name}", "deps": list(stage.deps),
                       "params": list(stage.params)}
        if stage.outs:
            entry["outs"] = [{path: {"persist": True, "cache": False}} for path in stage.outs]
        if stage.metrics:
            entry["metrics"] = [{path: {"cache": False}} for path in stage.metrics]
        if stage.plots:
            entry["plots"] = [{path: {**options, "cache": False}} for plot in stage.plots
                              for path, options in plot.items()]
        stages[stage.name] = entry
    header = "# Generated from pipeline/stages.py by 'python -m pipeline dvc-yaml'; edit that, not this.\n"
    return header + yaml.safe_dump({"stages": stages}, sort_keys=False, width=120)
