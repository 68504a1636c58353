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

With a bucket ``storage_path`` a snapshot is taken on the driver and uploaded in the
background, and Tune skips the upload of a snapshot while the last one is still going: the
state in the bucket may be many snapshots old. There a checkpoint is deleted only once the
bucket's state has been replaced three times after it dropped out (:class:`BucketState`
watches it): uploads run one at a time, so the third replacement seen is an upload begun
after the drop, of a snapshot taken after it.
"""

from __future__ import annotations

import logging
import math
import threading
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


class BucketState:
    """How many times Tune's experiment state in a bucket (the ``experiment_state-*.json``
    objects under ``uri``) has been seen to change, polled every ``every_s`` seconds by a
    background thread (a bucket that answers slowly or not at all never holds up Tune's
    loop). Two uploads that leave the same names, times and sizes count once: the count
    can only fall behind the uploads, never run ahead of them."""

    def __init__(self, uri: str, every_s: float = 1.0):
        self.uri, self.every_s = uri, every_s
        self.changes = 0
        self._seen: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start watching (again, after a stop: a resumed search may run a second fit)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._watch, name="trainyard-bucket-state", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        fs = inner = None
        while not self._stop.is_set():
            try:
                if fs is None:
                    from trainyard.runtime.storage import _checking_filesystem

                    fs, inner = _checking_filesystem(self.uri)
                self.poll(fs, inner)
            except Exception as exc:  # the bucket down for now: look again next time
                log.debug("could not look at the search's state in %s: %s", self.uri, exc)
            self._stop.wait(self.every_s)

    def poll(self, fs: Any, inner: str) -> None:
        import pyarrow.fs

        infos = fs.get_file_info(pyarrow.fs.FileSelector(inner.rstrip("/"), allow_not_found=True))
        seen = sorted((i.base_name, i.mtime_ns, i.size) for i in infos
                      if i.base_name.startswith("experiment_state") and i.base_name.endswith(".json"))
        if seen != self._seen:
            if self._seen is not None:
                self.changes += 1
            self._seen = seen


class CheckpointRetention(Callback):
    """Deletes the trial checkpoints ``checkpoint.num_to_keep`` does not keep, two
    experiment snapshots after they drop out, or with ``state_uri`` (the search's folder in
    a bucket) three replacements of the bucket's state after (see the module docstring)."""

    #: Snapshots to wait between a checkpoint dropping out and its deletion.
    LAG = 2
    #: With a bucket: replacements of the bucket's state to wait for instead.
    BUCKET_LAG = 3

    def __init__(self, keep: int, metric: str, mode: str, state_uri: str | None = None):
        self.keep, self.metric, self.mode, self.state_uri = keep, metric, mode, state_uri
        self._trials: dict[str, list[tuple[Any, dict]]] = {}  # trial id: [(checkpoint, metrics)]
        # (snapshots, or replacements of the bucket's state, counted when dropped; checkpoint)
        self._dropped: list[tuple[int, Any]] = []
        self._snapshots = 0
        self._bucket = BucketState(state_uri) if state_uri else None
        self._lag = self.BUCKET_LAG if state_uri else self.LAG

    def setup(self, **info) -> None:
        if self._bucket is not None:
            self._bucket.start()

    def on_experiment_end(self, **info) -> None:
        if self._bucket is not None:
            self._bucket.stop()

    def _count(self) -> int:
        return self._bucket.changes if self._bucket is not None else self._snapshots

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info) -> None:
        # Tune registers a checkpoint right after the result it came with.
        result = trial.last_result or {}
        saved = self._trials.setdefault(trial.trial_id, [])
        saved.append((checkpoint, {k: result.get(k) for k in (self.metric, "training_iteration")}))
        gone = to_drop(saved, checkpoint, self.keep, self.metric, self.mode)
        saved[:] = [pair for pair in saved if pair[0] not in gone]
        self._dropped += [(self._count(), c) for c in gone]

    def get_state(self) -> None:
        """Tune calls this at each snapshot of the experiment state."""
        self._snapshots += 1
        due_by = self._count() - self._lag
        due = [c for n, c in self._dropped if n <= due_by]
        self._dropped = [(n, c) for n, c in self._dropped if n > due_by]
        for checkpoint in due:
            _delete(checkpoint)
        return None

    def __getstate__(self) -> dict:  # Tune pickles its callbacks with the run config
        return {"keep": self.keep, "metric": self.metric, "mode": self.mode, "state_uri": self.state_uri}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["keep"], state["metric"], state["mode"], state.get("state_uri"))


def sweep(grid: Any, keep: int, metric: str, mode: str) -> None:
    """Once a search is over: delete each trial's checkpoints that ``keep`` does not hold
    (those the callback had not deleted yet, and those of the attempts before a resume)."""
    for result in grid:
        for checkpoint in to_drop(list(getattr(result, "best_checkpoints", None) or []),
                                  result.checkpoint, keep, metric, mode):
            if checkpoint.filesystem.get_file_info(checkpoint.path).type != 0:  # 0: not found
                _delete(checkpoint)
