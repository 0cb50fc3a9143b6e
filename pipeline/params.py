"""params.yaml as typed, frozen objects: one dataclass per section.

An unknown, missing-section, mistyped or out-of-range key is a ``ParamsError`` naming the key and
the file. Fields marked ``key=False`` do not change a stage's output (batch sizes, worker counts)
and stay out of its cache key; fields marked ``model="..."`` only matter for that head model.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

from pipeline.backbones.registry import BACKBONES
from pipeline.errors import ParamsError, PipelineError  # noqa: F401  (ParamsError: re-exported)

_CONFIG = ConfigDict(extra="forbid", strict=True)


def _meta(default, *, key: bool = True, output: bool = False, **constraints):
    """A field with cache-key metadata and pydantic constraints. ``output``: not in the cache file's key,
    yet it changes what the stage writes (so DVC must rerun the stage when it changes)."""
    return Field(default, json_schema_extra={"key": key, "output": output}, **constraints)


@dataclass(frozen=True, config=_CONFIG)
class TrainParams:
    # The rung whose model evaluate, predict, export and 'make train' use; auto: what 'make advise' recommends
    strategy: Literal["head", "top", "finetune", "auto"] = "head"


@dataclass(frozen=True, config=_CONFIG)
class PathsParams:
    cache_dir: str = "cache"  # every computed artifact lives under here
    reports_dir: str = "reports"  # metrics, tables, skipped files
    # converted backbones (Keras weights from the .pth, the checked LiteRT files): they depend on the backbone
    # alone, so by default one folder serves every project on the machine; "cache/weights" keeps them here
    weights_dir: str | None = None


@dataclass(frozen=True, config=_CONFIG)
class DataParams:
    root: str = "data/demo"  # one sub-folder per class, or train/ val/ test/ above them
    split_csv: str | None = None  # optional CSV with columns path,split (path relative to root)
    train_fraction: float = Field(0.7, ge=0.0, le=1.0)
    val_fraction: float = Field(0.15, ge=0.0, le=1.0)
    test_fraction: float = Field(0.15, ge=0.0, le=1.0)
    max_bad_fraction: float = Field(0.1, ge=0.0, le=1.0)  # fail when more images than this are unreadable
    group_near_duplicates: bool = False  # put each group of near-duplicate photos into one split (no leakage)
    # the user's decisions (CSV path,action,label; paths relative to the params file's folder): relabel,
    # exclude or keep a photo without moving it; 'make serve' and 'make inspect' write it
    corrections: str | None = "corrections.csv"
    # a folder of photos without labels: featurised like the rest, offered by 'make serve' to label
    unlabelled: str | None = None

    def __post_init__(self):
        total = self.train_fraction + self.val_fraction + self.test_fraction
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train_fraction + val_fraction + test_fraction must sum to 1, got {total:g}")
        if self.train_fraction <= 0:
            raise ValueError("train_fraction must be > 0")


@dataclass(frozen=True, config=_CONFIG)
class FeaturesParams:
    backbone: str = "efficientnet_lite0"
    weights: str = "default"  # default | imagenet | none | path to a weights file
    layer: str = "pooled"  # where the frozen part ends
    image_size: int = Field(0, ge=0)  # 0: the backbone's own input size
    resize: Literal["squash", "crop"] = "squash"  # squash the whole image, or centre-crop
    # reduced: a large JPEG decoded at the smallest DCT scale that keeps twice the input size (phone photos
    # several times faster; predict and export still decode whole, as an app does); draft: the smallest that
    # keeps the input size; full: every photo whole
    decode: Literal["reduced", "full", "draft"] = "reduced"
    dtype: Literal["float32", "float16"] = "float32"  # storage dtype of the cached activations
    # a photo whose header declares more pixels than this is refused before decoding (decompression bombs),
    # in every stage, predict, the app and export: a skipped.csv row, a one-line 400
    max_pixels: int = Field(120_000_000, gt=0)
    # what runs the frozen backbone: LiteRT is ~2x faster on a CPU, same features within 1e-4; auto: Keras
    # (TensorFlow, whole batches) where a GPU is visible, LiteRT elsewhere
    runtime: Literal["keras", "litert", "auto"] = "litert"
    # int8: a full-integer LiteRT backbone calibrated on up to 200 train photos, checked against float before use
    precision: Literal["float32", "int8"] = "float32"
    # the views cached per photo; heads train on their mean, predict and export average the same views.
    # Adding hflip later featurises only the mirrored view of the photos already cached.
    views: tuple[Literal["original", "hflip"], ...] = _meta(("original",), key=False, output=True)
    batch_size: int = _meta(32, key=False, gt=0)
    workers: int = _meta(2, key=False, gt=0)  # image-decoding threads
    commit_every: int = _meta(256, key=False, gt=0)  # images per committed part: the most an interruption loses
    # where the backbone runs: this process, or actors on a Ray cluster (the same cache either way)
    engine: Literal["local", "ray"] = _meta("local", key=False)
    ray_address: str | None = _meta(None, key=False)  # null: a local Ray for the run; auto; or host:port
    ray_workers: int = _meta(0, key=False, ge=0)  # actors; 0: as many as the cluster's CPUs allow (2 each)
    ray_gpus_per_worker: float = _meta(0.0, key=False, ge=0)  # GPUs each actor asks for (runtime auto uses them)

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if self.precision == "int8" and self.runtime != "litert":
            raise ValueError("precision: int8 runs on LiteRT; set features.runtime: litert")
        if self.engine == "ray" and self.runtime == "keras":
            raise ValueError("engine: ray runs LiteRT on CPU workers (auto: Keras on GPU workers); set runtime: "
                             "litert or auto")
        if not self.views or self.views[0] != "original" or len(set(self.views)) != len(self.views):
            raise ValueError("views: a list that starts with original, each view once, e.g. [original, hflip]")
        if len(self.views) > 1 and self.layer != "pooled":
            raise ValueError("views beyond original need layer: pooled (a mirrored photo's spatial map is not the "
                             "map mirrored)")


@dataclass(frozen=True, config=_CONFIG)
class TrainHeadParams:
    """The ``train_head`` section: the head ``model`` names (``training.heads.HEADS``), the keys every head
    shares, and the chosen head's own (``head``: its ``Params``, one member of a discriminated union on
    ``model``). In the file the section is flat: ``model: logreg`` beside ``C: auto``."""

    model: str = "logreg"
    class_weight: Literal["balanced", "none"] = "balanced"
    seed: int = 0
    head: object = None  # the chosen head's Params; built by head_section() (defaults: logreg's)

    def __post_init__(self):
        from pipeline.training.heads import HEADS

        if self.model not in HEADS:
            raise ValueError(f"model {self.model!r} is not a head; choose one of {', '.join(sorted(HEADS))}")
        if self.head is None:
            object.__setattr__(self, "head", HEADS[self.model].Params())


COMMON_HEAD_KEYS = ("model", "class_weight", "seed")


def head_params_union():
    """The discriminated union of every registered head's ``Params``, keyed on ``model``."""
    from typing import Annotated, Union

    from pydantic import TypeAdapter

    from pipeline.training.heads import HEADS

    members = tuple(cls.Params for cls in HEADS.values())
    union = members[0] if len(members) == 1 else Union[members]  # noqa: UP007 (a runtime tuple of types)
    return TypeAdapter(Annotated[union, Field(discriminator="model")])


