import subprocess
import sys

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline import layout
from pipeline import params as params_mod
from pipeline.fingerprint import stage_key
from pipeline.params import ParamsError
from pipeline.stages import train_head

from conftest import ROOT


def write(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_shipped_params_file_is_valid_and_complete():
    params = params_mod.load(ROOT / "params.yaml")
    assert params == params_mod.load(None), "params.yaml should spell out every default"


@pytest.mark.parametrize("text, expected", [
    ("train_head:\n  learning_rat: 0.1\n", "train_head.learning_rat: unknown key"),
    ("train_head:\n  learning_rate: fast\n", "train_head.learning_rate: Input should be a valid number"),
    ("train_head:\n  learning_rate: -0.1\n", "train_head.learning_rate: Input should be greater than 0"),
    ("train_head:\n  epochs: 1.5\n", "train_head.epochs: Input should be a valid integer"),
    ("data:\n  train_fraction: 0.5\n", "must sum to 1, got 0.8"),
    ("features:\n  backbone: vgg99\n", "unknown backbone 'vgg99'"),
    ("feature:\n  backbone: tiny\n", "unknown section 'feature'"),
    ("features: [1, 2]\n", "section 'features' must be a mapping"),
    ("data: {root: [unclosed\n", "not valid YAML"),
    ("train:\n  strategy: everything\n", "train.strategy: Input should be 'head', 'top', 'finetune' or 'auto'"),
])
def test_bad_params_name_the_key_and_the_file(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ParamsError) as error:
        params_mod.load(path)
    message = str(error.value)
    assert expected in message
    assert str(path) in message
    assert len(message.splitlines()) == 1


def test_missing_params_file(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        params_mod.load(tmp_path / "nope.yaml")


def test_overrides_are_typed_and_checked(tmp_path):
    path = write(tmp_path, "train_head:\n  C: 1.0\n")
    params = params_mod.load(path, ["train_head.C=0.25", "train_head.C_grid=[1, 2]", "data.split_csv=splits.csv"])
    assert params.train_head.head.C == 0.25
    assert params.train_head.head.C_grid == (1.0, 2.0)
    assert params.data.split_csv == "splits.csv"
    with pytest.raises(ParamsError, match=r"--set train_head\.Cee=2.*train_head\.Cee: unknown key"):
        params_mod.load(path, ["train_head.Cee=2"])
    with pytest.raises(ParamsError, match="expected section.key=value"):
        params_mod.load(path, ["C=2"])


def head_key(params, inputs="x"):
    return stage_key(train_head.RUNG.section, train_head.VERSION, params_mod.key_fields(params.train_head),
                     {"inputs": inputs})


def test_equal_values_give_equal_keys(tmp_path):
    a = params_mod.load(write(tmp_path, "train_head:\n  C: 0.2\n"))
    b = params_mod.load(write(tmp_path, "train_head:\n  C: 0.20\n"))
    assert head_key(a) == head_key(b)


def test_key_covers_only_the_chosen_models_params():
    logreg = params_mod.load(None, ["train_head.model=logreg"])
    other_softmax_value = params_mod.load(None, ["train_head.model=logreg", "train_head.learning_rate=0.5"])
    assert head_key(logreg) == head_key(other_softmax_value)
    assert head_key(logreg) != head_key(params_mod.load(None, ["train_head.C=0.5"]))


def test_speed_only_params_stay_out_of_the_features_key():
    base = params_mod.load(None, ["features.backbone=tiny"]).features
    faster = params_mod.load(None, ["features.backbone=tiny", "features.batch_size=7", "features.workers=1",
                                    "features.commit_every=3"]).features
    resized = params_mod.load(None, ["features.backbone=tiny", "features.resize=crop"]).features
    assert layout.cache_key(base) == layout.cache_key(faster)
    assert layout.cache_key(base) != layout.cache_key(resized)


def test_key_is_the_same_in_another_process_and_directory(tmp_path):
    code = ("from pipeline import params; from pipeline import layout; "
            "print(layout.cache_key(params.load(None, ['features.backbone=tiny']).features))")
    other = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                           env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    here = layout.cache_key(params_mod.load(None, ["features.backbone=tiny"]).features)
    assert other.stdout.strip() == here


def test_stage_key_properties():
    key = stage_key("s", 1, {"a": 1, "b": [1.0, 2]})
    assert key == stage_key("s", 1, {"b": [1.0, 2], "a": 1})  # order of keys does not matter
    assert key != stage_key("s", 2, {"a": 1, "b": [1.0, 2]})  # VERSION bump
    assert key != stage_key("t", 1, {"a": 1, "b": [1.0, 2]})  # stage name
    assert key != stage_key("s", 1, {"a": 1, "b": [1.0, 2]}, {"features": "x"})  # upstream


_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                       lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children,
                                                                                          max_size=3), max_leaves=6)
_keys = st.sampled_from(["root", "train_fraction", "backbone", "model", "C", "C_grid", "epochs", "learning_rate",
                         "resize", "dtype", "top_k", "quantize", "cache_dir", "strategy", "bogus"]) | st.text(max_size=4)
_sections = st.sampled_from(["paths", "data", "features", "train", "train_head", "evaluate", "predict", "export",
                             "nope"]) | st.text(max_size=4)


@settings(max_examples=300, deadline=None)
@given(raw=st.dictionaries(_sections, st.dictionaries(_keys, _values, max_size=4) | _values, max_size=4))
@example(raw={"paths": {"\n": None}})  # a key that is a line break: once a two-line error
@example(raw={"paths": {"a\rb": 1}})
@example(raw={"data": {"\u2028": 1}})  # Unicode's line separator
@example(raw={"\x85": {}})  # a section named NEXT LINE
@example(raw={"features": {"backbone": "a\nb"}})
def test_random_params_give_params_or_a_one_line_error(raw):
    try:
        params_mod.build(raw, "fuzz.yaml")
    except ParamsError as error:
        message = str(error)
        assert message.startswith("fuzz.yaml") and len(message.splitlines()) == 1, repr(message)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
@example(text="paths:\n  ? \"\\n\"\n  : 1\n")
@example(text="data:\n  \"\\u2028\": 1\n")
def test_random_params_files_give_params_or_a_one_line_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "params.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        params_mod.load(path)
    except ParamsError as error:
        assert str(path) in str(error) and len(str(error).splitlines()) == 1, repr(str(error))
