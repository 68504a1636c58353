"""A batch as the model plugins' processors make it: one tensor, or a dict of tensors
(keyword arguments of the model, as BERT's). Every place that slices, moves or feeds a
batch to a model goes through these, so the two shapes are handled in one place."""

from __future__ import annotations

from typing import Any


def take(x: Any, index: Any) -> Any:
    """Rows ``index`` of a batch."""
    if isinstance(x, dict):
        return {k: v[index] for k, v in x.items()}
    return x[index]


def to_device(x: Any, device: Any) -> Any:
    """A batch on ``device``."""
    if isinstance(x, dict):
        return {k: v.to(device, non_blocking=True) for k, v in x.items()}
    return x.to(device, non_blocking=True)


def call_model(model: Any, x: Any) -> Any:
    """The model's output for a batch: a dict is passed as keyword arguments."""
    return model(**x) if isinstance(x, dict) else model(x)