def head_section(values: dict) -> TrainHeadParams:
    """``train_head`` from its flat keys: the chosen head's keys through the union of heads. A key of another
    head is checked by that head's ``Params`` and kept out of everything (so that ``--set train_head.model=...``
    switches heads with the file as it is), unless that head declares it ``exclusive``."""
    from pipeline.training.heads import HEADS

    model = values.get("model", "logreg")
    if model not in HEADS:
        raise ValueError(f"model {model!r} is not a head; choose one of {', '.join(sorted(HEADS))}")
    own = {k: v for k, v in values.items() if k not in COMMON_HEAD_KEYS and k in _head_fields(HEADS[model])}
    others: dict[str, dict] = {}
    for key, value in values.items():
        if key in COMMON_HEAD_KEYS or key in own:
            continue
        owner = next((name for name, cls in HEADS.items() if key in _head_fields(cls)), None)
        if owner is None:
            raise KeyedError(key, "unknown key (misspelt?)")
        if key in HEADS[owner].Params.exclusive and value != HEADS[owner].Params.model_fields[key].default:
            raise ParamsError(f"{key} needs model: {owner} (the {model} head has no such setting)")
        others.setdefault(owner, {})[key] = value
    union = head_params_union()
    for owner, keys in others.items():
        union.validate_python({"model": owner, **keys}, strict=True)
    head = union.validate_python({"model": model, **own}, strict=True)
    return TrainHeadParams(**{k: values[k] for k in COMMON_HEAD_KEYS if k in values}, head=head)


