"""The training driver: start Ray Train's workers for a job, follow their progress, keep
the run folder (config, metrics, where each worker ran), and report the outcome."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from trainyard import jsontext, tracking
from trainyard.config import resolve
from trainyard.errors import ConfigError, TrainingError, reason_line
from trainyard.runtime.cluster import ResourcesWaitWarning, init_ray, resources_wait_note
from trainyard.runtime.resources import check_workers_fit, worker_resources
from trainyard.checkpoint import checkpoint_uri, local_run_dir, upload_records
from trainyard.runtime.storage import atomic_write_text, is_uri, join, read_text, remove_stale_tmp, storage_root
from trainyard.train.loop import train_loop_per_worker


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict]
    #: A local folder, or a URI (str) when storage_path is object storage.
    checkpoint: Path | str | None
    best: dict | None
    monitor: str
    resumed_from: int | None = None
    #: The epoch early stopping (train.patience) ended the run at; None if it ran to the end.
    stopped_early_at: int | None = None
    #: Where the run was tracked: "MLflow run ID in experiment NAME at URI"; None if it was not.
    tracked: str | None = None


def make_trainer(cfg: Any, loop_config: dict, name: str, storage: str, callbacks: list | None = None,
                 datasets: dict | None = None):
    """The TorchTrainer for a job: workers, resources, failures and checkpoints from ``cfg``;
    ``datasets``: a streamed dataset's train and val streams, which Ray Train shards."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from trainyard.train.trainer import LeanTorchTrainer

    use_gpu, resources = worker_resources(cfg)
    backend = cfg.scaling.backend
    if backend == "auto" and use_gpu and cfg.scaling.num_workers > 1 and cfg.scaling.gpus_per_worker < 1:
        backend = "gloo"  # workers sharing a GPU: NCCL refuses two ranks on one device
    streams: dict = {}
    if datasets is not None:
        from trainyard.train.stream import data_config

        streams = {"datasets": datasets, "dataset_config": data_config()}
    return LeanTorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=None if backend == "auto" else backend),
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=use_gpu, resources_per_worker=resources,
            placement_strategy=cfg.scaling.placement.upper(),
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            callbacks=callbacks or [],
        ),
        **streams,
    )


def _root_cause(exc: BaseException) -> str:
    """The first worker's own error, not Ray's wrapping of it (see ``reason_line``)."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        return _root_cause(next(iter(failures.values())))
    return reason_line(exc)


def latest_checkpoint_state(run_dir: Path) -> tuple[Path, dict] | None:
    """A local run's latest complete checkpoint and its trainer_state.json; None if none."""
    from trainyard.checkpoint import read_trainer_state
    from trainyard.winners import latest_complete_checkpoint

    folder = latest_complete_checkpoint(run_dir)
    try:
        return (folder, read_trainer_state(folder)) if folder is not None else None
    except (OSError, ValueError):
        return None


def _finished_before(cfg: Any, job: Any, run_dir: Path, latest: tuple[Path, dict],
                     on_event: Callable[[dict], None] | None) -> "TrainResult":
    """The result of a local run started again that already trained ``train.epochs``
    (``latest``: its latest checkpoint), read from the run folder, with no Ray started and
    nothing rewritten (its config.yaml keeps the epochs it ran)."""
    _check_resumable(read_text(str(run_dir / "config.yaml")), str(run_dir), cfg)  # same model and data
    log = _MetricsLog(run_dir / "metrics.jsonl")
    log.fill_from(latest)
    if on_event is not None:
        on_event({"type": "done_before", "epoch": latest[1]["epoch"]})
    monitor = f"val_{job.monitor}"
    rows = [r for r in log.history if monitor in r]
    best = (max if job.monitor_mode == "max" else min)(rows, key=lambda r: r[monitor]) if rows else None
    return TrainResult(run_dir, log.history, latest[0].resolve(), best, monitor)


