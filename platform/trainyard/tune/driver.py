"""The search driver: run (or resume) a tune section's search on Ray Tune, follow it in a
live table, collect the trials and export the winners."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import pickle
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from trainyard import jsontext
from trainyard.checkpoint import checkpoint_uri, local_run_dir, upload_records
from trainyard.config import load_config, resolve
from trainyard.errors import ConfigError, TrainyardError
from trainyard.runtime.cluster import init_ray
from trainyard.runtime.resources import check_workers_fit
from trainyard.runtime.storage import atomic_write_text, check_uri, is_uri, join, read_text, storage_root, write_text
from trainyard.tune.reaper import PlacementGroupReaper
from trainyard.tune.records import (
    BUDGET_MARK,
    EXPLOITS,
    HISTORY,
    budget_ended,
    budget_message,
    read_exploits,
    read_history,
)
from trainyard.tune.space import apply_values, mutable_keys, param_space, validate_space
from trainyard.tune.trial import trial_fn, trial_fn_async, trial_resources
from trainyard.ui.tune_table import LiveTable, make_callback
from trainyard.winners import export_winners, registry_dir


@dataclass
class TuneOutcome:
    run_dir: str
    metric: str
    mode: str
    trials: list[dict]
    winners: list[dict]
    registry_dir: str
    #: "time_budget" when tune.time_budget_s ended the search; None when it ran out.
    stopped_by: str | None = None
    #: One line saying why the search ended early (empty when it did not).
    stop_message: str = ""
    #: PBT's exploits, oldest first (see trainyard.tune.records.read_exploits).
    exploits: list[dict] = field(default_factory=list)
    #: The winners registered in MLflow's Model Registry: rank, name, version, uri, trial_id.
    registered: list[dict] = field(default_factory=list)


def _max_concurrent(cfg: DictConfig) -> int | None:
    """Trials the search keeps alive at once. A synchronous PBT population is created
    whole and takes turns as resources allow."""
    t = cfg.tune
    return None if t.scheduler == "pbt" and t.pbt.synch else t.max_concurrent_trials


def trains_on(cfg: DictConfig) -> bool:
    """Whether one-worker trials go on training while the driver handles their last result
    (trainyard.tune.trial.AsyncReports): not under PBT, which copies a trial at the result it
    saw, and only where the trials running at once leave the driver a CPU of the cluster's.
    The driver's round trip after every epoch is then latency that training can hide (a
    short-epoch random search trained 26% more epochs in the same budget with one trial on
    2 cores). Where the trials hold every CPU, the driver's work and theirs share the cores,
    training on gains nothing, and trials wait for the driver as Tune's do."""
    if cfg.scaling.num_workers != 1 or cfg.tune.scheduler == "pbt":
        return False
    import ray

    cpus = ray.cluster_resources().get("CPU", 0.0)
    per_trial = trial_resources(cfg).get("cpu", 1.0)
    concurrent = _max_concurrent(cfg) or math.inf
    return cpus - min(concurrent * per_trial, cpus) >= 1.0


def _searcher(cfg: DictConfig, metric: str, mode: str):
    """Tune's search algorithm for ``tune.search``, limited to ``max_concurrent_trials``
    itself, in the form that resumes from a torn snapshot (trainyard.tune.resume)."""
    from trainyard.tune.resume import ResumableVariants, searcher

    t = cfg.tune
    if t.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        import optuna

        return searcher(OptunaSearch(metric=metric, mode=mode, sampler=optuna.samplers.TPESampler(seed=cfg.seed)),
                        _max_concurrent(cfg))
    # random and grid: Tune's own variant generator, seeded so a search repeats.
    return ResumableVariants(random_state=cfg.seed, max_concurrent=_max_concurrent(cfg) or 0)


