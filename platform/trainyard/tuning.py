"""Hyperparameter search on Ray Tune, and export of the winners.

Each trial trains one config. A one-worker trial runs the training loop in the trial's
own process (no nested trainer and its start-up); a multi-worker trial runs a nested
Ray Train ``TorchTrainer`` (DDP) whose reports reach Tune through ``TuneReportCallback``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from trainyard.config import load_config, resolve
from trainyard.errors import ConfigError

DIMENSION_TYPES = ("loguniform", "uniform", "randint", "choice", "grid")
SEARCHERS = ("random", "grid", "optuna")
SCHEDULERS = ("asha", "none")
CHECKPOINT_PATH_KEY = "checkpoint_path"


# --------------------------------------------------------------------------------------
# The search space: validated before anything starts
# --------------------------------------------------------------------------------------


def _dimension_samples(key: str, dim: Any) -> list:
    """The values a dimension can take at its edges, to check against the schema."""
    kind = dim.type
    where = f"tune.space.{key}"
    if kind not in DIMENSION_TYPES:
        raise ConfigError(f"{where}.type: {kind!r} is not one of {', '.join(DIMENSION_TYPES)}")
    if kind in ("choice", "grid"):
        if dim["values"] is None or len(dim["values"]) == 0:
            raise ConfigError(f"{where}.values: {kind} needs a non-empty list of values")
        return list(OmegaConf.to_container(dim["values"]) if isinstance(dim["values"], DictConfig) else dim["values"])
    for bound in ("low", "high"):
        if getattr(dim, bound) is None:
            raise ConfigError(f"{where}.{bound}: {kind} needs low and high")
    if dim.low >= dim.high:
        raise ConfigError(f"{where}: low ({dim.low:g}) must be below high ({dim.high:g})")
    if kind == "loguniform" and dim.low <= 0:
        raise ConfigError(f"{where}.low: loguniform needs a positive low (got {dim.low:g})")
    if kind == "randint":
        if dim.low != int(dim.low) or dim.high != int(dim.high):
            raise ConfigError(f"{where}: randint needs integer low and high")
        return [int(dim.low), int(dim.high) - 1]
    return [dim.low, dim.high]


def validate_space(cfg: DictConfig) -> dict[str, list]:
    """Check every dimension against the job schema and the plugins' param schemas."""
    space = cfg.tune.space
    if not space:
        raise ConfigError("tune.space: empty; give at least one dimension, e.g. train.lr")
    samples: dict[str, list] = {}
    for key, dim in space.items():
        values = _dimension_samples(key, dim)
        current = OmegaConf.select(cfg, key, default="__missing__")
        if current == "__missing__" and not key.startswith(("model.params.", "data.params.")):
            raise ConfigError(f"tune.space.{key}: {key} is not a config key")
        if isinstance(current, int) and not isinstance(current, bool) and dim.type in ("uniform", "loguniform"):
            raise ConfigError(
                f"tune.space.{key}: {key} is an integer; use randint, choice or grid, not {dim.type}"
            )
        for value in values:
            try:
                resolve(apply_values(cfg, {key: value}))
            except ConfigError as exc:
                raise ConfigError(f"tune.space.{key}: value {value!r} is invalid: {exc}") from None
        samples[key] = values
    return samples


def apply_values(cfg: DictConfig, values: dict[str, Any]) -> DictConfig:
    """The job config with the trial's values in place, re-validated."""
    base = OmegaConf.to_container(cfg, resolve=True)
    base.pop("tune", None)
    merged = OmegaConf.create(base)
    for key, value in values.items():
        OmegaConf.update(merged, key, value, force_add=True)
    return load_config(base=merged)


def param_space(cfg: DictConfig) -> dict:
    from ray import tune

    space = {}
    for key, dim in cfg.tune.space.items():
        values = OmegaConf.to_container(dim["values"]) if dim["values"] is not None else None
        if dim.type == "loguniform":
            space[key] = tune.loguniform(dim.low, dim.high)
        elif dim.type == "uniform":
            space[key] = tune.uniform(dim.low, dim.high)
        elif dim.type == "randint":
            space[key] = tune.randint(int(dim.low), int(dim.high))
        elif dim.type == "choice":
            space[key] = tune.choice(values)
        else:
            space[key] = tune.grid_search(values)
    return space


# --------------------------------------------------------------------------------------
# The trial
# --------------------------------------------------------------------------------------


