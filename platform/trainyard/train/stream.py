"""Streaming data: a dataset's Ray Datasets, split, encoded and streamed to the workers.

On the driver, :func:`prepare_stream` loads the plugin's :class:`StreamingData` (lazy:
nothing is read yet), holds out validation by a seeded hash of each row's input when the
dataset has no validation split of its own, fits the model's processor on a bounded random
sample (the only rows the driver ever holds), and adds the processor's ``encode`` as a
``map_batches`` stage: preprocessing runs in Ray Data's CPU tasks, ahead of the training
step. Ray Train gives each worker its own shard of the training rows
(``streaming_split(equal=True)``: every worker takes the same number of steps) and of the
validation rows (``equal=False``: every row once, so gathered metrics are exact).

On a worker, :func:`train_batches` and :func:`val_batches` iterate the shard each epoch,
shuffled as ``data.stream.shuffle`` says, with ``prefetch_batches`` batches prepared ahead.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainyard.errors import ConfigError, TrainingError
from trainyard.hookspecs import DataInfo, Split, StreamingData

#: The hash split's resolution: data.val_fraction is rounded to 1 / VAL_BUCKETS.
VAL_BUCKETS = 10_000


@dataclass
class StreamMeta:
    """What every worker needs besides its shards: the dataset's info, the fitted
    processor (saved in each checkpoint, as for in-memory data) and the row counts."""

    info: DataInfo
    processor: Any
    train_rows: int
    #: The processor's output keys when it returns a dict (keyword arguments of the
    #: model); None when it returns one tensor.
    keys: list[str] | None


@dataclass
class Stream:
    meta: StreamMeta
    train: Any  # ray.data.Dataset of encoded rows: "x" (or "x.<key>") and "y"
    val: Any


# --------------------------------------------------------------------------------------
# Rows to raw inputs, as a Split holds them
# --------------------------------------------------------------------------------------


def raw_inputs(column: Any, info: DataInfo) -> Any:
    """A batch's ``input`` column as the processor takes raw inputs: a list of strings
    (text) or one stacked float array (features, images)."""
    if info.inputs == "text":
        return [str(v) for v in column]
    if isinstance(column, np.ndarray) and column.dtype != object:
        return column
    return np.stack([np.asarray(v) for v in column])


def targets_array(column: Any, task: str) -> np.ndarray:
    array = np.asarray(column)
    if task == "classification":
        return array.astype(np.int64).reshape(len(array))
    return array.astype(np.float32).reshape(len(array), -1)


def head_split(ds: Any, info: DataInfo, n: int) -> Split:
    """The first ``n`` rows of a stream as a :class:`Split` (for checks and samples)."""
    batch = ds.take_batch(n, batch_format="numpy")
    return Split(raw_inputs(batch["input"], info), np.asarray(batch["target"]))


# --------------------------------------------------------------------------------------
# The validation split of a stream that has none: a seeded hash of each row's input
# --------------------------------------------------------------------------------------


def row_buckets(column: Any, seed: int) -> np.ndarray:
    """Each row's bucket in [0, VAL_BUCKETS): a CRC of the seed and the row's input bytes.
    The same row always lands in the same bucket, whatever the batch or the worker."""
    salt = zlib.crc32(str(seed).encode())
    out = np.empty(len(column), dtype=np.int64)
    for i, value in enumerate(column):
        raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else \
            np.ascontiguousarray(value).tobytes()
        out[i] = zlib.crc32(raw, salt) % VAL_BUCKETS
    return out


class HashSplit:
    """``map_batches`` stage keeping the training rows (``val=False``) or the validation
    rows (``val=True``) of a hash split."""

    def __init__(self, seed: int, fraction: float, val: bool):
        self.seed, self.cut, self.val = seed, int(round(fraction * VAL_BUCKETS)), val

    def __call__(self, batch: dict) -> dict:
        held = row_buckets(batch["input"], self.seed) < self.cut
        keep = held if self.val else ~held
        return {k: v[keep] for k, v in batch.items()}


class Encode:
    """``map_batches`` stage: raw rows to the model's batch (the processor's ``encode``)."""

    def __init__(self, processor: Any, info: DataInfo, task: str):
        self.processor, self.info, self.task = processor, info, task

    def __call__(self, batch: dict) -> dict:
        encoded = self.processor.encode(raw_inputs(batch["input"], self.info))
        if isinstance(encoded, dict):
            out = {f"x.{k}": _numpy(v) for k, v in encoded.items()}
        else:
            out = {"x": _numpy(encoded)}
        out["y"] = targets_array(batch["target"], self.task)
        return out


def _numpy(value: Any) -> np.ndarray:
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


# --------------------------------------------------------------------------------------
# The driver's part
# --------------------------------------------------------------------------------------


def load_stream(job: Any) -> StreamingData:
    """The dataset plugin's streams; a problem with the data (a missing column, an empty
    glob, an unreadable URI, missing credentials) is one line naming it."""
    try:
        data = job.dataset.load(job.data_params, job.config.seed)
    except (ValueError, FileNotFoundError, OSError, KeyError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"data ({job.dataset.name}): {message}") from None
    if not isinstance(data, StreamingData):
        raise TrainingError(f"dataset {job.dataset.name!r} is registered with streaming=True but its "
                            f"load returned a {type(data).__name__}, not a trainyard.StreamingData")
    if data.info.task != job.task:
        raise TrainingError(
            f"dataset {job.dataset.name!r} declared task {job.task} but loaded {data.info.task}")
    return data


def _count(ds: Any, what: str, job: Any) -> int:
    try:
        return int(ds.count())
    except Exception as exc:  # a read error surfaces on the first pass
        raise ConfigError(f"data ({job.dataset.name}): cannot read the {what}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    cause = exc
    while getattr(cause, "__cause__", None) is not None:
        cause = cause.__cause__
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(cause).__name__


def prepare_stream(job: Any, search: bool = False) -> Stream:
    """The job's training and validation streams, encoded, and the fitted processor.
    ``search``: the streams feed a Tune search (``data.stream.cache: auto`` keeps them)."""
    cfg = job.config
    s = cfg.data.stream
    quiet_ray_data()
    from ray.data import DataContext

    # Datasets take the context they are made in: set before the plugin makes them.
    DataContext.get_current().target_max_block_size = s.block_mb * 2**20
    data = load_stream(job)
    info, train, val = data.info, data.train, data.val
    if val is None:
        train = data.train.map_batches(HashSplit(cfg.seed, cfg.data.val_fraction, False), batch_format="numpy")
        val = data.train.map_batches(HashSplit(cfg.seed, cfg.data.val_fraction, True), batch_format="numpy")
    exact = cfg.train.scheduler != "none"  # a schedule's length must not fall short
    if data.rows is not None and data.val is not None:
        rows = data.rows
    elif data.rows is not None and not exact:
        rows = int(round(data.rows * (1 - cfg.data.val_fraction)))
    else:
        rows = _count(train, "training rows", job)
    if rows < 1:
        raise ConfigError(f"data ({job.dataset.name}): the training split is empty")

    processor = job.model.processor(job.model_params, info)
    sample = train
    if rows > s.fit_sample:
        sample = train.random_sample(min(1.0, 1.2 * s.fit_sample / rows), seed=cfg.seed)
    try:
        batch = sample.take_batch(s.fit_sample, batch_format="numpy")
    except ValueError as exc:
        raise ConfigError(f"data ({job.dataset.name}): no training rows to fit the processor on ({exc})") from None
    except Exception as exc:
        raise ConfigError(f"data ({job.dataset.name}): cannot read the training rows: {_first_line(exc)}") from None
    processor.fit(raw_inputs(batch["input"], info))
    probe = processor.encode(raw_inputs(batch["input"][:2], info))
    keys = sorted(probe) if isinstance(probe, dict) else None

    encode = Encode(processor, info, job.task)
    train = train.map_batches(encode, batch_format="numpy")
    val = val.map_batches(encode, batch_format="numpy")
    cache = str(s.cache).lower()  # YAML reads a bare true/false as a boolean
    if cache == "true" or (cache == "auto" and search and _fits_cache(data.size_bytes)):
        train, val = train.materialize(), val.materialize()
    if s.shuffle == "full":
        train = train.random_shuffle(seed=None)  # a new order every epoch
    return Stream(StreamMeta(info, processor, rows, keys), train, val)


def check_data_cpus(cfg: Any, holders: float) -> None:
    """Ray Data's read and encode tasks need a CPU that the workers (or trials) do not
    hold, or the stream never starts: fail at once, saying so. ``holders``: how many
    workers or concurrent trials hold ``scaling.cpus_per_worker`` each."""
    from trainyard.runtime.cluster import check_capacity

    need = holders * float(cfg.scaling.cpus_per_worker) + 1
    check_capacity({"CPU": need}, f"{holders:g} worker(s) of {cfg.scaling.cpus_per_worker:g} CPU plus "
                   "one CPU for Ray Data's read and preprocessing tasks",
                   "Streamed data is read beside the workers: lower scaling.cpus_per_worker (e.g. 0.5) "
                   "or scaling.num_workers", error=ConfigError)


def quiet_ray_data() -> None:
    """No Ray Data progress bars or per-execution log lines in trainyard's console (the
    live training view is the progress); its warnings and errors still show, and its full
    logs stay in the Ray session's ray-data log."""
    import logging

    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False


