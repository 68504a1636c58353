"""ASHA and a trial whose learning rate warms up (trainyard.tune.asha): the scheduler's
decisions on the results a trial reports, and the loop's warming_up flag they rest on.
Pure logic on Ray Tune's own scheduler; no Ray is started."""

from __future__ import annotations

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from trainyard.train.loop import WARMING_UP, WARMUP_EPOCHS
from trainyard.tune.asha import WarmupASHA

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def _asha(cls):
    scheduler = cls(time_attr="training_iteration", max_t=16, grace_period=1, reduction_factor=4)
    scheduler.set_search_properties("val_loss", "min")
    return scheduler


def _result(scheduler, trial, epoch: int, loss: float, warming: bool | None = None, length: float = 4.8) -> str:
    result = {"training_iteration": epoch, "val_loss": loss}
    if warming is not None:  # as the loop reports them (length: the warmup's epochs)
        result[WARMING_UP], result[WARMUP_EPOCHS] = warming, length
    return scheduler.on_trial_result(None, trial, result)


def _trials(scheduler, n: int) -> list:
    trials = [Trial("__fake", stub=True) for _ in range(n)]
    for trial in trials:
        scheduler.on_trial_add(None, trial)
    return trials


def _rungs(scheduler, trial) -> dict[int, bool]:
    """Whether each rung (its epoch) has recorded ``trial``."""
    return {milestone: trial.trial_id in recorded for milestone, recorded in scheduler._trial_info[trial.trial_id]._rungs}


def test_a_warming_trial_is_not_stopped_at_a_rung_it_reaches_in_its_warmup():
    warm, plain = _asha(WarmupASHA), _asha(ASHAScheduler)
    for scheduler in (warm, plain):
        *full, slow = _trials(scheduler, 5)
        for trial, loss in zip(full, (0.30, 0.35, 0.40, 0.45)):  # at full rate from the start
            _result(scheduler, trial, 1, loss)
        scheduler.slow = slow
    # Ray Tune's ASHA stops the warming trial at its first epoch, on a loss it reached at a
    # fraction of its learning rate; trainyard's does not compare it with the trials at full
    # rate, and records nothing in their rungs.
    assert _result(plain, plain.slow, 1, 0.60, warming=True) == STOP
    assert _result(warm, warm.slow, 1, 0.60, warming=True) == CONTINUE
    assert not any(_rungs(warm, warm.slow).values())
    for epoch in (2, 3, 4):
        assert _result(warm, warm.slow, epoch, 0.5, warming=True) == CONTINUE


def test_trials_in_the_same_warmup_are_halved_among_themselves():
    scheduler = _asha(WarmupASHA)
    *warming, worse, better, other = _trials(scheduler, 7)
    for trial, loss in zip(warming, (0.55, 0.60, 0.65, 0.70)):
        _result(scheduler, trial, 1, loss, warming=True, length=4.8)
    # Below the top quarter of the trials whose warmup also ends in epoch 5: stopped.
    assert _result(scheduler, worse, 1, 0.68, warming=True, length=4.75) == STOP
    assert _result(scheduler, better, 1, 0.50, warming=True, length=4.8) == CONTINUE
    # A trial whose warmup ends in another epoch is not at the same point of its rise.
    assert _result(scheduler, other, 1, 0.68, warming=True, length=2.0) == CONTINUE


def test_after_its_warmup_a_trial_is_judged_at_the_highest_rung_it_passed():
    scheduler = _asha(WarmupASHA)
    *full, good, bad = _trials(scheduler, 6)
    for trial, loss in zip(full, (0.30, 0.35, 0.40, 0.45)):
        assert _result(scheduler, trial, 1, loss) in (CONTINUE, STOP)
    for trial, loss in zip(full, (0.20, 0.25, 0.22, 0.24)):  # the rung at epoch 4
        _result(scheduler, trial, 4, loss)
    for trial in (good, bad):
        for epoch in (1, 2, 3, 4):
            assert _result(scheduler, trial, epoch, 0.6, warming=True) == CONTINUE
    # Its warmup over at epoch 5, each is compared with what the others had at epoch 4 (the
    # rung it passed), not at epoch 1: the better one goes on, the worse one stops there.
    assert _result(scheduler, good, 5, 0.10, warming=False) == CONTINUE
    assert _result(scheduler, bad, 5, 0.50, warming=False) == STOP
    assert _rungs(scheduler, good) == {16: False, 4: True, 1: False}
    # From then on the trial is a trial like any other: judged at the next rung when it gets there.
    assert _result(scheduler, good, 6, 0.09) == CONTINUE


def test_a_trial_without_a_warmup_and_the_last_epoch_are_judged_as_by_ray_tunes_asha():
    warm, plain = _asha(WarmupASHA), _asha(ASHAScheduler)
    decisions = {}
    for name, scheduler in (("warm", warm), ("plain", plain)):
        trials = _trials(scheduler, 5)
        decisions[name] = [_result(scheduler, t, 1, loss) for t, loss in zip(trials, (0.3, 0.2, 0.5, 0.1, 0.6))]
        decisions[name].append(_result(scheduler, trials[1], 16, 0.05, warming=True))  # max_t ends it
    assert decisions["warm"] == decisions["plain"]
    assert STOP in decisions["warm"][:5] and decisions["warm"][-1] == STOP


def test_the_config_chooses_trainyards_asha_or_ray_tunes(tmp_path):
    from trainyard.config import load_config
    from trainyard.errors import ConfigError
    from trainyard.tune.driver import _scheduler

    from tests.conftest import CONFIGS

    assert type(_scheduler(load_config(CONFIGS / "tune_mlp.yaml"), tmp_path)) is WarmupASHA
    plain = _scheduler(load_config(CONFIGS / "tune_mlp.yaml", ["tune.grace_warmup=false"]), tmp_path)
    assert type(plain) is ASHAScheduler
    with pytest.raises(ConfigError, match="tune.grace_warmup"):
        load_config(CONFIGS / "tune_mlp.yaml", ["tune.grace_warmup=sometimes"])
