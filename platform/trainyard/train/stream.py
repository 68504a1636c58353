"""Streaming data: a dataset's Ray Datasets, split, encoded and streamed to the workers.

On the driver, :func:`prepare_stream` loads the plugin's :class:`StreamingData` (lazy:
nothing is read yet), holds out validation by a seeded hash of each row's input when the
dataset has no validation split of its own, fits the model's processor on a bounded random
sample (the only rows the driver ever holds), and adds the processor's ``encode`` as a
``map_batches`` stage: preprocessing runs in Ray Data's CPU tasks, ahead of the training
step. Ray Train gives each worker its own shard of the training rows
(``streaming_split(equal=True)``: every worker takes the same number of steps) and of the
validation rows (``equal=False``: every row once, so gathered metrics are exact).

On a worker, :class:`TrainFeed` and :func:`val_batches` iterate the shards each epoch,
shuffled as ``data.stream.shuffle`` says, with ``prefetch_batches`` fetches prepared ahead.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainyard.errors import ConfigError, TrainingError, reason_line
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
    #: Bytes of one encoded row (its inputs and target), measured on the fitted sample.
    row_bytes: int = 0


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
    """Each row's bucket in [0, VAL_BUCKETS): a seeded hash of the row's input. The same
    row always lands in the same bucket, whatever the batch or the worker. A numeric array
    is hashed in one vectorised pass over its bytes (a seeded multiply-add of its 32-bit
    words, then a 64-bit finaliser); text and ragged rows by a CRC of each row's bytes."""
    if isinstance(column, np.ndarray) and column.dtype != object and len(column):
        return _array_buckets(column, seed)
    salt = zlib.crc32(str(seed).encode())
    out = np.empty(len(column), dtype=np.int64)
    for i, value in enumerate(column):
        raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else \
            np.ascontiguousarray(value).tobytes()
        out[i] = zlib.crc32(raw, salt) % VAL_BUCKETS
    return out


def _array_buckets(array: np.ndarray, seed: int) -> np.ndarray:
    rows = np.ascontiguousarray(array).reshape(len(array), -1)
    raw = rows.view(np.uint8).reshape(len(rows), -1)
    pad = (-raw.shape[1]) % 4
    if pad:
        raw = np.concatenate([raw, np.zeros((len(raw), pad), np.uint8)], axis=1)
    words = np.ascontiguousarray(raw).view(np.uint32).astype(np.uint64)
    weights = np.random.default_rng([seed, 0x7A11]).integers(1, 2**63, size=words.shape[1], dtype=np.uint64) | 1
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64, as meant
        h = (words * weights).sum(axis=1, dtype=np.uint64) + np.uint64(words.shape[1])
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xC4CEB9FE1A85EC53)
        h ^= h >> np.uint64(33)
    return (h % np.uint64(VAL_BUCKETS)).astype(np.int64)


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
    """``map_batches`` stage: raw rows to the model's batch (the processor's ``encode``),
    after the hash split's selection of rows when there is one (one stage, so Ray Data
    converts each batch once)."""

    def __init__(self, processor: Any, info: DataInfo, task: str, split: HashSplit | None = None):
        self.processor, self.info, self.task, self.split = processor, info, task, split

    def __call__(self, batch: dict) -> dict:
        rows = batch
        if self.split is not None:
            rows = self.split(batch)
        # A block the split leaves no row of still gives the stream's columns, with no row:
        # a processor need not encode nothing (a tokenizer fails on an empty list).
        empty = len(rows["target"]) == 0 and len(batch["target"]) > 0
        if empty:
            rows = {k: v[:1] for k, v in batch.items()}
        encoded = self.processor.encode(raw_inputs(rows["input"], self.info))
        if isinstance(encoded, dict):
            out = {f"x.{k}": _numpy(v) for k, v in encoded.items()}
        else:
            out = {"x": _numpy(encoded)}
        out["y"] = targets_array(rows["target"], self.task)
        return {k: v[:0] for k, v in out.items()} if empty else out


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
        raise ConfigError(f"data ({job.dataset.name}): cannot read the {what}: {reason_line(exc)}") from None


def prepare_stream(job: Any, search: bool = False) -> Stream:
    """The job's training and validation streams, encoded, and the fitted processor.
    ``search``: the streams feed a Tune search (its trials share them)."""
    quiet_ray_data()  # imports Ray Data, which sets its logging up
    with _read_errors_in_one_line():
        return _prepare_stream(job, search)


@contextlib.contextmanager
def _read_errors_in_one_line():
    """Ray Data logs a read that fails with its stack traces on the console before it raises;
    here every such error becomes one ConfigError line naming the URI, so the console shows
    that line only (the traces still go to the session's ray-data log)."""
    import logging

    handlers = [h for h in logging.getLogger("ray.data").handlers if not isinstance(h, logging.FileHandler)
                and type(h).__name__ != "SessionFileHandler"]
    levels = [h.level for h in handlers]
    for h in handlers:
        h.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for h, level in zip(handlers, levels):
            h.setLevel(level)


