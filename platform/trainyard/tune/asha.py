"""ASHA that compares a trial only with the trials on the same learning-rate schedule.

Ray Tune's ASHA compares trials at fixed epochs (its rungs: the grace period, then times the
reduction factor). Where the search's space varies ``train.scheduler``, a trial's loss at a
rung says as much about where its schedule is in its course as about its values: at epoch 1
of 16 a one-cycle trial has only begun to climb from a twenty-fifth of its peak rate, and at
epoch 5 it is at its peak, while a constant-rate trial has been at full rate all along.
Ray's ASHA stopped every one-cycle trial at its first epoch on the sched benchmark, random
search's best configuration among them; with the warmup alone set aside, it stopped the
best one at its peak instead.

Here each schedule has its rungs of its own: the same successive halving, among trials at
the same point of the same course. A schedule is ``train.scheduler`` (a trial's value, where
the space varies it) and the epoch its warmup ends in (``warmup_epochs``, which the loop
reports with each epoch of a schedule that warms up, so that ``train.warmup_ratio`` or
``warmup_steps`` in the space splits them too). Continuous schedule values (``lr_gamma``,
``lr_step_epochs``) do not split them. The best of every schedule trains to the end, where
the search compares them all.
"""

from __future__ import annotations

import copy
import math

from ray.tune.schedulers import AsyncHyperBandScheduler

from trainyard.train.loop import WARMUP_EPOCHS

#: The space's key that picks a trial's learning-rate schedule.
SCHEDULE = "train.scheduler"


class ScheduleASHA(AsyncHyperBandScheduler):
    """Ray Tune's ASHA (one bracket, as trainyard runs it), with a bracket of its own for
    each learning-rate schedule. Ray's ASHA keeps each trial's bracket in ``_trial_info``
    (its one bracket, from ``on_trial_add``); a trial's first result moves it to its
    schedule's, and Ray's own code decides from there."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        #: Each schedule's bracket, by (train.scheduler, the epoch its warmup ends in).
        self._by_schedule: dict[tuple, object] = {}

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self._trial_info.get(trial.trial_id, self._brackets[0]) is self._brackets[0]:
            key = (str((trial.config or {}).get(SCHEDULE)), math.ceil(float(result.get(WARMUP_EPOCHS, 0.0)) - 1e-6))
            if key not in self._by_schedule:
                # Ray's bracket records nothing: every trial has left it by its first result.
                self._by_schedule[key] = copy.deepcopy(self._brackets[0])
            self._trial_info[trial.trial_id] = self._by_schedule[key]
        return super().on_trial_result(tune_controller, trial, result)
