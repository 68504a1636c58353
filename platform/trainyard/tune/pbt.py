"""Population based training and the time budget of a search.

``tune.scheduler: pbt`` runs Ray Tune's PopulationBasedTraining over the trials: every
``tune.pbt.perturbation_interval`` epochs a trial in the bottom quantile stops, takes the
latest checkpoint of a trial in the top quantile (model, optimizer and schedule) and that
trial's values, perturbed, and trains on. The loop applies the new values on restore
(``trainyard.train.schedule.apply_hyperparameters``). Each exploit is one JSON line in
``<run>/exploits.jsonl`` (see :func:`read_exploits`).

``tune.time_budget_s`` is Ray Tune's TimeoutStopper, which also notes in the run folder
that it ended the search (see :func:`budget_ended`). :class:`HistoryRecorder` keeps every
trial's results in the run folder (``trainyard_history.jsonl``), which Tune's result.json
does not for a trial that PBT restarts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ray.tune import Callback
from ray.tune.schedulers import PopulationBasedTraining
from ray.tune.stopper import TimeoutStopper

from trainyard import jsontext
from trainyard.tune.records import (
    BUDGET_MARK,
    EXPLOITS,
    HISTORY,
    HISTORY_KEYS,
    budget_ended,
    budget_message,
    read_exploits,
    read_history,
)

__all__ = ["BudgetStopper", "ClipToSpace", "HistoryRecorder", "RecordingPBT", "budget_ended",
           "budget_message", "budget_stopper", "make_pbt", "read_exploits", "read_history"]


class ClipToSpace:
    """PBT's custom explore step: a perturbed number stays within its dimension's
    low..high (randint: high - 1), as a trial sampled from the space would."""

    def __init__(self, bounds: dict[str, tuple[float, float]]):
        self.bounds = bounds

    def __call__(self, config: dict) -> dict:
        for key, (low, high) in self.bounds.items():
            value = config.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                clipped = min(max(value, low), high)
                config[key] = type(value)(clipped)
        return config


def hyperparam_mutations(cfg: DictConfig, keys: list[str]) -> tuple[dict, dict]:
    """PBT's ``hyperparam_mutations`` for the mutable ``keys`` (a list for choice and grid
    dimensions, the Tune domain otherwise) and the bounds the explore step clips to."""
    from trainyard.tune.space import domain

    mutations, bounds = {}, {}
    for key in keys:
        dim = cfg.tune.space[key]
        if dim.type in ("choice", "grid"):
            mutations[key] = list(OmegaConf.to_container(dim["values"]))
        else:
            mutations[key] = domain(dim)
            high = int(dim.high) - 1 if dim.type == "randint" else dim.high
            bounds[key] = (dim.low, high)
    return mutations, bounds


class RecordingPBT(PopulationBasedTraining):
    """Ray Tune's PopulationBasedTraining, writing each exploit to ``exploits.jsonl``."""

    def __init__(self, exploits_path: str, space_keys: list[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.exploits_path = exploits_path
        #: Every key of the search's space: an exploit also copies the donor's values of the
        #: keys it does not perturb (its checkpoint was trained with them).
        self.space_keys = list(space_keys or [])

    def _exploit(self, tune_controller, trial, trial_to_clone):
        # getattr: a search started before space_keys existed resumes with its pickled scheduler.
        space_keys = getattr(self, "space_keys", [])
        keys = [*self._hyperparam_mutations, *(k for k in space_keys if k not in self._hyperparam_mutations)]
        old = {k: trial.config.get(k) for k in keys}
        donor = {k: trial_to_clone.config.get(k) for k in keys}
        # PBT saves the result that brought a trial to its perturbation step before it
        # exploits (the trial's own last_result is updated only afterwards).
        mine = self._trial_state[trial].last_result or {}
        theirs = self._trial_state[trial_to_clone].last_result or {}
        super()._exploit(tune_controller, trial, trial_to_clone)
        entry = {
            "trial": trial.trial_id, "from_trial": trial_to_clone.trial_id,
            "epoch": int(mine.get("training_iteration", 0)),
            "from_epoch": int(theirs.get("training_iteration", 0)),
            "old": old, "new": {k: trial.config.get(k) for k in keys}, "donor": donor,
            "time": time.time(),
        }
        try:
            with open(self.exploits_path, "a") as out:
                out.write(jsontext.dumps(entry, default=_plain) + "\n")
        except OSError:  # the record is a report; the search goes on without it
            pass


def make_pbt(cfg: DictConfig, run_dir: Path, keys: list[str]) -> RecordingPBT:
    """The PBT scheduler of ``cfg.tune.pbt`` over the mutable ``keys``, recording its
    exploits in ``run_dir``."""
    p = cfg.tune.pbt
    mutations, bounds = hyperparam_mutations(cfg, keys)
    return RecordingPBT(
        str(Path(run_dir) / EXPLOITS),
        list(cfg.tune.space.keys()),
        time_attr="training_iteration",
        perturbation_interval=p.perturbation_interval,
        burn_in_period=p.burn_in_period,
        hyperparam_mutations=mutations,
        quantile_fraction=p.quantile_fraction,
        resample_probability=p.resample_probability,
        perturbation_factors=tuple(p.perturbation_factors),
        custom_explore_fn=ClipToSpace(bounds) if bounds else None,
        synch=p.synch,
    )


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


class BudgetStopper(TimeoutStopper):
    """Ray Tune's TimeoutStopper for ``tune.time_budget_s`` that, when the budget runs out,
    writes ``budget_ended.json`` in the run folder (so a resumed search, whose stopper Tune
    unpickles, still says so). Its clock starts at the search's first step and carries
    over a resume, as Tune's own budget does."""

    def __init__(self, timeout: float, mark: str):
        super().__init__(timeout)
        self.mark = mark
        self.started: float | None = None

    def stop_all(self) -> bool:
        if self.started is None:
            self.started = time.time()
        ended = super().stop_all()
        if ended and not Path(self.mark).exists():
            try:
                Path(self.mark).write_text(json.dumps({
                    "budget_s": self._timeout_seconds, "started": self.started, "ended": time.time()}))
            except OSError:
                pass
        return ended


def budget_stopper(budget_s: float, run_dir: Path) -> BudgetStopper:
    return BudgetStopper(float(budget_s), str(Path(run_dir) / BUDGET_MARK))


class HistoryRecorder(Callback):
    """Appends each trial result to ``trainyard_history.jsonl`` in the run folder (see
    ``trainyard.tune.records.read_history``), in the driver, as results arrive."""

    def __init__(self, run_dir: str | Path, keys: list[str]):
        self.path = str(Path(run_dir) / HISTORY)
        self.keys = list(keys)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        # The result's own config is the one it trained with: when this result made PBT
        # exploit, the trial's config is already the new one.
        config = result.get("config") or trial.config
        row = {"trial": trial.trial_id,
               **{k: v for k, v in result.items() if k in HISTORY_KEYS or k.startswith("val_")},
               "config": {k: config.get(k) for k in self.keys}, "time": time.time()}
        try:
            with open(self.path, "a") as out:
                out.write(jsontext.dumps(row, default=_plain) + "\n")
        except OSError:  # a report; the search goes on without it
            pass