def trial_fn(values: dict, job: dict | None = None) -> None:
    """One Tune trial: the job with this trial's values, trained and reported per epoch."""
    from trainyard.training import TuneTrialSession, run_loop

    cfg = apply_values(OmegaConf.create(job), values)
    loop_config = {"config": OmegaConf.to_container(cfg, resolve=True)}
    if cfg.scaling.num_workers == 1:
        run_loop(loop_config, TuneTrialSession())
        return
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainyard.training import make_trainer

    context = ray.tune.get_context()
    trainer = make_trainer(cfg, loop_config, context.get_trial_id(),
                           str(Path(context.get_trial_dir()).parent / "_train"),
                           callbacks=[TuneReportCallback()])
    trainer.fit()


class PlacementGroupReaper:
    """Removes placement groups nobody uses, while a search of multi-worker trials runs.

    A trial that the scheduler stops early is ended by Tune together with its nested
    trainer; the trainer's worker placement group is scoped to the job, not to the trial,
    so it would keep its CPUs and GPUs and the next multi-worker trial would wait for
    them forever. A group with no actor in any of its bundles for ``idle_s`` is removed.
    """

    def __init__(self, idle_s: float = 10.0, every_s: float = 2.0):
        self.idle_s, self.every_s = idle_s, every_s
        self.stop_event = threading.Event()
        self.idle_since: dict[str, float] = {}
        self.removed = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        while not self.stop_event.wait(self.every_s):
            try:
                self.sweep()
            except Exception:  # a sweep that fails is retried on the next tick
                continue

    def sweep(self) -> None:
        import ray
        from ray.util import placement_group_table
        from ray.util.placement_group import PlacementGroup

        available = ray.available_resources()
        total = ray.cluster_resources()
        now = time.monotonic()
        for pg_id, info in placement_group_table().items():
            key = f"bundle_group_{pg_id}"
            if info.get("state") != "CREATED" or key not in total:
                self.idle_since.pop(pg_id, None)
                continue
            if available.get(key, 0.0) < total[key]:  # some actor holds a bundle
                self.idle_since.pop(pg_id, None)
                continue
            first = self.idle_since.setdefault(pg_id, now)
            if now - first >= self.idle_s:
                ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
                self.idle_since.pop(pg_id, None)
                self.removed += 1


# --------------------------------------------------------------------------------------
# Progress a person can read
# --------------------------------------------------------------------------------------


@dataclass
class TrialRow:
    trial_id: str
    params: dict
    state: str = "PENDING"
    iteration: int = 0
    metric: float | None = None
    best: float | None = None
    error: str = ""
    history: list = field(default_factory=list)


def _make_callback(metric: str, mode: str, keys: list[str], on_change: Callable[[], None]):
    from ray.tune import Callback

    class ProgressCallback(Callback):
        """Keeps one row per trial for the live table (runs in the driver)."""

        def __init__(self):
            self.rows: dict[str, TrialRow] = {}
            self.lock = threading.Lock()

        def __getstate__(self):  # Tune pickles its run config; the live view stays here
            return {"rows": {}}

        def __setstate__(self, state):
            self.rows = state["rows"]
            self.lock = threading.Lock()

        def _row(self, trial) -> TrialRow:
            if trial.trial_id not in self.rows:
                params = {k: trial.config.get(k) for k in keys}
                self.rows[trial.trial_id] = TrialRow(trial.trial_id, params)
            return self.rows[trial.trial_id]

        def on_trial_start(self, iteration, trials, trial, **info):
            with self.lock:
                self._row(trial).state = "RUNNING"
            self.changed()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            with self.lock:
                row = self._row(trial)
                row.state = "RUNNING"
                row.iteration = result.get("training_iteration", row.iteration)
                value = result.get(metric)
                if value is not None:
                    row.metric = value
                    better = max if mode == "max" else min
                    row.best = value if row.best is None else better(row.best, value)
            self.changed()

        def on_trial_complete(self, iteration, trials, trial, **info):
            with self.lock:
                self._row(trial).state = "TERMINATED"
            self.changed()

        def on_trial_error(self, iteration, trials, trial, **info):
            with self.lock:
                row = self._row(trial)
                row.state = "ERROR"
                row.error = _trial_error(trial)
            self.changed()

        def changed(self):
            hook = getattr(self, "on_change", None)
            if hook is not None:
                hook()

    callback = ProgressCallback()
    callback.on_change = on_change
    return callback