class _MetricsLog:
    """metrics.jsonl in the run folder, one line per epoch (a resumed epoch replaces its line).

    Every write replaces the whole file atomically (a temporary file in the same folder,
    renamed over it), so a killed driver leaves the previous version or the new one. A line
    that does not parse (a file truncated by an older trainyard, or by a crash of the
    machine) is skipped on reading, so the run resumes; the next write drops it.
    """

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[int, dict] = {}
        self.skipped = 0
        remove_stale_tmp(path.parent)  # what a driver killed mid-write left
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                if not line.strip():
                    continue
                try:
                    row = jsontext.nan_for_null(json.loads(line))
                    self.rows[int(row["epoch"])] = row
                except (ValueError, KeyError, TypeError):
                    self.skipped += 1

    def add(self, row: dict) -> None:
        self.rows[row["epoch"]] = row
        self._write()

    def _write(self) -> None:
        atomic_write_text(self.path, "".join(jsontext.dumps(self.rows[e]) + "\n" for e in sorted(self.rows)))

    def fill_from(self, latest: tuple[Path, dict] | None) -> None:
        """Add the epochs the run's latest checkpoint holds (``latest``: see
        :func:`latest_checkpoint_state`; its own epoch and the ones before it) that this
        file lacks: a driver killed while its workers trained on never logged the epochs
        they checkpointed after it died, and the run resumes past them."""
        from trainyard.train.loop import epochs_in

        missing = [r for r in (epochs_in(latest[1]) if latest else []) if r["epoch"] not in self.rows]
        if missing:
            self.rows.update({int(r["epoch"]): r for r in missing})
            self._write()

    @property
    def history(self) -> list[dict]:
        return [self.rows[e] for e in sorted(self.rows)]


#: How long a run's workers may take to start before the driver checks whether others hold
#: the resources they wait for (Ray Train's own start-up is 20-40 s on a small machine).
WAIT_NOTE_S = 45.0


