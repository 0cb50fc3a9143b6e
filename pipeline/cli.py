"""Command line: ``python -m pipeline COMMAND [--params FILE] [--set section.key=value ...]``.

The only module that touches argv, the params file and logging. The stage commands come from
``pipeline/graph.py``; relative paths in the params file are relative to the file's own folder.
"""
from __future__ import annotations

import argparse
import errno
import logging
import shutil
import sys
from pathlib import Path

from pipeline import graph
from pipeline import params as params_mod
from pipeline.errors import PipelineError
from pipeline.project import open_project

log = logging.getLogger("pipeline")

COMMANDS = {  # commands that are not stages: name -> help
    "all": "features, the rung train.strategy chooses, and evaluate (= evaluate --with-upstream)",
    "advise": "recommend a rung of the ladder for this dataset, with the reasons",
    "compare": "the trained rungs side by side on the test split",
    "inspect": "likely label errors, near-duplicates (and leakage), outliers, from the feature cache",
    "predict": "top-k labels for photos (files or folders) with the model train.strategy chooses",
    "export": "write the chosen model as .keras, SavedModel and TFLite, after checking it answers like the pipeline",
    "serve": "a local app: try photos, review inspect's findings, label photos, retrain (serve.host:serve.port)",
    "clean-cache": "delete this project's cached artifacts (the stages' folders under paths.cache_dir, the file "
                   "index, and cache/weights when paths.weights_dir points there; the machine's converted "
                   "backbones in ~/.cache/photohead/weights serve every project and are kept)",
}


def _with_params(command: argparse.ArgumentParser) -> None:
    command.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    command.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override one parameter; may be repeated")


def _parser() -> argparse.ArgumentParser:
    prog = "photohead" if Path(sys.argv[0]).name == "photohead" else "python -m pipeline"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in (*graph.STAGES, graph.TRAIN):
        command = sub.add_parser(stage.name, help=stage.summary)
        _with_params(command)
        command.add_argument("--with-upstream", action="store_true",
                             help="first run the stages it needs for these params (cache hits when up to date)")
        if stage.gate:
            command.add_argument("--if-chosen", action="store_true",
                                 help="do nothing unless train.strategy needs this stage (as DVC runs it)")
    for name, help_text in COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        _with_params(command)
        if name == "inspect":
            command.add_argument("--corrections-template", action="store_true",
                                 help="add an undecided row per finding to data.corrections, to fill in by hand")
        if name == "predict":
            command.add_argument("paths", nargs="+", metavar="PATH")
            command.add_argument("--top-k", type=int, default=None, help="labels per photo (default: predict.top_k)")
            command.add_argument("--format", choices=("table", "csv", "json"), default=None,
                                 help="output format (default: predict.format)")
    sub.add_parser("dvc-yaml", help="write dvc.yaml from the stage declarations (pipeline/graph.py)")
    sub.add_parser("makefile", help="write stages.mk, the Make targets of the stages, from their declarations")
    sub.add_parser("params-yaml", help="write the train_head section of params.yaml and the template from the heads")
    demo = sub.add_parser("demo-data", help="build the small demo dataset from scikit-image's photographs")
    demo.add_argument("--out", default="data/demo")
    init = sub.add_parser("init", help="write a params.yaml with every setting documented, for photos under --root")
    init.add_argument("--root", default="data/demo", help="the folder of class folders (default: data/demo)")
    init.add_argument("--params", default="params.yaml", help="where to write it (default: params.yaml)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("interrupted; every finished part is kept and the next run continues from it", file=sys.stderr)
        return 130
    except PipelineError as error:  # the project's own: bad input, a missing upstream result, a refused check
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in USER_ERRNOS:  # not the user's to fix: a bug keeps its traceback
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)  # the file and the reason, without a traceback
        return 2


# Failures of the user's files and disks: the message names the file, and what to do is theirs.
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.EISDIR,
               errno.ENOTDIR, errno.EEXIST, errno.EADDRINUSE, errno.EMFILE}


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _dispatch(args) -> int:
    if args.command == "dvc-yaml":
        Path("dvc.yaml").write_text(graph.render_dvc_yaml())
        print("wrote dvc.yaml")
        return 0
    if args.command == "makefile":
        Path("stages.mk").write_text(graph.render_makefile())
        print("wrote stages.mk")
        return 0
    if args.command == "params-yaml":
        for path in (Path("params.yaml"), Path(__file__).resolve().parent / "params.yaml"):
            path.write_text(graph.render_params_yaml(path.read_text(encoding="utf-8")), encoding="utf-8")
        print("wrote the train_head section of params.yaml and pipeline/params.yaml")
        return 0
    if args.command == "demo-data":
        from pipeline.data import demo

        print(f"demo dataset in {demo.build(args.out)}")
        return 0
    if args.command == "init":
        return _init(Path(args.params), args.root)
    if args.command == "serve" and not Path(args.params).exists():
        _init(Path(args.params), *_new_project_root(Path(args.params).parent), serving=True)
    params = params_mod.load(args.params, args.overrides)
    project = open_project(params, Path(args.params).resolve().parent)  # resolved once, passed down
    if args.command in ("all", *graph.BY_NAME, graph.TRAIN.name):
        return _run_stages(args, project)
    return _use(args, project)


HIDDEN_OUTPUTS = ".photohead"  # a project whose photos are its own folder keeps what it computes in here


