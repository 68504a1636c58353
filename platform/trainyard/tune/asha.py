"""ASHA that compares a trial in its learning-rate warmup only with trials at the same point
of the same warmup.

Ray Tune's ASHA compares trials at fixed epochs (its rungs: the grace period, then times the
reduction factor). A trial whose schedule warms its learning rate up (one-cycle, or any
``train.warmup_steps``/``warmup_ratio``) is still training at a fraction of its rate at the
first rungs, and loses there to trials at full rate whatever it would reach: a search with
one-cycle in its space stopped every one-cycle trial at its first epoch, the search's best
configuration among them.

trainyard's loop reports, with each epoch of such a trial, ``warming_up`` (whether its warmup
goes on after this epoch) and ``warmup_epochs`` (how many epochs the warmup lasts). Here a
rung reached while warming up compares the trial with the trials at that rung whose warmup
ends in the same epoch, which are at about the same point of their rate's rise: the same
successive halving, among like trials. Once its warmup has ended, the trial is judged with
all trials, at the highest rung it has passed.
"""

from __future__ import annotations

import copy
import math

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from trainyard.train.loop import WARMING_UP, WARMUP_EPOCHS


class WarmupASHA(AsyncHyperBandScheduler):
    """Ray Tune's ASHA, with rungs of their own for trials warming their learning rate up."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._blank = copy.deepcopy(self._brackets[0])  # rungs with nothing recorded
        #: The rungs of the trials warming up, by the epoch their warmup ends in.
        self._warming: dict[int, object] = {}

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        time, metric = result.get(self._time_attr), result.get(self._metric)
        if not result.get(WARMING_UP) or time is None or metric is None or time >= self._max_t:
            return super().on_trial_result(tune_controller, trial, result)
        ends = math.ceil(float(result.get(WARMUP_EPOCHS, 0.0)) - 1e-6)
        rungs = self._warming.setdefault(ends, copy.deepcopy(self._blank))
        action = rungs.on_result(trial, time, self._metric_op * metric)
        if action == TrialScheduler.STOP:
            self._num_stopped += 1
        return action
