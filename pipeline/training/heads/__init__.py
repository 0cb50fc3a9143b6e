"""The heads of the first rung: a registry (``HEADS``, ``base.register``), one file per head.

A new head is one file beside these (its class, decorated with ``@register``, and its ``Params``) and
one line below; its params keys, its choice of ``train_head.model``, the DVC params and the params
template all come from the registry.
"""
# ruff: noqa: I001 (the import order is the registry's order: the default head first)
from pipeline.training.heads.base import HEADS, Head, HeadError, HeadParams, folds, from_params, register, registered
from pipeline.training.heads.logreg import LogRegHead
from pipeline.training.heads.softmax import SoftmaxHead
from pipeline.training.heads.ncm import NCMHead
from pipeline.training.heads.knn import KNNHead

__all__ = ["HEADS", "Head", "HeadError", "HeadParams", "KNNHead", "LogRegHead", "NCMHead", "SoftmaxHead", "folds",
           "from_params", "register", "registered"]