def _scheduler(cfg: DictConfig, run_dir: Path):
    t = cfg.tune
    if t.scheduler == "none":
        return None
    if t.scheduler == "pbt":
        from trainyard.tune.pbt import make_pbt

        return make_pbt(cfg, run_dir, mutable_keys(cfg))
    if t.asha_per_schedule:
        from trainyard.tune.asha import ScheduleASHA as ASHAScheduler
    else:
        from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=cfg.train.epochs,
        grace_period=min(t.grace_period, cfg.train.epochs),
        reduction_factor=t.reduction_factor,
    )


#: Where Ray's TuneReportCallback puts a nested trainer's checkpoint in a trial's metrics.
CHECKPOINT_PATH_KEY = "checkpoint_path"


def _stopper(cfg: DictConfig, metric: str, run_dir: Path | None = None):
    """``tune.stopper: plateau``: Ray Tune's TrialPlateauStopper, next to any scheduler;
    ``tune.time_budget_s``: Tune's TimeoutStopper, marking the run folder when it ends
    the search (needs ``run_dir``)."""
    t = cfg.tune
    stoppers = []
    if t.stopper == "plateau":
        from ray.tune.stopper import TrialPlateauStopper

        stoppers.append(TrialPlateauStopper(metric, std=t.plateau_std, num_results=t.plateau_epochs,
                                            grace_period=t.plateau_epochs))
    if t.time_budget_s is not None and run_dir is not None:
        from trainyard.tune.pbt import budget_stopper

        stoppers.append(budget_stopper(t.time_budget_s, run_dir))
    if len(stoppers) > 1:
        from ray.tune.stopper import CombinedStopper

        return CombinedStopper(*stoppers)
    return stoppers[0] if stoppers else None


