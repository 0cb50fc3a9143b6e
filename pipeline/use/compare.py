"""Command `compare`: every rung trained for the current params, side by side on the same test split.

It trains nothing: a rung not trained for these params is listed with the command that trains it.
"""
from __future__ import annotations

from pipeline.stages import ladder
from pipeline.stages.evaluate import evaluate_model


def run(project) -> str:
    chosen = ladder.chosen(project)
    lines = [f"{'rung':<9}{'input':<16}{'accuracy':>9} {'balanced':>9} {'test':>5} {'training s':>11}"]
    for rung in ladder.RUNGS.values():
        trained = rung.find(project)
        mark = "*" if rung is chosen else " "
        if trained is None:
            lines.append(f"{rung.name + mark:<9}not trained for these params ('make {rung.stage}')")
            continue
        with trained:
            metrics = evaluate_model(trained)["metrics"]
        seconds = trained.classifier.history.get("fit_seconds")
        lines.append(f"{rung.name + mark:<9}{trained.inputs.layer:<16}{metrics['accuracy']:9.4f} "
                     f"{metrics['balanced_accuracy']:9.4f} {metrics['n_test']:5d} "
                     f"{f'{seconds:.1f}' if seconds is not None else '-':>11}")
    lines.append(f"* the rung train.strategy chooses ({project.params.train.strategy}): evaluate, predict and export use it")
    return "\n".join(lines)