def _prepare_stream(job: Any, search: bool = False) -> Stream:
    cfg = job.config
    s = cfg.data.stream
    quiet_ray_data()
    from ray.data import DataContext

    # Datasets take the context they are made in: set before the plugin makes them.
    DataContext.get_current().target_max_block_size = s.block_mb * 2**20
    data = load_stream(job)
    info, train, val = data.info, data.train, data.val
    splits: tuple = (None, None)
    if val is None:  # held out by hash: selected in the encode stage, one pass each
        splits = (HashSplit(cfg.seed, cfg.data.val_fraction, False), HashSplit(cfg.seed, cfg.data.val_fraction, True))
        train = data.train.map_batches(splits[0], batch_format="numpy")  # for the count and the fit
        val = data.train
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
        raise ConfigError(f"data ({job.dataset.name}): cannot read the training rows: {reason_line(exc)}") from None
    _check_rows(batch, info, job)
    processor.fit(raw_inputs(batch["input"], info))
    probe = processor.encode(raw_inputs(batch["input"][:2], info))
    keys = sorted(probe) if isinstance(probe, dict) else None
    row_bytes = _row_bytes(probe, batch["target"][:2])

    train = data.train.map_batches(Encode(processor, info, job.task, splits[0]), batch_format="numpy")
    val = val.map_batches(Encode(processor, info, job.task, splits[1]), batch_format="numpy")
    cache = str(s.cache).lower()  # YAML reads a bare true/false as a boolean
    if cache == "true" or (cache == "auto" and _fits_cache(data.size_bytes)):
        train, val = train.materialize(), val.materialize()
    if s.shuffle == "full":
        train = train.random_shuffle(seed=None)  # a new order every epoch
    return Stream(StreamMeta(info, processor, rows, keys, row_bytes), train, val)


def _check_rows(batch: dict, info: DataInfo, job: Any) -> None:
    """The stream's rows (the processor's sample) as its DataInfo describes them: an
    ``input`` and a ``target`` column, inputs of its shape, features without missing values.
    A plugin's mistake is named here, before the workers start, not met inside them."""
    from trainyard.splits import split_problem

    name = job.dataset.name
    absent = [c for c in ("input", "target") if c not in batch]
    if absent:
        raise ConfigError(f"data ({name}): the stream's rows have no {absent[0]!r} column (columns: "
                          f"{', '.join(map(str, batch)) or 'none'}); a stream's rows hold 'input' and "
                          "'target' (docs/plugins.md)")
    try:
        head = Split(raw_inputs(batch["input"][:64], info), np.asarray(batch["target"][:64]))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"data ({name}): the stream's 'input' rows are not {info.inputs} inputs ({exc})") from None
    problem = split_problem(head, info)
    if problem:
        raise ConfigError(f"data ({name}): the stream's rows: {problem}")
    if info.inputs == "features":
        x = raw_inputs(batch["input"], info)
        finite = np.isfinite(x).reshape(len(x), -1).all(axis=0)
        if not finite.all():
            column = int(np.flatnonzero(~finite)[0])
            named = (f"feature {info.feature_names[column]!r}" if column < len(info.feature_names or [])
                     else f"feature {column}")
            raise ConfigError(f"data ({name}): {named} has missing (NaN) or infinite values in the "
                              "training rows; drop or fill them")


def _row_bytes(probe: Any, targets: Any) -> int:
    """Bytes per row of encoded inputs and targets, from a few encoded rows."""
    parts = list(probe.values()) if isinstance(probe, dict) else [probe]
    total = batch_bytes([([_numpy(p) for p in parts], np.asarray(targets))])
    return max(1, int(math.ceil(total / max(1, len(targets)))))


def check_data_cpus(cfg: Any, trials: int | None = None) -> None:
    """Ray Data's read and encode tasks need a CPU that the workers (or trials) do not
    hold, or the stream never starts: fail at once, saying so. ``trials``: a search's
    trials at once, each of ``scaling.num_workers`` workers (None: one training run)."""
    from trainyard.runtime.cluster import check_capacity

    holders = (trials or 1) * cfg.scaling.num_workers
    need = holders * float(cfg.scaling.cpus_per_worker) + 1
    held = f"{holders:g} worker(s) of {cfg.scaling.cpus_per_worker:g} CPU"
    advice = "lower scaling.cpus_per_worker (e.g. 0.5) or scaling.num_workers"
    if trials is not None:
        held = (f"{trials} trial(s) at once (tune.max_concurrent_trials) of {cfg.scaling.num_workers} "
                f"worker(s) of {cfg.scaling.cpus_per_worker:g} CPU")
        advice = "lower tune.max_concurrent_trials, scaling.cpus_per_worker (e.g. 0.5) or scaling.num_workers"
    check_capacity({"CPU": need}, f"{held} plus one CPU for Ray Data's read and preprocessing tasks",
                   f"Streamed data is read beside the workers: {advice}", error=ConfigError)


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
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")  # its "Progress bars disabled" warning: wanted here


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


