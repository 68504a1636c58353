"""What changes over a run: the learning-rate schedule, and when to stop early.

Schedules come from transformers (cosine and linear decay after a linear warmup, as its
Trainer uses them) and PyTorch (one-cycle; step decay as a LambdaLR); they advance once per optimizer
step, and their state travels in the checkpoint so a resumed run continues the schedule.
"""

from __future__ import annotations

import math
import warnings
from typing import Any


def optimizer_steps(n: int, cfg: Any, world: int) -> int:
    """Optimizer steps in one epoch: one per global batch (accumulation splits a global batch
    into micro-batches, it does not add steps); the last batch is dropped, as
    ``epoch_batches`` drops it, when it has fewer examples than there are workers."""
    full, rest = divmod(n, cfg.train.batch_size)
    return full + (1 if rest and rest >= world else 0)


def warmup_steps(cfg: Any, total: int) -> int:
    t = cfg.train
    return t.warmup_steps or int(round(t.warmup_ratio * total))


def warmup_epochs(cfg: Any, steps_per_epoch: int) -> float:
    """How many epochs ``train.scheduler``'s learning rate rises for: its warmup (one-cycle:
    up to its peak, pct_start into the run); 0 with no warmup."""
    t = cfg.train
    if t.scheduler == "none":
        return 0
    steps = max(1, steps_per_epoch)
    total = steps * t.epochs
    if t.scheduler == "onecycle":
        return _onecycle_pct(cfg, total) * t.epochs
    return warmup_steps(cfg, total) / steps


def _onecycle_pct(cfg: Any, total: int) -> float:
    # OneCycleLR warms up over pct_start of the run (its own default: 0.3).
    warmup = warmup_steps(cfg, total)
    return min(max(warmup / total if warmup else 0.3, 1e-6), 0.999)


def make_scheduler(cfg: Any, optimizer: Any, steps_per_epoch: int) -> Any:
    """The ``train.scheduler`` schedule over the whole run's optimizer steps; None for none."""
    t = cfg.train
    if t.scheduler == "none":
        return None
    import torch.optim.lr_scheduler as lrs

    total = max(1, steps_per_epoch * t.epochs)
    warmup = warmup_steps(cfg, total)
    if t.scheduler in ("cosine", "linear"):
        from transformers import get_scheduler

        return get_scheduler(t.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    if t.scheduler == "onecycle":
        return lrs.OneCycleLR(optimizer, max_lr=t.lr, total_steps=total, pct_start=_onecycle_pct(cfg, total))
    return lrs.LambdaLR(optimizer, _StepDecay(warmup, max(1, t.lr_step_epochs * steps_per_epoch), t.lr_gamma))


class _StepDecay:
    """Linear warmup, then times ``gamma`` every ``every`` steps: a closed form of the step
    count, so a restored schedule needs nothing but its step count (PyTorch's chained
    StepLR after LinearLR would build on the optimizer's current rate instead)."""

    def __init__(self, warmup: int, every: int, gamma: float):
        self.warmup, self.every, self.gamma = warmup, every, gamma

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        return self.gamma ** ((step - self.warmup) // self.every)


class EarlyStopping:
    """Stop when the monitored metric has not improved by more than ``min_delta`` for
    ``patience`` epochs. Its state is saved with each checkpoint, so resuming keeps count."""

    def __init__(self, patience: int, min_delta: float, mode: str):
        self.patience, self.min_delta, self.mode = patience, min_delta, mode
        self.best: float | None = None
        self.bad_epochs = 0

    def update(self, value: float) -> bool:
        """Record an epoch's value; True when the run should stop now."""
        if math.isnan(value):
            improved = False
        elif self.best is None:
            improved = True
        elif self.mode == "max":
            improved = value > self.best + self.min_delta
        else:
            improved = value < self.best - self.min_delta
        if improved:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load(self, state: dict | None) -> None:
        if state:
            self.best, self.bad_epochs = state.get("best"), int(state.get("bad_epochs", 0))


def apply_hyperparameters(cfg: Any, optimizer: Any, scheduler: Any) -> None:
    """Make the optimizer train with ``cfg``'s learning rate, weight decay and momentum
    once it has loaded a checkpoint's state (which brings back the values it was saved
    with): a PBT exploit restores another trial's checkpoint under new values. With a
    schedule, ``train.lr`` is its base (one-cycle: its peak) and the rate in effect is
    the schedule's at its restored step; a plain resume changes nothing."""
    import torch.optim.lr_scheduler as lrs

    t = cfg.train
    groups = optimizer.param_groups
    for group in groups:
        if "weight_decay" in group:
            group["weight_decay"] = t.weight_decay
        if t.optimizer == "sgd" and "momentum" in group and not isinstance(scheduler, lrs.OneCycleLR):
            group["momentum"] = t.momentum  # one-cycle cycles the momentum itself
    if scheduler is None:
        for group in groups:
            group["lr"] = t.lr
        return
    if isinstance(scheduler, lrs.OneCycleLR):
        for group in groups:  # initial and final rates are fixed fractions of the peak
            ratio = t.lr / group["max_lr"] if group["max_lr"] else 1.0
            for key in ("max_lr", "initial_lr", "min_lr"):
                group[key] *= ratio
        scheduler.base_lrs = [group["initial_lr"] for group in groups]
    else:  # LambdaLR: the transformers schedules and the step decay
        for group in groups:
            group["initial_lr"] = t.lr
        scheduler.base_lrs = [t.lr for _ in groups]
    if scheduler.last_epoch > getattr(scheduler, "total_steps", math.inf):
        return  # a finished one-cycle run has no rate to compute
    with warnings.catch_warnings():  # get_lr outside step() warns; it is what step() sets
        warnings.simplefilter("ignore")
        rates = scheduler.get_lr()
    for group, rate in zip(groups, rates):
        group["lr"] = rate
    scheduler._last_lr = [group["lr"] for group in groups]
