"""Distributed training on a real local Ray: accuracy, DDP equivalence, resume, seeding."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import ray
from omegaconf import OmegaConf

from tests.conftest import CONFIGS
from trainyard.checkpoint import load_predictor
from trainyard.errors import TrainingError
from trainyard.train.driver import run_training

pytestmark = pytest.mark.usefixtures("ray_cluster")

# (config, overrides, raw input for a prediction, accuracy that clearly beats chance)
MODELS = {
    "mlp": ("mlp_breast_cancer", ["train.epochs=4"], 0.85),  # majority class: 0.63
    "cnn": ("cnn_digits", ["train.epochs=4"], 0.6),  # chance: 0.10
    "bert": ("bert_sentiment", ["train.epochs=4"], 0.8),  # chance: 0.50
}


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory):
    """``two_worker_run(model)``: the built-in model's run on two workers (MODELS), trained
    once for the module: the seeding test reruns the MLP's and compares."""
    from trainyard.config import load_config

    runs: dict = {}

    def run(model: str):
        if model not in runs:
            config_name, overrides, _ = MODELS[model]
            root = tmp_path_factory.mktemp(f"two_{model}")
            cfg = load_config(CONFIGS / f"{config_name}.yaml",
                              [f"storage_path={root / 'runs'}", "scaling.num_workers=2", *overrides])
            runs[model] = (cfg, run_training(cfg))
        return runs[model]

    return run


@pytest.mark.parametrize("model", sorted(MODELS))
def test_each_builtin_model_trained_on_two_workers_beats_chance(model, two_worker_run):
    _, _, target = MODELS[model]
    cfg, result = two_worker_run(model)

    final = result.history[-1]
    assert final["val_accuracy"] > target, result.history
    run_dir = result.run_dir
    assert OmegaConf.load(run_dir / "config.yaml").model.name == model
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(cfg.train.epochs))
    assert len([p for p in run_dir.glob("checkpoint_*") if p.is_dir()]) == cfg.checkpoint.num_to_keep

    # The checkpoint alone rebuilds the model with its processing and label names.
    predictor = load_predictor(result.checkpoint)
    assert predictor.manifest["model"] == model
    assert predictor.manifest["model_plugin"] == model
    from trainyard.config import resolve
    from trainyard.train.data import prepare_data

    data = prepare_data(resolve(cfg))
    raw = _raw_validation_inputs(cfg, 64)
    answers = predictor.predict(raw)
    assert len(answers) == 64
    assert all(a["label"] in data.info.classes for a in answers)
    assert all(abs(sum(a["scores"].values()) - 1) < 1e-4 for a in answers)


def _raw_validation_inputs(cfg, n):
    """Raw (unprocessed) inputs as a client would send them."""
    from trainyard.config import resolve
    from trainyard.train.data import split_validation

    job = resolve(cfg)
    data = job.dataset.load(job.data_params, cfg.seed)
    val = data.val if data.val is not None else split_validation(data, cfg.data.val_fraction, cfg.seed)[1]
    return val.inputs[:n]


def _metrics(history):
    return [{k: v for k, v in row.items() if k.startswith("val_")} for row in history]


def test_seeded_run_is_reproduced_and_two_workers_match_one(job_config, two_worker_run):
    config_name, common, _ = MODELS["mlp"]
    _, first = two_worker_run("mlp")  # the same job in another run folder
    before = set(ray._private.state.actors())
    again = run_training(job_config(config_name, "scaling.num_workers=2", *common))
    started = Counter(a["ActorClassName"] for k, a in ray._private.state.actors().items() if k not in before)
    single = run_training(job_config(config_name, "name=single", "scaling.num_workers=1", *common))
    # (Accumulating micro-batches in one process is the same run too:
    # tests/test_training_essentials.py checks it without Ray.)

    assert _metrics(first.history) == _metrics(again.history)
    # Ray Train's own actors, less two that have nothing to do here (each a process of about
    # 3 s of a CPU): the datasets' manager (the workers load an in-memory dataset) and the
    # preemption watcher (an embedded Ray has no node to drain).
    assert started["RayTrainWorker"] == 2 and started["TrainController"] == 1, started
    assert not started["DatasetManager"] and not started["PreemptionWatcher"], started
    for two, one in zip(_metrics(first.history), _metrics(single.history), strict=True):
        for key in two:
            assert two[key] == pytest.approx(one[key], abs=2e-3), key


