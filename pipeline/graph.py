"""The stages, declared once: name, entry function, the params each reads, upstream stages, outputs.

Everything else derives from ``STAGES``:
- the CLI's stage commands (``python -m pipeline STAGE``), and the order ``--with-upstream`` runs;
- the Make targets and ``make help`` (``stages.mk``, generated: ``python -m pipeline makefile``);
- ``dvc.yaml`` (generated: ``python -m pipeline dvc-yaml``), with each stage's exact params keys,
  its code (the modules its entry imports) and outputs;
- ``python -m pipeline clean-cache`` (the declared cache folders).
A test keeps the generated files current.

The training rungs (and ``top-features``, train-top's input) are *gated*: run as an upstream
stage, or by DVC, a rung trains only when ``train.strategy`` chooses it, so that ``dvc repro``
with the default params never trains train-top or finetune. Run by name (``make train-top``), a
rung always trains.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from pipeline import layout, progress
from pipeline.params import SECTIONS, FeaturesParams, TrainHeadParams, key_field_names
from pipeline.project import Project
from pipeline.stages import evaluate, features, ladder
from pipeline.stages.contract import Rung

CACHE, REPORTS, ROOT = "${paths.cache_dir}", "${paths.reports_dir}", "${data.root}"
CORRECTIONS = "${data.corrections}"  # the user's decisions change labels and splits: a dep where the photos are
PACKAGE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Stage:
    name: str  # Make target, CLI command, DVC stage
    entry: Callable  # (project) -> result
    summary: str  # one line, for --help and make help
    reads: tuple[str, ...]  # params: a whole section ("data") or one key ("train_top.cut_point")
    upstream: tuple[str, ...] = ()  # stages whose outputs it reads (all that it may read)
    outputs: tuple[str, ...] = ()  # folders and files it writes, kept between runs (incremental caches)
    deps: tuple[str, ...] = ()  # other inputs than upstream outputs (the photos)
    metrics: tuple[str, ...] = ()
    plots: tuple[dict, ...] = ()
    gate: Callable | None = None  # (project) -> True when train.strategy needs this stage
    needs: Callable | None = None  # (project) -> the upstream stages these params need (default: all)
    cache_folders: tuple[str, ...] = field(default=())  # under paths.cache_dir, removed by clean-cache

    def chosen(self, project: Project) -> bool:
        return self.gate is None or self.gate(project)


def _rung_stage(rung: Rung, reads: tuple[str, ...], deps: tuple[str, ...] = ()) -> Stage:
    return Stage(rung.stage, rung.train, rung.summary, (*reads, "train.strategy"), (rung.input_stage,),
                 (f"{CACHE}/{rung.section}",), deps,
                 gate=lambda project: project.rung_name == rung.name, cache_folders=(rung.section,))


def _top_features_needed(project: Project) -> bool:
    return ladder.chosen(project).input_stage == "top-features"


# every rung fits its guard (calibration, rejection) for the reject params
RUNG_READS = {"head": ("train_head", "reject"), "top": ("train_top", "features", "reject"),
              "finetune": ("finetune", "features", "reject")}

STAGES: tuple[Stage, ...] = (
    Stage("features", features.run, "cache the frozen backbone's activations of every photo (incremental)",
          ("data", "features"), (), (f"{CACHE}/{layout.FOLDER}", f"{REPORTS}/skipped.csv"), (ROOT, CORRECTIONS),
          cache_folders=(layout.FOLDER,)),
    Stage("top-features", features.run_top,
          "cache the activations at train_top.cut_point, train-top's input (incremental)",
          ("data", *(f"features.{k}" for k in key_field_names(FeaturesParams) if k not in ("layer", "dtype")),
           "train_top.cut_point", "train.strategy"), (), (f"{CACHE}/{layout.TOP_FOLDER}",),
          (ROOT, CORRECTIONS), gate=_top_features_needed, cache_folders=(layout.TOP_FOLDER,)),
    *(_rung_stage(rung, RUNG_READS[name], (ROOT,) if name == "finetune" else ())  # finetune reads the photos
      for name, rung in ladder.RUNGS.items()),
    Stage("evaluate", evaluate.run, "metrics of the model train.strategy chooses, on the test split",
          ("train.strategy", "reject", "evaluate"), tuple(r.stage for r in ladder.RUNGS.values()),
          tuple(f"{REPORTS}/{name}" for name in ("index.html", "run.json", "misclassified.csv", "history.jsonl")),
          metrics=(f"{REPORTS}/metrics.json",),
          plots=({f"{REPORTS}/predictions.csv": {"template": "confusion", "x": "actual", "y": "predicted"}},),
          needs=lambda project: (ladder.chosen(project).stage,)),
)
BY_NAME = {stage.name: stage for stage in STAGES}
# Commands that run stages but are not one: ``make train`` trains the chosen rung.
TRAIN = Stage("train", lambda project: ladder.chosen(project).train(project),
              "train the rung train.strategy chooses (auto: the one 'make advise' recommends)", ("train.strategy",),
              tuple(r.stage for r in ladder.RUNGS.values()),
              needs=lambda project: (ladder.chosen(project).stage,))


def run(name: str, project: Project, with_upstream: bool = True) -> list:
    """Run stage ``name`` (and first the stages it needs, when ``with_upstream``): the one runner of stages,
    for the CLI and the app alike. Returns each stage's result, upstream first."""
    results = []
    for current in chain(name, project) if with_upstream else [stage(name)]:
        progress.report(current.name)
        results.append(current.entry(project))
    return results


