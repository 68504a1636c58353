"""Experiment tracking: a job's ``tracking`` section, with MLflow as the first backend.

``tracking: {backend: mlflow}`` logs every ``trainyard train`` run, and every trial of a
``trainyard tune`` search nested under one parent run per search, to MLflow: the resolved
config as params, each epoch's metrics with the epoch as the step, and the final
checkpoint and a report as artifacts. A search's winners are registered in the MLflow
Model Registry under the search's name, one model version per winner, tagged with the
trial, the metric and the checkpoint's URI; ``trainyard deploy models:/<name>/<version>``
serves one (:func:`registered_checkpoint`).

With no ``tracking.uri`` (nor ``$MLFLOW_TRACKING_URI``, which loading a new job's config puts there) the store is local, inside the run folder (``<run>/mlflow.db``,
artifacts in ``<run>/mlartifacts/``): no server needed. A URI sends to a tracking server.

Tracking never costs a run: every MLflow call runs in order on one background thread, so a
slow server does not stall training, and the first call that fails (a server that is down
or refuses) logs one warning naming the URI and turns tracking off for the rest of the run.
The run folder has everything either way.

All MLflow code lives here and imports ``mlflow`` only when tracking is on: trainyard
works without it. MLflow's own client does the talking (no protocol written here).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from trainyard.errors import ConfigError, TrainyardError

LOG = logging.getLogger("trainyard.tracking")

#: The local store, inside the run folder, when no tracking.uri is given.
LOCAL_STORE = "mlflow.db"
LOCAL_ARTIFACTS = "mlartifacts"
#: Model-version tag naming where the winner's checkpoint lives (its winners-registry folder).
CHECKPOINT_URI_TAG = "checkpoint_uri"
#: Artifact paths inside a run.
CHECKPOINT_ARTIFACT, REPORT_ARTIFACT, WINNER_ARTIFACT = "checkpoint", "report", "winner"
_THREAD = "trainyard-tracking"

#: MLflow settings trainyard sets unless the environment already does: no usage data sent
#: to MLflow's telemetry service, a down server fails in seconds (2 quick retries, not 7
#: with growing waits), and so does one that takes the connection and never answers (20 s
#: a request, not MLflow's 120 s: 3 tries of 120 s held a 30 s run for 6 minutes; enough
#: for a proxy to store a large checkpoint before it answers its upload), no
#: progress bars or run links printed over trainyard's own view.
MLFLOW_ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}

# Keys Ray Tune adds to every result: not metrics of the model.
_TUNE_KEYS = frozenset({
    "training_iteration", "time_total_s", "time_this_iter_s", "time_since_restore", "timestamp",
    "timesteps_total", "timesteps_since_restore", "episodes_total", "iterations_since_restore",
    "done", "pid", "date", "hostname", "node_ip", "trial_id", "experiment_tag", "config",
    "checkpoint_dir_name", "should_checkpoint", "epoch",
})
# MLflow's limits: a param value's length, entities per log_batch call.
_PARAM_MAX, _PARAMS_PER_CALL, _METRICS_PER_CALL = 6000, 100, 1000


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


def cli_overrides(uri: str | None) -> list[str]:
    """The config overrides a ``--tracking-uri URI`` option stands for."""
    if uri is None:
        return []
    if not uri.strip():  # an unset variable, "$MLFLOW_TRACKING_URI": not "no tracking"
        raise ConfigError("--tracking-uri: empty; give the tracking server's URI (or, for a local store in "
                          "the run folder, tracking.backend=mlflow)")
    return ["tracking.backend=mlflow", f"tracking.uri={uri}"]


def enabled(cfg: Any) -> bool:
    section = cfg.get("tracking") if hasattr(cfg, "get") else None
    return section is not None and section.get("backend") == "mlflow"


def check(cfg: Any) -> None:
    """Raise a one-line ConfigError when tracking is on but cannot work here."""
    if not enabled(cfg):
        return
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError("tracking.backend: mlflow is not installed here "
                          "(pip install mlflow-skinny, or set tracking.backend=none)")
    if not cfg.tracking.uri:
        missing = [m for m in ("sqlalchemy", "alembic") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"tracking.uri: the local store in the run folder needs "
                              f"{' and '.join(missing)} (pip install mlflow), or give a tracking server URI")


def store_uri(cfg: Any, run_dir: Path | None) -> str:
    """The tracking URI: ``tracking.uri``, or a SQLite store inside the run folder."""
    if cfg.tracking.uri:
        return str(cfg.tracking.uri)
    if run_dir is None:
        raise ConfigError("tracking.uri: needed when storage_path is a URI")
    return "sqlite:///" + str(Path(run_dir).resolve() / LOCAL_STORE)


def shown_uri(uri: str) -> str:
    """``uri`` without a password or token in it, fit for a message."""
    return re.sub(r"(://)[^/@]*@", r"\1***@", uri)


def _reason(exc: BaseException) -> str:
    text = str(exc)
    errno = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if errno:
        return errno.group(1).strip().lower()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = shown_uri(lines[0]) if lines else type(exc).__name__
    return line if len(line) <= 400 else line[:397] + "..."


def _mlflow():
    """``mlflow``, imported with trainyard's defaults for its settings in place."""
    for key, value in MLFLOW_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import mlflow

    _quiet_loggers()
    return mlflow


