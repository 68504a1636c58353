"""The loop each worker runs: build the model, train an epoch, evaluate, checkpoint.

The loop talks to its host through a :class:`Session`: a Ray Train worker
(:class:`TrainSession`) or a one-worker Tune trial (``trainyard.tune.trial``). Every epoch
draws one seeded permutation of the training set; worker ``r`` of ``W`` takes examples
``r::W`` of each global batch, so the workers' shards are disjoint and the gradient DDP
averages equals the one-process gradient of the global batch. Validation is sharded the
same way and gathered before metrics are computed, so N workers report the one-process
value.
"""

from __future__ import annotations

import contextlib
import math
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from trainyard.batches import call_model, take, to_device
from trainyard.config import ResolvedJob, resolve
from trainyard.train.data import Prepared, epoch_batches, prepare_data
from trainyard.train.stream import StreamMeta, TrainFeed, batch_bytes, steps_per_epoch, val_batches
from trainyard.train.schedule import (EarlyStopping, apply_hyperparameters, make_scheduler, optimizer_steps,
                                      warmup_epochs)


class Session(Protocol):
    """What the loop needs from the process it runs in."""

    rank: int
    world: int

    def device(self) -> Any: ...

    def prepare_model(self, model: Any, device: Any) -> Any: ...

    def get_checkpoint(self) -> Any: ...

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None: ...

    def stop_requested(self) -> bool:
        """Whether to stop now, mid-epoch (a Tune trial that trains on while Tune handles its
        last result, and that Tune has stopped: trainyard.tune.trial.AsyncReports)."""
        ...


class TrainSession:
    """The loop's view of a Ray Train worker."""

    def __init__(self):
        import ray.train
        import torch.distributed as dist

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.distributed = self.world > 1 and dist.is_available() and dist.is_initialized()

    def device(self):
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare_model(self, model, device):
        import ray.train.torch

        return ray.train.torch.prepare_model(model) if self.distributed else model.to(device)

    def get_checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def stop_requested(self) -> bool:
        return False  # its trainer stops a Ray Train worker

    def dataset_shard(self, name: str):
        """This worker's shard of a streamed dataset (Ray Train splits it)."""
        import ray.train

        return ray.train.get_dataset_shard(name)

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's entry point on each worker."""
    run_loop(loop_config, TrainSession())


# --------------------------------------------------------------------------------------
# Pieces of a step: optimizer, loss, precision, metrics
# --------------------------------------------------------------------------------------


def make_optimizer(cfg: Any, model: Any) -> Any:
    import torch

    t = cfg.train
    params = model.parameters()
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def loss_fn(task: str) -> Callable:
    """``loss(outputs, targets, reduction)``: cross-entropy or MSE, in fp32."""
    import torch.nn.functional as F

    if task == "classification":
        return lambda out, y, reduction="mean": F.cross_entropy(out.float(), y, reduction=reduction)
    return lambda out, y, reduction="mean": F.mse_loss(out.float().reshape(y.shape), y, reduction=reduction)


def compute_metrics(job: ResolvedJob, info: Any, outputs: np.ndarray, targets: np.ndarray) -> dict:
    """The job's metrics on the validation ``outputs``, checked first to be as wide as the
    data needs: a model plugin's wrong output width trains without an error (the loss
    takes any width that covers the labels) and would be saved and served broken."""
    import numbers

    from trainyard.errors import TrainingError

    width = info.num_outputs
    shape = list(outputs.shape)
    if not (len(shape) == 2 and shape[1] == width) and not (len(shape) == 1 and width == 1):
        why = f"one logit per class ({width})" if job.task == "classification" else f"{width} target(s)"
        raise TrainingError(
            f"model {job.model.name!r} returned outputs of shape {shape} for {len(outputs)} validation "
            f"examples; the data needs [N, {width}] ({why}); `trainyard plugins check` on its plugin "
            "shows this too")
    values = {}
    for m in job.metrics:
        value = m.fn(outputs, targets, info)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TrainingError(f"metric {m.name!r} returned {type(value).__name__} {value!r:.60}; a metric "
                                "must return one float")
        values[f"val_{m.name}"] = float(value)
    return values


