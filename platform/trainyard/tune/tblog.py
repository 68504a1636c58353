"""Ray Tune's TensorBoard logger, in a thread of its own.

Tune adds ``TBXLoggerCallback`` to every search. It runs in the search's driver, in the loop
that hands each trial its next epoch: per result it writes and flushes an event file, per
trial it opens one and closes it (a thread join). On CNN/digits that was about a third of
the driver's work, and each trial waited for it between epochs. Tune also builds it before
the first trial starts, importing tensorboardX and with it torch (3 s here).

This subclass does the same work, with the same files and tags, in a background thread:
the driver only queues each call. Tune sees a TBXLoggerCallback in the list and adds no
other. The files lag the results by no more than the thread's queue; the search's end
waits for the queue to drain.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from ray.tune.logger import TBXLoggerCallback

log = logging.getLogger(__name__)

#: How long the search's end waits for the last events to be written.
DRAIN_TIMEOUT_S = 60.0


class BackgroundTBXLogger(TBXLoggerCallback):
    """TBXLoggerCallback whose writes run in a background thread (see the module docstring)."""

    def __init__(self):  # not TBXLoggerCallback's: tensorboardX is imported in the thread
        self._trial_writer: dict = {}
        self._trial_result: dict = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # Tune pickles its run config; the thread stays here
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def _in_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def _put(self, method: Any, *args: Any) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="trainyard-tensorboard", daemon=True)
                self._thread.start()
        self._queue.put((method, args))

    def _run(self) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            log.warning("tensorboardX is not installed: the search writes no TensorBoard logs")
            SummaryWriter = None
        self._summary_writer_cls = SummaryWriter
        while True:
            item = self._queue.get()
            if item is None:
                return
            if SummaryWriter is None:
                continue
            method, args = item
            try:
                method(self, *args)
            except Exception as exc:  # a log that fails must not end the search
                log.warning("TensorBoard logging failed: %s", exc)

    def log_trial_start(self, trial: Any) -> None:
        if self._in_thread():  # log_trial_result starts a trial it has not seen
            TBXLoggerCallback.log_trial_start(self, trial)
        else:
            self._put(TBXLoggerCallback.log_trial_start, trial)

    def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
        self._put(TBXLoggerCallback.log_trial_result, iteration, trial, dict(result))

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        self._put(TBXLoggerCallback.log_trial_end, trial, failed)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.close()

    def close(self, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Write what is queued, close the files, stop the thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put((_end_open_trials, ()))
        self._queue.put(None)
        thread.join(timeout)
        if thread.is_alive():
            log.warning("TensorBoard logging did not finish within %.0f s; its last events may be missing",
                        timeout)


def _end_open_trials(logger: BackgroundTBXLogger) -> None:
    """In the thread: close the files of trials that never ended (the search stopped)."""
    for trial in list(logger._trial_writer):
        TBXLoggerCallback.log_trial_end(logger, trial)
