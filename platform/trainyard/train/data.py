"""A job's data on a worker: load the dataset, hold out validation, fit the model plugin's
processor on the training split and encode both splits once; and the epoch's batches.

Pure (no Ray), so tests use it directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from trainyard.config import ResolvedJob, load_config, resolve
from trainyard.errors import TrainingError


@dataclass
class Prepared:
    info: Any
    processor: Any
    x_train: Any
    y_train: Any
    x_val: Any
    y_val: Any


def _take(inputs: Any, index: np.ndarray) -> Any:
    if isinstance(inputs, list):
        return [inputs[i] for i in index]
    return inputs[index]


def split_validation(data: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """Hold out ``fraction`` of the training split, per class for classification, seeded."""
    targets = np.asarray(data.train.targets)
    rng = np.random.default_rng(seed)
    n = len(targets)
    if data.info.task == "classification":
        groups = [np.flatnonzero(targets == c) for c in np.unique(targets)]
    else:
        groups = [np.arange(n)]
    # Quotas per class that add up to round(n * fraction): floors, then the largest
    # remainders.
    total = min(max(int(round(n * fraction)), 1), n - 1)
    exact = np.array([len(g) * fraction for g in groups])
    quota = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - quota), kind="stable")[: total - quota.sum()]:
        quota[i] += 1
    val_parts = [rng.permutation(g)[:q] for g, q in zip(groups, quota)]
    val_idx = np.sort(np.concatenate(val_parts))
    train_idx = np.setdiff1d(np.arange(n), val_idx, assume_unique=True)
    split = type(data.train)
    return (
        split(_take(data.train.inputs, train_idx), targets[train_idx]),
        split(_take(data.train.inputs, val_idx), targets[val_idx]),
    )


def _targets_tensor(targets: Any, task: str) -> Any:
    import torch

    array = np.asarray(targets)
    if task == "classification":
        return torch.as_tensor(array.astype(np.int64))
    array = array.astype(np.float32)
    return torch.as_tensor(array.reshape(len(array), -1))


def load_dataset(job: ResolvedJob, load: Callable[[ResolvedJob], Any] | None = None) -> Any:
    """The dataset plugin's in-memory data for ``job``, of the task it declared, with splits
    that fit its DataInfo (the conformance check's rules): a plugin's mistake is one line
    naming the dataset, here (``train --dry-run``) or on the workers, not a crash inside the
    training loop. ``load``: what loads it (default: the plugin's ``load``)."""
    from trainyard import hookspecs
    from trainyard.errors import TrainyardError, reason_line
    from trainyard.splits import split_problem

    name = job.dataset.name
    try:
        data = load(job) if load is not None else job.dataset.load(job.data_params, job.config.seed)
    except (ValueError, OSError, KeyError, TrainyardError):  # the data's own errors: said as they are
        raise
    except Exception as exc:  # noqa: BLE001 - the plugin's code, not trainyard's
        raise TrainingError(f"dataset {name!r}: its load raised {type(exc).__name__}: {reason_line(exc)}") from exc
    if not isinstance(data, hookspecs.LoadedData):
        raise TrainingError(f"dataset {name!r}: load returned a {type(data).__name__}, expected a "
                            "trainyard.LoadedData (`trainyard plugins check` on its plugin shows this too)")
    if data.info.task != job.task:
        raise TrainingError(
            f"dataset {job.dataset.name!r} declared task {job.task} but loaded {data.info.task}"
        )
    for split_name, split in (("train", data.train), ("val", data.val)):
        if split is None and split_name == "val":  # trainyard holds validation out of train
            continue
        problem = split_problem(split, data.info)
        if problem:
            raise TrainingError(f"dataset {name!r}: the {split_name} split: {problem}")
    return data


def prepare_data(job: ResolvedJob, load: Callable[[ResolvedJob], Any] | None = None) -> Prepared:
    """Load the dataset, split off validation, fit the processor and encode both splits.
    ``load``: what loads the dataset for ``job`` (default: the plugin's ``load``)."""
    cfg = job.config
    data = load_dataset(job, load)
    train, val = (data.train, data.val) if data.val is not None else split_validation(
        data, cfg.data.val_fraction, cfg.seed
    )
    if len(train) == 0 or len(val) == 0:
        raise TrainingError(f"dataset {job.dataset.name!r} gave an empty training or validation split")
    processor = job.model.processor(job.model_params, data.info)
    processor.fit(train.inputs)
    return Prepared(
        data.info,
        processor,
        processor.encode(train.inputs),
        _targets_tensor(train.targets, job.task),
        processor.encode(val.inputs),
        _targets_tensor(val.targets, job.task),
    )


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, world: int) -> list:
    """The epoch's global batches as index tensors, drawn from one seeded permutation.

    The last batch is dropped when it has fewer examples than there are workers, so
    every worker takes part in every step.
    """
    import torch

    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(n, generator=g)
    batches = list(torch.split(perm, batch_size))
    if batches and len(batches[-1]) < world:
        batches.pop()
    return batches



def sample_input(checkpoint: str | Path) -> Any:
    """One raw validation input of a checkpoint's dataset, as a client would send it."""
    job = resolve(load_config(Path(checkpoint) / "job.yaml"))
    data = job.dataset.load(job.data_params, job.config.seed)
    if job.dataset.streaming:  # one row of the stream (Ray is up where this is asked)
        from trainyard.train.stream import head_split

        first = head_split(data.val if data.val is not None else data.train, data.info, 1).inputs[0]
        return first if isinstance(first, str) else first.tolist()
    val = data.val if data.val is not None else split_validation(data, job.config.data.val_fraction, job.config.seed)[1]
    first = val.inputs[0]
    return first if isinstance(first, str) else first.tolist()

