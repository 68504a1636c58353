"""The live table of a search's trials, and the summary of its top trials."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from trainyard.ui.console import is_live


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
                row = self.rows[trial.trial_id] = TrialRow(trial.trial_id, params)
                # A resumed search's trial brings its results so far (Tune keeps them).
                seen = (getattr(trial, "metric_analysis", None) or {}).get(metric) or {}
                row.best, row.metric = seen.get(mode), seen.get("last")
                row.iteration = (getattr(trial, "last_result", None) or {}).get("training_iteration", 0)
            return self.rows[trial.trial_id]

        def on_trial_start(self, iteration, trials, trial, **info):
            with self.lock:
                row = self._row(trial)
                row.state = "RUNNING"
                # A PBT exploit restarts the trial with new values.
                row.params = {k: trial.config.get(k) for k in keys}
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
    shown = rows[:limit]
    params = set(map(short_key, keys))
    id_width = max((len(r.trial_id) for r in shown), default=None)
    for column in ["trial", "state", *map(short_key, keys), "epoch", metric.removeprefix("val_"), "best"]:
        # Trial ids stay whole; on a narrow terminal the parameter columns give way first.
        param = column in params
        table.add_column(column, justify="left" if column in ("trial", "state") else "right",
                         no_wrap=not param, min_width=id_width if column == "trial" else None)
    colors = {"RUNNING": "cyan", "TERMINATED": "green", "ERROR": "red", "PENDING": "dim",
              "STOPPED": "yellow"}
    for row in shown:
        table.add_row(
            _plain(row.trial_id),
            f"[{colors.get(row.state, 'white')}]{row.state.lower()}[/]",
            *[_fmt(row.params.get(k)) for k in keys],
            str(row.iteration),
            _fmt(row.metric) if row.metric is not None else "-",
            _fmt(row.best) if row.best is not None else "-",
        )
    if len(rows) > limit:
        table.caption = f"... and {len(rows) - limit} more trials"
    return table


def _plain(text: Any):
    """A cell shown as it is: an id or an error with '[' in it is not rich markup."""
    from rich.text import Text

    return Text(str(text))


class LiveTable:
    """A compact live table of the trials, refreshed at most a few times a second, on a
    terminal. Elsewhere (a pipe, a CI log) one plain line per trial event instead: a trial
    started, reported an epoch, ended or failed."""

    def __init__(self, console: Any, metric: str, name: str):
        self.console = console
        self.metric = metric
        self.name = name
        self.callback = None
        self.live = None
        self.last = 0.0
        self.seen: dict[str, tuple[str, int]] = {}
        #: PBT's exploits so far (set by the tune driver; no arguments), and how many shown.
        self.read_exploits: Callable[[], list[dict]] | None = None
        self.exploits_shown = 0

    def _exploits(self) -> list[dict]:
        try:
            return list(self.read_exploits()) if self.read_exploits else []
        except Exception:  # a half-written record: shown on the next refresh
            return []

    def _table(self):
        from rich.console import Group
        from rich.text import Text

        with self.callback.lock:
            rows = list(self.callback.rows.values())
        table = render_table(rows, self.metric, f"{self.name}: trials")
        exploits = self._exploits()
        if not exploits:
            return table
        lines = [Text(exploit_line(e)) for e in exploits[-5:]]
        more = len(exploits) - len(lines)
        header = f"PBT exploits ({len(exploits)}{f', last {len(lines)}' if more else ''}):"
        return Group(table, Text(header), *lines)

    def __enter__(self):
        if is_live(self.console):
            from rich.live import Live

            self.live = Live(console=self.console, refresh_per_second=2, transient=False)
            self.live.start()
        return self

    def refresh(self) -> None:
        if self.live is None:
            self._print_events()
            return
        if time.monotonic() - self.last < 0.3:
            return
        self.last = time.monotonic()
        self.live.update(self._table())

    def _print_events(self) -> None:
        if self.console is None or self.callback is None:
            return
        with self.callback.lock:
            rows = [TrialRow(r.trial_id, dict(r.params), r.state, r.iteration, r.metric, r.best, r.error)
                    for r in self.callback.rows.values()]
        for row in rows:
            for line in trial_event_lines(row, self.seen.get(row.trial_id), self.metric):
                self.console.print(line, markup=False, highlight=False, soft_wrap=True)
            self.seen[row.trial_id] = (row.state, row.iteration)
        exploits = self._exploits()
        for e in exploits[self.exploits_shown:]:
            self.console.print(exploit_line(e), markup=False, highlight=False, soft_wrap=True)
        self.exploits_shown = max(self.exploits_shown, len(exploits))

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.update(self._table())
            self.live.stop()
        else:
            self._print_events()


def exploit_line(e: dict) -> str:
    """One PBT exploit: which trial copied which, at which epoch, and the values it changed."""
    changed = ", ".join(f"{short_key(k)} {_fmt((e.get('old') or {}).get(k))} -> {_fmt(v)}"
                        for k, v in (e.get("new") or {}).items()
                        if (e.get("old") or {}).get(k) != v)
    return (f"trial {e.get('trial')} copied trial {e.get('from_trial')} at epoch {e.get('epoch')}"
            f"{': ' + changed if changed else ''}")


def trial_event_lines(row: TrialRow, before: tuple[str, int] | None, metric: str) -> list[str]:
    """The log lines for what changed in ``row`` since ``before`` (its state and epoch when
    last printed; None: never printed)."""
    name = metric.removeprefix("val_")
    state, iteration = before or ("PENDING", 0)
    lines = []
    if before is None and row.state != "PENDING":
        params = " ".join(f"{short_key(k)}={_fmt(v)}" for k, v in row.params.items())
        lines.append(f"trial {row.trial_id} started: {params}".rstrip())
    if row.iteration > iteration:
        value = _fmt(row.metric) if row.metric is not None else "-"
        best = _fmt(row.best) if row.best is not None else "-"
        lines.append(f"trial {row.trial_id} epoch {row.iteration}: {name} {value} (best {best})")
    if row.state != state and row.state == "TERMINATED":
        best = _fmt(row.best) if row.best is not None else "-"
        lines.append(f"trial {row.trial_id} ended after {row.iteration} epoch(s): best {name} {best}")
    elif row.state != state and row.state == "ERROR":
        lines.append(f"trial {row.trial_id} failed: {row.error}")
    return lines


def ranked_trials(outcome: Any) -> list[tuple[int | None, dict]]:
    """Every trial of a search's outcome with its rank: finished trials best first (rank 1,
    2, ...), then those that reported no value (rank None), in the search's order."""
    ok = [t for t in outcome.trials if t["best"] is not None]
    ok.sort(key=lambda t: t["best"], reverse=(outcome.mode == "max"))
    rest = [t for t in outcome.trials if t["best"] is None]
    return [(i, t) for i, t in enumerate(ok, start=1)] + [(None, t) for t in rest]