def autocast_dtype(cfg: Any, device: Any) -> Any:
    """The mixed-precision dtype for ``train.precision`` on ``device``; None for fp32."""
    import torch

    if device.type != "cuda" or cfg.train.precision == "fp32":
        return None
    if cfg.train.precision == "fp16":
        return torch.float16
    if cfg.train.precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


@dataclass
class Streamed:
    """A streamed dataset on one worker: the driver's fitted processor and this worker's
    shards (Ray Data iterators, each epoch a new pass)."""

    meta: StreamMeta
    train: Any
    val: Any
    #: The validation batches, kept after the first pass when every worker's are small.
    val_kept: list | None = None
    #: Whether the first pass has decided on keeping them.
    val_decided: bool = False
    #: The training batches' reader (made at the first epoch the worker trains).
    feed: TrainFeed | None = None

    @property
    def info(self) -> Any:
        return self.meta.info

    @property
    def processor(self) -> Any:
        return self.meta.processor


@dataclass
class Trainee:
    """What one worker trains with, made once before the first epoch."""

    job: ResolvedJob
    data: Prepared | Streamed
    model: Any
    optimizer: Any
    device: Any
    amp_dtype: Any
    scaler: Any
    start_epoch: int
    scheduler: Any = None
    stopping: EarlyStopping | None = None
    #: The length of the schedule's warmup in epochs (0: no warmup).
    warmup_epochs: float = 0
    #: The metrics of the epochs before ``start_epoch``, kept in every checkpoint: a driver
    #: killed before it logged the epochs its workers checkpointed gets them back on resume.
    earlier: list = field(default_factory=list)


#: Reported with each epoch of a schedule that warms its learning rate up: the warmup's
#: length in epochs (trainyard's ASHA compares a trial only with trials on the same
#: schedule: tune/asha.py).
WARMUP_EPOCHS = "warmup_epochs"


def run_loop(loop_config: dict, session: Session) -> None:
    """Train the job in ``loop_config["config"]``, reporting each epoch to ``session``."""
    from omegaconf import DictConfig, OmegaConf

    from trainyard.plugins import get_registry

    _work_in(loop_config.get("cwd"))
    cfg = loop_config["config"]  # a dict; a Tune trial in its own process passes its DictConfig
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    registry = get_registry()
    job = resolve(cfg, registry)
    t = setup(job, session, _streamed(loop_config, session))
    plugin = registry.owner("model", cfg.model.name)
    progress = loop_config.get("progress")

    def emit(event: dict, wait: bool = False) -> None:
        if progress is not None and session.rank == 0:
            pushed = progress.push.remote(event)
            if wait:  # the driver must see it before the run ends
                import ray

                ray.get(pushed)

    if progress is not None:  # every rank says where it runs (workers.json in the run folder)
        progress.push.remote(_where(session.rank, t.device))
    if t.start_epoch >= cfg.train.epochs:
        emit({"type": "done_before", "epoch": t.start_epoch - 1})
    try:
        _epochs(t, job, session, emit, plugin, bool(loop_config.get("fail_on_nonfinite")))
    finally:
        if isinstance(t.data, Streamed) and t.data.feed is not None:
            t.data.feed.close()


def _work_in(folder: str | None) -> None:
    """Work in the caller's folder (where `trainyard train` ran), so that a relative path in
    the job, such as a data file's, means what it meant there; Ray starts its workers, and
    Tune its trials, in folders of their own. A node without that folder keeps its own."""
    import os

    if folder and os.path.isdir(folder) and os.getcwd() != folder:
        os.chdir(folder)


