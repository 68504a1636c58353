"""Hyperparameter search on a real local Ray Tune: winners, grid, ASHA, errors, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CONFIGS
from trainyard.checkpoint import load_predictor
from trainyard.config import load_config, resolve
from trainyard.errors import TrainingError
from trainyard.train.data import prepare_data
from trainyard.tune.driver import run_tuning, trains_on

pytestmark = pytest.mark.usefixtures("ray_cluster")


def tune_config(tmp_path, name, config="tune_mlp", space=None, overrides=(), **tune):
    """A shipped tune config under tmp_path, with its tune section (and space) replaced."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{config}.yaml"))
    raw.update(name=name, storage_path=str(tmp_path / "runs"))
    raw["tune"].update(registry=str(tmp_path / "winners"), **tune)
    if space is not None:
        raw["tune"]["space"] = space
    return load_config(base=raw, overrides=list(overrides))


def test_grid_covers_exactly_its_points_and_exports_a_winner_that_scores_what_it_reported(tmp_path):
    space = {"train.lr": {"type": "grid", "values": [0.00001, 0.003]},
             "train.batch_size": {"type": "grid", "values": [16, 64]}}
    cfg = tune_config(tmp_path, "grid", space=space, overrides=["train.epochs=3"],
                      search="grid", scheduler="none", num_samples=1, top_k=2)
    outcome = run_tuning(cfg)

    points = sorted((t["params"]["train.lr"], t["params"]["train.batch_size"]) for t in outcome.trials)
    assert points == [(0.00001, 16), (0.00001, 64), (0.003, 16), (0.003, 64)]
    bests = [t["best"] for t in outcome.trials]
    assert max(bests) - min(bests) > 0.05  # the winner is clearly better than the worst
    assert [w["rank"] for w in outcome.winners] == [1, 2]
    winner = outcome.winners[0]
    assert winner["value"] == max(bests)

    # The export is self-contained: it loads from its folder alone and scores what the
    # trial reported on the same validation set.
    folder = Path(winner["path"])
    assert {"manifest.json", "job.yaml", "data_info.json", "model.safetensors", "winner.json"} <= {
        p.name for p in folder.iterdir()}
    predictor = load_predictor(folder)
    assert predictor.manifest["model_plugin"] == "mlp"
    assert predictor.info.classes == ["malignant", "benign"]
    data = prepare_data(resolve(predictor.config))
    outputs = predictor.model(data.x_val).detach().numpy()
    accuracy = float((outputs.argmax(1) == data.y_val.numpy()).mean())
    assert accuracy == pytest.approx(winner["value"], abs=1e-9)

    # The report is one HTML file with the plots, the trials and the winner's config.
    from trainyard.ui.report import write_report

    page = write_report(outcome.run_dir).read_text()
    assert page.count("<svg") == 5 and winner["trial_id"] in page and "train:" in page


def test_cnn_search_with_optuna_ends_with_a_clearly_better_winner(tmp_path):
    cfg = tune_config(tmp_path, "cnn", config="tune_cnn", overrides=["train.epochs=3"],
                      num_samples=4, scheduler="none")
    outcome = run_tuning(cfg)
    bests = [t["best"] for t in outcome.trials if t["best"] is not None]
    assert len(bests) == 4
    assert outcome.winners[0]["value"] == max(bests)
    assert max(bests) - min(bests) > 0.05