def summary_table(outcome: Any, limit: int = 10):
    """The top trials of a search's outcome (``trainyard.tune.driver.TuneOutcome``), best
    first, ranked 1..N; failed trials last."""
    from rich.table import Table

    ranked = ranked_trials(outcome)
    ranks = [r for r, _ in ranked if r is not None]
    shown = [(r, t) for r, t in ranked if r is None or r <= limit]
    table = Table(title=f"top trials by {outcome.metric} ({outcome.mode})", title_justify="left")
    keys = list(outcome.trials[0]["params"]) if outcome.trials else []
    params = set(map(short_key, keys))
    ids = [len(str(t["trial_id"])) for _, t in shown]
    for column in ["#", "trial", *map(short_key, keys), "epochs", "best", "final", "state"]:
        # The rank and the trial id never give way: on a narrow terminal, the parameter
        # columns do first. Where stdout is not a terminal, nothing does (ui.console).
        if column == "#":
            table.add_column(column, justify="right", no_wrap=True, min_width=len(str(max(ranks, default=1))))
        elif column == "trial":
            table.add_column(column, no_wrap=True, min_width=max(ids, default=None))
        else:
            table.add_column(column, no_wrap=column not in params)
    for rank, t in shown:
        table.add_row(
            str(rank) if rank is not None else "-",
            _plain(t["trial_id"]),
            *[_fmt(t["params"].get(k)) for k in keys],
            str(t["iterations"]),
            _fmt(t["best"]) if t["best"] is not None else "-",
            _fmt(t["final"]) if t["final"] is not None else "-",
            t["state"].lower(),
        )
    if len(ranks) > limit:
        more = len(ranks) - limit
        table.caption = f"... and {more} more finished trial{'s' if more != 1 else ''}"
    return table


def summary_json(outcome: Any) -> dict:
    """The search's outcome as ``trainyard tune --json`` prints it. Stable keys:

    - ``run_dir``, ``metric`` (e.g. ``val_accuracy``), ``mode`` (``max``/``min``), ``registry_dir``;
    - ``trials``: every trial, ranked as the summary table ranks them: ``rank`` (1.., null for a
      trial with no value), ``trial_id``, ``state`` (TERMINATED, STOPPED, ERROR), ``params``
      (full config keys), ``iterations``, ``best``, ``final``, ``error`` ("" when none),
      ``checkpoint``;
    - ``winners``: the exported winners, best first: ``rank``, ``run``, ``trial_id``,
      ``metric``, ``mode``, ``value``, ``params``, ``path``, ``version``, ``replaced``;
    - ``stopped_by`` (``time_budget``, or null: the search ran to its end) and ``stop_message``;
    - ``exploits`` (PBT's, see ``trainyard.tune.records.read_exploits``) and ``registered``
      (the winners registered in MLflow: rank, name, version, uri, trial_id).

    Its NaN and infinite values print as null (``_print_json``, trainyard.jsontext)."""
    trials = [{"rank": rank, "trial_id": t["trial_id"], "state": t["state"], "params": t["params"],
               "iterations": t["iterations"], "best": t["best"], "final": t["final"],
               "error": t.get("error") or "", "checkpoint": t.get("checkpoint")}
              for rank, t in ranked_trials(outcome)]
    winners = [dict(w) for w in outcome.winners]
    return {"run_dir": str(outcome.run_dir), "metric": outcome.metric, "mode": outcome.mode,
            "registry_dir": str(getattr(outcome, "registry_dir", "") or ""),
            "trials": trials, "winners": winners,
            "stopped_by": outcome.stopped_by, "stop_message": outcome.stop_message,
            "exploits": list(outcome.exploits), "registered": list(outcome.registered)}