class _FromTrackingThread(logging.Filter):
    """Drops urllib3's retry warnings for calls made by the tracking thread: a down server
    gets one warning from trainyard, not one per retry."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.threadName.startswith(_THREAD)


_quieted = False


def _quiet_loggers() -> None:
    global _quieted
    if _quieted:
        return
    _quieted = True
    logging.getLogger("urllib3.connectionpool").addFilter(_FromTrackingThread())
    # MLflow's notes on its own work ("Creating initial MLflow database tables...",
    # "Waiting up to 300 seconds for model version to finish creation") stay out of
    # trainyard's output; its warnings still show.
    for name in ("mlflow.store.db.utils", "mlflow.store.model_registry.abstract_store", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def flatten(container: Any, prefix: str = "") -> dict[str, str]:
    """A resolved config as MLflow params: ``{"train.lr": "0.003", "model.params.hidden": "[64, 32]"}``."""
    if not isinstance(container, dict):
        from omegaconf import OmegaConf

        container = OmegaConf.to_container(container, resolve=True)
    flat: dict[str, str] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            flat[name] = text if len(text) <= _PARAM_MAX else text[: _PARAM_MAX - 3] + "..."
    return flat


def epoch_metrics(row: dict) -> tuple[int | None, dict[str, float]]:
    """An epoch's step (the epoch) and its numeric metrics, Tune's own keys left out."""
    epoch = row.get("epoch")
    if epoch is None and row.get("training_iteration") is not None:
        epoch = int(row["training_iteration"]) - 1
    metrics = {k: float(v) for k, v in row.items()
               if k not in _TUNE_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return (int(epoch) if epoch is not None else None), metrics


# --------------------------------------------------------------------------------------
# One connection: MLflow calls in order on one background thread
# --------------------------------------------------------------------------------------


class Connection:
    """An MLflow client whose calls run, in order, on one background thread. The first
    call that fails logs one warning and turns every later call into a no-op."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None, folder: Any, what: str):
        self.uri, self.experiment, self.artifact_root = uri, experiment, artifact_root
        self.folder, self.what = folder, what
        self.failed = False
        self.client: Any = None
        self._experiment_id: str | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_THREAD)
        self._closed = False

    def submit(self, fn: Callable, *args: Any) -> Future:
        """Queue ``fn(client, *args)``; its future gives its result (None once failed)."""
        return self._pool.submit(self._guarded, fn, *args)

    def call(self, fn: Callable, *args: Any) -> Any:
        """Run ``fn(client, *args)`` after everything queued; its result, None once failed."""
        return self.submit(fn, *args).result()

    def close(self) -> None:
        """Wait for every queued call, then stop the thread."""
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=True)

    def _guarded(self, fn: Callable, *args: Any) -> Any:
        if self.failed:
            return None
        try:
            if self.client is None:
                mlflow = _mlflow()
                self.client = mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            return fn(self.client, *args)
        except Exception as exc:  # a down or refusing server, a full disk: never the run's end
            self.failed = True
            LOG.warning("tracking: MLflow at %s failed (%s); the %s goes on without tracking, "
                        "and its run folder %s has everything", shown_uri(self.uri), _reason(exc),
                        self.what, self.folder)
            return None

    def experiment_id(self, client: Any) -> str:
        if self._experiment_id is None:
            self._experiment_id = _experiment(client, self.experiment, self.artifact_root)
        return self._experiment_id