def run_training(
    cfg: Any,
    address: str | None = None,
    on_event: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train the job ``cfg`` (a loaded config) on Ray Train; blocks until it ends."""
    from omegaconf import OmegaConf

    from trainyard.plugins import get_registry

    registry = get_registry()
    job = resolve(cfg, registry)  # every config error surfaces before Ray starts
    tracking.check(cfg)
    storage = storage_root(cfg.storage_path)
    remote = join(storage, cfg.name) if is_uri(storage) else None
    # The run's own records (config, metrics, workers): the run folder, or for object
    # storage a local folder uploaded next to Ray's checkpoints when the run ends.
    run_dir = local_run_dir(storage, cfg.name)
    latest = latest_checkpoint_state(run_dir) if remote is None else None  # bucket: Ray's own
    if latest is not None and latest[1]["epoch"] + 1 >= cfg.train.epochs:
        return _finished_before(cfg, job, run_dir, latest, on_event)
    init_ray(address)
    check_workers_fit(cfg)
    datasets = None
    loop_config: dict = {"config": OmegaConf.to_container(cfg, resolve=True)}
    if job.dataset.streaming:  # read lazily by Ray Data; the driver holds a sample only
        from trainyard.train.stream import check_data_cpus, prepare_stream

        check_data_cpus(cfg)
        stream = prepare_stream(job)
        loop_config["stream"], datasets = stream.meta, {"train": stream.train, "val": stream.val}

    sink = ProgressSink.remote()
    loop_config["progress"] = sink
    loop_config["fail_on_nonfinite"] = True  # a search's diverging trial is an outcome; a run's is an error
    loop_config["cwd"] = os.getcwd()  # relative paths in the job (a data file) are the caller's
    _check_resumable(read_text(join(remote or str(run_dir), "config.yaml")), remote or str(run_dir), cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    log = _MetricsLog(run_dir / "metrics.jsonl")
    log.fill_from(latest)
    # Tracking (tracking.backend) logs from here, the driver: rank 0's events, one run.
    tracker = tracking.train_run(cfg, run_dir, storage)
    if tracker is not None:
        tracker.start(log.history if log is not None else [])
    try:
        result, final = _fit(cfg, job, loop_config, storage, sink, run_dir, log, tracker, on_event, datasets)
    except BaseException as exc:
        if tracker is not None:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            tracker.finish(status, report=_report(cfg, run_dir, log, None))
        raise
    finally:
        if remote is not None:
            with contextlib.suppress(OSError):  # the run's outcome stands without them
                upload_records(run_dir, remote)
    if tracker is not None:
        tracker.finish("FINISHED", checkpoint=final, report=_report(cfg, run_dir, log, result))
        result.tracked = tracker.where()
    return result


def _report(cfg: Any, run_dir: Path | None, log: "_MetricsLog | None", result: "TrainResult | None") -> dict:
    """What a tracked train run logs as its report: the run folder's files (or, for a run
    stored at a URI, the same from memory) and a summary of the outcome."""
    from omegaconf import OmegaConf

    history = log.history if log is not None else (result.history if result is not None else [])
    report: dict = {"config.yaml": OmegaConf.to_yaml(cfg),
                    "metrics.jsonl": "".join(jsontext.dumps(row) + "\n" for row in history)}
    if run_dir is not None:
        report["workers.json"] = run_dir / "workers.json"
    if result is not None:
        report["summary.json"] = jsontext.dumps({
            "monitor": result.monitor, "best": result.best, "epochs": len(result.history),
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
            "resumed_from": result.resumed_from, "stopped_early_at": result.stopped_early_at,
        }, indent=1, default=str)
    return report


def _fit(cfg: Any, job: Any, loop_config: dict, storage: str, sink: Any, run_dir: Path | None,
         log: "_MetricsLog | None", tracker: Any, on_event: Callable[[dict], None] | None,
         datasets: dict | None = None) -> tuple[TrainResult, Any]:
    """Run the trainer, following its progress until it ends; the result and Ray's final
    checkpoint (on any storage)."""
    trainer = make_trainer(cfg, loop_config, cfg.name, storage, datasets=datasets)
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # reported to the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    resumed_from = stopped_early_at = diverged = None
    workers: dict[int, dict] = {}
    waiting_since, warned = time.monotonic(), False
    while True:
        thread.join(timeout=0.25)
        if not workers and not warned and time.monotonic() - waiting_since > WAIT_NOTE_S:
            warned = True  # once: the workers have not started; say so if others hold what they need
            _, each = worker_resources(cfg)
            n = cfg.scaling.num_workers
            note = resources_wait_note(each, n, f"the {n} worker(s)")
            if note:
                warnings.warn(ResourcesWaitWarning(note), stacklevel=1)
        for event in ray.get(sink.drain.remote()):
            if event["type"] == "epoch_start" and event.get("resumed"):
                resumed_from = event["epoch"]
            if event["type"] == "early_stop":
                stopped_early_at = event["epoch"]
            if event["type"] == "diverged":
                diverged = event
            if event["type"] == "worker":
                workers[event["rank"]] = {k: v for k, v in event.items() if k != "type"}
                if run_dir is not None:
                    atomic_write_text(run_dir / "workers.json", json.dumps([workers[r] for r in sorted(workers)], indent=1))
            if event["type"] == "epoch_end" and log is not None:
                log.add(event["metrics"])
            if event["type"] == "epoch_end" and tracker is not None:
                tracker.log_epoch(event["metrics"])
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
    if diverged is not None:
        kept = (f"; the latest checkpoint is epoch {diverged['epoch']}'s" if diverged["epoch"] > 0 else "")
        raise TrainingError(
            f"training failed: train_loss is {diverged['train_loss']} at epoch {diverged['epoch'] + 1}: the "
            f"data may hold missing (NaN) or infinite values, or train.lr ({cfg.train.lr:g}) is too high"
            f"{kept}")
    history = log.history if log is not None else []
    checkpoint = None
    if result.checkpoint is not None:
        where = checkpoint_uri(result.checkpoint)
        checkpoint = where if is_uri(where) else Path(where)
        if run_dir is not None and isinstance(checkpoint, Path):
            drop_unlisted_checkpoints(run_dir, result)
    best = None
    monitor = f"val_{job.monitor}"
    if history:
        pick = max if job.monitor_mode == "max" else min
        best = pick(history, key=lambda row: row[monitor])
    return TrainResult(run_dir, history, checkpoint, best, monitor, resumed_from,
                       stopped_early_at), result.checkpoint


def drop_unlisted_checkpoints(run_dir: Path, result: Any) -> list[Path]:
    """After a run that ended well, remove the run folder's checkpoints Ray Train does not
    list as kept: those a worker wrote just before it failed, which Ray's checkpoint manager
    never registered and so never deletes, past ``checkpoint.num_to_keep``. Returns them."""
    kept = {Path(c.path).resolve() for c, _ in (result.best_checkpoints or [])}
    kept.add(Path(result.checkpoint.path).resolve())
    dropped = [p for p in sorted(Path(run_dir).glob("checkpoint_*")) if p.is_dir() and p.resolve() not in kept]
    for folder in dropped:
        shutil.rmtree(folder, ignore_errors=True)
    return dropped


def _check_resumable(previous: str | None, run_dir: str, cfg: Any) -> None:
    """A run started again resumes; its model and data must be those it was trained on.
    ``previous``: the run's saved config.yaml, if it has one. A run that saved no
    checkpoint (it failed before its first epoch ended: a data file that was not there) has
    nothing to resume, and starts again with the new config."""
    from omegaconf import OmegaConf

    from trainyard.runtime.storage import list_names

    if previous is None or not any(n.startswith("checkpoint_") for n in list_names(run_dir)):
        return
    old = OmegaConf.create(previous)
    for key in ("model", "data"):
        if OmegaConf.to_container(old[key]) != OmegaConf.to_container(cfg[key]):
            raise ConfigError(
                f"{key}: run {cfg.name!r} already exists in {cfg.storage_path} with a different "
                f"{key} section, so it cannot resume; choose another name= or remove {run_dir}"
            )


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