def run_tuning(
    cfg: DictConfig | None,
    address: str | None = None,
    resume: str | None = None,
    console: Any = None,
    callbacks: list | None = None,
    ingress: str | None = None,
) -> TuneOutcome:
    """Run (or resume) the search in ``cfg.tune``; export the winners; return a summary.
    ``ingress``: Serve's HTTP ingress, should this start an embedded Ray (see init_ray)."""
    cfg, run_dir, metric, mode = _search(cfg, resume)
    init_ray(address, ingress=ingress)
    check_workers_fit(cfg)  # one trial's workers must fit: never wait in PENDING
    run_dir.mkdir(parents=True, exist_ok=True)
    state = state_dir(cfg, run_dir)
    bucket = is_uri(state)
    search_yaml = OmegaConf.to_yaml(cfg)
    (run_dir / "trainyard_tune.yaml").write_text(search_yaml)
    if bucket:  # beside Tune's state, so that any machine can resume it
        write_text(join(state, "trainyard_tune.yaml"), search_yaml)
    for record in (BUDGET_MARK,) if resume else (BUDGET_MARK, EXPLOITS, HISTORY):
        (run_dir / record).unlink(missing_ok=True)  # a resumed search keeps its records

    # Ray's own per-iteration output gives way to the compact table below.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    keys = list(cfg.tune.space.keys())
    live = LiveTable(console, metric, cfg.name)
    callback = make_callback(metric, mode, keys, live.refresh)
    live.callback = callback
    # For the live view: the exploits so far (PBT), read from the run folder when it wants.
    live.read_exploits = functools.partial(read_exploits, run_dir)
    from trainyard.tune.pbt import HistoryRecorder

    recorder = HistoryRecorder(run_dir, keys)
    from trainyard import tracking

    # [] unless tracking.backend is mlflow. Its place in the list stays fixed: a resumed
    # search finds its parent and trial runs again by it.
    tracked = tracking.tune_callbacks(cfg, run_dir)
    from trainyard.tune.retention import CheckpointRetention, sweep
    from trainyard.tune.tblog import BackgroundTBXLogger

    keep = _kept(cfg)
    # These two last in the list, so that a search resumed by a version without them finds
    # the others where they were; Tune adds no TensorBoard logger of its own beside ours.
    # With a bucket, deletions wait on Tune's state there.
    retention = [CheckpointRetention(keep, metric, mode, state if bucket else None)] if keep else []
    tuners = _Tuners(cfg, run_dir, state, metric, mode,
                     [callback, recorder, *tracked, *(callbacks or []), *retention, BackgroundTBXLogger()])
    tuner = tuners.restored() if resume and tuners.can_restore() else tuners.new()
    reaper = PlacementGroupReaper() if cfg.scaling.num_workers > 1 else contextlib.nullcontext()
    with live, reaper, _interruptions() as caught:
        grid = tuner.fit()
        interrupted = any(event.is_set() for event in caught.events)
        if not interrupted and resume and any(_lost_checkpoint(r.error) for r in grid):
            # A driver killed mid-search can leave Tune's last snapshot naming a trial
            # checkpoint that num_to_keep has since deleted; Tune then fails that trial on
            # resume. Start such unfinished trials again from scratch; finished ones stay.
            grid = tuners.restored(restart_errored=True).fit()
        if keep:
            sweep(grid, keep, metric, mode)
    trials = _collect(grid, metric, mode, keys, cfg.train.epochs, pbt=cfg.tune.scheduler == "pbt",
                      recorded=read_history(run_dir))
    mark = budget_ended(run_dir)
    if interrupted:  # a search cut short: resumable, and no winner replaces the registry's
        winners: list = []
        stopped_by = "interrupted"
        done = sum(t["state"] == "TERMINATED" for t in trials)
        message = (f"search interrupted ({caught.by()}): {done} of {_planned(cfg)} trials ran all their epochs; "
                   f"no winner was exported. Resume it: trainyard tune --resume {state if bucket else run_dir}")
    else:
        winners = export_winners(trials, cfg, metric, mode)
        stopped_by = "time_budget" if mark else None
        message = budget_message(mark, trials, winners, _planned(cfg)) if mark else ""
    exploits = read_exploits(run_dir)
    atomic_write_text(run_dir / "trainyard_trials.json", jsontext.dumps(
        {"metric": metric, "mode": mode, "max_t": cfg.train.epochs, "trials": trials,
         "winners": winners, "stopped_by": stopped_by, "stop_message": message,
         "exploits": exploits}, indent=2, default=str))
    if bucket:  # the search's records go next to Tune's own state in the bucket
        upload_records(run_dir, state)
    if interrupted:
        raise SearchInterrupted(message)
    registered = tracking.register_winners(tracked, winners)
    return TuneOutcome(str(run_dir), metric, mode, trials, winners, registry_dir(cfg),
                       stopped_by, message, exploits, registered)


class SearchInterrupted(TrainyardError):
    """Ctrl-C (SIGINT), or SIGUSR1, ended a search: Tune saved its state; nothing was exported."""

    exit_code = 130


@dataclass
class _Caught:
    events: list = field(default_factory=list)  # Tune's, one per run: set when a signal ended it
    signals: list = field(default_factory=list)  # the signals its handler took, in order

    def by(self) -> str:
        import signal

        sig = self.signals[0] if self.signals else signal.SIGINT
        return "Ctrl-C" if sig == signal.SIGINT else signal.Signals(sig).name


@contextlib.contextmanager
def _interruptions():
    """Yields what ended Tune's runs in the block early: Tune catches SIGINT (and SIGUSR1)
    itself, saves the search's state and returns its results as if the search had ended; the
    only trace is the event its signal handler sets, taken here from the function that makes
    it (``ray.tune.tune._setup_signal_catching``, called by each run), and which signal it
    was, from its handler wrapped on the way."""
    import signal
    import threading

    import ray.tune.tune as tune_module

    caught = _Caught()
    original = getattr(tune_module, "_setup_signal_catching", None)
    if original is None:  # another Ray: no way to tell, as before
        yield caught
        return

    def noting(handler):
        def handle(sig, frame):
            caught.signals.append(sig)
            return handler(sig, frame)
        return handle

    def setup(*args, **kwargs):
        before = {sig: signal.getsignal(sig) for sig in _tune_signals()} \
            if threading.current_thread() is threading.main_thread() else {}
        event = original(*args, **kwargs)
        caught.events.append(event)
        for sig, was in before.items():
            now = signal.getsignal(sig)
            if callable(now) and now is not was:  # the handler Tune just installed
                signal.signal(sig, noting(now))
        return event

    tune_module._setup_signal_catching = setup
    try:
        yield caught
    finally:
        tune_module._setup_signal_catching = original


