"""Which of a search's trial checkpoints stay on storage: ``checkpoint.num_to_keep``.

Tune can keep the ``num_to_keep`` best checkpoints of each trial itself, but it then saves
its whole experiment state (every trial's record, as JSON) each time a trial checkpoints
``num_to_keep`` times, so that its snapshot never names a deleted checkpoint. With one
checkpoint a trial epoch and ``num_to_keep: 1`` that is a snapshot per epoch per trial, on
the driver, while the trial waits for its next epoch: on CNN/digits a search trained 63%
more epochs in the same time without it.

So trainyard gives Tune no ``num_to_keep`` and deletes checkpoints itself, the same ones
Tune would: each trial keeps its ``num_to_keep`` best checkpoints by the search's metric
(on a tie the earliest, as the export picks it) and its latest. A checkpoint that drops out
is deleted only after two more snapshots of the experiment state have been taken (Tune
snapshots every 10 s or more), so the snapshot a killed search resumes from names only
checkpoints that are still there. :func:`sweep` deletes the rest once the search is over.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ray.tune import Callback

log = logging.getLogger(__name__)


def rank(score: Any, iteration: Any, mode: str) -> tuple:
    """A sort key, best first: by ``score`` (``mode``: max or min; missing or NaN last),
    then the earlier ``iteration`` (the export and the retention pick the same one)."""
    if score is None or (isinstance(score, float) and math.isnan(score)):
        return (1, 0.0, iteration or 0)
    return (0, -float(score) if mode == "max" else float(score), iteration or 0)


def to_drop(entries: list, latest: Any, key: Any, keep: int) -> list:
    """The entries of one trial that ``keep`` does not hold: all but the ``keep`` best by
    ``key`` (see :func:`rank`) and ``latest``."""
    held = sorted(entries, key=key)[:keep]
    return [e for e in entries if e is not latest and not any(e is h for h in held)]


def _delete(checkpoint: Any) -> None:
    try:
        checkpoint.filesystem.delete_dir(checkpoint.path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # a bucket that is down now: the checkpoint stays, the search goes on
        log.warning("could not delete the superseded checkpoint %s: %s", checkpoint.path, exc)


class CheckpointRetention(Callback):
    """Deletes the trial checkpoints ``checkpoint.num_to_keep`` does not keep, two
    experiment snapshots after they drop out (see the module docstring)."""

    #: Snapshots to wait between a checkpoint dropping out and its deletion.
    LAG = 2

    def __init__(self, keep: int, metric: str, mode: str):
        self.keep, self.metric, self.mode = keep, metric, mode
        self._trials: dict[str, list[tuple[Any, tuple]]] = {}  # trial id: (checkpoint, rank)
        self._dropped: list[tuple[int, Any]] = []  # (snapshot count when dropped, checkpoint)
        self._snapshots = 0

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info) -> None:
        # Tune registers a checkpoint right after the result it came with.
        result = trial.last_result or {}
        entry = (checkpoint, rank(result.get(self.metric), result.get("training_iteration"), self.mode))
        entries = self._trials.setdefault(trial.trial_id, [])
        entries.append(entry)
        for gone in to_drop(entries, entry, lambda e: e[1], self.keep):
            entries.remove(gone)
            self._dropped.append((self._snapshots, gone[0]))

    def get_state(self) -> None:
        """Tune calls this at each snapshot of the experiment state."""
        self._snapshots += 1
        due = [c for n, c in self._dropped if n <= self._snapshots - self.LAG]
        self._dropped = [(n, c) for n, c in self._dropped if n > self._snapshots - self.LAG]
        for checkpoint in due:
            _delete(checkpoint)
        return None

    def __getstate__(self) -> dict:  # Tune pickles its callbacks with the run config
        return {"keep": self.keep, "metric": self.metric, "mode": self.mode}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["keep"], state["metric"], state["mode"])


def sweep(grid: Any, keep: int, metric: str, mode: str) -> int:
    """Once a search is over: delete each trial's checkpoints that ``keep`` does not hold
    (those the callback had not deleted yet, and those of the attempts before a resume).
    Returns how many it deleted."""
    deleted = 0
    for result in grid:
        saved = list(getattr(result, "best_checkpoints", None) or [])
        latest = result.checkpoint
        last = next((pair for pair in saved if latest is not None and pair[0].path == latest.path), None)
        key = lambda pair: rank(pair[1].get(metric), pair[1].get("training_iteration"), mode)  # noqa: E731
        for checkpoint, _ in to_drop(saved, last, key, keep):
            if latest is not None and checkpoint.path == latest.path:
                continue
            if checkpoint.filesystem.get_file_info(checkpoint.path).type != 0:  # 0: not found
                _delete(checkpoint)
                deleted += 1
    return deleted