def _experiment(client: Any, name: str, artifact_root: Path | None) -> str:
    """The id of the experiment ``name``, made (or restored from deleted) as needed."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            location = str(artifact_root) if artifact_root is not None else None
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as exc:  # made meanwhile by another process
            found = client.get_experiment_by_name(name)
            if found is None:
                raise exc
    if found.lifecycle_stage == "deleted":
        client.restore_experiment(found.experiment_id)
        LOG.warning("tracking: MLflow experiment %r (id %s) was deleted; restored it to log this run",
                    name, found.experiment_id)
    return found.experiment_id


def _key(name: str) -> str:
    """A name MLflow takes as a param or metric key (letters, digits, _ - . / : and space)."""
    return re.sub(r"[^\w\-. /:]", "_", str(name))


def _log_params(client: Any, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(_key(k), v) for k, v in params.items()]
    for i in range(0, len(items), _PARAMS_PER_CALL):
        client.log_batch(run_id, params=items[i:i + _PARAMS_PER_CALL])


def _log_epochs(client: Any, run_id: str, rows: list[dict]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = []
    for row in rows:
        step, values = epoch_metrics(row)
        items += [Metric(_key(k), v, now, step if step is not None else 0) for k, v in values.items()]
    for i in range(0, len(items), _METRICS_PER_CALL):
        client.log_batch(run_id, metrics=items[i:i + _METRICS_PER_CALL])


def _log_checkpoint(client: Any, run_id: str, checkpoint: Any, path: str) -> None:
    """Log a checkpoint folder (a path, or a Ray Checkpoint on any storage)."""
    if checkpoint is None:
        return
    if hasattr(checkpoint, "as_directory"):
        with checkpoint.as_directory() as folder:
            client.log_artifacts(run_id, folder, path)
    elif Path(checkpoint).is_dir():
        client.log_artifacts(run_id, str(checkpoint), path)


def _log_folder(client: Any, run_id: str, folder: str, path: str) -> None:
    """Log a folder at a local path or a URI (copied down first) under ``path``."""
    if "://" not in folder:
        client.log_artifacts(run_id, folder, path)
        return
    from trainyard.runtime.storage import copy_into

    with tempfile.TemporaryDirectory(prefix="trainyard-winner-") as tmp:
        copy_into(folder, str(Path(tmp, "checkpoint")))
        client.log_artifacts(run_id, str(Path(tmp, "checkpoint")), path)


def _log_files(client: Any, run_id: str, files: dict[str, str | Path], path: str) -> None:
    """Log ``{name: text or a file}`` under ``path``."""
    with tempfile.TemporaryDirectory(prefix="trainyard-report-") as tmp:
        for name, content in files.items():
            if isinstance(content, Path):
                if content.is_file():
                    shutil.copyfile(content, Path(tmp, name))
            else:
                Path(tmp, name).write_text(content)
        if any(Path(tmp).iterdir()):
            client.log_artifacts(run_id, tmp, path)


# --------------------------------------------------------------------------------------
# trainyard train: one MLflow run per invocation
# --------------------------------------------------------------------------------------


class TrainTracking:
    """Logs one ``trainyard train`` run from its driver (rank 0's events: one MLflow run
    whatever the number of workers). A run started again (resumed) gets a new MLflow run
    holding its earlier epochs too."""

    def __init__(self, cfg: Any, run_dir: Path | None, storage: str):
        from omegaconf import OmegaConf

        self.cfg = cfg
        self.params = flatten(OmegaConf.to_container(cfg, resolve=True))
        uri = store_uri(cfg, run_dir)
        root = (Path(run_dir).resolve() / LOCAL_ARTIFACTS) if not cfg.tracking.uri else None
        self.conn = Connection(uri, cfg.tracking.experiment or cfg.name, root,
                               run_dir or f"{storage}/{cfg.name}", "training run")
        self.run_id: str | None = None

    @property
    def uri(self) -> str:
        return self.conn.uri

    def start(self, history: list[dict]) -> None:
        def start(client: Any) -> None:
            tags = {"trainyard.kind": "train", "trainyard.run": self.cfg.name}
            if history:
                tags["trainyard.resumed_at_epoch"] = str(max(r["epoch"] for r in history) + 1)
            run = client.create_run(self.conn.experiment_id(client), run_name=self.cfg.name, tags=tags)
            self.run_id = run.info.run_id
            _log_params(client, self.run_id, self.params)
            if history:
                _log_epochs(client, self.run_id, history)

        self.conn.submit(start)

    def log_epoch(self, row: dict) -> None:
        self.conn.submit(lambda client: _log_epochs(client, self.run_id, [row]))

    def finish(self, status: str, checkpoint: Any = None, report: dict[str, str | Path] | None = None) -> None:
        """Log the final checkpoint and the report, end the run with ``status``
        (FINISHED, FAILED or KILLED), and wait for every queued call."""
        def finish(client: Any) -> None:
            if checkpoint is not None and self.cfg.tracking.log_checkpoints:
                _log_checkpoint(client, self.run_id, checkpoint, CHECKPOINT_ARTIFACT)
            if report:
                _log_files(client, self.run_id, report, REPORT_ARTIFACT)
            client.set_terminated(self.run_id, status)

        try:
            self.conn.submit(finish)
        finally:
            self.conn.close()

    def where(self) -> str | None:
        """Where the run was logged, for the run's last lines; None if tracking failed."""
        if self.conn.failed or self.run_id is None:
            return None
        return (f"MLflow run {self.run_id} in experiment {self.conn.experiment!r} at "
                f"{shown_uri(self.conn.uri)}")


