"""Experiment tracking with MLflow, against a real MLflow tracking server the test starts
on loopback (SQLite backend store, artifacts served from a local folder), read back with
MLflow's own client: train runs, searches with nested trials, metrics by epoch, artifacts,
registered winners, deploying ``models:/<name>/<version>``, the local store in the run
folder, and a server that is down."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONFIGS
from tests.ports import free_port
from trainyard import tracking
from trainyard.checkpoint import MANIFEST, incomplete_reason, load_predictor
from trainyard.config import load_config
from trainyard.errors import ConfigError, TrainyardError
from trainyard.train.driver import run_training
from trainyard.winners import resolve_checkpoint

pytest.importorskip("mlflow")
pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch):
    """trainyard's MLflow defaults, undone after each test (tracking sets them for the process)."""
    for key, value in tracking.MLFLOW_ENV_DEFAULTS.items():
        monkeypatch.setenv(key, os.environ.get(key, value))
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on loopback: SQLite store, artifacts it serves itself
    (clients upload and download them over HTTP) from a local folder."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the MLflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"uri": uri, "artifacts": root / "artifacts"}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _files(client, run_id: str, path: str = "") -> set[str]:
    """Every artifact file of a run, by its path in the run."""
    found = set()
    for item in client.list_artifacts(run_id, path or None):
        found |= _files(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def _tracking_warnings(caplog, uri: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and uri in r.getMessage()]


def test_tracking_config_is_checked_before_anything_runs():
    base = CONFIGS / "mlp_breast_cancer.yaml"
    with pytest.raises(ConfigError, match=r"^tracking.uri: set, but tracking.backend is none"):
        load_config(base, ["tracking.uri=http://127.0.0.1:5000"])
    with pytest.raises(ConfigError, match=r"^tracking.uri: must be a URI .*got 'mlruns'"):
        load_config(base, ["tracking.backend=mlflow", "tracking.uri=mlruns"])
    with pytest.raises(ConfigError, match=r"^tracking.uri: MLflow has no tracking store for 'htp://'; use one of "
                                          r"http://, https://, .* \(got 'htp://127.0.0.1:5000'\)"):
        load_config(base, ["tracking.backend=mlflow", "tracking.uri=htp://127.0.0.1:5000"])
    for uri in ("https://mlflow.example.com", "postgresql+psycopg2://u@db/mlflow", "sqlite:////tmp/m.db"):
        assert load_config(base, ["tracking.backend=mlflow", f"tracking.uri={uri}"]).tracking.uri == uri
    with pytest.raises(ConfigError, match=r"^tracking.uri: needed when storage_path is a URI"):
        load_config(base, ["tracking.backend=mlflow", "storage_path=s3://bucket/runs"])
    with pytest.raises(ConfigError, match=r"^tracking.backend: must be one of none, mlflow"):
        load_config(base, ["tracking.backend=wandb"])
    with pytest.raises(ConfigError, match=r"^--tracking-uri: empty; give the tracking server's URI"):
        tracking.cli_overrides("")  # "$MLFLOW_TRACKING_URI", unset
    assert tracking.cli_overrides(None) == []
    cfg = load_config(base, tracking.cli_overrides("http://127.0.0.1:5000"))
    assert (cfg.tracking.backend, cfg.tracking.uri) == ("mlflow", "http://127.0.0.1:5000")
    assert load_config(base).tracking.backend == "none"  # off by default


def test_mlflow_tracking_uri_names_the_store_when_tracking_uri_is_empty(monkeypatch):
    base = CONFIGS / "mlp_breast_cancer.yaml"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert load_config(base, ["tracking.backend=mlflow"], new_job=True).tracking.uri == "http://127.0.0.1:5000"
    given = load_config(base, ["tracking.backend=mlflow", "tracking.uri=sqlite:////tmp/m.db"], new_job=True)
    assert given.tracking.uri == "sqlite:////tmp/m.db"  # the job's own URI wins
    off = load_config(base, new_job=True)  # the variable alone does not turn tracking on
    assert (off.tracking.backend, off.tracking.uri) == ("none", "")
    # A saved config read back (a resumed search, a checkpoint's job) keeps the store it had.
    assert load_config(base, ["tracking.backend=mlflow"]).tracking.uri == ""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "htp://127.0.0.1:5000")
    with pytest.raises(ConfigError, match=r"^tracking.uri \(from \$MLFLOW_TRACKING_URI\): MLflow has no "
                                          r"tracking store for 'htp://'"):
        load_config(base, ["tracking.backend=mlflow"], new_job=True)


