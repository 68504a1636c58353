"""ASHA and learning-rate schedules (trainyard.tune.asha): the scheduler's decisions on the
results trials report, compared with Ray Tune's own ASHA on the same results. Pure logic
on Ray Tune's scheduler; no Ray is started."""

from __future__ import annotations

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from trainyard.train.loop import WARMUP_EPOCHS
from trainyard.tune.asha import ScheduleASHA

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def _asha(cls):
    scheduler = cls(time_attr="training_iteration", max_t=16, grace_period=1, reduction_factor=4)
    scheduler.set_search_properties("val_loss", "min")
    return scheduler


def _trials(scheduler, n: int, schedule: str | None = None) -> list:
    """``n`` trials added to ``scheduler``, with ``schedule`` as their train.scheduler value
    (None: the space does not vary it)."""
    trials = [Trial("__fake", stub=True, config={} if schedule is None else {"train.scheduler": schedule})
              for _ in range(n)]
    for trial in trials:
        scheduler.on_trial_add(None, trial)
    return trials


def _result(scheduler, trial, epoch: int, loss: float, warmup: float | None = None) -> str:
    result = {"training_iteration": epoch, "val_loss": loss}
    if warmup is not None:  # as the loop reports it for a schedule that warms up
        result[WARMUP_EPOCHS] = warmup
    return scheduler.on_trial_result(None, trial, result)


def test_a_one_cycle_trial_is_not_stopped_for_losing_to_trials_at_full_rate():
    ours, ray = _asha(ScheduleASHA), _asha(ASHAScheduler)
    for scheduler in (ours, ray):
        for trial, loss in zip(_trials(scheduler, 4, "none"), (0.30, 0.35, 0.40, 0.45)):
            _result(scheduler, trial, 1, loss)
        (scheduler.cycle,) = _trials(scheduler, 1, "onecycle")
    # At epoch 1 one-cycle trains at a fraction of its peak rate: Ray's ASHA stops it on
    # that loss; trainyard's compares it with one-cycle trials only (none yet).
    assert _result(ray, ray.cycle, 1, 0.60, warmup=4.8) == STOP
    assert _result(ours, ours.cycle, 1, 0.60, warmup=4.8) == CONTINUE
    # At its peak rate (epoch 5) its loss is up again: still among its own.
    assert _result(ours, ours.cycle, 4, 0.50, warmup=4.8) == CONTINUE


def test_trials_on_the_same_schedule_are_halved_among_themselves():
    scheduler = _asha(ScheduleASHA)
    cycles = _trials(scheduler, 6, "onecycle")
    for trial, loss in zip(cycles, (0.55, 0.60, 0.65, 0.70)):
        _result(scheduler, trial, 1, loss, warmup=4.8)
    worse, better = cycles[4:]
    # Below the top quarter of the one-cycle trials whose warmup also ends in epoch 5: stopped.
    assert _result(scheduler, worse, 1, 0.68, warmup=4.75) == STOP
    assert _result(scheduler, better, 1, 0.50, warmup=4.8) == CONTINUE
    # A one-cycle trial whose warmup ends in another epoch is at another point of its course.
    (short,) = _trials(scheduler, 1, "onecycle")
    assert _result(scheduler, short, 1, 0.68, warmup=2.0) == CONTINUE
    # And the constant-rate trials are halved among themselves, whatever one-cycle's losses.
    flat = _trials(scheduler, 5, "none")
    decisions = [_result(scheduler, t, 1, loss) for t, loss in zip(flat, (1.2, 1.05, 1.0, 0.95, 1.3))]
    assert decisions == [CONTINUE, CONTINUE, CONTINUE, CONTINUE, STOP]


def test_without_the_schedule_in_the_space_it_decides_as_ray_tunes_asha():
    decisions = {}
    for cls in (ScheduleASHA, ASHAScheduler):
        scheduler = _asha(cls)
        trials = _trials(scheduler, 5)
        made = [_result(scheduler, t, 1, loss) for t, loss in zip(trials, (0.3, 0.2, 0.5, 0.1, 0.6))]
        made += [_result(scheduler, t, 4, loss) for t, loss in zip(trials, (0.25, 0.15, 0.4, 0.05, 0.5))]
        made.append(_result(scheduler, trials[1], 16, 0.05))  # max_t ends it
        scheduler.on_trial_complete(None, trials[1], {"training_iteration": 16, "val_loss": 0.05})
        decisions[cls] = made
    assert decisions[ScheduleASHA] == decisions[ASHAScheduler]
    assert STOP in decisions[ScheduleASHA][:10] and decisions[ScheduleASHA][-1] == STOP


def test_the_config_chooses_trainyards_asha_or_ray_tunes(tmp_path):
    from trainyard.config import load_config
    from trainyard.errors import ConfigError
    from trainyard.tune.driver import _scheduler

    from tests.conftest import CONFIGS

    assert type(_scheduler(load_config(CONFIGS / "tune_mlp.yaml"), tmp_path)) is ScheduleASHA
    plain = _scheduler(load_config(CONFIGS / "tune_mlp.yaml", ["tune.asha_per_schedule=false"]), tmp_path)
    assert type(plain) is ASHAScheduler
    with pytest.raises(ConfigError, match="tune.asha_per_schedule"):
        load_config(CONFIGS / "tune_mlp.yaml", ["tune.asha_per_schedule=sometimes"])
