"""Validation metrics: loss, accuracy, macro precision/recall/F1, ROC AUC, log loss, MSE,
MAE and R².

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


def _probabilities(outputs):
    """Softmax of the logits, in float64 (so each row sums to 1 as scikit-learn checks)."""
    outputs = np.asarray(outputs, dtype=np.float64)
    shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def roc_auc(outputs, targets, info):
    """ROC AUC of the softmax probabilities: of the positive class (index 1) for two
    classes, one-vs-rest macro-averaged over all of ``info.classes`` for more. NaN when
    the validation split lacks one of the classes (AUC is then undefined)."""
    from sklearn import metrics

    targets = np.asarray(targets).astype(np.int64)
    labels = _labels(info)
    if len(labels) < 2 or not np.isin(labels, targets).all():
        return float("nan")
    probs = _probabilities(outputs)
    if len(labels) == 2:
        return float(metrics.roc_auc_score(targets, probs[:, 1]))
    return float(metrics.roc_auc_score(targets, probs, multi_class="ovr", average="macro",
                                       labels=labels))


def log_loss(outputs, targets, info):
    """Cross-entropy of the softmax probabilities as scikit-learn computes it (its
    probabilities clipped away from 0), over all of ``info.classes``."""
    from sklearn import metrics

    return float(metrics.log_loss(np.asarray(targets).astype(np.int64), _probabilities(outputs),
                                  labels=_labels(info)))


def mse(outputs, targets, info):
    o, t = _regression_pair(outputs, targets)
    return float(((o - t) ** 2).mean())


def mae(outputs, targets, info):
    o, t = _regression_pair(outputs, targets)
    return float(np.abs(o - t).mean())


def r2(outputs, targets, info):
    """Coefficient of determination, averaged over the targets (1 is perfect)."""
    from sklearn import metrics

    o, t = _regression_pair(outputs, targets)
    return float(metrics.r2_score(t, o))


@hookimpl
def register_metrics(register):
    # The defaults (a job with no train.metrics): loss, accuracy, f1 or loss, mse, mae.
    register(MetricSpec("loss", loss, "any", "min", "Cross-entropy (classification) or MSE", default=True))
    register(MetricSpec("accuracy", accuracy, "classification", "max", "Share of correct labels",
                        default=True))
    for kind in ("precision", "recall", "f1"):
        register(MetricSpec(kind, _prf(kind), "classification", "max", f"Macro-averaged {kind}",
                            default=kind == "f1"))
    # Opt-in (train.metrics / tune.metric), never defaults.
    register(MetricSpec("roc_auc", roc_auc, "classification", "max",
                        "ROC AUC of softmax probabilities (multiclass: one-vs-rest macro); "
                        "nan if the validation split lacks a class"))
    register(MetricSpec("log_loss", log_loss, "classification", "min",
                        "Log loss of softmax probabilities (scikit-learn)"))
    register(MetricSpec("mse", mse, "regression", "min", "Mean squared error", default=True))
    register(MetricSpec("mae", mae, "regression", "min", "Mean absolute error", default=True))
    register(MetricSpec("r2", r2, "regression", "max", "Coefficient of determination R²"))