def train_run(cfg: Any, run_dir: Path | None, storage: str) -> TrainTracking | None:
    """The tracking of a train run, or None when ``tracking.backend`` is none."""
    if not enabled(cfg):
        return None
    check(cfg)
    return TrainTracking(cfg, run_dir, storage)


# --------------------------------------------------------------------------------------
# trainyard tune: a parent run per search, a nested run per trial, winners registered
# --------------------------------------------------------------------------------------


class SearchTracking:
    """The MLflow runs of one search: a parent, a nested run per trial (logged from the
    Tune driver's callback), and the winners' model versions."""

    def __init__(self, cfg: Any, run_dir: Path):
        from omegaconf import OmegaConf

        self.cfg, self.run_dir = cfg, Path(run_dir)
        container = OmegaConf.to_container(cfg, resolve=True)
        self.search_params = flatten(container)
        container.pop("tune", None)
        self.base_params = flatten(container)
        uri = store_uri(cfg, self.run_dir)
        root = (self.run_dir.resolve() / LOCAL_ARTIFACTS) if not cfg.tracking.uri else None
        self.conn = Connection(uri, cfg.tracking.experiment or cfg.name, root, self.run_dir, "search")
        self.lock = threading.Lock()
        self.parent: str | None = None
        self.runs: dict[str, str] = {}  # trial id -> MLflow run id
        self.logged_epoch: dict[str, int] = {}  # trial id -> epoch of its logged checkpoint

    # Tune's callback state: a resumed search goes on in the same MLflow runs.
    def state(self) -> dict:
        with self.lock:
            return {"trainyard_mlflow": 1, "uri": self.conn.uri, "parent": self.parent,
                    "runs": dict(self.runs), "logged_epoch": dict(self.logged_epoch)}

    def restore(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("trainyard_mlflow") != 1 or state.get("uri") != self.conn.uri:
            return
        with self.lock:
            self.parent = state.get("parent")
            self.runs.update(state.get("runs") or {})
            self.logged_epoch.update(state.get("logged_epoch") or {})

    def start(self) -> None:
        def start(client: Any) -> None:
            if self.parent is not None:  # resumed
                client.update_run(self.parent, status="RUNNING")
                return
            run = client.create_run(self.conn.experiment_id(client), run_name=self.cfg.name,
                                    tags={"trainyard.kind": "search", "trainyard.run": self.cfg.name})
            with self.lock:
                self.parent = run.info.run_id
            _log_params(client, self.parent, self.search_params)

        self.conn.submit(start)

    def trial_started(self, trial_id: str, values: dict) -> None:
        params = {**self.base_params, **flatten(dict(values))}
        self.conn.submit(self._trial_run, trial_id, params, True)

    def _trial_run(self, client: Any, trial_id: str, params: dict | None = None, started: bool = False) -> str:
        """The trial's MLflow run id: the run made when it first started (marked running
        again when a resumed or paused trial starts again), or a new one."""
        known = self.runs.get(trial_id)
        if known is not None:
            if started:
                client.update_run(known, status="RUNNING")
            return known
        run = client.create_run(
            self.conn.experiment_id(client), run_name=trial_id,
            tags={"mlflow.parentRunId": self.parent, "trainyard.kind": "trial",
                  "trainyard.run": self.cfg.name, "trainyard.trial_id": trial_id})
        with self.lock:
            self.runs[trial_id] = run.info.run_id
        _log_params(client, run.info.run_id, params if params is not None else self.base_params)
        return run.info.run_id

    def trial_result(self, trial_id: str, result: dict) -> None:
        row = dict(result)
        self.conn.submit(lambda client: _log_epochs(client, self._trial_run(client, trial_id), [row]))

    def trial_ended(self, trial_id: str, status: str, checkpoint: str | None, trial_dir: str | None) -> None:
        def ended(client: Any) -> None:
            run_id = self._trial_run(client, trial_id)
            if checkpoint and self.cfg.tracking.log_checkpoints and Path(checkpoint).is_dir():
                client.log_artifacts(run_id, checkpoint, CHECKPOINT_ARTIFACT)
                with self.lock:
                    self.logged_epoch[trial_id] = _epoch_of(checkpoint)
            if trial_dir and Path(trial_dir).is_dir():
                folder = Path(trial_dir)
                _log_files(client, run_id, {name: folder / name for name in
                                            ("result.json", "progress.csv", "params.json", "error.txt")},
                           REPORT_ARTIFACT)
            client.set_terminated(run_id, status)

        self.conn.submit(ended)

    def end(self) -> None:
        self.conn.submit(lambda client: client.set_terminated(self.parent, "FINISHED"))

    def register(self, winners: list[dict]) -> list[dict]:
        """Log the search's report to the parent run and register each winner as a new
        version of the model named after the search; the registered versions, best first."""
        report = self._report_files()
        self.conn.submit(lambda client: _log_files(client, self.parent, report, REPORT_ARTIFACT))
        registered = self.conn.call(self._register, list(winners)) or []
        self.conn.close()
        return registered

    def _report_files(self) -> dict[str, str | Path]:
        files: dict[str, str | Path] = {name: self.run_dir / name
                                        for name in ("trainyard_trials.json", "trainyard_tune.yaml")}
        try:
            from trainyard.ui.report import write_report

            with tempfile.TemporaryDirectory() as tmp:
                files["report.html"] = write_report(self.run_dir, Path(tmp, "report.html")).read_text()
        except Exception as exc:  # the report is a nicety; the search's own files still go
            LOG.info("tracking: no HTML report for %s (%s)", self.run_dir, _reason(exc))
        return files

    def _register(self, client: Any, winners: list[dict]) -> list[dict]:
        from mlflow.exceptions import MlflowException

        name = self.cfg.name
        if not winners:
            return []
        try:
            client.create_registered_model(name, tags={"trainyard.search": name},
                                           description=f"Winners of the trainyard search {name}")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        registered = []
        for winner in winners:
            trial = str(winner.get("trial_id"))
            run_id = self.runs.get(trial) or self.parent
            folder = str(winner["path"])
            if trial in self.runs and self.logged_epoch.get(trial) == _epoch_of(folder):
                artifact = CHECKPOINT_ARTIFACT  # the trial's logged final checkpoint is the winner
            else:
                artifact = WINNER_ARTIFACT if run_id != self.parent else f"winners/rank_{winner['rank']}"
                _log_folder(client, run_id, folder, artifact)
            tags = {"trial_id": trial, "metric": str(winner.get("metric")),
                    "metric_value": str(winner.get("value")), "rank": str(winner.get("rank")),
                    CHECKPOINT_URI_TAG: folder, "winners_version": str(winner.get("version")),
                    "search": name}
            version = client.create_model_version(
                name, f"runs:/{run_id}/{artifact}", run_id=run_id, tags=tags,
                description=f"rank {winner.get('rank')} of search {name}: trial {trial}, "
                            f"{winner.get('metric')} {winner.get('value')}")
            registered.append({"rank": winner.get("rank"), "name": name, "version": int(version.version),
                               "uri": f"models:/{name}/{version.version}", "trial_id": trial})
        return registered


def _epoch_of(checkpoint: str | Path) -> int | None:
    try:
        return int(json.loads(Path(checkpoint, "trainer_state.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _trial_checkpoint(trial: Any) -> str | None:
    checkpoint = getattr(trial, "checkpoint", None)
    if checkpoint is not None and getattr(checkpoint, "path", None) and Path(checkpoint.path).is_dir():
        return checkpoint.path
    # A multi-worker trial's nested trainer reports its checkpoint's path in the metrics.
    path = (getattr(trial, "last_result", None) or {}).get("checkpoint_path")
    return str(path) if path else None


def _trial_dir(trial: Any) -> str | None:
    for attr in ("local_path", "path"):
        try:
            value = getattr(trial, attr)
        except Exception:
            value = None
        if value and Path(value).is_dir():
            return str(value)
    return None


def tune_callbacks(cfg: Any, run_dir: str | Path) -> list:
    """The Tune callbacks that track a search (run in the Tune driver), or [] when
    ``tracking.backend`` is none. Pass the same list to :func:`register_winners` after
    the winners are exported."""
    if not enabled(cfg):
        return []
    check(cfg)
    from ray.tune import Callback

    class MlflowSearchCallback(Callback):
        def __init__(self, search: SearchTracking | None):
            self.search = search

        def __getstate__(self):  # Tune pickles its run config; the connection stays here
            return {}

        def __setstate__(self, state):
            self.search = None

        def setup(self, **info):
            if self.search is not None:
                self.search.start()

        def on_trial_start(self, iteration, trials, trial, **info):
            if self.search is not None:
                self.search.trial_started(trial.trial_id, dict(trial.config or {}))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if self.search is not None:
                self.search.trial_result(trial.trial_id, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            if self.search is not None:
                self.search.trial_ended(trial.trial_id, "FINISHED", _trial_checkpoint(trial), _trial_dir(trial))

        def on_trial_error(self, iteration, trials, trial, **info):
            if self.search is not None:
                self.search.trial_ended(trial.trial_id, "FAILED", _trial_checkpoint(trial), _trial_dir(trial))

        def on_experiment_end(self, trials, **info):
            if self.search is not None:
                self.search.end()

        def get_state(self):
            return self.search.state() if self.search is not None else None

        def set_state(self, state):
            if self.search is not None:
                self.search.restore(state)

    return [MlflowSearchCallback(SearchTracking(cfg, Path(run_dir)))]


def register_winners(callbacks: list, winners: list[dict]) -> list[dict]:
    """Register a search's exported ``winners`` in the MLflow Model Registry, through the
    tracking callback among ``callbacks`` (from :func:`tune_callbacks`), and log the
    search's report to its parent run. Returns ``[{rank, name, version, uri, trial_id}]``,
    best first; [] when tracking is off or failed (it warned then)."""
    for callback in callbacks or []:
        search = getattr(callback, "search", None)
        if isinstance(search, SearchTracking):
            return search.register(winners)
    return []


# --------------------------------------------------------------------------------------
# trainyard deploy models:/<name>/<version>
# --------------------------------------------------------------------------------------

_MODEL_URI = re.compile(r"models:/([^/@]+)(?:/(\d+)|@([A-Za-z0-9_-]+))/?")


def registered_checkpoint(uri: str) -> Path:
    """The checkpoint folder a registered model version (``models:/<name>/<version>`` or
    ``models:/<name>@<alias>``) stands for, looked up in the registry that
    MLFLOW_REGISTRY_URI or MLFLOW_TRACKING_URI names: its ``checkpoint_uri`` tag when that
    folder is here and complete, else its artifacts, downloaded once into trainyard's cache
    (``$XDG_CACHE_HOME/trainyard/mlflow``)."""
    match = _MODEL_URI.fullmatch(uri)
    if match is None:
        raise TrainyardError(f"{uri}: a registered model is models:/<name>/<version> or models:/<name>@<alias>")
    name, version, alias = match.groups()
    registry = os.environ.get("MLFLOW_REGISTRY_URI") or os.environ.get("MLFLOW_TRACKING_URI")
    if not registry:
        raise TrainyardError(f"{uri}: set MLFLOW_TRACKING_URI to the MLflow tracking server (or store) "
                             "the model is registered in")
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or registry
    import importlib.util

    if importlib.util.find_spec("mlflow") is None:
        raise TrainyardError(f"{uri}: reading the MLflow Model Registry needs mlflow (pip install mlflow-skinny)")
    from trainyard.checkpoint import incomplete_reason

    mlflow = _mlflow()
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking, registry_uri=registry)
    where = shown_uri(registry)
    try:
        found = (client.get_model_version(name, version) if version is not None
                 else client.get_model_version_by_alias(name, alias))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise TrainyardError(f"{uri}: no such registered model version in {where}") from None
        raise TrainyardError(f"{uri}: MLflow at {where}: {_reason(exc)}") from None
    tagged = found.tags.get(CHECKPOINT_URI_TAG, "")
    if tagged and "://" not in tagged and Path(tagged).is_dir() and incomplete_reason(tagged) is None:
        return Path(tagged).resolve()
    return _download(client, tracking, uri, name, str(found.version), where, incomplete_reason)


def _download(client: Any, tracking: str, uri: str, name: str, version: str, where: str,
              incomplete_reason: Callable) -> Path:
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trainyard" / "mlflow"
    cache = base / hashlib.sha256(where.encode()).hexdigest()[:12] / name / version
    if cache.is_dir() and incomplete_reason(cache) is None:
        return cache.resolve()
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=cache.parent))
    try:
        source = client.get_model_version_download_uri(name, version)
        folder = Path(download_artifacts(artifact_uri=source, dst_path=str(staging), tracking_uri=tracking))
        reason = incomplete_reason(folder)
        if reason is not None:
            raise TrainyardError(f"{uri}: its artifacts are not a complete trainyard checkpoint ({reason})")
        if cache.exists():
            shutil.rmtree(cache)
        os.replace(folder, cache)
    except MlflowException as exc:
        raise TrainyardError(f"{uri}: downloading its artifacts from {where}: {_reason(exc)}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cache.resolve()
