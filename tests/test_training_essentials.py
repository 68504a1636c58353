"""Learning-rate schedules, gradient accumulation and early stopping: the schedule and stop
logic alone, and the real training loop run in this process through its Session seam
(the same loop a Ray Train worker runs; see test_training.py for it on Ray)."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from trainyard.config import load_config
from trainyard.errors import ConfigError
from trainyard.train.loop import WARMUP_EPOCHS, run_loop
from trainyard.train.schedule import EarlyStopping, make_scheduler, optimizer_steps
from trainyard.tune.space import validate_space

from tests.conftest import CONFIGS


def _cfg(*overrides: str):
    return load_config(CONFIGS / "mlp_breast_cancer.yaml", ["scaling.num_workers=1", *overrides])


def _lrs(cfg, steps_per_epoch: int) -> list[float]:
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
    sched = make_scheduler(cfg, opt, steps_per_epoch)
    seen = []
    for _ in range(steps_per_epoch * cfg.train.epochs):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


def test_no_schedule_is_none_and_steps_count_global_batches():
    cfg = _cfg("train.batch_size=10")
    assert make_scheduler(cfg, torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1), 5) is None
    assert optimizer_steps(95, cfg, world=1) == 10  # 9 full batches and one of 5
    assert optimizer_steps(91, cfg, world=2) == 9  # a last batch of 1 < 2 workers is dropped


def test_cosine_with_warmup_rises_then_decays_to_zero():
    lrs = _lrs(_cfg("train.scheduler=cosine", "train.lr=0.1", "train.epochs=2", "train.warmup_steps=4"), 10)
    assert lrs[0] == 0.0 and lrs[4] == pytest.approx(0.1)  # linear warmup over 4 steps
    assert all(a <= b for a, b in zip(lrs[:5], lrs[1:5]))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # then only down
    assert lrs[-1] < 0.01


def test_linear_warmup_ratio_step_and_onecycle_follow_their_shapes():
    linear = _lrs(_cfg("train.scheduler=linear", "train.lr=0.1", "train.epochs=2", "train.warmup_ratio=0.1"), 10)
    assert linear[2] == pytest.approx(0.1) and linear[11] == pytest.approx(0.1 * 9 / 18)
    step = _lrs(_cfg("train.scheduler=step", "train.lr=0.1", "train.epochs=3", "train.lr_gamma=0.5"), 4)
    assert step[:4] == [pytest.approx(0.1)] * 4 and step[4:8] == [pytest.approx(0.05)] * 4
    assert step[8] == pytest.approx(0.025)
    cycle = _lrs(_cfg("train.scheduler=onecycle", "train.lr=0.1", "train.epochs=2"), 10)
    peak = max(range(len(cycle)), key=cycle.__getitem__)
    assert cycle[peak] == pytest.approx(0.1, rel=1e-3) and 0 < peak < len(cycle) - 1
    assert cycle[0] < 0.01 and cycle[-1] < 0.001


def test_a_schedules_state_round_trips_as_a_weights_only_file(tmp_path):
    for kind in ("cosine", "linear", "step", "onecycle"):
        cfg = _cfg(f"train.scheduler={kind}", "train.lr=0.1", "train.epochs=3", "train.warmup_steps=2")
        opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
        sched = make_scheduler(cfg, opt, 5)
        for _ in range(7):
            opt.step()
            sched.step()
        torch.save(sched.state_dict(), tmp_path / "s.pt")
        opt2 = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
        opt2.load_state_dict(opt.state_dict())
        again = make_scheduler(cfg, opt2, 5)
        again.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
        opt.step(), sched.step(), opt2.step(), again.step()
        assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"]), kind


def test_early_stopping_counts_epochs_without_a_real_improvement():
    stop = EarlyStopping(patience=2, min_delta=0.01, mode="max")
    assert [stop.update(v) for v in (0.5, 0.505, 0.7, 0.705, 0.70)] == [False, False, False, False, True]
    assert stop.best == 0.7
    again = EarlyStopping(2, 0.01, "max")
    again.load(json.loads(json.dumps(stop.state())))
    assert again.best == 0.7 and again.bad_epochs == 2
    down = EarlyStopping(1, 0.0, "min")
    assert [down.update(v) for v in (1.0, 0.9, float("nan"))] == [False, False, True]


@pytest.mark.parametrize(("override", "key"), [
    ("train.scheduler=exponential", "train.scheduler"), ("train.grad_accum_steps=0", "train.grad_accum_steps"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio"), ("train.patience=-1", "train.patience"),
    ("train.lr_gamma=0", "train.lr_gamma"),
])
def test_bad_schedule_accumulation_and_patience_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        _cfg(override)
    with pytest.raises(ConfigError, match=r"scaling.num_workers x train.grad_accum_steps"):
        _cfg("train.batch_size=3", "train.grad_accum_steps=4")


def test_the_schedule_and_patience_are_tunable_like_any_key():
    cfg = load_config(CONFIGS / "tune_mlp.yaml", [])
    cfg.tune.space = OmegaConf.create({
        "train.scheduler": {"type": "choice", "values": ["none", "cosine"]},
        "train.warmup_ratio": {"type": "uniform", "low": 0.0, "high": 0.2},
        "train.grad_accum_steps": {"type": "choice", "values": [1, 2]},
    })
    assert validate_space(cfg)["train.scheduler"] == ["none", "cosine"]
    cfg.tune.space = OmegaConf.create({"train.scheduler": {"type": "choice", "values": ["none", "bogus"]}})
    with pytest.raises(ConfigError, match=r"tune.space.train.scheduler: value 'bogus'"):
        validate_space(cfg)


# --------------------------------------------------------------------------------------
# The real loop, in this process
# --------------------------------------------------------------------------------------


class LocalSession:
    """The loop's Session for one process: reports kept in memory, checkpoints copied to
    folders, and an optional checkpoint to start from."""

    rank, world = 0, 1

    def __init__(self, folder: Path, start_from: Path | None = None):
        self.folder, self.start_from = folder, start_from
        self.reports: list[dict] = []
        self.checkpoints: list[Path] = []

    def device(self):
        return torch.device("cpu")

    def prepare_model(self, model, device):
        return model

    def stop_requested(self) -> bool:
        return False

    def get_checkpoint(self):
        if self.start_from is None:
            return None
        path = self.start_from

        class Local:
            @contextlib.contextmanager
            def as_directory(self):
                yield str(path)

        return Local()

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir:
            dest = self.folder / f"checkpoint_{len(self.checkpoints)}"
            shutil.copytree(checkpoint_dir, dest)
            self.checkpoints.append(dest)


def _loop(cfg, folder: Path, start_from: Path | None = None) -> LocalSession:
    session = LocalSession(folder, start_from)
    folder.mkdir(parents=True, exist_ok=True)
    run_loop({"config": OmegaConf.to_container(cfg, resolve=True)}, session)
    return session


def test_early_stopping_ends_the_run_and_its_count_survives_a_resume(tmp_path):
    # A min_delta no epoch can beat: patience 2 stops after epoch 3 (index 2).
    cfg = _cfg("train.epochs=8", "train.patience=2", "train.min_delta=10", "train.monitor=accuracy")
    run = _loop(cfg, tmp_path / "a")
    assert [r["epoch"] for r in run.reports] == [0, 1, 2]
    state = json.loads((run.checkpoints[1] / "trainer_state.json").read_text())
    assert state["early_stopping"]["bad_epochs"] == 1
    resumed = _loop(cfg, tmp_path / "b", start_from=run.checkpoints[1])
    assert [r["epoch"] for r in resumed.reports] == [2]  # one more epoch without improvement


def test_a_resumed_run_continues_its_schedule(tmp_path):
    cfg = _cfg("train.epochs=4", "train.scheduler=cosine", "train.warmup_ratio=0.25", "train.lr=0.01")
    straight = _loop(cfg, tmp_path / "straight")
    assert (straight.checkpoints[1] / "scheduler.pt").is_file()
    resumed = _loop(cfg, tmp_path / "resumed", start_from=straight.checkpoints[1])
    assert [r["epoch"] for r in resumed.reports] == [2, 3]
    for a, b in zip(straight.reports[2:], resumed.reports, strict=True):
        assert b["lr"] == pytest.approx(a["lr"])
        assert b["val_accuracy"] == pytest.approx(a["val_accuracy"], abs=1e-6)
    lrs = [r["lr"] for r in straight.reports]
    assert lrs[-1] < lrs[1]  # it decayed


def test_accumulation_in_one_process_matches_no_accumulation(tmp_path):
    common = ["train.epochs=2", "train.batch_size=32"]
    plain = _loop(_cfg(*common), tmp_path / "plain")
    accum = _loop(_cfg(*common, "train.grad_accum_steps=4"), tmp_path / "accum")
    for a, b in zip(plain.reports, accum.reports, strict=True):
        for key in ("val_loss", "val_accuracy", "train_loss"):
            assert b[key] == pytest.approx(a[key], abs=2e-3), key


def test_the_plateau_stopper_is_ray_tunes_with_the_configs_numbers():
    from ray.tune.stopper import TrialPlateauStopper

    from trainyard.tune.driver import _stopper

    cfg = load_config(CONFIGS / "tune_mlp.yaml", ["tune.stopper=plateau", "tune.plateau_epochs=4",
                                                  "tune.plateau_std=0.002"])
    stopper = _stopper(cfg, "val_accuracy")
    assert isinstance(stopper, TrialPlateauStopper)
    assert (stopper._metric, stopper._std, stopper._num_results) == ("val_accuracy", 0.002, 4)
    # Four equal results in a row: the trial has plateaued and is stopped; a moving one is not.
    flat = [stopper("t1", {"val_accuracy": 0.9, "training_iteration": i}) for i in range(1, 6)]
    assert bool(flat[-1]) is True
    moving = [stopper("t2", {"val_accuracy": 0.1 * i, "training_iteration": i}) for i in range(1, 6)]
    assert not any(moving)
    assert _stopper(load_config(CONFIGS / "tune_mlp.yaml", []), "val_accuracy") is None
    with pytest.raises(ConfigError, match=r"^tune.stopper: must be one of none, plateau"):
        load_config(CONFIGS / "tune_mlp.yaml", ["tune.stopper=median"])


def test_a_run_whose_rate_warms_up_reports_the_warmups_length_in_epochs(tmp_path):
    # One-cycle peaks 30% into the run: 1.5 of 5 epochs.
    cycle = _loop(_cfg("train.epochs=5", "train.scheduler=onecycle", "train.lr=0.01"), tmp_path / "cycle")
    assert [r[WARMUP_EPOCHS] for r in cycle.reports] == [pytest.approx(1.5)] * 5
    lrs = [r["lr"] for r in cycle.reports]
    assert lrs[0] < lrs[1] > lrs[-1]  # it rose through the warmup, then fell
    cosine = _loop(_cfg("train.epochs=4", "train.scheduler=cosine", "train.warmup_ratio=0.5", "train.lr=0.01"),
                   tmp_path / "cosine")
    assert [r[WARMUP_EPOCHS] for r in cosine.reports] == [pytest.approx(2.0)] * 4
    for i, plain in enumerate((_cfg("train.epochs=2"), _cfg("train.epochs=2", "train.scheduler=cosine"))):
        assert all(WARMUP_EPOCHS not in r for r in _loop(plain, tmp_path / f"plain{i}").reports)