def _epochs(t: Trainee, job: ResolvedJob, session: Session, emit: Callable[..., None], plugin: str,
            fail_on_nonfinite: bool = False) -> None:
    cfg = job.config
    for epoch in range(t.start_epoch, cfg.train.epochs):
        if session.stop_requested():
            return
        streamed = isinstance(t.data, Streamed)
        trained = (train_epoch_stream if streamed else train_epoch)(t, session, epoch, emit)
        if session.stop_requested():  # an epoch Tune will not take: neither checked nor saved
            return
        if streamed:
            checked = evaluate_stream(job, t.model, t.data, t.device, session.world, t.amp_dtype)
        else:
            checked = evaluate(job, t.model, t.data, t.device, session.rank, session.world, t.amp_dtype)
        metrics = {**checked, **trained}
        if fail_on_nonfinite and not math.isfinite(metrics["train_loss"]):
            # Ends here, before its checkpoint (the latest stays the last epoch with a finite
            # loss), for the driver to fail the run: an error raised here would have Ray
            # Train restart the workers (checkpoint.max_failures) into the same loss.
            emit({"type": "diverged", "epoch": epoch, "train_loss": metrics["train_loss"]}, wait=True)
            return
        if t.warmup_epochs:
            metrics[WARMUP_EPOCHS] = t.warmup_epochs
        emit({"type": "epoch_end", "epoch": epoch, "metrics": metrics})
        stop = t.stopping is not None and t.stopping.update(metrics[f"val_{job.monitor}"])
        save_and_report(t, session, epoch, metrics, plugin)
        if stop:  # every rank sees the same gathered metrics, so all stop together
            emit({"type": "early_stop", "epoch": epoch, "monitor": f"val_{job.monitor}",
                  "best": t.stopping.best, "patience": cfg.train.patience})
            return


def _streamed(loop_config: dict, session: Session) -> Streamed | None:
    """The worker's streams: its shards from Ray Train, or (a one-worker Tune trial, which
    has no trainer to split them) the whole streams the driver passed."""
    meta = loop_config.get("stream")
    if meta is None:
        return None
    shard = getattr(session, "dataset_shard", None)
    if shard is not None:
        return Streamed(meta, shard("train"), shard("val"))
    streams = loop_config["datasets"]
    return Streamed(meta, streams["train"].iterator(), streams["val"].iterator())


def load_restored_weights(directory: str, model: Any) -> None:
    """Load a checkpoint's weights into ``model``, built from this run's config. A PBT
    exploit may have changed a model param that adds or drops a parameter-free layer
    (the built-in MLP and CNN add a Dropout layer only when dropout is above 0), which
    renumbers the layers after it: the same tensors, in the same order, under other
    names. Such weights are loaded by position; weights that do not fit the model (a param
    that changes the architecture) fail with an error saying so."""
    from trainyard.checkpoint import WEIGHTS, load_weights

    try:
        load_weights(directory, model)
        return
    except RuntimeError as exc:
        if not Path(directory, WEIGHTS).is_file():
            raise
        error = exc
    from safetensors.torch import load_file

    saved = load_file(str(Path(directory, WEIGHTS)))
    own = model.state_dict()
    theirs, mine = sorted(saved, key=_natural), sorted(own, key=_natural)
    if [tuple(saved[k].shape) for k in theirs] != [tuple(own[k].shape) for k in mine]:
        raise RuntimeError(
            f"the checkpoint's weights do not fit the model built from this trial's params (a "
            f"mutable param changes the architecture?): {str(error).splitlines()[0]}") from None
    model.load_state_dict({m: saved[t] for m, t in zip(mine, theirs)})


def _natural(key: str) -> list:
    """``net.10.weight`` after ``net.9.weight``: a Sequential's layers in their order."""
    import re

    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"\.", key)]


def _where(rank: int, device: Any) -> dict:
    import os

    import ray

    return {"type": "worker", "rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
            "host": socket.gethostname(), "pid": os.getpid(), "device": str(device)}