class KeyedError(ValueError):
    """A bad key of a section, named apart from the message."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _head_fields(cls) -> list[str]:
    return cls.Params.keys()


@dataclass(frozen=True, config=_CONFIG)
class TrainTopParams:
    cut_point: str = "block15"  # where the frozen part ends; the layers above it are trained
    epochs_head: int = Field(5, ge=0)  # phase 1: the top layers frozen, only the softmax learns
    learning_rate_head: float = Field(0.001, gt=0)
    epochs: int = Field(30, gt=0)  # phase 2: the top layers learn too (BatchNorm kept frozen)
    learning_rate: float = Field(0.0001, gt=0)  # low: the top layers start from pretrained weights
    batch_size: int = Field(32, gt=0)
    patience: int = Field(5, ge=0)  # early stopping on val loss; 0 disables
    dropout: float = Field(0.2, ge=0, lt=1)  # before the softmax
    hidden_units: tuple[int, ...] = ()  # new hidden layers between the top layers and the softmax
    class_weight: Literal["balanced", "none"] = "balanced"
    seed: int = 0


@dataclass(frozen=True, config=_CONFIG)
class FinetuneParams:
    epochs_head: int = Field(3, ge=0)  # phase 1: backbone frozen, the softmax learns
    epochs_all: int = Field(10, ge=0)  # phase 2: every layer learns (BatchNorm kept frozen)
    learning_rate_head: float = Field(0.001, gt=0)
    learning_rate_all: float = Field(0.00001, gt=0)  # low: the pretrained weights are the starting point
    batch_size: int = Field(16, gt=0)
    patience: int = Field(3, ge=0)  # early stopping on val loss, per phase; 0 disables
    dropout: float = Field(0.2, ge=0, lt=1)
    flip: bool = True  # random horizontal flips
    zoom: float = Field(0.1, ge=0, lt=1)  # random zoom in by up to this share (a random crop)
    color: float = Field(0.1, ge=0, lt=1)  # random brightness and contrast changes of up to this share
    class_weight: Literal["balanced", "none"] = "balanced"
    seed: int = 0


@dataclass(frozen=True, config=_CONFIG)
class RejectParams:
    """How every rung's model says "none of these" (``training.guard``); set from training photos only."""

    score: Literal["knn", "mahalanobis", "energy", "msp"] = "knn"  # knn: distance to the k-th nearest train photo
    k: int = Field(10, gt=0)  # the neighbour the knn score measures
    keep: float = Field(0.95, gt=0, le=1)  # share of known photos (val, else out-of-fold) the threshold accepts
    label: str = Field("unknown", min_length=1)  # the answer for a rejected photo; no class may be named so
    bank_size: int = Field(1024, gt=0)  # train embeddings kept for the knn score (beyond: that many k-means centres)

    def __post_init__(self):
        if self.label != self.label.strip() or "/" in self.label:
            raise ValueError(f"label {self.label!r}: a plain name, no slashes or surrounding spaces")


