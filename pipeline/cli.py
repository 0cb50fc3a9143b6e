"""Command line: ``python -m pipeline STAGE [--params FILE] [--set section.key=value ...]``.

The only module that touches argv, the params file and logging. Relative paths in the params
file are relative to the file's own folder.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline import params as params_mod

STAGES = ("features", "train-head", "evaluate")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [
        ("features", "cache the frozen backbone's activations for every image"),
        ("train-head", "train the head on the cached features"),
        ("evaluate", "metrics of the head on the test split (trains it first if needed)"),
        ("all", "features, train-head and evaluate"),
        ("train-top", "train the backbone's blocks above train_top.cut_point on cached activations"),
        ("finetune", "train the whole network from its pretrained start on the images, with augmentation"),
        ("train", "train the rung train.strategy names (auto: the one 'advise' recommends)"),
        ("advise", "recommend a rung of the ladder for this dataset, with the reasons"),
        ("compare", "the trained rungs side by side on the test split"),
    ]:
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                             help="override one parameter; may be repeated")
    predict = sub.add_parser("predict", help="top-k labels for photos (files or folders) with the last trained model")
    predict.add_argument("paths", nargs="+", metavar="PATH")
    predict.add_argument("--top-k", type=int, default=None, help="labels per photo (default: predict.top_k)")
    predict.add_argument("--format", choices=("table", "csv", "json"), default=None,
                         help="output format (default: predict.format)")
    export = sub.add_parser("export", help="write the last trained model as .keras, SavedModel and TFLite, "
                                           "after checking it answers like the pipeline")
    for command in (predict, export):
        command.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        command.add_argument("--set", dest="overrides", action="append", default=[],
                             metavar="SECTION.KEY=VALUE", help="override one parameter; may be repeated")
    sub.add_parser("dvc-yaml", help="write dvc.yaml from the stage declarations")
    demo = sub.add_parser("demo-data", help="build the small demo dataset from scikit-image's photographs")
    demo.add_argument("--out", default="data/demo")
    return parser


def _expected_errors() -> tuple[type, ...]:
    from pipeline.dataset import DatasetError
    from pipeline.evaluate import EvaluationError
    from pipeline.export import ExportError
    from pipeline.feature_store import CacheError
    from pipeline.features import BadDataError
    from pipeline.train_head import TrainingError

    return (params_mod.ParamsError, DatasetError, CacheError, BadDataError, TrainingError, EvaluationError,
            ExportError, FileNotFoundError, RuntimeError, ValueError)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("interrupted; every finished part is kept and the next run continues from it", file=sys.stderr)
        return 130
    except _expected_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # disk full, permissions, ...: the file and the reason, without a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    if args.command == "dvc-yaml":
        from pipeline import stages

        Path("dvc.yaml").write_text(stages.render_dvc_yaml())
        print("wrote dvc.yaml")
        return 0
    if args.command == "demo-data":
        from pipeline import demo

        print(f"demo dataset in {demo.build(args.out)}")
        return 0
    params = params_mod.load(args.params, args.overrides)
    base = Path(args.params).resolve().parent
    if args.command == "predict":
        from pipeline import predict

        predictions = predict.run(params, base, args.paths, args.top_k)
        print(predict.format_predictions(predictions, args.format or params.predict.format))
        return 0 if any(p.labels for p in predictions) else 1
    if args.command == "export":
        from pipeline import export

        result = export.run(params, base)
        print(f"exported to {result.folder}: {', '.join(result.files)}")
        return 0
    if args.command == "train-top":
        from pipeline import train_top

        train_top.run(params, base)
        return 0
    if args.command == "finetune":
        from pipeline import finetune

        finetune.run(params, base)
        return 0
    if args.command == "train":
        from pipeline import advise, features, trained

        rung, advice = advise.chosen_rung(params, base)
        if advice is not None:
            print(advise.format_advice(advice))
        features.run(params, base)
        trained.bring_up_to_date(params, base, rung)
        return 0
    if args.command == "advise":
        from pipeline import advise, dataset

        summary = advise.summarise(dataset.scan(params.data, base))
        print(advise.format_advice(advise.recommend(summary)))
        return 0
    if args.command == "compare":
        from pipeline import evaluate

        print(evaluate.compare(params, base))
        return 0
    commands = ["features", "train-head", "evaluate"] if args.command == "all" else [args.command]
    for command in commands:
        if command == "features":
            from pipeline import features

            features.run(params, base)
        elif command == "train-head":
            from pipeline import train_head

            train_head.run(params, base)
        elif command == "evaluate":
            from pipeline import evaluate

            print(evaluate.run(params, base).table)
    return 0