def test_asha_stops_weak_trials_early(tmp_path):
    # Good rates first: a weak trial then always reaches a rung after good ones are recorded
    # there. (Weak trials' accuracies tie at the majority class; ASHA stops a trial only below
    # the rung's cutoff, so a weak trial recorded among weak ones could pass on a tie, and
    # whether it did depended on which trial reported first.)
    space = {"train.lr": {"type": "grid", "values": [0.003, 0.004, 0.005, 0.000001, 0.000002, 0.000003]}}
    cfg = tune_config(tmp_path, "asha", space=space, overrides=["train.epochs=6"],
                      search="grid", scheduler="asha", grace_period=1, reduction_factor=2,
                      num_samples=1)
    outcome = run_tuning(cfg)
    stopped = [t for t in outcome.trials if t["state"] == "STOPPED"]
    assert stopped, [(t["params"], t["iterations"]) for t in outcome.trials]
    assert all(t["iterations"] < 6 for t in stopped)
    assert outcome.winners[0]["params"]["train.lr"] >= 0.003

    # checkpoint.num_to_keep (1 in tune_mlp.yaml): each trial keeps its best checkpoint and
    # its latest, and the checkpoint a trial's row names (the export's source) is there.
    assert cfg.checkpoint.num_to_keep == 1
    for trial in outcome.trials:
        folder = Path(outcome.run_dir) / trial["trial_id"]
        kept = sorted(p.name for p in folder.glob("checkpoint_*"))
        assert 1 <= len(kept) <= 2, (trial["trial_id"], kept)
        assert Path(trial["checkpoint"]).is_dir(), trial["checkpoint"]
        # Tune's TensorBoard events, written by trainyard's background logger: one
        # val_accuracy point per epoch the trial trained.
        steps = tensorboard_steps(folder, "ray/tune/val_accuracy")
        assert steps == list(range(1, trial["iterations"] + 1)), (trial["trial_id"], steps)


