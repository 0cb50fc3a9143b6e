"""The rungs of the transfer-learning ladder, and the one setting that chooses among them.

``train.strategy`` names the rung whose model evaluate, predict, export and ``make train`` use:
``head``, ``top`` or ``finetune``, or ``auto`` (what ``make advise`` recommends for the dataset).
Params and photos alone decide: what ran last never does.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.data import scan
from pipeline.params import Params
from pipeline.stages import finetune, train_head, train_top
from pipeline.training import advise
from pipeline.training.contract import Rung

RUNGS: dict[str, Rung] = {rung.name: rung for rung in (train_head.RUNG, train_top.RUNG, finetune.RUNG)}


def chosen(params: Params, base: str | Path = ".") -> tuple[Rung, advise.Advice | None]:
    """The rung ``train.strategy`` chooses; with ``auto``, the advice for the dataset (and the advice)."""
    if params.train.strategy != "auto":
        return RUNGS[params.train.strategy], None
    advice = advise.recommend(advise.summarise(scan.scan(params.data, Path(base))))
    return RUNGS[advice.rung], advice


def describe_choice(params: Params, rung: Rung) -> str:
    """``rung head (train.strategy: head)``, and the setting that picks another."""
    others = ", ".join(name for name in RUNGS if name != rung.name)
    how = "advised for this dataset" if params.train.strategy == "auto" else "chosen"
    return (f"rung {rung.name} ({rung.stage}), {how} by train.strategy: {params.train.strategy}; "
            f"set train.strategy to {others} for another")
