"""The stage declaration and everything derived from it; the package's import graph."""
import ast
import json
import re

import pytest
import yaml

from pipeline import cli as cli_mod
from pipeline import graph
from pipeline.project import open_project
from pipeline.stages import features, ladder, train_head

from conftest import ROOT, cli, make_dataset, make_params


def test_generated_files_are_current():
    assert (ROOT / "dvc.yaml").read_text() == graph.render_dvc_yaml(), "run 'python -m pipeline dvc-yaml'"
    for params_file in (ROOT / "params.yaml", ROOT / "pipeline" / "params.yaml"):
        text = params_file.read_text()
        assert text == graph.render_params_yaml(text), "run 'python -m pipeline params-yaml'"
    assert (ROOT / "stages.mk").read_text() == graph.render_makefile(), "run 'python -m pipeline makefile'"


def test_cli_make_and_dvc_list_the_declared_stages():
    names = [s.name for s in graph.STAGES]
    assert names == ["features", "top-features", "train-head", "train-top", "finetune", "evaluate"]
    subcommands = cli_mod._parser()._subparsers._group_actions[0].choices
    assert set(names) | {"train"} <= set(subcommands)
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == names
    targets = re.findall(r"^([a-z-]+): setup ## ", (ROOT / "stages.mk").read_text(), re.M)
    assert targets == [*names, "train"]
    assert "include stages.mk" in (ROOT / "Makefile").read_text()


def test_dvc_stages_read_exactly_their_params():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert dvc["train-head"]["params"] == [f"train_head.{k}" for k in (
        "model", "class_weight", "seed", "C", "search_C", "C_grid", "cv_folds", "max_iter", "learning_rate",
        "epochs", "batch_size", "l2", "dropout", "patience", "hidden_units", "k")] + \
        [f"reject.{k}" for k in ("score", "k", "keep", "label", "bank_size")] + ["train.strategy"]
    assert "features.batch_size" not in dvc["features"]["params"]  # speed only: not a reason to rerun
    assert not any(p.startswith("train_head") for name, s in dvc.items() if name != "train-head" for p in s["params"])
    assert dvc["train-top"]["deps"][0] == "${paths.cache_dir}/top_features"
    assert "${paths.cache_dir}/top_features" not in [next(iter(o)) for o in dvc["features"]["outs"]]
    for name in ("top-features", "train-head", "train-top", "finetune"):
        assert dvc[name]["cmd"].endswith("--if-chosen")  # gated: trains only when train.strategy chooses it


def test_clean_cache_removes_the_declared_folders(project):
    params = make_params(project)
    features.run(open_project(params, project))
    train_head.run(open_project(params, project))
    (project / "params.yaml").write_text(json.dumps({"data": {"root": "photos", "train_fraction": 0.6,
                                                              "val_fraction": 0.2, "test_fraction": 0.2},
                                                     "features": {"backbone": "tiny"}}))
    out = cli(project, "clean-cache")
    assert out.returncode == 0
    assert sorted(p.name for p in (project / "cache").iterdir()) == []


def test_the_chain_follows_the_strategy(project):
    head = [s.name for s in graph.chain("evaluate", open_project(make_params(project), project))]
    assert head == ["features", "train-head", "evaluate"]
    top = [s.name for s in graph.chain("evaluate", open_project(make_params(project, train={"strategy": "top"}), project))]
    assert top == ["top-features", "train-top", "evaluate"]
    named = [s.name for s in graph.chain("train-top", open_project(make_params(project), project))]
    assert named == ["top-features", "train-top"]  # asked by name: it runs whatever the strategy


def test_a_gated_stage_does_nothing_unless_chosen(tmp_path):
    make_dataset(tmp_path / "photos", per_class=6)
    (tmp_path / "params.yaml").write_text("data: {root: photos, train_fraction: 0.6, val_fraction: 0.2, "
                                          "test_fraction: 0.2}\nfeatures: {backbone: tiny}\n")
    out = cli(tmp_path, "train-top", "--if-chosen")
    assert out.returncode == 0
    assert "train-top: not chosen, nothing to do (rung head (train-head), chosen by train.strategy: head" in out.stderr
    assert (tmp_path / "cache" / "train_top").is_dir() and not any((tmp_path / "cache" / "train_top").iterdir())


def _imports(path):
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):  # function-level imports included
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("pipeline"):
            deps.add(node.module)
            deps.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            deps.update(alias.name for alias in node.names if alias.name.startswith("pipeline"))
    return module, deps


