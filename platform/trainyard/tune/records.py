"""What a search leaves in its run folder besides Tune's own files, read without Ray:
the exploits of a PBT search and the mark of a time budget that ended it."""

from __future__ import annotations

import json
import math
from pathlib import Path

from trainyard.jsontext import nan_for_null

#: One JSON line per PBT exploit, appended as they happen (see read_exploits).
EXPLOITS = "exploits.jsonl"
#: Written when tune.time_budget_s ends the search (see budget_ended).
BUDGET_MARK = "budget_ended.json"


def read_exploits(run_dir: str | Path) -> list[dict]:
    """The exploits of a PBT search, oldest first: one dict per exploit, ``trial`` (the
    trial that copied), ``from_trial`` (the trial it copied), ``epoch`` (epochs ``trial``
    had trained when it copied), ``from_epoch`` (the epoch of the copied checkpoint),
    ``old`` and ``new`` (``trial``'s mutable values before and after, by config key),
    ``donor`` (``from_trial``'s values, which ``new`` perturbs) and ``time`` (unix
    seconds). [] for a run without exploits; a line cut short by a kill is skipped."""
    path = Path(run_dir) / EXPLOITS
    try:
        text = path.read_text()
    except OSError:
        return []
    exploits = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "trial" in entry:
            exploits.append(entry)
    return sorted(exploits, key=lambda e: e.get("time", 0))


def budget_ended(run_dir: str | Path) -> dict | None:
    """What ``budget_ended.json`` says (budget_s, started, ended: unix seconds) when the
    time budget ended the search; None when it did not."""
    try:
        mark = json.loads((Path(run_dir) / BUDGET_MARK).read_text())
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) else None


def budget_message(mark: dict, trials: list[dict], winners: list[dict],
                   planned: int | None = None) -> str:
    """One line saying the time budget ended the search, and what it left. ``planned``:
    the trials the search would have run (Tune creates some only when others finish)."""
    planned = max(planned or 0, len(trials))
    full = sum(1 for t in trials if t["state"] == "TERMINATED")
    cut = sum(1 for t in trials if t["state"] == "STOPPED")
    never = planned - len(trials) + sum(1 for t in trials if t["state"] == "PENDING")
    budget = mark.get("budget_s")
    parts = [f"{full} of {planned} trials ran to their end"]
    if cut:
        parts.append(f"{cut} stopped early")
    if never:
        parts.append(f"{never} never trained an epoch")
    exported = (f"exported the best {len(winners)} found so far" if winners
                else "no trial finished an epoch, so nothing was exported")
    shown = f"{budget:g}" if isinstance(budget, (int, float)) and not math.isnan(budget) else "?"
    return (f"the time budget (tune.time_budget_s={shown}s) ended the search: {', '.join(parts)}; "
            f"{exported}")


#: One JSON line per trial result, written by the driver as results arrive (see read_history).
HISTORY = "trainyard_history.jsonl"
#: What a history row keeps of a trial's result, besides the search metric.
HISTORY_KEYS = ("training_iteration", "epoch", "train_loss", "lr", "time_this_iter_s", "time_total_s", "pid",
                "timestamp")


def read_history(run_dir: str | Path) -> dict[str, list[dict]]:
    """Each trial's results in the order they arrived, by trial id: ``trial``,
    ``training_iteration``, ``epoch``, the metrics, ``lr`` (the learning rate in effect at
    the epoch's end), ``config`` (the values it trained with), ``time`` (unix seconds, when
    the driver got it; a result that made PBT exploit comes just after the exploit's
    record). Unlike Tune's own result.json,
    which a restarted trial's copy from storage can cut short, this keeps every result of
    a trial that PBT paused, restored and changed."""
    try:
        text = (Path(run_dir) / HISTORY).read_text()
    except OSError:
        return {}
    history: dict[str, list[dict]] = {}
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "trial" in row:
            history.setdefault(row["trial"], []).append(nan_for_null(row, keep=("trial", "config")))
    return history
