"""Distributed training on Ray Train: the per-worker loop and the driver around it.

Each worker loads the dataset itself, fits the model plugin's processor on the training
split and encodes both splits once. Every epoch draws one seeded permutation of the
training set; worker ``r`` of ``W`` takes examples ``r::W`` of each global batch, so the
workers' shards are disjoint and the gradient DDP averages equals the one-process
gradient of the global batch. Validation is sharded the same way and gathered before
metrics are computed, so N workers report the one-process value.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch

from trainyard.config import ResolvedJob, resolve
from trainyard.errors import TrainingError
from trainyard.raycluster import check_capacity, init_ray, storage_root

FAULT_ENV = "TRAINYARD_FAULT_AT_EPOCH"


# --------------------------------------------------------------------------------------
# Data preparation (runs on each worker; pure, so tests use it without Ray)
# --------------------------------------------------------------------------------------


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


def prepare_data(job: ResolvedJob) -> Prepared:
    """Load the dataset, split off validation, fit the processor and encode both splits."""
    cfg = job.config
    data = job.dataset.load(job.data_params, cfg.seed)
    if data.info.task != job.task:
        raise TrainingError(
            f"dataset {job.dataset.name!r} declared task {job.task} but loaded {data.info.task}"
        )
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


def batch_slice(x: Any, index: Any) -> Any:
    if isinstance(x, dict):
        return {k: v[index] for k, v in x.items()}
    return x[index]


def _to(x: Any, device: Any) -> Any:
    if isinstance(x, dict):
        return {k: v.to(device, non_blocking=True) for k, v in x.items()}
    return x.to(device, non_blocking=True)


def _forward(model: Any, x: Any) -> Any:
    return model(**x) if isinstance(x, dict) else model(x)


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


def compute_metrics(job: ResolvedJob, info: Any, outputs: np.ndarray, targets: np.ndarray) -> dict:
    return {f"val_{m.name}": float(m.fn(outputs, targets, info)) for m in job.metrics}


def _precision(cfg: Any, device: Any) -> Any:
    import torch

    if device.type != "cuda" or cfg.train.precision == "fp32":
        return None
    if cfg.train.precision == "fp16":
        return torch.float16
    if cfg.train.precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


# --------------------------------------------------------------------------------------
# The loop each Ray Train worker runs
# --------------------------------------------------------------------------------------


class TrainSession:
    """The loop's view of a Ray Train worker."""

    def __init__(self):
        import ray.train
        import torch.distributed as dist

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.distributed = self.world > 1 and dist.is_available() and dist.is_initialized()

    def device(self):
        return ray.train.torch.get_device()

    def prepare_model(self, model, device):
        return ray.train.torch.prepare_model(model) if self.distributed else model.to(device)

    def get_checkpoint(self):
        return ray.train.get_checkpoint()

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


class TuneTrialSession:
    """The loop's view of a one-worker Tune trial: it trains in the trial's own process,
    without the start-up of a nested trainer."""

    rank, world = 0, 1

    def device(self):
        import torch

        return torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")

    def prepare_model(self, model, device):
        return model.to(device)

    def get_checkpoint(self):
        import ray.tune

        return ray.tune.get_checkpoint()

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import ray.tune

        checkpoint = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=checkpoint)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's entry point on each worker."""
    run_loop(loop_config, TrainSession())


