"""The checks of a metric, for each task it serves: it returns a finite float on
synthetic outputs and targets, and scores perfect predictions at least as well as random
ones in the direction its ``mode`` declares. Each step is one function of the
:class:`MetricRun` the earlier one filled."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from trainyard import hookspecs
from trainyard.conformance.results import CheckFailed, CheckResult
from trainyard.conformance.runner import Plugin, Step, run_steps


@dataclass
class MetricRun:
    """One metric checked on one task: the synthetic data and the score on random outputs."""

    spec: hookspecs.MetricSpec
    task: str
    info: hookspecs.DataInfo | None = None
    targets: Any = None
    perfect: Any = None
    random: float | None = None


def check_metric(plugin: Plugin, spec: hookspecs.MetricSpec) -> list[CheckResult]:
    """Every check of the metric ``spec``, for each task it serves."""
    results: list[CheckResult] = []
    tasks = hookspecs.TASKS if spec.task == "any" else (spec.task,)
    for task in tasks:
        label = "" if len(tasks) == 1 else f" ({task})"
        steps = _steps(MetricRun(spec, task))
        results += run_steps(plugin, "metric", spec.name, [(c + label, s) for c, s in steps])
    return results


def _steps(run: MetricRun) -> list[Step]:
    return [
        ("value", lambda: check_value(run)),
        ("direction", lambda: check_direction(run)),
    ]


def check_value(run: MetricRun) -> str:
    """The metric of random outputs is a finite float."""
    info, outputs, targets, perfect = metric_inputs(run.task)
    value = as_metric_value(run.spec.fn(outputs, targets, info))
    run.info, run.targets, run.perfect, run.random = info, targets, perfect, value
    return f"{value:.4g} on random outputs"


def check_direction(run: MetricRun) -> str:
    """Perfect outputs score no worse than random ones, in the direction of ``mode``."""
    spec = run.spec
    best = as_metric_value(spec.fn(run.perfect, run.targets, run.info))
    worse = best < run.random - 1e-9 if spec.mode == "max" else best > run.random + 1e-9
    if worse:
        direction = "higher" if spec.mode == "max" else "lower"
        raise CheckFailed(
            f"declared mode {spec.mode!r} ({direction} is better), but perfect predictions "
            f"score {best:.4g} and random ones {run.random:.4g}: is mode the right "
            "way round?"
        )
    return f"{best:.4g} on perfect outputs (mode {spec.mode})"


def metric_inputs(task: str) -> tuple[hookspecs.DataInfo, Any, Any, Any]:
    """Synthetic validation outputs and targets, shaped as trainyard passes them."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = 60
    if task == "classification":
        info = hookspecs.DataInfo("classification", "features", ["a", "b", "c"], [4])
        targets = (np.arange(n) % 3).astype(np.int64)
        outputs = rng.normal(size=(n, 3)).astype(np.float32)
        perfect = (np.eye(3, dtype=np.float32)[targets] * 10.0).astype(np.float32)
    else:
        info = hookspecs.DataInfo("regression", "features", [], [4], target_names=["y"])
        targets = rng.normal(size=(n, 1)).astype(np.float32)  # [N, T], as in training
        outputs = rng.normal(size=(n, 1)).astype(np.float32)
        perfect = targets.copy()
    return info, outputs, targets, perfect


def as_metric_value(value: Any) -> float:
    """A metric's return value as a finite float, else CheckFailed."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CheckFailed(f"fn returned {type(value).__name__} {value!r:.60}; a metric must "
                          "return one float")
    value = float(value)
    if not math.isfinite(value):
        raise CheckFailed(f"fn returned {value}; a metric must return a finite float")
    return value