@dataclass(frozen=True, config=_CONFIG)
class EvaluateParams:
    top_k: int = Field(3, gt=0)  # probabilities listed per misclassified image


@dataclass(frozen=True, config=_CONFIG)
class InspectParams:
    folds: int = Field(5, ge=2)  # K-fold logistic regression for out-of-fold probabilities (fewer for small classes)
    C: float = Field(1.0, gt=0)  # of that logistic regression
    outliers: float = Field(0.01, gt=0, le=1)  # share of photos listed as outliers, the least typical first
    near_duplicate_threshold: float | None = Field(None, gt=-1, le=1)  # cosine similarity; null: calibrated
    thumbnails: int = Field(24, ge=0)  # photos shown per finding on the report page


@dataclass(frozen=True, config=_CONFIG)
class PredictParams:
    top_k: int = Field(3, gt=0)  # labels listed per image
    format: Literal["table", "csv", "json"] = "table"


@dataclass(frozen=True, config=_CONFIG)
class ExportParams:
    dir: str = "models"  # where the exported model files go
    quantize: Literal["none", "dynamic", "int8"] = "none"  # extra quantised TFLite file
    tolerance: float = Field(1e-4, gt=0)  # max |p_export - p_pipeline| for float exports
    min_top1_agreement: float = Field(0.99, ge=0, le=1)  # for quantised exports
    representative_images: int = Field(100, gt=0)  # train images used to calibrate int8
    web: bool = True  # the browser bundle web/ (model.onnx in a page, onnxruntime-web vendored from npm)


@dataclass(frozen=True, config=_CONFIG)
class ServeParams:
    host: str = "127.0.0.1"  # the address the app listens on; anything but loopback is reachable from the network
    port: int = Field(8000, ge=0, le=65535)  # 0: any free port (printed at start)
    max_upload_mb: float = Field(20.0, gt=0)  # larger request bodies get 413
    neighbours: int = Field(3, ge=0, le=20)  # nearest training photos shown beside each answer
    # Host headers accepted besides host:port, localhost and 127.0.0.1 (a name the app is reached by); any
    # other Host is refused, which stops DNS rebinding
    allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True, config=_CONFIG)
class Params:
    paths: PathsParams = PathsParams()
    data: DataParams = DataParams()
    features: FeaturesParams = FeaturesParams()
    train: TrainParams = TrainParams()
    train_head: TrainHeadParams = TrainHeadParams()
    reject: RejectParams = RejectParams()
    train_top: TrainTopParams = TrainTopParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluate: EvaluateParams = EvaluateParams()
    inspect: InspectParams = InspectParams()
    predict: PredictParams = PredictParams()
    export: ExportParams = ExportParams()
    serve: ServeParams = ServeParams()


SECTIONS: dict[str, type] = {f.name: type(f.default) for f in dataclasses.fields(Params)}


def _yaml_to_python(raw):
    """YAML lists become tuples so that frozen params stay hashable."""
    if isinstance(raw, list):
        return tuple(_yaml_to_python(v) for v in raw)
    if isinstance(raw, dict):
        return {k: _yaml_to_python(v) for k, v in raw.items()}
    return raw


def parse_override(text: str) -> tuple[str, str, object]:
    """``'train_head.C=0.5'`` -> ``('train_head', 'C', 0.5)``; the value is read as YAML."""
    name, sep, value = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise ParamsError(f"--set {text!r}: expected section.key=value, e.g. train_head.C=0.5")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return section, key, parsed


