"""A search resumed from a torn snapshot: the search algorithm's state older than its trials'
(trainyard.tune.resume). Pure logic on Tune's own search algorithms; no Ray is started."""

from __future__ import annotations

import json

import pytest
from ray import tune
from ray.tune.experiment import Experiment
from ray.tune.search import BasicVariantGenerator

from trainyard.tune.resume import ResumableSearch, ResumableVariants, searcher, snapshot_trials


def _trainable(config):
    return None


def _grid(cls):
    search = cls(max_concurrent=1, random_state=0)
    search.add_configurations([Experiment("grid", run=_trainable, config={"lr": tune.grid_search([1, 2, 3])})])
    return search


def _snapshot(folder, statuses: dict[str, str]) -> None:
    """An experiment snapshot as Tune writes it: each trial's JSON state and its run metadata."""
    trial_data = [[json.dumps({"trial_id": t, "status": s, "config": {}}), "{}"] for t, s in statuses.items()]
    (folder / "experiment_state-2026-11-27_00-00-00.json").write_text(json.dumps({"trial_data": trial_data}))


@pytest.fixture
def saved(tmp_path):
    """A grid search's state saved with its first trial running (the only one allowed)."""
    search = _grid(ResumableVariants)
    first = search.next_trial()
    search.save_to_dir(str(tmp_path), "2026-11-27_00-00-00")
    return tmp_path, first.trial_id, first.trial_id[:-5]


def test_a_trial_the_snapshot_records_as_finished_no_longer_holds_the_only_slot(saved):
    folder, first, prefix = saved
    _snapshot(folder, {first: "TERMINATED"})
    tunes = _grid(BasicVariantGenerator)
    tunes.restore_from_dir(str(folder))
    assert tunes.next_trial() is None  # Tune's own: waits for that trial's end, forever

    ours = _grid(ResumableVariants)
    ours.restore_from_dir(str(folder))
    following = ours.next_trial()
    assert (following.trial_id, following.config) == (f"{prefix}00001", {"lr": 2})


def test_a_trial_the_snapshot_records_but_the_state_had_not_made_is_not_made_again(saved):
    folder, first, prefix = saved
    _snapshot(folder, {first: "TERMINATED", f"{prefix}00001": "RUNNING"})
    tunes = _grid(BasicVariantGenerator)
    tunes.restore_from_dir(str(folder))
    tunes.on_trial_complete(first)  # as if it had heard of that end: it makes 00001 again
    again = tunes.next_trial()
    assert (again.trial_id, again.config) == (f"{prefix}00001", {"lr": 2})  # Tune's own: twice

    ours = _grid(ResumableVariants)
    ours.restore_from_dir(str(folder))
    assert ours.next_trial() is None  # the restored 00001 holds the slot
    ours.on_trial_complete(f"{prefix}00001")
    last = ours.next_trial()
    assert (last.trial_id, last.config) == (f"{prefix}00002", {"lr": 3})
    ours.on_trial_complete(last.trial_id)
    assert ours.next_trial() is None and ours.is_finished()  # three in all


def test_a_consistent_snapshot_resumes_as_tune_does(saved):
    folder, first, prefix = saved
    _snapshot(folder, {first: "RUNNING"})
    ours = _grid(ResumableVariants)
    ours.restore_from_dir(str(folder))
    assert ours.next_trial() is None
    ours.on_trial_complete(first)
    assert ours.next_trial().trial_id == f"{prefix}00001"


def test_an_optuna_search_forgets_a_finished_trial_and_makes_no_more_than_planned(tmp_path):
    pytest.importorskip("optuna")
    from ray.tune.search.optuna import OptunaSearch

    def make() -> ResumableSearch:
        search = searcher(OptunaSearch(metric="score", mode="max", seed=0), 1)
        space = {"lr": tune.uniform(0.1, 1.0)}
        search.set_search_properties("score", "max", space)
        search.add_configurations([Experiment("tpe", run=_trainable, config=space, num_samples=3)])
        return search

    search = make()
    first = search.next_trial()
    search.save_to_dir(str(tmp_path), "2026-11-27_00-00-00")
    _snapshot(tmp_path, {first.trial_id: "TERMINATED", "made-since": "TERMINATED"})
    resumed = make()
    resumed.restore_from_dir(str(tmp_path))
    third = resumed.next_trial()
    assert third is not None and third.trial_id not in (first.trial_id, "made-since")
    resumed.on_trial_complete(third.trial_id, result={"score": 1.0})
    assert resumed.next_trial() is None and resumed.is_finished()  # three in all


def test_an_unreadable_snapshot_leaves_the_state_as_tune_restored_it(saved):
    folder, first, _ = saved
    (folder / "experiment_state-2026-11-27_00-00-00.json").write_text("{not json")
    assert snapshot_trials(folder) == {}
    ours = _grid(ResumableVariants)
    ours.restore_from_dir(str(folder))
    assert ours.next_trial() is None  # as Tune's own: the first trial still holds the slot


def test_a_trials_last_result_in_the_snapshot_counts_when_its_own_files_are_short(tmp_path):
    """A driver killed before a finished trial's last upload: its progress.csv in storage
    stops at epoch 5, Tune's snapshot has its epoch 6. The summary says 6 epochs, finished."""
    import pandas as pd
    from ray.tune import Result

    from trainyard.tune.driver import _collect

    rows = [{"training_iteration": i, "val_accuracy": 0.9 + i / 100, "train_loss": 1.0 / i} for i in range(1, 6)]
    last = {"training_iteration": 6, "val_accuracy": 0.97, "train_loss": 0.1, "config": {"train.lr": 0.001}}
    short = Result(metrics=last, checkpoint=None, error=None, path=str(tmp_path / "t_00000"),
                   metrics_dataframe=pd.DataFrame(rows))
    whole = Result(metrics=rows[-1], checkpoint=None, error=None, path=str(tmp_path / "t_00001"),
                   metrics_dataframe=pd.DataFrame(rows))
    first, second = _collect([short, whole], "val_accuracy", "max", ["train.lr"], max_t=6)
    assert (first["state"], first["iterations"], first["best"]) == ("TERMINATED", 6, 0.97)
    assert [h["iteration"] for h in first["history"]] == [1, 2, 3, 4, 5, 6]
    assert (second["state"], second["iterations"]) == ("STOPPED", 5)  # nothing newer: as it was
