"""The rungs of the transfer-learning ladder, and the one setting that chooses among them.

``train.strategy`` names the rung whose model evaluate, predict, export and ``make train`` use:
``head``, ``top`` or ``finetune``, or ``auto`` (what ``make advise`` recommends for the dataset).
It is resolved once per command, into the project (``pipeline.project.open_project``): params and
photos alone decide, what ran last never does.
"""
from __future__ import annotations

from pipeline.project import Project
from pipeline.stages import finetune, train_head, train_top
from pipeline.stages.contract import Rung

RUNGS: dict[str, Rung] = {rung.name: rung for rung in (train_head.RUNG, train_top.RUNG, finetune.RUNG)}


def chosen(project: Project) -> Rung:
    """The rung the project's ``train.strategy`` chose."""
    return RUNGS[project.rung_name]


def describe_choice(project: Project) -> str:
    """``rung head (train-head), chosen by train.strategy: head``, and the setting that picks another."""
    rung = chosen(project)
    others = ", ".join(name for name in RUNGS if name != rung.name)
    strategy = project.params.train.strategy
    how = "advised for this dataset" if strategy == "auto" else "chosen"
    return (f"rung {rung.name} ({rung.stage}), {how} by train.strategy: {strategy}; "
            f"set train.strategy to {others} for another")
