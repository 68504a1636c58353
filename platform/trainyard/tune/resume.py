"""Search algorithms that resume from a torn snapshot.

Tune snapshots a search in two files, the trials (``experiment_state-*.json``) and then the
search algorithm (``basic-variant-state-*.json``, ``search_gen_state-*.json``), in its
staging folder, and copies that folder to ``storage_path`` in the background, one file
after the other, while the next snapshot is being written. A driver killed mid-copy leaves
a pair from two moments: the search algorithm older than the trials (Ray 2.60). Resumed
from such a pair, Tune's own search algorithms

- count a trial the snapshot records as finished as still running, because they had not
  heard of its end yet: with ``max_concurrent_trials`` trials so "running" the search waits
  for a trial that never comes, forever (seen: a resumed grid search idle for 400 s);
- create again a trial the snapshot records but they had not created yet: the same grid
  point under the same trial id, run twice into one folder (seen: a winner whose best
  checkpoint had been half overwritten).

The classes here are Tune's own, which after restoring themselves take the trials of the
snapshot Tune resumes (the newest ``experiment_state-*.json`` beside their own state) as the
truth: a finished trial is no longer running, and the trials created since their state was
saved are passed over, not created again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchGenerator

log = logging.getLogger(__name__)

FINISHED = ("TERMINATED", "ERROR")


def snapshot_trials(dirpath: str | Path) -> dict[str, str]:
    """``{trial id: status}`` of the newest experiment snapshot in ``dirpath`` (the one
    Tune resumes: the greatest name), or {} when there is none or it cannot be read."""
    files = sorted(Path(dirpath).glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        data = json.loads(files[-1].read_text())
        trials = [json.loads(state) for state, _ in data["trial_data"]]
        return {t["trial_id"]: t["status"] for t in trials}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("could not read the trials of %s to check the search's own state: %s", files[-1], exc)
        return {}


class ResumableVariants(BasicVariantGenerator):
    """Tune's random and grid search (``BasicVariantGenerator``), made consistent on resume
    with the trials Tune restores (see the module docstring)."""

    def restore_from_dir(self, dirpath: str) -> None:
        super().restore_from_dir(dirpath)
        trials = snapshot_trials(dirpath)
        if not trials:
            return
        # Trials the snapshot records that this state had not created yet: create them
        # now and drop them, so that the next trial is the one after them, not one again.
        made = self._iterators[0].counter if len(self._iterators) == 1 else None
        numbered = {t: _index(t, self._uuid_prefix) for t in trials}
        ahead = sorted(t for t, n in numbered.items() if made is not None and n >= made)
        if ahead:
            log.warning("the search's own state was older than its trials' (%s not created yet); "
                        "passing over them", ", ".join(ahead))
            self._trial_iter = self._trial_iter or iter(self._trial_generator)
            for _ in range(numbered[ahead[-1]] + 1 - made):
                try:
                    next(self._trial_iter)
                except StopIteration:
                    break
        live = {t for t, status in trials.items() if status not in FINISHED}
        if self._live_trials - live:
            log.warning("the search's own state counted finished trials as running (%s); they are not",
                        ", ".join(sorted(self._live_trials - live)))
        # Every unfinished trial of the snapshot is running again, or soon: Tune resumes it.
        self._live_trials = live


def _index(trial_id: str, prefix: str) -> int:
    """The number a BasicVariantGenerator gave ``trial_id`` (its prefix then ``%05d``);
    -1 for an id it did not make."""
    rest = trial_id[len(prefix):] if trial_id.startswith(prefix) else ""
    return int(rest) if rest.isdigit() else -1


class ResumableSearch(SearchGenerator):
    """Tune's wrapper of a ``Searcher`` (Optuna's, say) with its concurrency limit, made
    consistent on resume with the trials Tune restores (see the module docstring)."""

    def restore_from_dir(self, dirpath: str) -> None:
        super().restore_from_dir(dirpath)
        trials = snapshot_trials(dirpath)
        if not trials:
            return
        # Trials are made with random ids here: those created since the state was saved
        # cannot be made again, only counted, so the search makes no more than planned.
        self._counter = max(self._counter, len(trials))
        limiter = self.searcher
        if isinstance(limiter, ConcurrencyLimiter):
            ended = {t for t in limiter.live_trials if trials.get(t) in FINISHED}
            if ended:
                log.warning("the search's own state counted finished trials as running (%s); they are not",
                            ", ".join(sorted(ended)))
                # Only the limiter forgets them: the searcher below heard nothing of their end.
                limiter.live_trials -= ended
                limiter.num_unfinished_live_trials = len(limiter.live_trials)


def searcher(base, max_concurrent: int | None):
    """``base`` (a Tune ``Searcher``) as Tune would wrap it for ``max_concurrent_trials``,
    in :class:`ResumableSearch`; pass the Tuner no ``max_concurrent_trials`` beside it."""
    return ResumableSearch(ConcurrencyLimiter(base, max_concurrent=max_concurrent) if max_concurrent else base)
