"""Local training and evaluation of a hospital's model; metrics in :mod:`.metrics`."""

from fedcrypt.training.loops import (
    EvalResult,
    TrainResult,
    dataset_labels,
    evaluate,
    recalibrate_batchnorm,
    train,
)
from fedcrypt.training.metrics import Confusion, pool_confusions

__all__ = [
    "Confusion",
    "EvalResult",
    "TrainResult",
    "dataset_labels",
    "evaluate",
    "pool_confusions",
    "recalibrate_batchnorm",
    "train",
]
