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

The thread writes each event to its file itself. tensorboardX's SummaryWriter hands every
scalar to a thread of its own through a multiprocessing queue (pickled, sent down a pipe
and read back, in one process), and starts and joins that thread per trial: with Tune's
twenty-odd scalars per result, that was a fifth of a search's driver CPU on the MLP.
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
            SummaryWriter = _inline_summary_writer()
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


def _inline_summary_writer() -> type:
    """tensorboardX's SummaryWriter, writing each event to its file in the calling thread
    (see the module docstring): the same event files, records and tags."""
    import os

    from tensorboardX import SummaryWriter
    from tensorboardX.event_file_writer import EventFileWriter, EventsWriter
    from tensorboardX.record_writer import directory_check
    from tensorboardX.writer import FileWriter

    class InlineEvents(EventFileWriter):
        def __init__(self, logdir: str, filename_suffix: str = ""):  # no queue, no thread
            self._logdir = logdir
            directory_check(logdir)
            self._ev_writer = EventsWriter(os.path.join(logdir, "events"), filename_suffix)
            self._closed = False

        def add_event(self, event: Any) -> None:
            if not self._closed:
                self._ev_writer.write_event(event)

        def reopen(self) -> None:  # a closed writer is not written to again here
            pass

        def close(self) -> None:
            if not self._closed:
                self._ev_writer.close()
                self._closed = True

    class InlineFileWriter(FileWriter):
        def __init__(self, logdir: Any, max_queue: int = 10, flush_secs: int = 120, filename_suffix: str = ""):
            self.event_writer = InlineEvents(str(logdir), filename_suffix)
            self._default_metadata = {}

    class InlineSummaryWriter(SummaryWriter):
        def _get_file_writer(self) -> Any:
            if self.all_writers is None or self.file_writer is None:
                self.file_writer = InlineFileWriter(self.logdir, filename_suffix=self._filename_suffix)
                self.all_writers = {self.file_writer.get_logdir(): self.file_writer}
            return self.file_writer

    return InlineSummaryWriter