def setup(job: ResolvedJob, session: Session, streamed: Streamed | None = None) -> Trainee:
    """Data, model and optimizer on this worker, restored from the session's checkpoint."""
    import torch

    cfg = job.config
    torch.set_num_threads(cfg.train.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))
    data = streamed if streamed is not None else prepare_data(job, getattr(session, "load_dataset", None))
    torch.manual_seed(cfg.seed)  # the same initial weights on every worker, for any W
    model = job.model.build(job.model_params, data.info, data.processor)
    device = session.device()
    start_epoch, saved, earlier = 0, {}, []
    checkpoint = session.get_checkpoint()
    if checkpoint is not None:
        from trainyard.checkpoint import read_trainer_state

        with checkpoint.as_directory() as ckpt:
            load_restored_weights(ckpt, model)
            for part in ("optimizer", "scheduler"):
                if Path(ckpt, f"{part}.pt").exists():
                    saved[part] = torch.load(Path(ckpt, f"{part}.pt"), map_location="cpu", weights_only=True)
            state = read_trainer_state(ckpt)
            start_epoch = state["epoch"] + 1
            saved["stopping"] = state.get("early_stopping")
            earlier = epochs_in(state)
    model = session.prepare_model(model, device)
    optimizer = make_optimizer(cfg, model)
    if "optimizer" in saved:
        optimizer.load_state_dict(saved["optimizer"])
    if streamed is not None:
        epoch_steps = steps_per_epoch(streamed.meta, cfg, session.world)
    else:
        epoch_steps = optimizer_steps(len(data.y_train), cfg, session.world)
    scheduler = make_scheduler(cfg, optimizer, epoch_steps)
    if scheduler is not None and "scheduler" in saved:
        scheduler.load_state_dict(saved["scheduler"])  # resume continues the schedule
    if checkpoint is not None:
        # The checkpoint's optimizer brought back the values it was saved with; a PBT
        # exploit restores another trial's checkpoint under this trial's new values.
        apply_hyperparameters(cfg, optimizer, scheduler)
    stopping = None
    if cfg.train.patience:
        stopping = EarlyStopping(cfg.train.patience, cfg.train.min_delta, job.monitor_mode)
        stopping.load(saved.get("stopping"))
    amp_dtype = autocast_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    return Trainee(job, data, model, optimizer, device, amp_dtype, scaler, start_epoch, scheduler, stopping,
                   warmup_epochs(cfg, epoch_steps), earlier)


def train_epoch(t: Trainee, session: Session, epoch: int, emit: Callable[[dict], None]) -> dict:
    """One pass over the training split; the epoch's loss and samples/s."""
    import torch

    cfg, rank, world = t.job.config, session.rank, session.world
    criterion = loss_fn(t.job.task)
    on_gpu = t.device.type == "cuda"
    grad_clip = cfg.train.grad_clip  # read once: a DictConfig lookup per step costs
    t.model.train()
    batches = epoch_batches(len(t.data.y_train), cfg.train.batch_size, cfg.seed, epoch, world)
    emit({"type": "epoch_start", "epoch": epoch, "batches": len(batches),
          "resumed": epoch == t.start_epoch and epoch > 0})
    total_loss = torch.zeros((), device=t.device) if on_gpu else 0.0
    seen, last_emit, started = 0, 0.0, time.perf_counter()
    accum = cfg.train.grad_accum_steps
    halt = session.stop_requested
    for step, global_idx in enumerate(batches):
        if step % 8 == 7 and halt():
            break
        local = global_idx[rank::world] if world > 1 else global_idx
        if accum == 1:
            loss = forward_loss(t, criterion, local, len(global_idx), world, on_gpu)
            backward(t, loss)
        else:
            loss = accumulate(t, criterion, local, len(global_idx), world, on_gpu, accum)
        optimizer_step(t, grad_clip)
        # On a GPU the running loss stays a tensor: a float() per step would sync.
        total_loss += loss.detach() * len(global_idx) if on_gpu else loss.item() * len(global_idx)
        seen += len(global_idx)
        now = time.perf_counter()
        if now - last_emit > 0.5 or step == len(batches) - 1:
            last_emit = now
            emit({"type": "step", "epoch": epoch, "step": step + 1, "loss": float(total_loss) / max(seen, 1)})
    train_time = time.perf_counter() - started
    # Each worker's running loss covers its shard of every global batch: their mean over
    # the workers is the one-process epoch loss.
    total = _reduce_over_workers(total_loss, world, t.device) / world
    return {"epoch": epoch, "train_loss": total / max(seen, 1),
            "train_samples_per_s": seen / train_time if train_time > 0 else 0.0,
            "lr": t.optimizer.param_groups[0]["lr"], "rss_peak_mb": _peak_rss_mb()}