def _trial_error(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        text = Path(path).read_text() if path and Path(path).exists() else ""
    except OSError:
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "failed"


def short_key(key: str) -> str:
    """``model.params.dropout`` -> ``dropout``: table headers stay narrow."""
    return key.rsplit(".", 1)[-1]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-3 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def render_table(rows: list[TrialRow], metric: str, title: str, limit: int = 20):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    keys = list(rows[0].params) if rows else []
    for column in ["trial", "state", *map(short_key, keys), "epoch", metric.removeprefix("val_"), "best"]:
        table.add_column(column, justify="left" if column in ("trial", "state") else "right", no_wrap=True)
    colors = {"RUNNING": "cyan", "TERMINATED": "green", "ERROR": "red", "PENDING": "dim",
              "STOPPED": "yellow"}
    for row in rows[:limit]:
        table.add_row(
            row.trial_id,
            f"[{colors.get(row.state, 'white')}]{row.state.lower()}[/]",
            *[_fmt(row.params.get(k)) for k in keys],
            str(row.iteration),
            _fmt(row.metric) if row.metric is not None else "-",
            _fmt(row.best) if row.best is not None else "-",
        )
    if len(rows) > limit:
        table.caption = f"... and {len(rows) - limit} more trials"
    return table


# --------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------


@dataclass
class TuneOutcome:
    run_dir: str
    metric: str
    mode: str
    trials: list[dict]
    winners: list[dict]
    registry_dir: str


def _searcher(cfg: DictConfig, metric: str, mode: str):
    t = cfg.tune
    if t.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        import optuna

        return OptunaSearch(metric=metric, mode=mode, sampler=optuna.samplers.TPESampler(seed=cfg.seed))
    from ray.tune.search import BasicVariantGenerator

    # random and grid: Tune's own variant generator, seeded so a search repeats.
    return BasicVariantGenerator(random_state=cfg.seed, max_concurrent=t.max_concurrent_trials)


def _scheduler(cfg: DictConfig):
    t = cfg.tune
    if t.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=cfg.train.epochs,
        grace_period=min(t.grace_period, cfg.train.epochs),
        reduction_factor=t.reduction_factor,
    )


def trial_resources(cfg: DictConfig) -> dict:
    """What one trial holds. A multi-worker trial's workers come from its nested trainer."""
    from trainyard.training import worker_resources

    use_gpu, per_worker = worker_resources(cfg)
    if cfg.scaling.num_workers == 1:
        return {k.lower() if k in ("CPU", "GPU") else k: v for k, v in per_worker.items()}
    # The trial itself only waits on its nested trainer: a token of memory (Ray
    # refuses an empty request) keeps all CPUs and GPUs for the trainer's workers.
    return {"cpu": 0, "memory": 1}


def check_trial_fits(cfg: DictConfig) -> None:
    """Fail at once when one trial's resources exceed the cluster's: never wait in PENDING."""
    from trainyard.training import check_fits, worker_resources

    _, per_worker = worker_resources(cfg)
    check_fits(cfg, per_worker)