def run_loop(loop_config: dict, session) -> None:
    """Train the job in ``loop_config["config"]``, reporting each epoch to ``session``."""
    import torch
    from omegaconf import OmegaConf

    from trainyard.checkpoint import read_trainer_state, unwrap, write_checkpoint
    from trainyard.plugins import get_registry

    cfg = OmegaConf.create(loop_config["config"])
    registry = get_registry()
    job = resolve(cfg, registry)
    model_plugin = registry.owner("model", cfg.model.name)
    rank, world = session.rank, session.world
    threads = cfg.train.torch_threads or max(1, int(cfg.scaling.cpus_per_worker))
    torch.set_num_threads(threads)

    data = prepare_data(job)
    torch.manual_seed(cfg.seed)  # the same initial weights on every worker, for any W
    model = job.model.build(job.model_params, data.info, data.processor)
    device = session.device()
    start_epoch = 0
    checkpoint = session.get_checkpoint()
    optimizer_state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt:
            model.load_state_dict(torch.load(Path(ckpt, "model.pt"), map_location="cpu", weights_only=True))
            if Path(ckpt, "optimizer.pt").exists():
                optimizer_state = torch.load(Path(ckpt, "optimizer.pt"), map_location="cpu", weights_only=True)
            start_epoch = read_trainer_state(ckpt)["epoch"] + 1
    model = session.prepare_model(model, device)
    optimizer = make_optimizer(cfg, model)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    amp_dtype = _precision(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    criterion = loss_fn(job.task)
    on_gpu = device.type == "cuda"
    grad_clip = cfg.train.grad_clip  # read once: a DictConfig lookup per step costs
    progress = loop_config.get("progress")
    fault_at = loop_config.get("fault_at_epoch")

    def emit(event: dict) -> None:
        if progress is not None and rank == 0:
            progress.push.remote(event)

    if progress is not None:  # every rank says where it runs (workers.json in the run folder)
        import socket

        progress.push.remote({"type": "worker", "rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
                              "host": socket.gethostname(), "device": str(device)})
    if start_epoch >= cfg.train.epochs:
        emit({"type": "done_before", "epoch": start_epoch - 1})
    for epoch in range(start_epoch, cfg.train.epochs):
        if fault_at is not None and epoch == fault_at + 1 and rank == 0:
            _inject_fault(Path(loop_config["fault_marker"]), epoch)
        model.train()
        batches = epoch_batches(len(data.y_train), cfg.train.batch_size, cfg.seed, epoch, world)
        emit({"type": "epoch_start", "epoch": epoch, "batches": len(batches), "resumed": epoch == start_epoch and epoch > 0})
        total_loss = torch.zeros((), device=device) if on_gpu else 0.0
        seen, last_emit, started = 0, 0.0, time.perf_counter()
        for step, global_idx in enumerate(batches):
            local = global_idx[rank::world] if world > 1 else global_idx
            x, y = batch_slice(data.x_train, local), data.y_train[local]
            if on_gpu:
                x, y = _to(x, device), y.to(device, non_blocking=True)
            if amp_dtype is None:
                out = _forward(model, x)
            else:
                with torch.autocast(device.type, dtype=amp_dtype):
                    out = _forward(model, x)
            if len(local) * world == len(global_idx):
                loss = criterion(out, y, "mean")  # equal shards: DDP's mean of means
            else:
                # Sum over the shard / global batch size * W: DDP's mean over workers
                # then gives the one-process mean over the global batch.
                loss = criterion(out, y, "sum") * (world / len(global_idx))
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            # On a GPU the running loss stays a tensor: a float() per step would sync.
            total_loss += loss.detach() * len(global_idx) if on_gpu else loss.item() * len(global_idx)
            seen += len(global_idx)
            now = time.perf_counter()
            if now - last_emit > 0.5 or step == len(batches) - 1:
                last_emit = now
                emit({"type": "step", "epoch": epoch, "step": step + 1, "loss": float(total_loss) / max(seen, 1)})
        train_time = time.perf_counter() - started
        metrics = evaluate(job, model, data, device, rank, world, amp_dtype)
        metrics.update(
            epoch=epoch,
            train_loss=float(total_loss) / max(seen, 1),
            train_samples_per_s=seen / train_time if train_time > 0 else 0.0,
        )
        emit({"type": "epoch_end", "epoch": epoch, "metrics": metrics})
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                write_checkpoint(
                    tmp,
                    job=job,
                    model=unwrap(model),
                    processor=data.processor,
                    info=data.info,
                    epoch=epoch,
                    metrics=metrics,
                    optimizer=optimizer,
                    plugin=model_plugin,
                )
                session.report(metrics, tmp)
        else:
            session.report(metrics, None)
def _inject_fault(marker: Path, epoch: int) -> None:
    """Kill this worker once, as a crash during ``epoch`` would (TRAINYARD_FAULT_AT_EPOCH).

    The pause lets the controller record the checkpoint reported just before, as it
    would have for any crash that comes some time after a report.
    """
    if marker.exists():
        return
    marker.write_text(f"injected failure in epoch {epoch}\n")
    time.sleep(3)
    os._exit(1)


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
            x = _to(batch_slice(data.x_val, chunk), device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs.append(_forward(model, x).float().cpu())
    local = torch.cat(outputs).numpy() if outputs else np.zeros((0, data.info.num_outputs), np.float32)
    if world > 1 and dist.is_initialized():
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (index.numpy(), local))
        full = np.zeros((n, local.shape[1]), dtype=np.float32)
        for idx, out in gathered:
            full[idx] = out
    else:
        full = local
    targets = data.y_val.numpy()
    return compute_metrics(job, data.info, full, targets)


# --------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict]
    checkpoint: Path | None
    best: dict | None
    monitor: str
    resumed_from: int | None = None


def make_trainer(cfg: Any, loop_config: dict, name: str, storage: str, callbacks: list | None = None):
    """The TorchTrainer for a job: workers, resources, failures and checkpoints from ``cfg``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu, resources = worker_resources(cfg)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            callbacks=callbacks or [],
        ),
    )


def worker_resources(cfg: Any) -> tuple[bool, dict]:
    """Whether workers use GPUs, and the Ray resources each worker asks for."""
    use_gpu = _use_gpu(cfg)
    resources = {"CPU": float(cfg.scaling.cpus_per_worker), **dict(cfg.scaling.resources_per_worker)}
    if use_gpu:
        resources["GPU"] = float(cfg.scaling.gpus_per_worker)
    return use_gpu, resources


def _use_gpu(cfg: Any) -> bool:

    setting = cfg.scaling.use_gpu
    if setting == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return setting == "true"


def _root_cause(exc: BaseException) -> str:
    """The first worker's own error, not Ray's wrapping of it."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        first = next(iter(failures.values()))
        return _root_cause(first)
    cause = getattr(exc, "cause", None) or exc.__cause__
    if cause is not None and cause is not exc:
        return _root_cause(cause)
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


class _MetricsLog:
    """metrics.jsonl in the run folder, one line per epoch (a resumed epoch replaces its line)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[int, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.rows[row["epoch"]] = row

    def add(self, row: dict) -> None:
        self.rows[row["epoch"]] = row
        self.path.write_text("".join(json.dumps(self.rows[e]) + "\n" for e in sorted(self.rows)))

    @property
    def history(self) -> list[dict]:
        return [self.rows[e] for e in sorted(self.rows)]


def run_training(
    cfg: Any,
    address: str | None = None,
    on_event: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train the job ``cfg`` (a loaded config) on Ray Train; blocks until it ends."""
    import threading

    from omegaconf import OmegaConf

    from trainyard.plugins import get_registry

    registry = get_registry()
    job = resolve(cfg, registry)  # every config error surfaces before Ray starts
    storage = storage_root(cfg.storage_path)
    run_dir = Path(storage) / cfg.name if "://" not in storage else None
    init_ray(address)
    _, resources = worker_resources(cfg)
    check_fits(cfg, resources)

    sink = ProgressSink.remote()
    loop_config: dict = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "progress": sink,
    }
    if run_dir is not None:
        _check_resumable(run_dir, cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        fault = os.environ.get(FAULT_ENV)
        if fault:
            loop_config["fault_at_epoch"] = int(fault)
            loop_config["fault_marker"] = str(run_dir / ".injected_fault")
    log = _MetricsLog(run_dir / "metrics.jsonl") if run_dir is not None else None

    trainer = make_trainer(cfg, loop_config, cfg.name, storage)
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # reported to the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    resumed_from = None
    workers: dict[int, dict] = {}
    while True:
        thread.join(timeout=0.25)
        for event in ray.get(sink.drain.remote()):
            if event["type"] == "epoch_start" and event.get("resumed"):
                resumed_from = event["epoch"]
            if event["type"] == "worker":
                workers[event["rank"]] = {k: v for k, v in event.items() if k != "type"}
                if run_dir is not None:
                    (run_dir / "workers.json").write_text(json.dumps([workers[r] for r in sorted(workers)], indent=1))
            if event["type"] == "epoch_end" and log is not None:
                log.add(event["metrics"])
            if on_event is not None:
                on_event(event)
        if not thread.is_alive():
            break
    ray.kill(sink)
    if "error" in outcome:
        raise TrainingError(f"training failed: {_root_cause(outcome['error'])}") from None
    result = outcome["result"]
    if result.error is not None:
        raise TrainingError(f"training failed: {_root_cause(result.error)}")
    history = log.history if log is not None else []
    checkpoint = Path(result.checkpoint.path) if result.checkpoint is not None else None
    best = None
    monitor = f"val_{job.monitor}"
    if history:
        pick = max if job.monitor_mode == "max" else min
        best = pick(history, key=lambda row: row[monitor])
    return TrainResult(run_dir or Path(storage), history, checkpoint, best, monitor, resumed_from)


def _check_resumable(run_dir: Path, cfg: Any) -> None:
    """A run started again resumes; its model and data must be those it was trained on."""
    from omegaconf import OmegaConf

    from trainyard.errors import ConfigError

    previous = run_dir / "config.yaml"
    if not previous.exists():
        return
    old = OmegaConf.load(previous)
    for key in ("model", "data"):
        if OmegaConf.to_container(old[key]) != OmegaConf.to_container(cfg[key]):
            raise ConfigError(
                f"{key}: run {cfg.name!r} already exists in {run_dir.parent} with a different "
                f"{key} section, so it cannot resume; choose another name= or remove {run_dir}"
            )


def check_fits(cfg: Any, resources: dict) -> None:
    """Fail at once, naming what is missing, when no placement can ever fit the workers."""
    n = cfg.scaling.num_workers
    check_capacity({k: v * n for k, v in resources.items()}, f"{n} worker(s) with {resources} each",
                   "Lower scaling.num_workers or the per-worker resources (fractions such as "
                   "scaling.gpus_per_worker=0.25 are allowed)")


@ray.remote(num_cpus=0)
class ProgressSink:
    """Collects progress events from rank 0 for the driver to render."""

    def __init__(self):
        self.events: list[dict] = []

    def push(self, event: dict) -> None:
        self.events.append(event)

    def drain(self) -> list[dict]:
        events, self.events = self.events, []
        return events