def train_epoch_stream(t: Trainee, session: Session, epoch: int, emit: Callable[[dict], None]) -> dict:
    """One pass over this worker's shard of a streamed training split. Shards are equal,
    so every worker takes the same steps; each step's local batch is batch_size / W rows,
    and DDP's mean of the workers' mean losses is the global batch's mean loss."""
    import torch

    cfg, world = t.job.config, session.world
    criterion = loss_fn(t.job.task)
    on_gpu = t.device.type == "cuda"
    grad_clip = cfg.train.grad_clip
    accum = cfg.train.grad_accum_steps
    t.model.train()
    steps = steps_per_epoch(t.data.meta, cfg, world)
    emit({"type": "epoch_start", "epoch": epoch, "batches": steps,
          "resumed": epoch == t.start_epoch and epoch > 0})
    total_loss = torch.zeros((), device=t.device) if on_gpu else 0.0
    seen, last_emit, started = 0, 0.0, time.perf_counter()
    if t.data.feed is None:
        t.data.feed = TrainFeed(t.data.train, t.data.meta, cfg, world, epoch, cfg.train.epochs - 1)
    halt = session.stop_requested
    for step, (x, y) in enumerate(t.data.feed.batches(epoch)):
        if step % 8 == 7 and halt():
            break
        x, y = to_device(x, t.device), y.to(t.device, non_blocking=True)
        rows = len(y)
        if accum == 1:
            loss = _stream_loss(t, criterion, x, y)
            backward(t, loss)
        else:
            t.optimizer.zero_grad(set_to_none=True)
            chunks = [i for i in torch.arange(rows).chunk(accum) if len(i)]
            loss = 0.0
            for i, index in enumerate(chunks):
                part = _stream_loss(t, criterion, take(x, index), y[index]) * (len(index) / rows)
                no_sync = getattr(t.model, "no_sync", None)
                last = i == len(chunks) - 1
                with contextlib.nullcontext() if last or no_sync is None else no_sync():
                    (t.scaler.scale(part) if t.scaler is not None else part).backward()
                loss = loss + part.detach()
        optimizer_step(t, grad_clip)
        total_loss += loss.detach() * rows if on_gpu else float(loss.detach()) * rows
        seen += rows
        now = time.perf_counter()
        if now - last_emit > 0.5:
            last_emit = now
            emit({"type": "step", "epoch": epoch, "step": step + 1, "loss": float(total_loss) / max(seen, 1)})
    train_time = time.perf_counter() - started
    # The epoch's loss over every worker's rows (shards are equal: the rows are seen x W).
    total = _reduce_over_workers(total_loss, world, t.device)
    return {"epoch": epoch, "train_loss": total / max(seen * world, 1),
            "train_samples_per_s": seen * world / train_time if train_time > 0 else 0.0,
            "lr": t.optimizer.param_groups[0]["lr"], "rss_peak_mb": _peak_rss_mb()}


