"""Training: one plain loop function (:func:`train_adapter_weights`) and the library-level :func:`train_adapter`."""

from __future__ import annotations

from smoa.train.api import TrainResult, routing_examples, train_adapter
from smoa.train.loop import TrainHistory, evaluate_loss, train_adapter_weights

__all__ = ["TrainHistory", "TrainResult", "evaluate_loss", "routing_examples", "train_adapter", "train_adapter_weights"]