def _tune_signals() -> list:
    import signal

    return [signal.SIGINT] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])


def _kept(cfg: DictConfig) -> int | None:
    """How many of each one-worker trial's checkpoints trainyard keeps (the rest it
    deletes, see trainyard.tune.retention); None: all (PBT copies any trial's latest
    checkpoint a while after it was written; a multi-worker trial's nested trainer keeps
    its own)."""
    if cfg.tune.scheduler == "pbt" or cfg.scaling.num_workers > 1:
        return None
    return cfg.checkpoint.num_to_keep


def _planned(cfg: DictConfig) -> int:
    """The trials a search runs: num_samples times the grid's points."""
    planned = cfg.tune.num_samples
    for dim in cfg.tune.space.values():
        if dim.type == "grid" and dim["values"]:
            planned *= len(dim["values"])
    return planned


def _search(cfg: DictConfig | None, resume: str | None) -> tuple[DictConfig, Path, str, str]:
    """The search's config (a resumed one's own), run folder, metric and mode; every
    config error surfaces here, before Ray starts."""
    run_dir = None
    if resume:
        run_dir = _find_run(resume, cfg)
        cfg = load_config(run_dir / "trainyard_tune.yaml")
        spent = budget_ended(run_dir)
        if spent:  # the budget counts over resumes: nothing is left to run
            raise ConfigError(
                f"tune.time_budget_s: the time budget ({spent.get('budget_s', '?')} s) already ended the search "
                f"in {run_dir}, and it counts over resumes; its winners were exported then. To search on, "
                "start a new search (another name=) with its own budget")
        if _ran_to_its_end(run_dir, _planned(cfg)):
            raise ConfigError(f"--resume: the search in {run_dir} already ran to its end (its winners, if it "
                              "had any, were exported then); nothing is left to run. To search on, start a new "
                              "search (another name=)")
    if cfg.tune is None:
        raise ConfigError("tune: this config has no tune section (see configs/tune_mlp.yaml)")
    validate_space(cfg)
    job = resolve(apply_values(cfg, {}))
    metric_name = cfg.tune.metric or job.monitor
    if metric_name not in cfg.train.metrics and metric_name not in job.config.train.metrics:
        raise ConfigError(f"tune.metric: {metric_name!r} is not one of train.metrics")
    mode = cfg.tune.mode or next(m.mode for m in job.metrics if m.name == metric_name)
    storage = storage_root(cfg.storage_path)  # a URI: checked here, before Ray starts
    if is_uri(cfg.tune.registry):
        check_uri(cfg.tune.registry, "tune.registry", write=True)
    run_dir = Path(run_dir or local_run_dir(storage, cfg.name))
    if not resume and _searched_before(run_dir):  # a new search would replace its records
        raise ConfigError(f"name: a search named {cfg.name!r} already ran in {run_dir}; resume it "
                          f"(trainyard tune --resume {run_dir}) or give this one another name=")
    return cfg, run_dir, f"val_{metric_name}", mode