def test_no_import_cycles_in_the_package():
    modules = dict(_imports(path) for path in (ROOT / "pipeline").rglob("*.py"))
    graph_ = {m: {d for d in deps if d in modules and d != m} for m, deps in modules.items()}
    cycles = []

    def visit(module, stack):
        if module in stack:
            cycles.append(stack[stack.index(module):] + [module])
            return
        for dep in sorted(graph_[module]):
            visit(dep, stack + [module])

    for module in sorted(graph_):
        visit(module, [])
        if cycles:
            break
    assert not cycles, " -> ".join(cycles[0])


# The package's layers, top to bottom: a module imports only from its own layer or those below it. Every
# package sits whole in one layer: no module of a package is declared apart from its package.
LAYERS = (
    ("pipeline.cli", "pipeline.__main__"),
    ("pipeline.app",),  # the local app (serve): pages and API over a trained model
    ("pipeline.graph",),
    ("pipeline.use",),  # commands that use a trained model: predict, export, compare, inspect
    ("pipeline.stages",),  # the stages, the rung contract and the rung registry
    ("pipeline.project",),  # the project object: params, base folder, layout, the chosen rung
    ("pipeline.featurise", "pipeline.runtime", "pipeline.ray_engine"),  # photos in, activations out
    ("pipeline.quality",),
    ("pipeline.layout", "pipeline.scan"),  # where a project's files live; the photos, their labels and splits
    ("pipeline.params",),  # typed params, validated against the registries below
    # the registries whose names params accept, and what they are made of
    ("pipeline.training",),  # heads (the head registry), classifiers, fitting, the guard, advice
    ("pipeline.backbones",),  # the backbone registry and its converters
    ("pipeline.store",),  # the cache's tables, labelling files, parts and batches
    ("pipeline.data",),  # decoding (the decoder registry), resizing, corrections, the demo photos
    ("pipeline.fingerprint", "pipeline.tf_import", "pipeline.errors", "pipeline.vectors", "pipeline.templates",
     "pipeline.progress", "pipeline"),
)


def _layer(module: str) -> int:
    """The index in LAYERS of the package or module that holds ``module``."""
    for index, names in enumerate(LAYERS):
        if any(module == name or module.startswith(name + ".") for name in names if name != "pipeline"):
            return index
    assert module == "pipeline", f"{module} is in no declared layer; add it to LAYERS"
    return len(LAYERS) - 1


def test_imports_only_go_down_through_the_declared_layers():
    modules = dict(_imports(path) for path in (ROOT / "pipeline").rglob("*.py"))
    upward = sorted(f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
                    for m, deps in modules.items() for d in deps if d in modules and _layer(d) < _layer(m))
    assert not upward, "; ".join(upward)


def test_the_layer_check_sees_an_upward_import():
    assert _layer("pipeline.stages.evaluate") < _layer("pipeline.training.guard")
    assert _layer("pipeline.use.report") < _layer("pipeline.stages.evaluate")  # stages may not import use/
    assert _layer("pipeline.params") < _layer("pipeline.training.heads.logreg")  # params may name heads
    assert _layer("pipeline.training.guard") > _layer("pipeline.params")  # training may not import params


def test_predict_does_not_use_the_features_stage():
    assert "pipeline.stages.features" not in _imports(ROOT / "pipeline" / "use" / "predict.py")[1]
    assert not [d for d in _imports(ROOT / "pipeline" / "runtime.py")[1] if d.startswith("pipeline.stages")]


@pytest.mark.parametrize("rung", list(ladder.RUNGS.values()), ids=list(ladder.RUNGS))
def test_every_rung_has_its_stage_section_and_folder(rung):
    stage = graph.BY_NAME[rung.stage]
    assert stage.entry == rung.train and stage.cache_folders == (rung.section,)
    assert rung.section in graph.params_keys((rung.section,))[0]


@pytest.mark.parametrize("module", ["use/predict.py", "use/export.py", "use/compare.py", "stages/evaluate.py"])
def test_users_of_a_model_never_branch_on_the_rung(module):
    tree = ast.parse((ROOT / "pipeline" / module).read_text(encoding="utf-8"))
    rung_names = set(ladder.RUNGS)
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            compared = [n.value for n in (node.left, *node.comparators) if isinstance(n, ast.Constant)]
            assert not rung_names & set(compared), f"{module}:{node.lineno} compares with a rung's name"


def _functions(path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg not in ("self", "cls")]
            names += [a.arg for a in (args.vararg, args.kwarg) if a]
            yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1, len(names)


def test_functions_stay_small():
    found = [f for path in (ROOT / "pipeline").rglob("*.py") for f in _functions(path)]
    assert len(found) > 300  # the walk sees the package
    too_long = [f"{name} ({lines} lines)" for name, lines, _ in found if lines > 60]
    too_many = [f"{name} ({count} parameters)" for name, _, count in found if count > 8]
    assert not too_long and not too_many, "; ".join(too_long + too_many)