def fetch_size(meta: StreamMeta, cfg: Any, world: int) -> int:
    """Rows a worker takes from its stream at a time: a whole number of local batches, at
    most ``data.stream.fetch_rows`` rows and an eighth of ``data.stream.block_mb`` (a worker
    holds several fetches ahead: what it holds stays a few blocks)."""
    s = cfg.data.stream
    step = local_batch_size(cfg, world)
    rows = s.fetch_rows
    if meta.row_bytes:
        rows = min(rows, (s.block_mb * 2**20 // 8) // meta.row_bytes)
    return step * max(1, rows // step)


def _rows(x: Any, start: int, stop: int) -> Any:
    return {k: v[start:stop] for k, v in x.items()} if isinstance(x, dict) else x[start:stop]


def local_shuffle(fetches: Any, size: int, buffer: int, seed: int):
    """``fetches`` (dicts of tensors, rows first) reshuffled through a buffer of at least
    ``buffer`` rows: each output of ``size`` rows is drawn at random from the buffer, and the
    buffer is drawn empty at the end. Every row comes out once; every output but the last
    has ``size`` rows. Torch gathers (no Python per row): Ray Data's own local shuffle cost
    about a sixth of a small model's throughput here."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    pool: dict | None = None
    for batch in fetches:
        pool = batch if pool is None else {k: torch.cat([pool[k], batch[k]]) for k in pool}
        rows = len(pool["y"])
        while rows >= buffer + size:
            order = torch.randperm(rows, generator=generator)
            yield {k: v[order[:size]] for k, v in pool.items()}
            pool = {k: v[order[size:]] for k, v in pool.items()}
            rows -= size
    if pool is not None:
        order = torch.randperm(len(pool["y"]), generator=generator)
        for start in range(0, len(order), size):
            yield {k: v[order[start:start + size]] for k, v in pool.items()}


class TrainFeed:
    """This worker's training batches, epoch after epoch: ``(x, y)`` tensors of the local
    batch size, cut from larger fetches (Ray Data's cost per batch is paid once a fetch).

    A background thread reads the shard into a queue of ``prefetch_batches`` fetches and
    begins the next epoch's pass as soon as this one's is read, so the next epoch's read
    starts while this epoch's last batches and the validation pass run, instead of after
    them. Each epoch is its own pass (its own local-shuffle seed; Ray Data's full shuffle
    draws a new order) and every fetch but the last is a whole number of batches, so the
    steps are those of fetching one batch at a time. A shard split across workers starts
    an epoch when every worker's thread asks for it, as before."""

    def __init__(self, shard: Any, meta: StreamMeta, cfg: Any, world: int, first: int, last: int):
        import queue
        import threading

        self.shard, self.meta, self.cfg, self.world = shard, meta, cfg, world
        self.epochs = range(first, last + 1)
        self.step = local_batch_size(cfg, world)
        self.queue: Any = queue.Queue(maxsize=max(1, 2 * cfg.data.stream.prefetch_batches))
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._read, name="trainyard-feed", daemon=True)
        self.started = False

    def _read(self) -> None:
        s = self.cfg.data.stream
        fetch = fetch_size(self.meta, self.cfg, self.world)
        try:
            for epoch in self.epochs:
                fetches = self.shard.iter_torch_batches(batch_size=fetch, prefetch_batches=s.prefetch_batches)
                if s.shuffle == "local":
                    fetches = local_shuffle(fetches, fetch, s.shuffle_buffer, self.cfg.seed * 1000 + epoch)
                for batch in fetches:
                    if not self._put((epoch, batch)):
                        return
                if not self._put((epoch, None)):
                    return
        except BaseException as exc:  # handed to the training thread, raised there
            self._put((None, exc))

    def _put(self, item: tuple) -> bool:
        import queue

        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def batches(self, epoch: int):
        """Epoch ``epoch``'s batches (epochs are asked for in order)."""
        if not self.started:
            self.started = True
            self.thread.start()
        while True:
            got, item = self.queue.get()
            if got is None:
                raise item
            if got < epoch:  # the rest of an epoch left unfinished
                continue
            if item is None:
                return
            x, y = _model_input(item, self.meta.keys), item["y"]
            for start in range(0, len(y), self.step):
                yield _rows(x, start, start + self.step), y[start:start + self.step]

    def close(self) -> None:
        self.stopped.set()


def val_batches(shard: Any, meta: StreamMeta, cfg: Any):
    for batch in shard.iter_torch_batches(batch_size=max(512, cfg.data.stream.fetch_rows),
                                          prefetch_batches=cfg.data.stream.prefetch_batches):
        yield _model_input(batch, meta.keys), batch["y"]


def batch_bytes(batches: list) -> int:
    """Bytes of a list of ``(x, y)`` batches; ``x`` an array or tensor, or a dict or list of them."""
    total = 0
    for x, y in batches:
        parts = x.values() if isinstance(x, dict) else x if isinstance(x, list) else [x]
        total += sum(p.nbytes for p in parts) + y.nbytes
    return total
