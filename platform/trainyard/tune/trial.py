"""One Tune trial: the job with the trial's values, trained and reported per epoch.

A one-worker trial runs the training loop in the trial's own process (no nested trainer and
its start-up); a multi-worker trial runs a nested Ray Train ``TorchTrainer`` (DDP) whose
reports reach Tune through ``TuneReportCallback``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from trainyard.runtime.resources import worker_resources
from trainyard.train.loop import run_loop
from trainyard.tune.space import apply_values


#: The metric a one-worker trial reports with each epoch: its own seconds for that epoch.
OWN_TIME = "trial_own_s"


class TuneTrialSession:
    """The loop's view of a one-worker Tune trial: it trains in the trial's own process,
    without the start-up of a nested trainer."""

    rank, world = 0, 1

    def __init__(self):
        from ray.train._internal.session import get_session

        # Made in the trial's training thread, after Tune set its session up for this trial
        # (a reused actor's session gets a new stop event per trial).
        self._stop = get_session().stop_event
        self._since = time.perf_counter()

    def device(self):
        import ray
        import torch

        return torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")

    def prepare_model(self, model, device):
        return model.to(device)

    def get_checkpoint(self):
        import ray.tune

        return ray.tune.get_checkpoint()

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import ray.tune

        if self._stop.is_set():  # Tune would not take it: nothing goes to storage
            return
        checkpoint = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        # The trial's own time since its last report returned (the first: since it began):
        # what it trained, evaluated and wrote, without waiting on Tune.
        ray.tune.report({**metrics, OWN_TIME: time.perf_counter() - self._since}, checkpoint=checkpoint)
        self._since = time.perf_counter()

    def stop_requested(self) -> bool:
        """Whether Tune has stopped this trial while it trains on (see AsyncReports)."""
        return self._stop.is_set()

    def load_dataset(self, job: Any) -> Any:
        """The dataset plugin's ``load`` for ``job``, kept for the next trial: Tune reuses a
        one-worker trial's process for the next trial, which loads the same dataset (the
        search's space has the same data.* values, or the load is done again)."""
        key = (job.dataset.name, repr(job.data_params), job.config.seed)
        if _LAST_LOAD and _LAST_LOAD[0][0] == key:
            return _LAST_LOAD[0][1]
        _LAST_LOAD.clear()  # one dataset in memory at a time
        data = job.dataset.load(job.data_params, job.config.seed)
        _LAST_LOAD.append((key, data))
        return data


#: The last dataset a trial in this process loaded: [(key, data)] or [].
_LAST_LOAD: list = []


def search_stream(cfg: DictConfig, concurrent: int | None) -> Any:
    """A streamed dataset's encoded streams, prepared once on the search's driver and shared
    by every trial (kept in the object store after the first pass when
    ``data.stream.cache`` says so); None for an in-memory dataset. ``concurrent``: the
    most trials running at once (None: as many as fit)."""
    from trainyard.config import resolve
    from trainyard.errors import ConfigError
    from trainyard.train.stream import check_data_cpus, prepare_stream

    job = resolve(apply_values(cfg, {}))
    if not job.dataset.streaming:
        return None
    if any(str(key).startswith("data.") for key in cfg.tune.space):
        raise ConfigError(f"tune.space: dataset {job.dataset.name!r} is streamed, read once for the "
                          "whole search, so its data.* keys cannot vary between trials")
    check_data_cpus(cfg, trials=concurrent or 1)
    return prepare_stream(job, search=True)


def trial_fn(values: dict, job: dict | None = None, stream: Any = None, cwd: str | None = None) -> None:
    """One Tune trial: the job with this trial's values, trained and reported per epoch.
    ``stream``: a streamed dataset's streams (see :func:`search_stream`); ``cwd``: the
    search's working folder, which relative paths in the job are relative to."""
    cfg = apply_values(job, values)
    loop_config: dict = {"config": cfg, "cwd": cwd}
    datasets = None
    if stream is not None:
        datasets = {"train": stream.train, "val": stream.val}
        loop_config["stream"] = stream.meta
    if cfg.scaling.num_workers == 1:
        if datasets is not None:
            loop_config["datasets"] = datasets
        run_loop(loop_config, TuneTrialSession())
        return
    loop_config["config"] = OmegaConf.to_container(cfg, resolve=True)  # sent to the workers
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainyard.train.driver import make_trainer

    context = ray.tune.get_context()
    trainer = make_trainer(cfg, loop_config, context.get_trial_id(),
                           str(Path(context.get_trial_dir()).parent / "_train"),
                           callbacks=[TuneReportCallback()], datasets=datasets)
    trainer.fit()


class AsyncReports:
    """Tune's function trainable, made to let its training thread go on with the next epoch
    as soon as the trial's actor has taken the last epoch's result.

    Tune's own waits until its driver has handled the result and asked the actor for the
    next one: a round trip through the driver every epoch, during which the trial trains
    nothing (a third of a short-epoch trial's time on 2 cores). Here the driver handles
    epoch N while epoch N+1 trains; at most one result waits in the actor. A trial that
    Tune stops (ASHA, the time budget) ends at its next report, after its epoch in flight;
    the loop ends that epoch early when it sees the stop (:func:`stop_requested`).
    Not for PBT, which pauses and copies a trial at the result it saw."""

    def setup(self, config):
        super().setup(config)
        from ray.train._internal.session import get_session

        get_session().synchronous_result_reporting = False


def trial_fn_async(values: dict, job: dict | None = None, stream: Any = None, cwd: str | None = None) -> None:
    """:func:`trial_fn`, run by a trainable with :class:`AsyncReports`."""
    trial_fn(values, job, stream, cwd)


trial_fn_async.__mixins__ = (AsyncReports,)


def trial_resources(cfg: DictConfig) -> dict:
    """What one trial holds. A multi-worker trial's workers come from its nested trainer."""
    _, per_worker = worker_resources(cfg)
    if cfg.scaling.num_workers == 1:
        return {k.lower() if k in ("CPU", "GPU") else k: v for k, v in per_worker.items()}
    # The trial itself only waits on its nested trainer: a token of memory (Ray
    # refuses an empty request) keeps all CPUs and GPUs for the trainer's workers.
    return {"cpu": 0, "memory": 1}