def run_tuning(
    cfg: DictConfig | None,
    address: str | None = None,
    resume: str | None = None,
    console: Any = None,
    callbacks: list | None = None,
) -> TuneOutcome:
    """Run (or resume) the search in ``cfg.tune``; export the winners; return a summary."""
    from ray import tune

    from trainyard.raycluster import init_ray, storage_root

    if resume:
        run_dir = _find_run(resume, cfg)
        cfg = load_config(run_dir / "trainyard_tune.yaml")
    else:
        run_dir = None
    if cfg.tune is None:
        raise ConfigError("tune: this config has no tune section (see configs/tune_mlp.yaml)")
    validate_space(cfg)
    job = resolve(apply_values(cfg, {}))
    metric = f"val_{cfg.tune.metric or job.monitor}"
    metric_name = metric[4:]
    if metric_name not in cfg.train.metrics and metric_name not in job.config.train.metrics:
        raise ConfigError(f"tune.metric: {metric_name!r} is not one of train.metrics")
    mode = cfg.tune.mode or next(m.mode for m in job.metrics if m.name == metric_name)
    storage = storage_root(cfg.storage_path)
    run_dir = run_dir or Path(storage) / cfg.name
    init_ray(address)
    check_trial_fits(cfg)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "trainyard_tune.yaml").write_text(OmegaConf.to_yaml(cfg))

    # Ray's own per-iteration output gives way to the compact table below.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    keys = list(cfg.tune.space.keys())
    live = _LiveTable(console, metric, cfg.name)
    callback = _make_callback(metric, mode, keys, live.refresh)
    live.callback = callback
    base = OmegaConf.to_container(apply_values(cfg, {}), resolve=True)
    trainable = tune.with_resources(tune.with_parameters(trial_fn, job=base), trial_resources(cfg))
    run_config = tune.RunConfig(
        name=cfg.name,
        storage_path=storage,
        callbacks=[callback, *(callbacks or [])],
        verbose=0,
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=cfg.checkpoint.num_to_keep,
            checkpoint_score_attribute=metric,
            checkpoint_score_order=mode,
        ),
        failure_config=tune.FailureConfig(max_failures=max(cfg.checkpoint.max_failures, 0)),
    )
    def restore(restart_errored: bool = False):
        restored = tune.Tuner.restore(
            str(run_dir), trainable=trainable, resume_unfinished=True, resume_errored=False,
            restart_errored=restart_errored, param_space=param_space(cfg),
        )
        # Progress callbacks are not restored: attach ours to the restored run.
        restored._local_tuner._run_config.callbacks = [callback]
        restored._local_tuner._run_config.verbose = 0
        return restored

    if resume and tune.Tuner.can_restore(str(run_dir)):
        tuner = restore()
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(cfg),
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=mode,
                search_alg=_searcher(cfg, metric, mode),
                scheduler=_scheduler(cfg),
                num_samples=cfg.tune.num_samples,
                max_concurrent_trials=cfg.tune.max_concurrent_trials,
                time_budget_s=cfg.tune.time_budget_s,
                trial_dirname_creator=lambda trial: trial.trial_id,
                # One-worker trials run in their actor's process: reusing the actor
                # saves a process start and a torch import per trial.
                reuse_actors=cfg.scaling.num_workers == 1,
            ),
            run_config=run_config,
        )
    reaper = PlacementGroupReaper() if cfg.scaling.num_workers > 1 else contextlib.nullcontext()
    with live, reaper:
        grid = tuner.fit()
        if resume and any(_lost_checkpoint(r.error) for r in grid):
            # A driver killed mid-search can leave Tune's last snapshot naming a trial
            # checkpoint that num_to_keep has since deleted; Tune then fails that trial on
            # resume. Start such unfinished trials again from scratch; finished ones stay.
            grid = restore(restart_errored=True).fit()
    trials = _collect(grid, metric, mode, keys, cfg.train.epochs)
    winners = export_winners(trials, cfg, metric, mode)
    (Path(run_dir) / "trainyard_trials.json").write_text(json.dumps(
        {"metric": metric, "mode": mode, "max_t": cfg.train.epochs, "trials": trials,
         "winners": winners}, indent=2, default=str))
    return TuneOutcome(str(run_dir), metric, mode, trials, winners, _registry_dir(cfg))


def _lost_checkpoint(error: BaseException | None) -> bool:
    return error is not None and "does not exist on storage anymore" in str(error)


def _find_run(resume: str, cfg: DictConfig | None) -> Path:
    path = Path(resume).expanduser()
    if (path / "trainyard_tune.yaml").is_file():
        return path.resolve()
    storage = cfg.storage_path if cfg is not None else "runs"
    candidate = Path(storage).expanduser().resolve() / resume
    if (candidate / "trainyard_tune.yaml").is_file():
        return candidate
    raise ConfigError(f"--resume: no tuning run found at {str(path)!r} or {str(candidate)!r}")


def _collect(grid: Any, metric: str, mode: str, keys: list[str], max_t: int) -> list[dict]:
    """One dict per trial; STOPPED marks a trial the scheduler ended early."""
    trials = []
    for result in grid:
        history = []
        frame = result.metrics_dataframe
        if frame is not None and metric in frame:
            history = [
                {"iteration": int(r["training_iteration"]), metric: float(r[metric]),
                 **{k: float(r[k]) for k in ("train_loss",) if k in frame}}
                for _, r in frame.iterrows()
            ]
        values = [h[metric] for h in history if not math.isnan(h[metric])]
        pick = max if mode == "max" else min
        checkpoint = None
        if result.checkpoint is not None:
            checkpoint = result.checkpoint.path
        elif result.metrics and result.metrics.get(CHECKPOINT_PATH_KEY):
            checkpoint = result.metrics[CHECKPOINT_PATH_KEY]
        best_checkpoint = None
        if getattr(result, "best_checkpoints", None):
            ordered = sorted(
                (c for c in result.best_checkpoints if metric in c[1]),
                key=lambda c: c[1][metric], reverse=(mode == "max"),
            )
            if ordered:
                best_checkpoint = ordered[0][0].path
        trials.append({
            "trial_id": Path(result.path).name if result.path else "?",
            "params": {k: (result.config or {}).get(k) for k in keys},
            "state": "ERROR" if result.error else (
                "STOPPED" if len(history) < max_t else "TERMINATED"),
            "error": _short_error(result.error),
            "iterations": len(history),
            "final": values[-1] if values else None,
            "best": pick(values) if values else None,
            "history": history,
            "checkpoint": best_checkpoint or checkpoint,
            "path": result.path,
        })
    return trials