def tensorboard_steps(folder: Path, tag: str) -> list[int]:
    """The steps of ``tag`` in the TensorBoard event files of ``folder`` (TFRecord framing:
    length, its CRC, an Event protobuf, its CRC)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    steps = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return sorted(steps)


def test_a_trial_that_raises_is_recorded_and_the_search_goes_on(tmp_path):
    from sklearn.datasets import load_breast_cancer
    import pandas as pd

    bunch = load_breast_cancer()
    frame = pd.DataFrame(bunch.data, columns=[f"f{i}" for i in range(bunch.data.shape[1])])
    frame["label"] = bunch.target
    good = tmp_path / "good.csv"
    frame.to_csv(good, index=False)
    space = {"data.params.path": {"type": "grid", "values": [str(good), str(tmp_path / "missing.csv")]}}
    cfg = tune_config(tmp_path, "raises", space=space,
                      overrides=["train.epochs=2", "data.name=table", f"data.params.path={good}"],
                      search="grid", scheduler="none", num_samples=1)
    outcome = run_tuning(cfg)
    states = {t["params"]["data.params.path"]: t for t in outcome.trials}
    assert states[str(tmp_path / "missing.csv")]["state"] == "ERROR"
    assert "missing.csv" in states[str(tmp_path / "missing.csv")]["error"]
    assert states[str(good)]["state"] == "TERMINATED"
    assert outcome.winners[0]["params"]["data.params.path"] == str(good)


def test_a_search_that_cannot_fit_one_trial_fails_at_once_saying_what_is_missing(tmp_path):
    cfg = tune_config(tmp_path, "huge", overrides=["scaling.cpus_per_worker=64"])
    started = time.monotonic()
    with pytest.raises(TrainingError, match="CPU: needs 64"):
        run_tuning(cfg)
    assert time.monotonic() - started < 30


def test_multi_worker_trials_run_ddp_inside_the_search(tmp_path):
    # One trial: each multi-worker trial pays for its own Ray Train worker group (20-40 s here).
    space = {"train.lr": {"type": "grid", "values": [0.003]}}
    cfg = tune_config(tmp_path, "ddp", space=space,
                      overrides=["train.epochs=2", "scaling.num_workers=2"],
                      search="grid", scheduler="none", num_samples=1, max_concurrent_trials=1)
    outcome = run_tuning(cfg)
    assert [t["state"] for t in outcome.trials] == ["TERMINATED"]
    assert all(t["iterations"] == 2 for t in outcome.trials)
    assert load_predictor(outcome.winners[0]["path"]).manifest["model"] == "mlp"


def _finished_trials(run_dir: Path, epochs: int) -> dict[str, int]:
    done = {}
    for result in run_dir.glob("*/result.json"):
        lines = [line for line in result.read_text().splitlines() if line.strip()]
        if len(lines) >= epochs:
            done[result.parent.name] = len(lines)
    return done


def test_search_whose_driver_is_killed_resumes_without_redoing_finished_trials(tmp_path):
    space = {"train.lr": {"type": "grid", "values": [0.001, 0.002, 0.003, 0.004]}}
    cfg = tune_config(tmp_path, "killed", space=space, overrides=["train.epochs=5"],
                      search="grid", scheduler="none", num_samples=1, max_concurrent_trials=1)
    config_file = tmp_path / "killed.yaml"
    from omegaconf import OmegaConf

    config_file.write_text(OmegaConf.to_yaml(cfg))
    trainyard = [sys.executable, "-m", "trainyard.cli"]
    run_dir = tmp_path / "runs" / "killed"
    # Tune snapshots its state at every step, so the snapshot names the running trial's
    # latest checkpoint.
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    driver = subprocess.Popen([*trainyard, "tune", str(config_file)], start_new_session=True, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def running_with_checkpoint() -> list[Path]:
        finished = _finished_trials(run_dir, 5)
        return [d for d in run_dir.glob("*_0000*") if d.name not in finished and any(d.glob("checkpoint_*"))]

    try:
        deadline = time.monotonic() + 240
        # Kill once one trial has finished and the next has a checkpoint: three still to run.
        while not (_finished_trials(run_dir, 5) and running_with_checkpoint()) and time.monotonic() < deadline:
            assert driver.poll() is None, "the search ended before it could be killed"
            time.sleep(0.1)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started
        driver.wait()
    finished_before = _finished_trials(run_dir, 5)
    assert 1 <= len(finished_before) < 4
    assert not (run_dir / "trainyard_trials.json").exists()
    # As when the kill lands after num_to_keep deleted the checkpoint Tune's last snapshot
    # names (seen once in CI): the running trial's checkpoints are gone. It starts again
    # from scratch; the finished one is not run again.
    lost = running_with_checkpoint()
    assert lost
    for trial_dir in lost:
        for checkpoint in trial_dir.glob("checkpoint_*"):
            shutil.rmtree(checkpoint)

    out = subprocess.run([*trainyard, "tune", "--resume", str(run_dir)], capture_output=True,
                         text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    summary = json.loads((run_dir / "trainyard_trials.json").read_text())
    assert len(summary["trials"]) == 4
    assert all(t["state"] == "TERMINATED" for t in summary["trials"])
    for trial_id, lines in finished_before.items():  # not run again: no new results
        assert len((run_dir / trial_id / "result.json").read_text().splitlines()) == lines
    assert summary["winners"] and np.isfinite(summary["winners"][0]["value"])


def test_sigterm_ends_a_search_as_interrupted_exporting_nothing_and_saying_how_to_resume(tmp_path):
    """SIGTERM (a scheduler's, systemd's, ``timeout``'s) stops a search as Ctrl-C does: Tune
    catches SIGINT and returns as if the search had ended, and trainyard hands it SIGTERM
    too (Ray's own handler would print a native stack dump and abort). trainyard says it was
    interrupted, exports no winner (a half search must not become the registry's current
    version), records it, and exits 143 (130 for Ctrl-C, whose handler is Tune's alone:
    see the SIGUSR1 test below)."""
    space = {"train.lr": {"type": "grid", "values": [0.001, 0.002, 0.003]}}
    cfg = tune_config(tmp_path, "cut", space=space, overrides=["train.epochs=300"],
                      search="grid", scheduler="none", num_samples=1, max_concurrent_trials=1)
    config_file = tmp_path / "cut.yaml"
    from omegaconf import OmegaConf

    config_file.write_text(OmegaConf.to_yaml(cfg))
    run_dir = tmp_path / "runs" / "cut"
    driver = subprocess.Popen([sys.executable, "-m", "trainyard.cli", "tune", str(config_file)],
                              start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not any(run_dir.glob("*_0000*/checkpoint_*")) and time.monotonic() < deadline:
            assert driver.poll() is None, "the search ended before it could be interrupted"
            time.sleep(0.1)
        driver.send_signal(signal.SIGTERM)
        out, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert driver.returncode == 143, out[-2000:] + err[-2000:]
    assert "SIGTERM received" not in err  # Ray's crash handler's dump
    assert err.strip().splitlines()[-1] == (
        f"error: search interrupted (SIGTERM): 0 of 3 trials ran all their epochs; no winner was exported. "
        f"Resume it: trainyard tune --resume {run_dir}"), err[-2000:]
    summary = json.loads((run_dir / "trainyard_trials.json").read_text())
    assert summary["stopped_by"] == "interrupted" and summary["winners"] == []
    assert summary["trials"] and all(t["state"] != "TERMINATED" for t in summary["trials"])
    assert not (tmp_path / "winners" / "cut").exists() or not any((tmp_path / "winners" / "cut").iterdir())


def test_the_interrupting_signal_is_named_sigusr1_apart_from_ctrl_c():
    """Tune's handler takes SIGUSR1 as it takes SIGINT; the message names which one came."""
    import ray.tune.tune as tune_module

    from trainyard.tune.driver import _interruptions

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGUSR1)}
    tunes_own = tune_module._setup_signal_catching
    try:
        with _interruptions() as caught:
            event = tune_module._setup_signal_catching()
            assert not event.is_set() and caught.by() == "Ctrl-C"
            os.kill(os.getpid(), signal.SIGUSR1)
            deadline = time.monotonic() + 10
            while not event.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
        assert event.is_set() and caught.events == [event] and caught.by() == "SIGUSR1"
        assert tune_module._setup_signal_catching is tunes_own  # put back after the block
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