def stage(name: str) -> Stage:
    return TRAIN if name == TRAIN.name else BY_NAME[name]


def chain(name: str, project: Project) -> list[Stage]:
    """``name`` and the stages it needs for these params, upstream first, each once."""
    order: list[Stage] = []

    def visit(current: Stage) -> None:
        needed = current.needs(project) if current.needs else current.upstream
        for upstream in needed:
            visit(BY_NAME[upstream])
        if current not in order:
            order.append(current)

    visit(stage(name))
    return order


# ---- derived files -------------------------------------------------------------------------------------

def params_keys(reads: tuple[str, ...]) -> list[str]:
    """DVC params entries: a section becomes the keys of it that change a stage's output."""
    keys = []
    for item in reads:
        if "." in item:
            keys.append(item)
        else:
            keys += [f"{item}.{name}" for name in key_field_names(SECTIONS[item])]
    return keys


def code_of(entry: Callable) -> list[str]:
    """The package's source files that ``entry``'s module imports, directly or not (DVC code deps)."""
    start = entry.__self__.open_inputs.__module__ if hasattr(entry, "__self__") else entry.__module__
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _module_file(module)
        if path is None:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                    node.module.startswith("pipeline"):
                todo.append(node.module)
                todo += [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names if alias.name.startswith("pipeline")]
    files = {_module_file(m) for m in seen} - {None}
    return sorted(str(f.relative_to(PACKAGE.parent)) for f in files if f.name != "__init__.py")


def _module_file(module: str) -> Path | None:
    parts = module.split(".")[1:]
    for candidate in (PACKAGE.joinpath(*parts).with_suffix(".py"), PACKAGE.joinpath(*parts, "__init__.py")):
        if parts and candidate.is_file():
            return candidate
    return None


def render_dvc_yaml() -> str:
    stages = {}
    for s in STAGES:
        gated = " --if-chosen" if s.gate else ""
        entry: dict = {"cmd": f"python -m pipeline {s.name}{gated}",
                       "deps": [*s.deps, *(o for u in s.upstream for o in BY_NAME[u].outputs
                                           if o.startswith(CACHE)), *code_of(s.entry)],
                       "params": params_keys(s.reads)}
        if s.outputs:
            entry["outs"] = [{path: {"persist": True, "cache": False}} for path in s.outputs]
        if s.metrics:
            entry["metrics"] = [{path: {"cache": False}} for path in s.metrics]
        if s.plots:
            entry["plots"] = [{path: {**options, "cache": False}} for plot in s.plots for path, options in plot.items()]
        stages[s.name] = entry
    header = ("# Generated from pipeline/graph.py by 'python -m pipeline dvc-yaml'; edit that, not this.\n"
              "# The training rungs run only when train.strategy chooses them (--if-chosen).\n")
    return header + yaml.safe_dump({"stages": stages}, sort_keys=False, width=120)


def render_makefile() -> str:
    lines = ["# Generated from pipeline/graph.py by 'python -m pipeline makefile'; edit that, not this.",
             "# Each stage target runs the stages it needs first (cache hits when up to date), then itself.",
             ".PHONY: " + " ".join(s.name for s in (*STAGES, TRAIN)), ""]
    for s in (*STAGES, TRAIN):
        lines += [f"{s.name}: setup ## {s.summary}", f"\t$(RUN) {s.name} --with-upstream $(ARGS)", ""]
    return "\n".join(lines)


def cache_folders() -> list[str]:
    """Every folder under paths.cache_dir that a stage writes, plus what the features stage keeps beside."""
    return [folder for s in STAGES for folder in s.cache_folders] + ["weights", "file_index"]


def render_params_yaml(text: str) -> str:
    """The params file ``text`` with its ``train_head`` section made from the head registry: every head's
    keys at their defaults, each with its description."""
    from pipeline.training.heads import HEADS

    default = TrainHeadParams()
    names = [default.model, *(name for name in HEADS if name != default.model)]
    choices = "; ".join(f"{name} ({HEADS[name].summary})" for name in names)
    lines = ["train_head:", *_commented("model", default.model, f"the head, one of: {choices}"),
             *_commented("class_weight", default.class_weight, "balanced (weights inverse to class frequency) or none"),
             *_commented("seed", default.seed, "random seed for shuffling and initialisation")]
    for name in names:
        fields = HEADS[name].Params.model_fields
        if len(fields) > 1:
            lines.append(f"  # {name} only")
        lines += [line for key in HEADS[name].Params.keys()
                  for line in _commented(key, fields[key].default, fields[key].description or "")]
    section = re.compile(r"^train_head:\n(?:(?:[ #].*)?\n)*?(?=\n[a-z_]+:)", re.MULTILINE)
    if not section.search(text):
        raise ValueError("no train_head section to replace")
    return section.sub("\n".join(lines) + "\n", text, count=1)


def _commented(key: str, value, description: str, column: int = 28, width: int = 118) -> list[str]:
    """``  key: value   # description``, the description wrapped at ``width`` under its column."""
    import textwrap

    shown = yaml.safe_dump({key: list(value) if isinstance(value, tuple) else value}, default_flow_style=True,
                           width=1000).strip()[1:-1]
    head = f"  {shown}".ljust(column - 1) + " "
    room = max(width - max(len(head), column), 30) - 2
    wrapped = textwrap.wrap(description, room) or [""]
    return [f"{head}# {wrapped[0]}".rstrip(), *(" " * column + f"# {line}" for line in wrapped[1:])]