def test_worker_killed_from_outside_resumes_from_latest_checkpoint_not_epoch_zero(job_config):
    """SIGKILL to rank 0's process (found through the worker event behind workers.json), a
    few seconds after epoch 1 was checkpointed: the workers restart from the latest
    checkpoint and go on from the epoch after it."""
    epochs = 10
    cfg = job_config("mlp_breast_cancer", "name=faulty", f"train.epochs={epochs}",
                     "scaling.num_workers=2", "checkpoint.max_failures=1")
    events, pids, killed = [], {}, {}

    def on_event(event: dict) -> None:
        events.append(event)
        if event["type"] == "worker":
            pids.setdefault(event["rank"], []).append(event["pid"])
        if event["type"] == "epoch_end" and event["epoch"] == 1:
            killed["after"] = time.monotonic() + 2.0  # time for the controller to record it
        if "after" in killed and "at" not in killed and time.monotonic() >= killed["after"]:
            os.kill(pids[0][0], signal.SIGKILL)
            killed["at"] = event.get("epoch")

    result = run_training(cfg, on_event=on_event)

    assert killed.get("at") is not None, "the run ended before the worker could be killed"
    assert len(pids[0]) == 2 and pids[0][0] != pids[0][1]  # rank 0 ran again, in a new process
    starts = [e["epoch"] for e in events if e["type"] == "epoch_start"]
    drop = next(i for i in range(1, len(starts)) if starts[i] <= starts[i - 1])
    assert starts[:drop] == list(range(drop))
    assert result.resumed_from == starts[drop] >= 2  # from a checkpoint, never from epoch 0
    assert starts[drop:] == list(range(starts[drop], epochs))
    assert [r["epoch"] for r in result.history] == list(range(epochs))
    workers = json.loads((result.run_dir / "workers.json").read_text())
    assert workers[0]["pid"] == pids[0][1]
    # What the failure left is not kept past checkpoint.num_to_keep (a checkpoint written as
    # the worker died is one Ray Train never registered, and never deletes).
    assert len([p for p in result.run_dir.glob("checkpoint_*") if p.is_dir()]) == cfg.checkpoint.num_to_keep


def test_run_started_again_with_the_same_name_resumes_unless_its_model_or_data_changed(job_config):
    from trainyard.errors import ConfigError

    first = run_training(job_config("mlp_breast_cancer", "name=same", "train.epochs=2", "scaling.num_workers=1"))
    # A driver killed before it logged epoch 1, which its worker had checkpointed: the
    # checkpoint brings the line back when the run resumes.
    metrics = Path(first.run_dir) / "metrics.jsonl"
    logged = metrics.read_text().splitlines()
    metrics.write_text(logged[0] + "\n")
    # ... and a checkpoint folder its worker was writing as it died, which Ray Train never
    # registered: it does not outlive the resumed run's checkpoint.num_to_keep.
    orphan = Path(first.run_dir) / "checkpoint_2000-01-01_00-00-00.000000"
    shutil.copytree(first.checkpoint, orphan)
    # Another split of the data is another run: refused before anything trains.
    with pytest.raises(ConfigError, match="data: run 'same' already exists"):
        run_training(job_config("mlp_breast_cancer", "name=same", "data.val_fraction=0.3"))
    events = []
    result = run_training(
        job_config("mlp_breast_cancer", "name=same", "train.epochs=3", "scaling.num_workers=1"),
        on_event=events.append,
    )
    assert [e["epoch"] for e in events if e["type"] == "epoch_start"] == [2]
    assert [r["epoch"] for r in result.history] == [0, 1, 2]
    assert not orphan.exists()
    kept = sorted(p for p in Path(result.run_dir).glob("checkpoint_*") if p.is_dir())
    assert len(kept) == 2 and result.checkpoint in kept  # mlp_breast_cancer.yaml: num_to_keep 2
    assert metrics.read_text().splitlines()[:2] == logged
    # Started again for fewer epochs than it ran: its result, with nothing started or rewritten.
    events.clear()
    again = run_training(job_config("mlp_breast_cancer", "name=same", "train.epochs=2", "scaling.num_workers=1"),
                         on_event=events.append)
    assert events == [{"type": "done_before", "epoch": 2}]
    assert again.history == result.history and again.checkpoint == Path(result.checkpoint).resolve()
    assert "epochs: 3" in (Path(first.run_dir) / "config.yaml").read_text()


def test_error_inside_a_worker_reaches_the_user_as_its_root_cause(job_config, tmp_path):
    cfg = job_config("mlp_breast_cancer", "name=nofile", "data.name=table",
                     f"data.params.path={tmp_path / 'missing.csv'}", "scaling.num_workers=1",
                     "checkpoint.max_failures=0")
    with pytest.raises(TrainingError, match="missing.csv.*does not exist"):
        run_training(cfg)


def test_workers_the_cluster_cannot_fit_fail_at_once_naming_the_shortfall(job_config):
    cfg = job_config("mlp_breast_cancer", "name=huge", "scaling.num_workers=64", "train.batch_size=64")
    with pytest.raises(TrainingError, match="CPU: needs 64"):
        run_training(cfg)


def test_train_command_runs_the_main_job_end_to_end(tmp_path):
    from tests.conftest import CONFIGS

    out = subprocess.run(
        [sys.executable, "-m", "trainyard.cli", "train", str(CONFIGS / "mlp_breast_cancer.yaml"),
         "train.epochs=2", f"storage_path={tmp_path}"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "summary" in out.stdout and "val_accuracy" in out.stdout
    assert "Traceback" not in out.stderr
    rows = (tmp_path / "mlp_breast_cancer" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2
    assert np.isfinite(json.loads(rows[-1])["val_loss"])