def _ran_to_its_end(run_dir: Path, planned: int) -> bool:
    """The search's records say it ran to its end: not cut by Ctrl-C or the time budget, and
    every planned trial made (a search an older trainyard saw interrupted recorded no cause,
    but left trials unmade, or running ones unfinished)."""
    try:
        data = json.loads((run_dir / "trainyard_trials.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or "stopped_by" not in data or data["stopped_by"] is not None:
        return False
    trials = data.get("trials") or []
    return len(trials) >= planned and all(t.get("state") != "PENDING" for t in trials)


def _searched_before(run_dir: Path) -> bool:
    """A search ran in ``run_dir``: it finished (its trials' record), or Tune saved its state
    (one stopped half-way, to be resumed). A search that failed before either starts again."""
    return (run_dir / "trainyard_trials.json").is_file() or any(run_dir.glob("experiment_state-*.json"))


def state_dir(cfg: DictConfig, run_dir: Path) -> str:
    """Where Tune keeps a search's state: its folder in the bucket, or the local run folder."""
    storage = storage_root(cfg.storage_path)
    return join(storage, cfg.name) if is_uri(storage) else str(run_dir)


class _Tuners:
    """Tune's Tuner for a search: a new one, or one restored from the run folder."""

    def __init__(self, cfg: DictConfig, run_dir: Path, state: str, metric: str, mode: str, callbacks: list):
        from ray import tune

        self.cfg, self.run_dir, self.metric, self.mode, self.callbacks = cfg, run_dir, metric, mode, callbacks
        self.state_dir = state  # Tune's state: the run folder, or its folder in the bucket
        base = OmegaConf.to_container(apply_values(cfg, {}), resolve=True)
        from trainyard.tune.trial import search_stream

        # A streamed dataset: read lazily, encoded once here, shared by every trial.
        stream = search_stream(cfg, _max_concurrent(cfg))
        fn = trial_fn_async if trains_on(cfg) else trial_fn
        self.trainable = tune.with_resources(tune.with_parameters(fn, job=base, stream=stream, cwd=os.getcwd()),
                                             trial_resources(cfg))

    def can_restore(self) -> bool:
        from ray import tune

        return tune.Tuner.can_restore(self.state_dir)

    def new(self):
        from ray import tune

        cfg, t = self.cfg, self.cfg.tune
        return tune.Tuner(
            self.trainable,
            param_space=param_space(cfg),
            tune_config=tune.TuneConfig(
                metric=self.metric, mode=self.mode,
                search_alg=_searcher(cfg, self.metric, self.mode),
                scheduler=_scheduler(cfg, self.run_dir),
                num_samples=t.num_samples,
                # The search algorithm holds the limit (see _searcher).
                max_concurrent_trials=None,
                trial_dirname_creator=lambda trial: trial.trial_id,
                # One-worker trials run in their actor's process: reusing the actor
                # saves a process start and a torch import per trial.
                reuse_actors=cfg.scaling.num_workers == 1,
            ),
            run_config=tune.RunConfig(
                name=cfg.name,
                # tune.time_budget_s is a stopper here, which says when it ended the search.
                stop=_stopper(cfg, self.metric, self.run_dir),
                storage_path=storage_root(cfg.storage_path),
                callbacks=self.callbacks,
                verbose=0,
                checkpoint_config=tune.CheckpointConfig(
                    # Tune keeps every checkpoint: trainyard deletes those num_to_keep
                    # does not keep (trainyard.tune.retention; given num_to_keep, Tune would
                    # save its whole experiment state each time a trial checkpoints that
                    # often); PBT keeps them all; a multi-worker trial's nested trainer
                    # keeps its own and reports none to Tune.
                    num_to_keep=None,
                    checkpoint_score_attribute=self.metric,
                    checkpoint_score_order=self.mode,
                ),
                failure_config=tune.FailureConfig(max_failures=max(cfg.checkpoint.max_failures, 0)),
            ),
        )

    def restored(self, restart_errored: bool = False):
        from ray import tune

        try:
            tuner = tune.Tuner.restore(
                self.state_dir, trainable=self.trainable, resume_unfinished=True, resume_errored=False,
                restart_errored=restart_errored, param_space=param_space(self.cfg),
            )
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise ConfigError(f"--resume: {self.state_dir}: Tune's saved search (tuner.pkl) is damaged and "
                              f"cannot be resumed ({type(exc).__name__}: {exc}); start the search again "
                              "under another name=") from None
        # Tune restores the search algorithm's state into the object it pickled; a search
        # begun by an older trainyard pickled Tune's own, which a torn snapshot can hang.
        tune_config = tuner._local_tuner._tune_config
        tune_config.search_alg, tune_config.max_concurrent_trials = _searcher(self.cfg, self.metric, self.mode), None
        # Tune restores the run config it pickled, whose progress callbacks lost their live
        # view; Tuner.restore takes no run config, so ours go on through the internal tuner.
        run_config = tuner._local_tuner.get_run_config()
        run_config.callbacks = list(self.callbacks)
        run_config.verbose = 0
        return tuner


def _lost_checkpoint(error: BaseException | None) -> bool:
    return error is not None and "does not exist on storage anymore" in str(error)


TRUST_RUN_DIR_ENV = "TRAINYARD_TRUST_RUN_DIR"


def _find_run(resume: str, cfg: DictConfig | None) -> Path:
    """The run folder ``--resume RUN`` names (a path, or a run name under the storage
    path), once :func:`check_run_dir_trusted` has passed it; for a search stored in a
    bucket (RUN a URI, or a name under a URI storage path), its local records folder."""
    if is_uri(resume) or (cfg is not None and is_uri(cfg.storage_path) and "/" not in resume):
        return _bucket_run(resume if is_uri(resume) else join(cfg.storage_path, resume))
    path = Path(resume).expanduser()
    if (path / "trainyard_tune.yaml").is_file():
        return check_run_dir_trusted(path.resolve())
    storage = cfg.storage_path if cfg is not None else "runs"
    candidate = Path(storage).expanduser().resolve() / resume
    if (candidate / "trainyard_tune.yaml").is_file():
        return check_run_dir_trusted(candidate)
    for folder in (path, candidate):
        if (folder / "config.yaml").is_file() and (folder / "metrics.jsonl").exists():
            raise ConfigError(f"--resume: {folder} is a training run, not a search; start it again with "
                              "trainyard train and the same name= to resume it")
    where = f"{str(path)!r}" if path.resolve() == candidate else f"{str(path)!r} or {str(candidate)!r}"
    raise ConfigError(f"--resume: no tuning run found at {where} (no trainyard_tune.yaml there)")


def _bucket_run(uri: str) -> Path:
    """The local records folder of the search stored at ``uri`` (``<storage>/<name>`` in a
    bucket), made from the config the search left there when this machine has none: a
    search may be resumed from any machine that reaches the bucket. Its Tune state (pickles,
    which run code when loaded) comes from the bucket: whoever may write there is trusted,
    as with any code in it."""
    uri = uri.rstrip("/")
    check_uri(uri, "--resume")
    text = read_text(join(uri, "trainyard_tune.yaml"))
    if text is None:
        raise ConfigError(f"--resume: no tuning run found at {uri!r} (it holds no trainyard_tune.yaml)")
    try:
        cfg = load_config(base=OmegaConf.to_container(OmegaConf.create(text)))
    except ConfigError as exc:
        raise ConfigError(f"--resume: {uri}/trainyard_tune.yaml: {exc}") from None
    if join(storage_root(cfg.storage_path), cfg.name) != uri:
        raise ConfigError(f"--resume: {uri}/trainyard_tune.yaml is the search {cfg.name!r} stored at "
                          f"{cfg.storage_path!r}, not this one")
    run_dir = local_run_dir(storage_root(cfg.storage_path), cfg.name)
    if not (run_dir / "trainyard_tune.yaml").is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "trainyard_tune.yaml", text)
    # The records its last driver left (uploaded whenever one ends, Ctrl-C included): how the
    # search ended, so that one the budget or its end finished is refused on any machine as
    # on the one that ran it (the bucket's copy wins: another machine may have ended it since
    # this one last did), and the epochs' history and exploits, which a resumed search
    # appends to and uploads over the bucket's (append-only: the longer copy holds the other).
    for record in ("trainyard_trials.json", BUDGET_MARK, HISTORY, EXPLOITS):
        kept = read_text(join(uri, record))
        if kept is None:
            continue
        local = run_dir / record
        if record in (HISTORY, EXPLOITS) and local.is_file() and \
                len(local.read_text(errors="replace").splitlines()) >= len(kept.splitlines()):
            continue
        atomic_write_text(local, kept)
    return run_dir


def _run_state_files(run_dir: Path) -> list[Path]:
    """What resuming reads from a run folder: the folder itself, its entries (Tune's
    ``tuner.pkl``, ``experiment_state-*.json`` holding pickled trials, searcher state,
    ``trainyard_tune.yaml``, the trial folders) and the pickles in the trial folders."""
    entries = sorted(run_dir.iterdir())
    pickles = [p for d in entries if d.is_dir() and not d.is_symlink() for p in sorted(d.glob("*.pkl"))]
    tuner = [run_dir / "tuner.pkl"] if (run_dir / "tuner.pkl").exists() else []
    return [run_dir, *tuner, *(e for e in entries if e.name != "tuner.pkl"), *pickles]


def check_run_dir_trusted(run_dir: str | Path, trust: bool | None = None) -> Path:
    """Refuse to resume from a run folder someone else could have written.

    Resuming unpickles Tune's ``tuner.pkl`` (and the pickled trial and searcher state next
    to it), and a pickle is code that runs when it is loaded. So the folder and what it
    holds must be owned by the current user (or root) and not writable by group or
    others. ``trust=True``, or ``TRAINYARD_TRUST_RUN_DIR=1`` when ``trust`` is None, skips
    the check. Returns ``run_dir``; raises a one-line ConfigError naming what is wrong.
    """
    run_dir = Path(run_dir)
    if trust is None:
        trust = os.environ.get(TRUST_RUN_DIR_ENV, "") not in ("", "0")
    if trust or not hasattr(os, "geteuid"):  # no POSIX owners (Windows): nothing to check
        return run_dir
    me = os.geteuid()
    for path in _run_state_files(run_dir):
        try:
            st = path.stat()  # a link is judged by what it points to: that is what is read
        except OSError as exc:
            raise ConfigError(f"--resume: cannot check {str(path)!r}: {exc}") from exc
        why = None
        if st.st_uid not in (me, 0):
            why = f"is owned by {_user(st.st_uid)}, not by you ({_user(me)})"
        elif st.st_mode & 0o022:
            who = " and ".join(w for bit, w in ((0o020, "group"), (0o002, "others")) if st.st_mode & bit)
            why = f"is writable by {who} (mode {stat.filemode(st.st_mode)})"
        if why:
            what = "it" if path == run_dir else repr(str(path.relative_to(run_dir)))
            raise ConfigError(
                f"--resume: refusing the run folder {str(run_dir)!r}: {what} {why}; resuming "
                "unpickles Tune's tuner.pkl, which runs code, so the folder must be yours alone "
                f"(chown it, chmod -R go-w it, or set {TRUST_RUN_DIR_ENV}=1 if you trust it)"
            )
    return run_dir


def _user(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _collect(grid: Any, metric: str, mode: str, keys: list[str], max_t: int,
             pbt: bool = False, recorded: dict[str, list[dict]] | None = None) -> list[dict]:
    """One dict per trial; STOPPED marks a trial ended early (by the scheduler, a stopper
    or the time budget), PENDING one that never reported an epoch. ``iterations`` is the
    epoch a trial got to: a PBT trial that copied another's checkpoint goes on from its
    epoch, so its history can step back. ``recorded``: the driver's own record of the
    results (read_history), preferred to Tune's result.json, which a restored trial's
    copy from storage can cut short."""
    from trainyard.tune.retention import rank

    trials = []
    for result in grid:
        history = []
        frame = result.metrics_dataframe
        rows = (recorded or {}).get(Path(result.path).name if result.path else "", [])
        if any(metric in r for r in rows):
            history = [
                {"iteration": int(r["training_iteration"]), metric: float(r[metric]),
                 **{k: float(r[k]) for k in ("train_loss", "lr") if k in r}}
                for r in rows if metric in r and "training_iteration" in r
            ]
        elif frame is not None and metric in frame:
            history = [
                {"iteration": int(r["training_iteration"]), metric: float(r[metric]),
                 **{k: float(r[k]) for k in ("train_loss", "lr") if k in frame}}
                for _, r in frame.iterrows()
            ]
        last = result.metrics or {}
        if isinstance(last.get(metric), (int, float)) and isinstance(last.get("training_iteration"), int) and (
                not history or last["training_iteration"] > history[-1]["iteration"]):
            # Tune's record of the trial's last result (its experiment snapshot) is newer
            # than the trial's own files in storage: a driver killed before the trial's last
            # upload leaves those an epoch or more short.
            history.append({"iteration": last["training_iteration"], metric: float(last[metric]),
                            **{k: float(last[k]) for k in ("train_loss", "lr")
                               if isinstance(last.get(k), (int, float))}})
        values = [h[metric] for h in history if not math.isnan(h[metric])]
        pick = max if mode == "max" else min
        checkpoint = None
        if result.checkpoint is not None:
            checkpoint = checkpoint_uri(result.checkpoint)
        elif result.metrics and result.metrics.get(CHECKPOINT_PATH_KEY):
            # A multi-worker trial's nested trainer reports through Ray's TuneReportCallback,
            # which puts its checkpoint's path in the metrics instead of a Tune checkpoint.
            checkpoint = result.metrics[CHECKPOINT_PATH_KEY]
        best_checkpoint = None
        if getattr(result, "best_checkpoints", None):
            # The order the retention keeps them by (checkpoint.num_to_keep).
            ordered = sorted(
                (c for c in result.best_checkpoints if metric in c[1]),
                key=lambda c: rank(c[1], metric, mode),
            )
            if ordered:
                best_checkpoint = checkpoint_uri(ordered[0][0])
        reached = history[-1]["iteration"] if history else 0
        params = {k: (result.config or {}).get(k) for k in keys}
        if pbt and best_checkpoint:  # the values that trained the exported checkpoint
            params = _checkpoint_params(best_checkpoint, params)
        trials.append({
            "trial_id": Path(result.path).name if result.path else "?",
            "params": params,
            "state": "ERROR" if result.error else (
                "PENDING" if not history else "STOPPED" if reached < max_t else "TERMINATED"),
            "error": _short_error(result.error),
            "iterations": reached,
            "final": values[-1] if values else None,
            "best": pick(values) if values else None,
            "history": history,
            "checkpoint": best_checkpoint or checkpoint,
            "path": result.path,
        })
    return trials


def _checkpoint_params(checkpoint: str, params: dict) -> dict:
    """``params`` as the checkpoint's own config has them: under PBT a trial's best
    checkpoint may predate an exploit that changed its values."""
    try:
        text = read_text(join(checkpoint, "job.yaml"))
    except OSError:
        text = None
    if text is None:
        return params
    try:
        saved = OmegaConf.create(text)
    except Exception:  # an unreadable config keeps the trial's final values
        return params
    return {k: _plain(OmegaConf.select(saved, k, default=v)) for k, v in params.items()}


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value


def _short_error(error: Any) -> str:
    if error is None:
        return ""
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__

