"""Validation metrics: loss, accuracy, macro precision/recall/F1, MSE and MAE.

Each gets the whole validation set (trainyard gathers the workers' outputs first), so a
value from N workers equals the one-process value.
"""

from __future__ import annotations

import numpy as np
from trainyard import MetricSpec, hookimpl


def _pred(outputs):
    return np.asarray(outputs).argmax(axis=1)


def _labels(info):
    return list(range(len(info.classes)))


def loss(outputs, targets, info):
    outputs = np.asarray(outputs, dtype=np.float64)
    if info.task == "classification":
        shifted = outputs - outputs.max(axis=1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(targets)), np.asarray(targets, int)].mean())
    return mse(outputs, targets, info)


def accuracy(outputs, targets, info):
    return float((_pred(outputs) == np.asarray(targets)).mean())


def _prf(kind):
    def fn(outputs, targets, info):
        from sklearn import metrics

        f = {"precision": metrics.precision_score, "recall": metrics.recall_score,
             "f1": metrics.f1_score}[kind]
        return float(f(np.asarray(targets), _pred(outputs), labels=_labels(info),
                       average="macro", zero_division=0))

    return fn


def _regression_pair(outputs, targets):
    outputs = np.asarray(outputs, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64).reshape(len(outputs), -1)
    return outputs.reshape(targets.shape), targets


def mse(outputs, targets, info):
    o, t = _regression_pair(outputs, targets)
    return float(((o - t) ** 2).mean())


def mae(outputs, targets, info):
    o, t = _regression_pair(outputs, targets)
    return float(np.abs(o - t).mean())


@hookimpl
def register_metrics(register):
    # The defaults (a job with no train.metrics): loss, accuracy, f1 or loss, mse, mae.
    register(MetricSpec("loss", loss, "any", "min", "Cross-entropy (classification) or MSE", default=True))
    register(MetricSpec("accuracy", accuracy, "classification", "max", "Share of correct labels",
                        default=True))
    for kind in ("precision", "recall", "f1"):
        register(MetricSpec(kind, _prf(kind), "classification", "max", f"Macro-averaged {kind}",
                            default=kind == "f1"))
    register(MetricSpec("mse", mse, "regression", "min", "Mean squared error", default=True))
    register(MetricSpec("mae", mae, "regression", "min", "Mean absolute error", default=True))