def _reduce_over_workers(value: Any, world: int, device: Any, op: str = "sum") -> float:
    """``value`` (a float or a 0-d tensor) reduced over the workers (``op``: sum or max); one
    all-reduce."""
    import torch
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return float(value)
    backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.as_tensor(float(value), dtype=torch.float64, device=backend_device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return float(tensor)


def _peak_rss_mb() -> float:
    """This worker's peak resident memory so far (what streaming keeps bounded)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def _stream_loss(t: Trainee, criterion: Callable, x: Any, y: Any) -> Any:
    return criterion(_outputs(t, x), y, "mean")


def _outputs(t: Trainee, x: Any) -> Any:
    """The model's training outputs for ``x``, under autocast when mixed precision is on."""
    import torch

    if t.amp_dtype is None:  # no autocast context on the hot path when it would do nothing
        return call_model(t.model, x)
    with torch.autocast(t.device.type, dtype=t.amp_dtype):
        return call_model(t.model, x)


def forward_loss(t: Trainee, criterion: Callable, rows: Any, global_size: int, world: int,
                 on_gpu: bool, whole_shard: bool = True) -> Any:
    """This worker's loss on ``rows`` of a global batch of ``global_size``, scaled so that
    DDP's mean over workers of the (accumulated) gradients is the one-process gradient of
    the global batch's mean loss."""

    x, y = take(t.data.x_train, rows), t.data.y_train[rows]
    if on_gpu:
        x, y = to_device(x, t.device), y.to(t.device, non_blocking=True)
    out = _outputs(t, x)
    if whole_shard and len(rows) * world == global_size:
        return criterion(out, y, "mean")  # the whole equal shard: DDP's mean of means
    # Sum over the rows / global batch size * W: DDP's mean over workers (of gradients
    # summed over micro-batches) then gives the one-process mean over the global batch.
    return criterion(out, y, "sum") * (world / global_size)


def backward(t: Trainee, loss: Any) -> None:
    t.optimizer.zero_grad(set_to_none=True)
    (t.scaler.scale(loss) if t.scaler is not None else loss).backward()


def accumulate(t: Trainee, criterion: Callable, local: Any, global_size: int, world: int,
               on_gpu: bool, accum: int) -> Any:
    """Forward and backward over ``accum`` micro-batches of this worker's rows, gradients
    summed; DDP syncs them on the last micro-batch only. Returns the rows' loss."""
    t.optimizer.zero_grad(set_to_none=True)
    micro = [rows for rows in (local[m::accum] for m in range(accum)) if len(rows)]
    total = 0.0
    for i, rows in enumerate(micro):
        loss = forward_loss(t, criterion, rows, global_size, world, on_gpu, whole_shard=False)
        last = i == len(micro) - 1
        no_sync = getattr(t.model, "no_sync", None)  # a DDP model: sync on the last pass only
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            (t.scaler.scale(loss) if t.scaler is not None else loss).backward()
        total = total + loss.detach()
    return total


def optimizer_step(t: Trainee, grad_clip: float | None) -> None:
    """Clip and step (through the fp16 gradient scaler when there is one), then advance the
    learning-rate schedule."""
    import torch

    if t.scaler is not None:
        t.scaler.unscale_(t.optimizer)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(t.model.parameters(), grad_clip)
    if t.scaler is not None:
        t.scaler.step(t.optimizer)
        t.scaler.update()
    else:
        t.optimizer.step()
    if t.scheduler is not None:
        t.scheduler.step()


def evaluate(job, model, data, device, rank: int, world: int, amp_dtype=None) -> dict:
    """Validation metrics over the whole validation set, identical for any W."""
    import torch
    import torch.distributed as dist

    model.eval()
    n = len(data.y_val)
    index = torch.arange(rank, n, world)
    outputs = []
    with torch.inference_mode():
        for chunk in torch.split(index, 512):
            x = to_device(take(data.x_val, chunk), device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs.append(call_model(model, x).float().cpu())
    local = torch.cat(outputs).numpy() if outputs else np.zeros((0, data.info.num_outputs), np.float32)
    if world > 1 and dist.is_initialized():
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (index.numpy(), local))
        full = np.zeros((n, local.shape[1]), dtype=np.float32)
        for idx, out in gathered:
            full[idx] = out
    else:
        full = local
    return compute_metrics(job, data.info, full, data.y_val.numpy())


def evaluate_stream(job, model, data: Streamed, device, world: int, amp_dtype=None) -> dict:
    """Validation metrics over a streamed validation split: each worker evaluates its shard
    (every row is in exactly one), and the outputs and targets of all are gathered, so the
    metrics are the one-process values."""
    import torch
    import torch.distributed as dist

    model.eval()
    outputs, targets = [], []
    limit = job.config.data.stream.val_cache_mb * 2**20
    kept: list | None = [] if not data.val_decided and limit > 0 else None
    kept_bytes = 0
    batches = data.val_kept if data.val_kept is not None else val_batches(data.val, data.meta, job.config)
    with torch.inference_mode():
        for x, y in batches:
            if kept is not None:
                kept_bytes += batch_bytes([(x, y)])
                kept.append((x, y))
                if kept_bytes > limit:  # too large to keep: stop holding it at once
                    kept = None
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs.append(call_model(model, to_device(x, device)).float().cpu().numpy())
            targets.append(y.cpu().numpy())
    if not data.val_decided:
        _keep_val(data, kept, kept_bytes if kept is not None else float("inf"), limit, world, device)
    width = data.info.num_outputs
    local = (np.concatenate(outputs) if outputs else np.zeros((0, width), np.float32),
             np.concatenate(targets) if targets else np.zeros((0,), np.int64 if job.task == "classification" else np.float32))
    if world > 1 and dist.is_initialized():
        gathered: list = [None] * world
        dist.all_gather_object(gathered, local)
        parts = [g for g in gathered if len(g[0])]
        full = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])) if parts else local
    else:
        full = local
    if not len(full[0]):
        from trainyard.errors import TrainingError

        raise TrainingError(f"dataset {job.dataset.name!r}: the validation split is empty")
    return compute_metrics(job, data.info, full[0], full[1])


