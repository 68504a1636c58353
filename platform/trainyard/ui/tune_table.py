"""The live table of a search's trials, and the summary of its top trials."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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


def make_callback(metric: str, mode: str, keys: list[str], on_change: Callable[[], None]):
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


class LiveTable:
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


def summary_table(outcome: Any, limit: int = 10):
    """The top trials of a search's outcome (``trainyard.tune.driver.TuneOutcome``), best
    first; failed trials last."""
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