def test_train_run_on_two_workers_logs_one_run_with_config_metrics_by_epoch_and_artifacts(
        job_config, mlflow_server, caplog):
    uri = mlflow_server["uri"]
    cfg = job_config("mlp_breast_cancer", "name=tracked_train", "scaling.num_workers=2", "train.epochs=2",
                     "tracking.backend=mlflow", f"tracking.uri={uri}")
    result = run_training(cfg)
    assert _tracking_warnings(caplog, uri) == []

    client = _client(uri)
    experiment = client.get_experiment_by_name("tracked_train")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the driver logs, not each worker
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked_train"
    assert run.data.params["train.lr"] == "0.003"
    assert run.data.params["scaling.num_workers"] == "2"
    assert run.data.params["model.params.hidden"] == "[64, 32]"
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("val_accuracy", "val_loss", "train_loss"):
        assert _history(client, run.info.run_id, key) == [(r["epoch"], pytest.approx(r[key])) for r in rows]

    files = _files(client, run.info.run_id)
    assert {"checkpoint/" + MANIFEST, "checkpoint/model.safetensors", "report/metrics.jsonl",
            "report/config.yaml", "report/summary.json", "report/workers.json"} <= files
    # The artifacts went through the server, into its artifact folder.
    assert list(mlflow_server["artifacts"].rglob("checkpoint/" + MANIFEST))
    import mlflow

    folder = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="checkpoint",
                                                      tracking_uri=uri))
    assert (folder / MANIFEST).read_text() == (result.checkpoint / MANIFEST).read_text()
    report = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="report",
                                                      tracking_uri=uri))
    assert (report / "metrics.jsonl").read_text() == (result.run_dir / "metrics.jsonl").read_text()
    summary = json.loads((report / "summary.json").read_text())
    assert summary["best"]["val_accuracy"] == pytest.approx(max(r["val_accuracy"] for r in rows))


def _search_config(tmp_path: Path, name: str, *overrides: str):
    raw = OmegaConf.to_container(OmegaConf.load(CONFIGS / "tune_mlp.yaml"))
    raw.update(name=name, storage_path=str(tmp_path / "runs"))
    raw["tune"].update(registry=str(tmp_path / "winners"), search="grid", scheduler="none",
                       num_samples=1, top_k=2, max_concurrent_trials=1,
                       space={"train.lr": {"type": "grid", "values": [0.00001, 0.003]}})
    return load_config(base=raw, overrides=["train.epochs=2", *overrides])