def _keep_val(data: Streamed, batches: list | None, size: float, limit: float, world: int,
              device: Any) -> None:
    """After the first validation pass: keep this worker's batches for the next epochs when
    every worker's are within ``limit`` bytes. The workers agree (one all-reduce), since an
    epoch of a split stream needs every worker to read its part."""
    size = _reduce_over_workers(size, world, device, op="max")
    data.val_decided = True
    if batches is not None and size <= limit:
        data.val_kept = batches


def epochs_in(state: dict) -> list[dict]:
    """The metrics of every epoch up to a checkpoint's, from its trainer_state.json (one
    written before trainyard kept ``earlier`` has its own epoch's only)."""
    rows = [r for r in state.get("earlier") or [] if isinstance(r, dict) and "epoch" in r]
    return [*rows, state["metrics"]] if isinstance(state.get("metrics"), dict) else rows


def save_and_report(t: Trainee, session: Session, epoch: int, metrics: dict, plugin: str) -> None:
    """Rank 0 writes the epoch's checkpoint; every rank reports the epoch's metrics."""
    if session.rank != 0:
        session.report(metrics, None)
        return
    from trainyard.checkpoint import unwrap, write_checkpoint

    # A new folder each epoch: writing over the last one's files was slower (on ext4, freeing
    # a file's blocks as it is truncated costs more than making and removing a folder).
    # Not durable: the session copies the folder to storage as it takes the report.
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, job=t.job, model=unwrap(t.model), processor=t.data.processor,
                         info=t.data.info, epoch=epoch, metrics=metrics, optimizer=t.optimizer,
                         plugin=plugin, scheduler=t.scheduler,
                         state={**({"early_stopping": t.stopping.state()} if t.stopping else {}),
                                "earlier": t.earlier}, durable=False)
        session.report(metrics, tmp)
    t.earlier.append(metrics)
