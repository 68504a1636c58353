"""The checks of a dataset: its params type (a dataset that needs a param, such as a file
path, is skipped unless it is given), it loads, and what it loads is what its spec and
:class:`~trainyard.hookspecs.DataInfo` declare. Each step is one function of the
:class:`DatasetRun` the earlier ones filled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainyard import hookspecs
from trainyard.conformance.params import params_detail, typed
from trainyard.conformance.results import CheckFailed, CheckResult
from trainyard.conformance.runner import Plugin, run_steps
from trainyard.splits import split_problem


@dataclass
class DatasetRun:
    """One dataset checked: what each step makes for the next."""

    spec: hookspecs.DatasetSpec
    overrides: dict
    params: Any = None
    task: str | None = None
    data: hookspecs.LoadedData | None = None


def check_dataset(plugin: Plugin, spec: hookspecs.DatasetSpec, overrides: dict) -> list[CheckResult]:
    """Every check of the dataset ``spec``."""
    run = DatasetRun(spec, overrides)
    return run_steps(plugin, "dataset", spec.name, [
        ("params", lambda: check_params(plugin, run)),
        ("load", lambda: check_load(run)),
        ("contents", lambda: check_contents(run)),
    ])


def check_params(plugin: Plugin, run: DatasetRun) -> str:
    """The user's params (or the defaults) type, and give one of the known tasks."""
    spec = run.spec
    run.params = typed(spec.params, run.overrides, "dataset", spec.name, plugin.name)
    task = spec.task(run.params) if callable(spec.task) else spec.task
    if task not in hookspecs.TASKS:
        raise CheckFailed(f"task(params) gave {task!r}; expected one of {hookspecs.TASKS}")
    run.task = task
    return params_detail(run.params)


def check_load(run: DatasetRun) -> str:
    """``load`` gives a LoadedData (a StreamingData for a streaming dataset)."""
    if run.spec.streaming:  # its load may read with Ray Data: trainyard's quiet Ray, as train's
        _quiet_ray()
    data = run.spec.load(run.params, 0)
    expected = hookspecs.StreamingData if run.spec.streaming else hookspecs.LoadedData
    if not isinstance(data, expected):
        raise CheckFailed(f"load returned a {type(data).__name__}, expected a trainyard.{expected.__name__}")
    run.data = data
    if isinstance(data, hookspecs.StreamingData):
        return "a stream (Ray Dataset)" + (", with a validation stream" if data.val is not None else "")
    val = f", {len(data.val)} validation" if data.val is not None else ""
    return f"{len(data.train)} training examples{val}"


def check_contents(run: DatasetRun) -> str:
    """The loaded DataInfo agrees with the spec, and each split with the DataInfo."""
    data = run.data
    info = data.info
    _check_info(run.spec, run.task, info, run.params)
    splits = (("train", data.train), ("val", data.val))
    if isinstance(data, hookspecs.StreamingData):  # a few rows of each stream, as a Split
        from trainyard.train.stream import head_split

        _quiet_ray()
        splits = tuple((name, head_split(ds, info, 16) if ds is not None else None) for name, ds in splits)
    for split_name, split in splits:
        if split is None:
            continue
        problem = split_problem(split, info)
        if problem:
            raise CheckFailed(f"the {split_name} split: {problem}")
    shape = f", input_shape {info.input_shape}" if info.input_shape else ""
    classes = f", {len(info.classes)} classes" if info.classes else ""
    return f"{info.task}, {info.inputs}{shape}{classes}"


def _quiet_ray() -> None:
    """Ray for reading a stream (the running one, or an embedded one), with Ray Data's
    progress bars and per-execution lines off, as in a training run."""
    from trainyard.runtime.cluster import init_ray
    from trainyard.train.stream import quiet_ray_data

    init_ray()
    quiet_ray_data()


def _check_info(spec: hookspecs.DatasetSpec, task: str, info: Any, params: Any = None) -> None:
    """The loaded DataInfo is one, with the spec's inputs and task (and classes to classify)."""
    if not isinstance(info, hookspecs.DataInfo):
        raise CheckFailed(f"LoadedData.info is a {type(info).__name__}, expected a trainyard.DataInfo")
    declared = spec.inputs(params) if callable(spec.inputs) else spec.inputs
    if info.inputs != declared:
        raise CheckFailed(f"the spec declares inputs {declared!r} but the loaded "
                          f"DataInfo says {info.inputs!r}")
    if info.task != task:
        raise CheckFailed(f"the spec declares task {task!r} but the loaded DataInfo says {info.task!r}")
    if task == "classification" and len(info.classes) < 2:
        raise CheckFailed(f"a classification set needs at least two classes in "
                          f"DataInfo.classes (got {info.classes})")
