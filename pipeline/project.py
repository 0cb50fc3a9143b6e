"""One project: its params, its folder, and what they resolve to, resolved once and passed down.

The CLI builds one ``Project`` per command and the app one per model it serves (``open_project``);
every stage and command takes it. It holds:
- ``params`` and ``base`` (the params file's folder: relative paths in the params are relative to it);
- ``rung_name``: the rung ``train.strategy`` chooses, decided here once (under ``auto``, from one
  scan of the photos and ``training.advise``), never again by a module on its own;
- where every file of the project lives (``layout``): the caches, the labelling of these
  params, the reports, the converted weights.

State is the params: the labels and splits a model trains and answers on are those of the
labelling file keyed by these params (``labels_key``), never whatever an earlier run left. A
decision recorded while the app serves a model changes the key only for the next project: the
model served, its review and its report keep the labelling they were made from until a retrain.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline import layout
from pipeline.params import FeaturesParams, Params


@dataclass(frozen=True)
class Project:
    params: Params
    base: Path
    rung_name: str  # head | top | finetune: the rung train.strategy chooses for these params
    # what the labels and splits depend on (layout.labels_key): the data params and the content of the
    # split CSV and of the corrections they name, as they were when the project was opened
    labels_key: str
    advice: object | None = None  # training.advise.Advice, when train.strategy is auto

    # ---- folders ---------------------------------------------------------------------------------------
    @property
    def data_root(self) -> Path:
        return self.base / self.params.data.root

    @property
    def cache_dir(self) -> Path:
        return self.base / self.params.paths.cache_dir

    @property
    def reports_dir(self) -> Path:
        return self.base / self.params.paths.reports_dir

    @property
    def weights_dir(self) -> Path:
        return layout.weights_dir(self.params, self.base)

    @property
    def skipped_csv(self) -> Path:
        return layout.skipped_csv(self.params, self.base)

    @property
    def file_index(self) -> Path:
        return layout.file_index_path(self.params, self.base)

    # ---- caches ----------------------------------------------------------------------------------------
    def features_file(self, f: FeaturesParams | None = None, folder: str = layout.FOLDER) -> Path:
        """The features cache of settings ``f`` (default: ``params.features``)."""
        return layout.cache_file(self.params, self.base, f, folder)

    @property
    def top_settings(self) -> FeaturesParams:
        return layout.top_settings(self.params)

    def top_features_file(self) -> Path:
        return layout.top_cache_file(self.params, self.base)

    def labels_file(self, features_file: Path | None = None) -> Path:
        """The labels and splits these params give the photos of ``features_file`` (default: the pooled cache)."""
        return layout.labels_file(features_file or self.features_file(), self.labels_key)


def open_project(params: Params, base: str | Path = ".") -> Project:
    """The project of ``params`` in ``base``, with its rung resolved: ``train.strategy`` itself, or under
    ``auto`` what ``training.advise`` recommends for the photos (one scan)."""
    base = Path(base)
    labels_key = layout.labels_key(params, base)
    if params.train.strategy != "auto":
        return Project(params, base, params.train.strategy, labels_key)
    from pipeline import scan
    from pipeline.training import advise

    advice = advise.recommend(advise.summarise(scan.scan(params.data, base)))
    return Project(params, base, advice.rung, labels_key, advice)