def _new_project_root(folder: Path) -> tuple[str, bool]:
    """(data.root, whether the outputs hide under .photohead/) for ``serve`` in a folder with no params file:
    its own class folders where it has photos in sub-folders, else a new ``photos/``."""
    from pipeline import scan
    from pipeline.data.decode import image_suffixes

    suffixes = image_suffixes()
    for sub in scan._class_dirs(folder) if folder.is_dir() else []:
        if any(f.suffix.lower() in suffixes for f in scan._walk_files(sub)):
            return ".", True
    (folder / "photos").mkdir(parents=True, exist_ok=True)
    return "photos", False


def _init(target: Path, root: str, hidden_outputs: bool = False, serving: bool = False) -> int:
    """Write a params file for photos under ``root`` (and an empty corrections file), never over one; say
    what the photos are: classes, photo counts, formats not read. ``hidden_outputs``: the cache, reports and
    exports under .photohead/ (the photos are the params file's own folder)."""
    import re

    import yaml

    from pipeline import scan
    from pipeline.data import corrections

    if target.exists():
        raise params_mod.ParamsError(f"{target} exists; edit it, or pass --params to write another file")
    text = (Path(__file__).resolve().parent / "params.yaml").read_text(encoding="utf-8")
    text = re.sub(r"(?m)^  root: .*$", lambda _: f"  root: {root}  # one sub-folder per class (or train/ val/ test/ "
                  "above them)", text, count=1)
    if hidden_outputs:
        for key, name in (("cache_dir", "cache"), ("reports_dir", "reports"), ("dir", "models")):
            text = re.sub(rf"(?m)^  {key}: \S+", f"  {key}: {HIDDEN_OUTPUTS}/{name}", text, count=1)
    params = params_mod.build(yaml.safe_load(text), str(target))
    found, problem = None, f"no folder {root} yet: put one sub-folder of photos per class in it"
    if (target.parent / root).is_dir():
        try:
            found = scan.scan(params.data, target.parent)
        except scan.DatasetError as error:  # the params are still worth writing: say what to fix
            problem = str(error)
    target.write_text(text, encoding="utf-8")
    decisions = target.parent / "corrections.csv"  # where the params' data.corrections points
    if not decisions.exists():
        decisions.write_text(corrections.render({}), encoding="utf-8")
    print(f"wrote {target} (data.root: {root}) and {decisions.name}")
    if found is None:
        print(problem)
    else:
        counts = {c: sum(1 for r in found.records if r.label == c) for c in found.classes}
        print(f"{len(counts)} classes, {sum(counts.values())} photos: "
              + ", ".join(f"{c} {n}" for c, n in counts.items()))
        unread = scan.unread_summary(found.skipped)
        if unread:
            print(f"{unread}; convert them to JPEG, PNG, HEIC or AVIF to use them")
    if not serving:
        print("next: 'features', 'train-head', 'evaluate' or 'serve'")
    return 0


def _use(args, project) -> int:
    """The commands that use what the stages made."""
    params = project.params
    if args.command == "predict":
        from pipeline.use import predict

        predictions = predict.run(project, args.paths, args.top_k)
        print(predict.format_predictions(predictions, args.format or params.predict.format))
        return 0 if any(p.labels for p in predictions) else 1
    if args.command == "export":
        from pipeline.use import export

        result = export.run(project)
        print(f"exported to {result.folder}: {', '.join(result.files)}")
        return 0
    if args.command == "advise":
        from pipeline import scan
        from pipeline.training import advise

        advice = project.advice or advise.recommend(advise.summarise(scan.scan(params.data, project.base)))
        print(advise.format_advice(advice))
        return 0
    if args.command == "compare":
        from pipeline.use import compare

        print(compare.run(project))
        return 0
    if args.command == "inspect":
        from pipeline.use import inspect

        result = inspect.run(project)
        print(result.text)
        if args.corrections_template:
            path, added = inspect.corrections_template(project, result)
            print(f"added {added} undecided row(s) to {path}: fill in action (relabel, exclude or keep) and, to "
                  "relabel, the label; the next run applies them")
        return 0
    if args.command == "serve":
        from pipeline.app import server

        sock = server.listen(params.serve)  # a port in use is said at once, before any training
        server.serve(project, sock)  # the page at once; a project with no model trains behind its progress
        return 0
    if args.command == "clean-cache":
        cache = project.cache_dir
        for folder in graph.cache_folders():
            if (cache / folder).exists():  # a folder that cannot be removed is an error naming it
                shutil.rmtree(cache / folder)
        print(f"removed {', '.join(graph.cache_folders())} under {cache}")
        return 0
    raise AssertionError(f"unhandled command {args.command}")  # argparse accepts only the commands above


def _run_stages(args, project) -> int:
    name = "evaluate" if args.command == "all" else args.command
    stage = graph.stage(name)
    if getattr(args, "if_chosen", False) and not stage.chosen(project):
        for folder in stage.cache_folders:  # DVC expects the declared output to exist
            (project.cache_dir / folder).mkdir(parents=True, exist_ok=True)
        from pipeline.stages import ladder

        log.info("%s: not chosen, nothing to do (%s)", stage.name, ladder.describe_choice(project))
        return 0
    results = graph.run(name, project, with_upstream=args.command == "all" or args.with_upstream)
    if name == "evaluate":
        print(results[-1].table)
    return 0