_AHEAD: list[bool] = []


def test_a_trial_trains_its_next_epoch_while_the_driver_handles_its_last_result(tmp_path):
    """A one-worker trial that leaves the driver a CPU does not wait for Tune's driver
    between epochs: while the driver is held up handling a trial's second result, the
    trial's third epoch is trained, and its checkpoint reaches storage. Every epoch's result
    still reaches Tune, in order. Trials that hold every CPU (and PBT's) wait, as Tune's do."""
    from ray.tune import Callback

    class SlowDriver(Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result["training_iteration"] == 2:
                third = Path(trial.storage.trial_fs_path) / "checkpoint_000002"
                deadline = time.monotonic() + 20
                while not third.is_dir() and time.monotonic() < deadline:
                    time.sleep(0.05)
                _AHEAD.append(third.is_dir())

        def __getstate__(self):  # Tune pickles its callbacks with the run config
            return {}

    _AHEAD.clear()
    cfg = tune_config(tmp_path, "ahead", space={"train.lr": {"type": "grid", "values": [0.003]}},
                      overrides=["train.epochs=4"], search="grid", scheduler="none", num_samples=1,
                      max_concurrent_trials=1)
    assert trains_on(cfg)  # one trial of one CPU: the driver has a CPU of its own
    outcome = run_tuning(cfg, callbacks=[SlowDriver()])
    assert _AHEAD == [True]
    (trial,) = outcome.trials
    assert (trial["state"], [h["iteration"] for h in trial["history"]]) == ("TERMINATED", [1, 2, 3, 4])
    frame = __import__("pandas").read_csv(Path(outcome.run_dir) / trial["trial_id"] / "progress.csv")
    assert list(frame["training_iteration"]) == [1, 2, 3, 4]
    assert (frame["trial_own_s"] > 0).all()  # the trial's own time, each epoch

    assert not trains_on(tune_config(tmp_path, "full", max_concurrent_trials=2))  # 2 CPUs, both held
    light = ["scaling.cpus_per_worker=0.1"]  # 8 trials in 0.8 CPU: a CPU left, but PBT
    assert trains_on(tune_config(tmp_path, "light", overrides=light, max_concurrent_trials=8))
    assert not trains_on(tune_config(tmp_path, "pbt", overrides=light, scheduler="pbt", max_concurrent_trials=8))
