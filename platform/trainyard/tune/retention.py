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


def rank(metrics: dict, metric: str, mode: str) -> tuple:
    """A checkpoint's sort key from the metrics it was saved with, best first: by
    ``metric`` (``mode``: max or min; missing or NaN last), then the earlier epoch. The
    export and the retention order by it, so they pick the same one."""
    score, iteration = metrics.get(metric), metrics.get("training_iteration") or 0
    if score is None or (isinstance(score, float) and math.isnan(score)):
        return (1, 0.0, iteration)
    return (0, -float(score) if mode == "max" else float(score), iteration)


def to_drop(saved: list[tuple[Any, dict]], latest: Any, keep: int, metric: str, mode: str) -> list:
    """Of one trial's ``(checkpoint, metrics)`` pairs, the checkpoints that ``keep`` does
    not hold: all but the ``keep`` best (see :func:`rank`) and ``latest`` (None: none)."""
    best = sorted(saved, key=lambda pair: rank(pair[1], metric, mode))[:keep]
    held = {checkpoint.path for checkpoint, _ in best} | {latest.path if latest is not None else None}
    return [checkpoint for checkpoint, _ in saved if checkpoint.path not in held]


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
        self._trials: dict[str, list[tuple[Any, dict]]] = {}  # trial id: [(checkpoint, metrics)]
        self._dropped: list[tuple[int, Any]] = []  # (snapshot count when dropped, checkpoint)
        self._snapshots = 0

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info) -> None:
        # Tune registers a checkpoint right after the result it came with.
        result = trial.last_result or {}
        saved = self._trials.setdefault(trial.trial_id, [])
        saved.append((checkpoint, {k: result.get(k) for k in (self.metric, "training_iteration")}))
        gone = to_drop(saved, checkpoint, self.keep, self.metric, self.mode)
        saved[:] = [pair for pair in saved if pair[0] not in gone]
        self._dropped += [(self._snapshots, c) for c in gone]

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


def sweep(grid: Any, keep: int, metric: str, mode: str) -> None:
    """Once a search is over: delete each trial's checkpoints that ``keep`` does not hold
    (those the callback had not deleted yet, and those of the attempts before a resume)."""
    for result in grid:
        for checkpoint in to_drop(list(getattr(result, "best_checkpoints", None) or []),
                                  result.checkpoint, keep, metric, mode):
            if checkpoint.filesystem.get_file_info(checkpoint.path).type != 0:  # 0: not found
                _delete(checkpoint)