def test_search_nests_its_trials_registers_its_winners_and_deploy_takes_a_registered_version(
        tmp_path, mlflow_server, monkeypatch, caplog):
    from trainyard.tune.driver import run_tuning

    uri = mlflow_server["uri"]
    outcome = run_tuning(_search_config(tmp_path, "tracked_search", "tracking.backend=mlflow",
                                        f"tracking.uri={uri}"))
    assert _tracking_warnings(caplog, uri) == []
    client = _client(uri)
    experiment = client.get_experiment_by_name("tracked_search")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("trainyard.kind") == "search"]
    assert len(parents) == 1 and len(runs) == 3
    parent = parents[0]
    assert parent.data.params["tune.search"] == "grid"
    trials = {r.info.run_name: r for r in runs if r is not parent}
    assert set(trials) == {t["trial_id"] for t in outcome.trials}
    for trial in outcome.trials:
        run = trials[trial["trial_id"]]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
        assert float(run.data.params["train.lr"]) == trial["params"]["train.lr"]
        assert not [k for k in run.data.params if k.startswith("tune.")]  # the trial's own config
        # Per-epoch metrics, the epoch as the step, as the trial reported them.
        assert _history(client, run.info.run_id, "val_accuracy") == [
            (h["iteration"] - 1, pytest.approx(h["val_accuracy"])) for h in trial["history"]]
        files = _files(client, run.info.run_id)
        assert {"checkpoint/" + MANIFEST, "report/result.json"} <= files
    assert {"report/trainyard_trials.json", "report/report.html"} <= _files(client, parent.info.run_id)

    # Each winner is a version of the model named after the search, tagged with its trial,
    # metric and checkpoint.
    versions = sorted(client.search_model_versions("name='tracked_search'"), key=lambda v: int(v.version))
    assert [int(v.version) for v in versions] == [1, 2]
    for version, winner in zip(versions, outcome.winners):
        assert version.tags["trial_id"] == winner["trial_id"]
        assert version.tags["metric"] == "val_accuracy"
        assert float(version.tags["metric_value"]) == pytest.approx(winner["value"])
        assert version.tags["checkpoint_uri"] == winner["path"]
        assert version.run_id == trials[winner["trial_id"]].info.run_id

    # deploy takes models:/<name>/<version>: the tagged checkpoint while it is here...
    with pytest.raises(TrainyardError, match="set MLFLOW_TRACKING_URI"):
        resolve_checkpoint("models:/tracked_search/1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    best = Path(outcome.winners[0]["path"]).resolve()
    assert resolve_checkpoint("models:/tracked_search/1") == best
    with pytest.raises(TrainyardError, match="no such registered model version"):
        resolve_checkpoint("models:/tracked_search/9")
    # ... and the registered artifacts, downloaded from the server, once it is gone.
    shutil.move(tmp_path / "winners", tmp_path / "winners_moved")
    downloaded = resolve_checkpoint("models:/tracked_search/1")
    assert downloaded.is_relative_to(tmp_path / "cache") and incomplete_reason(downloaded) is None
    assert load_predictor(downloaded).manifest == load_predictor(
        tmp_path / "winners_moved" / best.relative_to(tmp_path / "winners")).manifest

    from click.testing import CliRunner

    from trainyard.cli import main

    out = tmp_path / "serve.yaml"
    answer = CliRunner().invoke(main, ["deploy", "models:/tracked_search/2", "--name", "second",
                                       "--insecure", "--config-out", str(out)])
    assert answer.exit_code == 0, answer.output
    checkpoint = OmegaConf.load(out).applications[0].args.checkpoint
    assert incomplete_reason(checkpoint) is None
    assert load_predictor(checkpoint).manifest["run"] == load_predictor(downloaded).manifest["run"]


def test_with_no_uri_the_store_is_local_in_the_run_folder(job_config, caplog):
    cfg = job_config("mlp_breast_cancer", "name=tracked_local", "scaling.num_workers=1", "train.epochs=2",
                     "tracking.backend=mlflow")
    result = run_training(cfg)
    assert not [r for r in caplog.records if r.name == "trainyard.tracking" and r.levelno >= logging.WARNING]
    store = result.run_dir / tracking.LOCAL_STORE
    assert store.is_file()
    client = _client(f"sqlite:///{store}")
    [run] = client.search_runs([client.get_experiment_by_name("tracked_local").experiment_id])
    assert [step for step, _ in _history(client, run.info.run_id, "val_accuracy")] == [0, 1]
    # The run's last lines say where it went.
    assert result.tracked == (f"MLflow run {run.info.run_id} in experiment 'tracked_local' at "
                              f"sqlite:///{store.resolve()}")
    manifests = list((result.run_dir / tracking.LOCAL_ARTIFACTS).rglob("checkpoint/" + MANIFEST))
    assert len(manifests) == 1 and manifests[0].read_text() == (result.checkpoint / MANIFEST).read_text()


def test_a_tracking_server_that_takes_the_connection_and_never_answers_holds_the_run_seconds(job_config, caplog,
                                                                                          monkeypatch):
    """A wedged server (it accepts, and never answers) costs one warning and MLflow's few
    tries of the request timeout, not MLflow's own 3 x 120 s. trainyard's default timeout is
    20 s (MLFLOW_ENV_DEFAULTS; about a minute in all); a user's setting wins, and 5 s here
    keeps the test short."""
    import threading

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list = []
    stop = threading.Event()

    def hold() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    threading.Thread(target=hold, daemon=True).start()
    uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
    cfg = job_config("mlp_breast_cancer", "name=wedged", "scaling.num_workers=1", "train.epochs=2",
                     "tracking.backend=mlflow", f"tracking.uri={uri}")
    try:
        started = time.monotonic()
        result = run_training(cfg)
        took = time.monotonic() - started
    finally:
        stop.set()
        for conn in held:
            conn.close()
        listener.close()
    assert held, "MLflow never connected"
    warnings = _tracking_warnings(caplog, uri)
    assert len(warnings) == 1, warnings
    assert "timed out" in warnings[0].lower() or "timeout" in warnings[0].lower(), warnings[0]
    assert [r["epoch"] for r in result.history] == [0, 1] and result.tracked is None
    # Training (~25 s) beside at most 3 tries of 5 s with their back-off.
    print(f"\nwedged tracking server: the run took {took:.1f} s")
    assert took < 90, f"the run took {took:.0f} s"


def test_a_tracking_server_that_is_down_costs_one_warning_and_nothing_of_the_run(job_config, caplog):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = job_config("mlp_breast_cancer", "name=untracked", "scaling.num_workers=1", "train.epochs=2",
                     "tracking.backend=mlflow", f"tracking.uri={uri}")
    result = run_training(cfg)

    warnings = _tracking_warnings(caplog, uri)
    assert len(warnings) == 1, warnings
    assert "connection refused" in warnings[0] and str(result.run_dir) in warnings[0]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith(("urllib3", "mlflow"))]
    # The run folder has everything.
    assert [r["epoch"] for r in result.history] == [0, 1]
    assert OmegaConf.load(result.run_dir / "config.yaml").tracking.uri == uri
    assert len((result.run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert incomplete_reason(result.checkpoint) is None
    assert not (result.run_dir / tracking.LOCAL_STORE).exists()


def test_a_deleted_experiment_is_restored_saying_so(tmp_path, caplog):
    """Logging under the name of an experiment someone deleted brings it back, with one
    line that says so (it silently undid the delete)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    deleted = client.create_experiment("gone", artifact_location=str(tmp_path / "artifacts"))
    client.delete_experiment(deleted)
    with caplog.at_level(logging.WARNING, logger="trainyard.tracking"):
        assert tracking._experiment(client, "gone", tmp_path / "artifacts") == deleted
    assert client.get_experiment(deleted).lifecycle_stage == "active"
    assert [r.getMessage() for r in caplog.records if r.name == "trainyard.tracking"] == [
        f"tracking: MLflow experiment 'gone' (id {deleted}) was deleted; restored it to log this run"]
