"""tune.time_budget_s on a real local Ray Tune: the search ends within the budget (plus the
epoch in flight and a fixed allowance), exports the winners found so far and says the
budget ended it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONFIGS
from trainyard.config import load_config
from trainyard.errors import ConfigError

#: Long enough for the first trial's actor to start and train some epochs on a 2-core machine
#: running this suite (its start took 4 s with the machine to itself, up to 35 s here with
#: other jobs on it); far short of the whole search (4 trials x 5000 epochs at 0.04-0.5 s an
#: epoch: at 200 epochs, trials grown faster finished all four within the budget once).
BUDGET_S = 30.0
#: Tune's clock starts at the search's first step, after its start-up: checking the config,
#: building the Tuner, registering the trainable and laying out the run folder. Measured
#: 2-5 s on an idle 2-core machine and 27 s on one loaded ~10 by other jobs; 40 s covers
#: the latter.
START_S = 40.0
#: After the budget ends: Tune stops the running trial (the epoch in flight is lost, which
#: the one-epoch term covers), takes its last snapshot, then the winners are exported and
#: trainyard_trials.json written. Measured under 1 s; 10 s leaves room.
TEARDOWN_S = 10.0


def test_a_bad_budget_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"^tune.time_budget_s: must be positive or null"):
        load_config(CONFIGS / "tune_mlp.yaml", ["tune.time_budget_s=0"])


@pytest.mark.usefixtures("ray_cluster")
def test_the_budget_ends_the_search_exports_the_winners_so_far_and_says_so(tmp_path):
    from trainyard.tune.driver import run_tuning
    from trainyard.tune.records import budget_ended, read_history

    raw = OmegaConf.to_container(OmegaConf.load(CONFIGS / "tune_mlp.yaml"))
    raw.update(name="budget", storage_path=str(tmp_path / "runs"))
    raw["tune"].update(registry=str(tmp_path / "winners"), scheduler="none", num_samples=4,
                       max_concurrent_trials=1, time_budget_s=BUDGET_S, top_k=2)
    cfg = load_config(base=raw, overrides=["train.epochs=5000"])
    started = time.time()
    outcome = run_tuning(cfg)
    ended = time.time()

    run_dir = Path(outcome.run_dir)
    history = read_history(run_dir)
    assert any(history.values()), "no trial finished an epoch within the budget"
    # One epoch's time: a trial's first result also holds its start-up, so the others
    # are the epochs (a trial that reported once gives its one result).
    epochs = [r["time_this_iter_s"] for rows in history.values() for r in (rows[1:] or rows)]
    epoch_s = max(epochs)
    mark = budget_ended(run_dir)
    assert mark is not None
    # Tune's clock ran the whole budget, not less; the search ended within the budget plus
    # the epoch in flight (and the teardown), and run_tuning within that plus its start-up.
    assert BUDGET_S <= mark["ended"] - mark["started"] <= BUDGET_S + 1.0
    assert ended - mark["started"] <= BUDGET_S + epoch_s + TEARDOWN_S
    assert ended - started <= START_S + BUDGET_S + epoch_s + TEARDOWN_S
    print(f"\nbudget {BUDGET_S:g}s: run_tuning took {ended - started:.1f}s: start-up "
          f"{mark['started'] - started:.1f}s, budget {mark['ended'] - mark['started']:.1f}s, "
          f"after it {ended - mark['ended']:.1f}s; longest epoch {epoch_s:.2f}s")

    # The search was cut short: not every trial ran all its epochs.
    assert sum(t["state"] == "TERMINATED" for t in outcome.trials) < 4
    assert any(t["state"] in ("STOPPED", "PENDING") for t in outcome.trials)
    # The winners found so far are exported, best first, from what the trials reported.
    assert outcome.winners and outcome.winners[0]["rank"] == 1
    bests = [t["best"] for t in outcome.trials if t["best"] is not None]
    assert outcome.winners[0]["value"] == max(bests)
    assert Path(outcome.winners[0]["path"], "model.safetensors").is_file()
    # And the run says the budget ended it.
    assert outcome.stopped_by == "time_budget"
    assert outcome.stop_message.startswith(f"the time budget (tune.time_budget_s={BUDGET_S:g}s) ended the search: ")
    assert "of 4 trials ran to their end" in outcome.stop_message
    summary = json.loads((run_dir / "trainyard_trials.json").read_text())
    assert summary["stopped_by"] == "time_budget" and summary["stop_message"] == outcome.stop_message


def test_a_search_the_budget_ended_is_not_resumed_and_keeps_its_record(tmp_path):
    """Its budget counts over resumes, so it is spent: a resume says so before Ray starts,
    and the run's records (the budget's mark, the winners) stay as they were."""
    from trainyard.tune.driver import _search
    from trainyard.tune.records import BUDGET_MARK

    raw = OmegaConf.to_container(OmegaConf.load(CONFIGS / "tune_mlp.yaml"))
    raw.update(name="spent", storage_path=str(tmp_path / "runs"))
    raw["tune"].update(registry=str(tmp_path / "winners"), time_budget_s=30)
    cfg = load_config(base=raw)
    run_dir = tmp_path / "runs" / "spent"
    run_dir.mkdir(parents=True)
    (run_dir / "trainyard_tune.yaml").write_text(OmegaConf.to_yaml(cfg))
    _search(None, str(run_dir))  # no mark: the budget did not end it, so it resumes
    mark = json.dumps({"budget_s": 30, "started": 1.0, "ended": 31.0})
    (run_dir / BUDGET_MARK).write_text(mark)
    with pytest.raises(ConfigError, match=rf"^tune.time_budget_s: the time budget \(30 s\) already ended the "
                                          rf"search in {run_dir}, and it counts over resumes"):
        _search(None, str(run_dir))
    assert (run_dir / BUDGET_MARK).read_text() == mark
    # One that ran to its end has nothing left either (a resume exported the same winners
    # again as a new version); one Ctrl-C cut short resumes.
    (run_dir / BUDGET_MARK).unlink()
    planned = [{"trial_id": str(i), "state": "TERMINATED"} for i in range(cfg.tune.num_samples)]
    for stopped_by, trials, refused in ((None, planned, True), ("interrupted", planned, False),
                                        (None, planned[1:], False)):  # an older version's Ctrl-C
        (run_dir / "trainyard_trials.json").write_text(json.dumps({"trials": trials, "stopped_by": stopped_by}))
        if refused:
            with pytest.raises(ConfigError, match=rf"^--resume: the search in {run_dir} already ran to its end"):
                _search(None, str(run_dir))
        else:
            _search(None, str(run_dir))