def _short_error(error: Any) -> str:
    if error is None:
        return ""
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


def _registry_dir(cfg: DictConfig) -> str:
    registry = cfg.tune.registry
    if "://" in registry:
        return f"{registry.rstrip('/')}/{cfg.name}"
    return str(Path(registry).expanduser().resolve() / cfg.name)


def export_winners(trials: list[dict], cfg: DictConfig, metric: str, mode: str) -> list[dict]:
    """Copy the top-k finished trials' best checkpoints into the winners registry.

    ``<registry>/<run name>/rank_<k>/`` is a self-contained checkpoint (weights, resolved
    config, processor, label names, model plugin name) plus ``winner.json``;
    ``<registry>/<run name>/winners.json`` indexes them.
    """
    finished = [t for t in trials if t["state"] != "ERROR" and t["best"] is not None and t["checkpoint"]]
    finished.sort(key=lambda t: t["best"], reverse=(mode == "max"))
    target = _registry_dir(cfg)
    winners = []
    for rank, trial in enumerate(finished[: cfg.tune.top_k], start=1):
        dest = f"{target}/rank_{rank}"
        _copy_tree(trial["checkpoint"], dest)
        entry = {
            "rank": rank,
            "run": cfg.name,
            "trial_id": trial["trial_id"],
            "metric": metric,
            "mode": mode,
            "value": trial["best"],
            "params": trial["params"],
            "path": dest,
        }
        _write_text(f"{dest}/winner.json", json.dumps(entry, indent=2, default=str))
        winners.append(entry)
    _write_text(f"{target}/winners.json", json.dumps(winners, indent=2, default=str))
    return winners


def _copy_tree(source: str, dest: str) -> None:
    if "://" not in source and "://" not in dest:
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(source, dest)
        return
    import pyarrow.fs

    pyarrow.fs.copy_files(source, dest)


def _write_text(path: str, text: str) -> None:
    if "://" not in path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        return
    import pyarrow.fs

    fs, inner = pyarrow.fs.FileSystem.from_uri(path)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode())


class _LiveTable:
    """A compact live table of the trials, refreshed at most a few times a second."""

    def __init__(self, console: Any, metric: str, name: str):
        self.console = console
        self.metric = metric
        self.name = name
        self.callback = None
        self.live = None
        self.last = 0.0

    def _table(self):
        with self.callback.lock:
            rows = list(self.callback.rows.values())
        return render_table(rows, self.metric, f"{self.name}: trials")

    def __enter__(self):
        if self.console is not None:
            from rich.live import Live

            self.live = Live(console=self.console, refresh_per_second=2, transient=False)
            self.live.start()
        return self

    def refresh(self) -> None:
        if self.live is None or time.monotonic() - self.last < 0.3:
            return
        self.last = time.monotonic()
        self.live.update(self._table())

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.update(self._table())
            self.live.stop()


def summary_table(outcome: TuneOutcome, limit: int = 10):
    """The top trials, best first; failed trials last."""
    from rich.table import Table

    ok = [t for t in outcome.trials if t["best"] is not None]
    ok.sort(key=lambda t: t["best"], reverse=(outcome.mode == "max"))
    rows = ok[:limit] + [t for t in outcome.trials if t["best"] is None]
    table = Table(title=f"top trials by {outcome.metric} ({outcome.mode})", title_justify="left")
    keys = list(outcome.trials[0]["params"]) if outcome.trials else []
    for column in ["#", "trial", *map(short_key, keys), "epochs", "best", "final", "state"]:
        table.add_column(column, no_wrap=True)
    for i, t in enumerate(rows, start=1):
        table.add_row(
            str(i) if t["best"] is not None else "-",
            t["trial_id"],
            *[_fmt(t["params"].get(k)) for k in keys],
            str(t["iterations"]),
            _fmt(t["best"]) if t["best"] is not None else "-",
            _fmt(t["final"]) if t["final"] is not None else "-",
            t["state"].lower(),
        )
    return table


def sample_input(checkpoint: str | Path) -> Any:
    """One raw validation input of a checkpoint's dataset, as a client would send it."""
    from trainyard.training import split_validation

    job = resolve(load_config(Path(checkpoint) / "job.yaml"))
    data = job.dataset.load(job.data_params, job.config.seed)
    val = data.val if data.val is not None else split_validation(data, job.config.data.val_fraction, job.config.seed)[1]
    first = val.inputs[0]
    return first if isinstance(first, str) else first.tolist()