def build(raw: dict, source: str) -> Params:
    """Validate a nested dict (sections of keys) into ``Params``; errors name ``source``."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    classes = SECTIONS
    sections = {}
    for section, values in raw.items():
        if section not in classes:
            raise ParamsError(f"{source}: unknown section {section!r}; expected one of {', '.join(classes)}")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ParamsError(f"{source}: section {section!r} must be a mapping of keys")
        try:
            values = _yaml_to_python(values)
            sections[section] = head_section(values) if section == "train_head" else classes[section](**values)
        except ValidationError as error:
            raise ParamsError(_describe(error, source, section)) from None
        except KeyedError as error:
            raise ParamsError(f"{source}: {section}.{_shown(error.key)}: {error}") from None
        except (ValueError, TypeError) as error:
            raise ParamsError(f"{source}: {section}: {' '.join(str(error).split())}") from None
    return Params(**sections)


def _shown(name) -> str:
    """A key as written in messages: as is when printable, else quoted with escapes (one line always)."""
    text = str(name)
    return text if text.isprintable() and text == text.strip() and text else repr(text)


def _describe(error: ValidationError, source: str, section: str) -> str:
    first = error.errors()[0]
    parts = first["loc"][1:] if section == "train_head" and first["loc"] else first["loc"]  # less the union's tag
    loc = ".".join(_shown(part) for part in parts)
    key = f"{section}.{loc}" if loc else section
    msg = first["msg"]
    if first["type"] == "unexpected_keyword_argument":
        msg = "unknown key (misspelt?)"
    elif msg.startswith("Value error, "):
        msg = msg.removeprefix("Value error, ")
    else:
        msg = f"{msg}, got {first['input']!r}"
    return f"{source}: {key}: {msg}"


def load(path: str | Path | None = "params.yaml", overrides: list[str] | tuple[str, ...] = ()) -> Params:
    """Read a params file (``None`` for all defaults) and apply ``section.key=value`` overrides."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ParamsError(f"{path}: params file not found; pass --params FILE, or write one with the init command")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            line = getattr(getattr(error, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise ParamsError(f"{path}: not valid YAML{where}") from None
        if not isinstance(raw, dict):
            raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    build(raw, source)  # a broken file is reported as such, before any override hides it
    classes = SECTIONS
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in classes:
            raise ParamsError(f"--set {text}: unknown section {section!r}; expected one of {', '.join(classes)}")
        raw = {**raw, section: {**(raw.get(section) or {}), key: value}}
        source = f"--set {text} (over {path or 'defaults'})"
        build(raw, source)
    return build(raw, str(path) if path is not None else "defaults")


def key_fields(section) -> dict:
    """The fields of a section that change its stage's output, for the cache key."""
    if isinstance(section, TrainHeadParams):  # every key of the chosen head changes the head
        return as_dict(section)
    return {field.name: getattr(section, field.name) for field in dataclasses.fields(section)
            if _field_extra(type(section), field.name).get("key", True)}


def key_field_names(cls) -> list[str]:
    """The fields of a section class that can change its stage's output (for any head)."""
    if cls is TrainHeadParams:
        from pipeline.training.heads import HEADS

        return list(dict.fromkeys([*COMMON_HEAD_KEYS, *(name for head in HEADS.values() for name in _head_fields(head))]))
    return [f.name for f in dataclasses.fields(cls)
            if _field_extra(cls, f.name).get("key", True) or _field_extra(cls, f.name).get("output")]


def _field_extra(cls, name: str) -> dict:
    info = cls.__pydantic_fields__[name]
    extra = info.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def as_dict(section) -> dict:
    """A section as plain JSON-ready data (tuples become lists); ``train_head`` flat, as in the file."""
    if isinstance(section, TrainHeadParams):
        head = {k: list(v) if isinstance(v, tuple) else v for k, v in section.head.model_dump().items() if k != "model"}
        return {"model": section.model, "class_weight": section.class_weight, "seed": section.seed, **head}
    return _plain(section)


def _plain(section) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(section).items()}