def _fits_cache(size: int | None) -> bool:
    """The data (the plugin's estimate, never found by reading it) is under a quarter of
    the cluster's object store; an unknown size does not fit."""
    import ray

    store = ray.available_resources().get("object_store_memory", 0)
    return size is not None and 0 < size < store / 4


def data_config() -> Any:
    """Ray Train's DataConfig for trainyard's two streams: equal training shards (every
    worker takes the same number of steps), and validation shards that cover every row
    once (so the gathered metrics are the one-process values)."""
    from ray.train import DataConfig

    class StreamSplit(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, split in enumerate(ds.streaming_split(world_size, equal=name == "train",
                                                             locality_hints=hints)):
                    output[i][name] = split
            return output

    return StreamSplit()


# --------------------------------------------------------------------------------------
# The worker's part
# --------------------------------------------------------------------------------------


def local_batch_size(cfg: Any, world: int) -> int:
    return max(1, cfg.train.batch_size // world)


def steps_per_epoch(meta: StreamMeta, cfg: Any, world: int) -> int:
    """Each worker's steps in one epoch over its equal shard."""
    return max(1, math.ceil((meta.train_rows // world) / local_batch_size(cfg, world)))


def _model_input(batch: dict, keys: list[str] | None) -> Any:
    return batch["x"] if keys is None else {k: batch[f"x.{k}"] for k in keys}


def train_batches(shard: Any, meta: StreamMeta, cfg: Any, world: int, epoch: int):
    """This worker's training batches for ``epoch``: ``(x, y)`` tensors."""
    s = cfg.data.stream
    options: dict = {"batch_size": local_batch_size(cfg, world), "prefetch_batches": s.prefetch_batches}
    if s.shuffle == "local":
        options.update(local_shuffle_buffer_size=s.shuffle_buffer,
                       local_shuffle_seed=cfg.seed * 1000 + epoch)
    for batch in shard.iter_torch_batches(**options):
        yield _model_input(batch, meta.keys), batch["y"]


def val_batches(shard: Any, meta: StreamMeta, cfg: Any):
    for batch in shard.iter_torch_batches(batch_size=512, prefetch_batches=cfg.data.stream.prefetch_batches):
        yield _model_input(batch, meta.keys), batch["y"]
