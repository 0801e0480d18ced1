"""Local training and evaluation of a hospital's model; metrics in :mod:`.metrics`."""

from fedcrypt.training.loops import EvalResult, TrainResult, evaluate, train

__all__ = ["EvalResult", "TrainResult", "evaluate", "train"]
