"""Object storage (s3://) for training runs and their checkpoints, searches and the winners
registry, deploy and submit: against a real S3-protocol server on loopback
(tests/s3server.py), through pyarrow's S3 client as a user's run uses it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import CONFIGS, ROW, remove_applications
from tests.ports import free_port
from trainyard.config import load_config
from trainyard.errors import ConfigError, TrainyardError



def _checkpoints(keys: list[str]) -> list[str]:
    return sorted({k.split("/")[1] for k in keys if k.startswith("s3run/checkpoint_") and k.count("/") >= 2})


@pytest.mark.usefixtures("ray_cluster")
def test_training_checkpoints_to_a_bucket_and_a_second_run_resumes_from_them(s3_bucket, s3_server):
    from trainyard.checkpoint import load_predictor
    from trainyard.train.driver import run_training
    from trainyard.winners import resolve_checkpoint

    storage = f"{s3_bucket}/runs"
    common = [f"storage_path={storage}", "name=s3run", "scaling.num_workers=1", "checkpoint.num_to_keep=2"]
    run_training(load_config(CONFIGS / "mlp_breast_cancer.yaml", [*common, "train.epochs=1"]))
    keys = s3_server.keys(storage)
    first = _checkpoints(keys)
    assert len(first) == 1, keys
    assert f"s3run/{first[0]}/manifest.json" in keys and f"s3run/{first[0]}/model.safetensors" in keys

    events = []
    result = run_training(load_config(CONFIGS / "mlp_breast_cancer.yaml", [*common, "train.epochs=2"]),
                          on_event=events.append)
    # The result names the checkpoint by its URI, and the run's records sit beside it.
    assert str(result.checkpoint).startswith(f"{storage}/s3run/checkpoint_")
    assert [row["epoch"] for row in result.history] == [0, 1] and result.best is not None
    keys = s3_server.keys(storage)
    assert {"s3run/config.yaml", "s3run/metrics.jsonl", "s3run/workers.json"} <= set(keys), keys
    # The second run went on from the bucket's checkpoint: it trained epoch 1 only.
    assert [e["epoch"] for e in events if e["type"] == "epoch_start"] == [1]
    assert all(e.get("resumed") for e in events if e["type"] == "epoch_start")
    checkpoints = _checkpoints(s3_server.keys(storage))
    assert len(checkpoints) == 2 and first[0] in checkpoints

    # The run in the bucket resolves to its latest complete checkpoint, which loads and predicts.
    latest = resolve_checkpoint(f"{storage}/s3run")
    assert latest.startswith(f"{storage}/s3run/checkpoint_") and latest.rsplit("/", 1)[1] != first[0]
    predictor = load_predictor(latest)
    assert json.loads(json.dumps(predictor.manifest))["run"] == "s3run"
    assert predictor.predict([ROW])[0]["label"] in ("malignant", "benign")

    # A checkpoint whose upload was cut short is skipped, never served.
    fs = s3_server.filesystem()
    fs.delete_file(latest.removeprefix("s3://") + "/model.safetensors")
    older = resolve_checkpoint(f"{storage}/s3run")
    assert older == f"{storage}/s3run/{first[0]}"
    with pytest.raises(TrainyardError, match="incomplete checkpoint .*model.safetensors is missing"):
        load_predictor(latest)


@pytest.mark.usefixtures("ray_cluster")
def test_search_exports_winners_to_a_bucket_and_deploy_serves_them_over_http(s3_bucket, s3_server, tmp_path,
                                                                             monkeypatch, serve_port):
    from omegaconf import OmegaConf

    from trainyard.serve.config import load_serve_config
    from trainyard.serve.deploy import deploy
    from trainyard.tune.driver import run_tuning

    raw = OmegaConf.to_container(OmegaConf.load(CONFIGS / "tune_mlp.yaml"))
    raw.update(name="s3tune", storage_path=f"{s3_bucket}/runs")
    raw["tune"].update(registry=f"{s3_bucket}/winners", search="grid", scheduler="none", num_samples=1,
                       top_k=1, space={"train.lr": {"type": "grid", "values": [0.003]}})
    outcome = run_tuning(load_config(base=raw, overrides=["train.epochs=1", "scaling.num_workers=1"]))

    registry = f"{s3_bucket}/winners/s3tune"
    assert outcome.registry_dir == registry
    winner = outcome.winners[0]
    assert winner["path"] == f"{registry}/v1/rank_1"
    assert winner["value"] == outcome.trials[0]["best"] and winner["trial_id"] == outcome.trials[0]["trial_id"]
    keys = s3_server.keys(registry)
    assert {"winners.json", "v1/winners.json", "v1/rank_1/manifest.json", "v1/rank_1/winner.json",
            "v1/rank_1/model.safetensors"} <= set(keys)
    index = json.loads(s3_server.filesystem().open_input_stream(registry[5:] + "/winners.json").read())
    assert [e["trial_id"] for e in index] == [winner["trial_id"]]
    # The trials' checkpoints and the search's own records are in the bucket too.
    run_keys = s3_server.keys(f"{s3_bucket}/runs/s3tune")
    assert "trainyard_trials.json" in run_keys and any("/checkpoint_" in k for k in run_keys)
    from trainyard.winners import resolve_checkpoint

    assert resolve_checkpoint(f"{s3_bucket}/runs/s3tune") == winner["path"]  # the run names its winner
    # Its report, from the bucket (what `--resume`, deploy and export take), written here.
    from click.testing import CliRunner

    from trainyard.cli import main

    monkeypatch.chdir(tmp_path)
    written = CliRunner().invoke(main, ["report", f"{s3_bucket}/runs/s3tune"])
    assert written.exit_code == 0 and "wrote s3tune-report.html" in written.output, written.output
    page = (tmp_path / "s3tune-report.html").read_text()
    assert winner["trial_id"] in page and "Tuning run s3tune" in page  # named by the run, not a temp folder
    missing = CliRunner().invoke(main, ["report", f"{s3_bucket}/runs/none"])
    assert missing.exit_code == 1 and missing.output.strip().splitlines()[-1] == (
        f"error: {s3_bucket}/runs/none is not a finished trainyard tuning run (no trainyard_trials.json there)")

    # Deploy the registry (its current version) straight from the bucket; ask it over HTTP.
    port = serve_port
    cfg = load_serve_config(base={"port": port, "models": [{"winner": registry, "name": "s3mlp", "num_cpus": 0.1}]})
    try:
        endpoints = deploy(cfg)
        assert endpoints == {"s3mlp": f"http://127.0.0.1:{port}/v2/models/s3mlp"}
        request = urllib.request.Request(f"{endpoints['s3mlp']}/predict", data=json.dumps({"inputs": [ROW]}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        assert response.status == 200
        assert answer["predictions"][0]["label"] in ("malignant", "benign"), answer
    finally:
        remove_applications()


def _finished_in_bucket(s3_server, run: str) -> list[str]:
    """The trials Tune's latest experiment state in the bucket records as finished."""
    fs, prefix = s3_server.filesystem(), run.removeprefix("s3://")
    states = [k for k in s3_server.keys(run) if k.startswith("experiment_state-") and k.endswith(".json")]
    if not states:
        return []
    try:
        with fs.open_input_stream(f"{prefix}/{max(states)}") as f:
            trials = [json.loads(t[0]) for t in json.loads(f.read())["trial_data"]]
    except (OSError, ValueError, KeyError):  # being replaced
        return []
    return [t["trial_id"] for t in trials if t.get("status") == "TERMINATED"]


def _run_logged(command: list[str], logs, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Runs ``command`` in its own session with its output in files, so that a run past
    ``timeout`` fails naming what it printed last, and leaves no process (nor its Ray) behind."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stdout", "w") as stdout, open(logs / "stderr", "w") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, start_new_session=True)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            pytest.fail(f"{' '.join(command[-4:])} still ran after {timeout} s; its stderr ended:\n"
                        + (logs / "stderr").read_text()[-4000:])
    return subprocess.CompletedProcess(command, process.returncode, (logs / "stdout").read_text(),
                                       (logs / "stderr").read_text())


def test_a_search_in_a_bucket_whose_driver_is_killed_resumes_on_another_machine(s3_bucket, s3_server, tmp_path):
    """The driver (and the Ray it started) killed with SIGKILL once a trial has finished;
    ``trainyard tune --resume s3://.../<name>`` with another cache folder (no local record of
    the search, as on another machine) finishes it from the bucket alone."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(CONFIGS / "tune_mlp.yaml"))
    raw.update(name="s3killed", storage_path=f"{s3_bucket}/runs")
    raw["train"]["epochs"] = 6
    raw["scaling"]["num_workers"] = 1
    raw["tune"].update(registry=f"{s3_bucket}/winners", search="grid", scheduler="none", num_samples=1,
                       max_concurrent_trials=1, top_k=1,
                       space={"train.lr": {"type": "grid", "values": [0.001, 0.002, 0.003]}})
    config_file = tmp_path / "s3killed.yaml"
    config_file.write_text(OmegaConf.to_yaml(raw))
    trainyard = [sys.executable, "-m", "trainyard.cli"]
    run = f"{s3_bucket}/runs/s3killed"
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "0", "TRAINYARD_CACHE_DIR": str(tmp_path / "machine-a")}
    driver = subprocess.Popen([*trainyard, "tune", str(config_file)], start_new_session=True, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        # Kill once Tune's state in the bucket records the first trial as finished.
        while not (first := _finished_in_bucket(s3_server, run)) and time.monotonic() < deadline:
            assert driver.poll() is None, "the search ended before it could be killed"
            time.sleep(0.25)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started
        driver.wait()
    assert first, "no trial finished within 240 s"
    before = s3_server.keys(run)
    assert "trainyard_tune.yaml" in before and "trainyard_trials.json" not in before, before
    first = first[0]

    # Resumed with Tune's own snapshot period: a snapshot at every step, each an upload, is
    # only for placing the kill.
    env.pop("TUNE_GLOBAL_CHECKPOINT_S")
    env["TRAINYARD_CACHE_DIR"] = str(tmp_path / "machine-b")
    out = _run_logged([*trainyard, "tune", "--resume", run, "--json"], tmp_path / "resume", env, timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    summary = json.loads(out.stdout)
    states = [(t["trial_id"], t["state"], t["iterations"], t["error"]) for t in summary["trials"]]
    assert sorted(t["state"] for t in summary["trials"]) == ["TERMINATED"] * 3, (states, out.stderr[-3000:])
    assert all(t["iterations"] == 6 for t in summary["trials"])
    # The trial finished before the kill was not run again.
    assert f"trial {first} started" not in out.stderr, out.stderr[-2000:]
    assert summary["winners"][0]["path"] == f"{s3_bucket}/winners/s3killed/v1/rank_1"
    assert summary["run_dir"].startswith(str(tmp_path / "machine-b"))
    assert "trainyard_trials.json" in s3_server.keys(run)
    # From a third machine, the finished search is refused as on the one that finished it.
    env["TRAINYARD_CACHE_DIR"] = str(tmp_path / "machine-c")
    again = subprocess.run([*trainyard, "tune", "--resume", run], env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode != 0 and again.stderr.strip().splitlines()[-1].startswith(
        "error: --resume: the search in "), again.stderr[-2000:]
    assert "already ran to its end" in again.stderr


def test_a_bucket_search_another_machine_finished_is_refused_where_a_stale_record_says_interrupted(
        s3_bucket, s3_server, tmp_path, monkeypatch):
    """Machine A was interrupted; B resumed and finished the search. A's own records still say
    "interrupted": the bucket's, which every driver uploads as it ends, win. A's longer
    history (append-only) stays. No Ray: refused before it starts."""
    from omegaconf import OmegaConf

    from trainyard.runtime.storage import write_text
    from trainyard.tune.driver import _bucket_run, _search
    from trainyard.tune.records import HISTORY

    monkeypatch.setenv("TRAINYARD_CACHE_DIR", str(tmp_path / "machine-a"))
    cfg = load_config(CONFIGS / "tune_mlp.yaml", ["name=twice", f"storage_path={s3_bucket}/runs"])
    uri = f"{s3_bucket}/runs/twice"
    write_text(f"{uri}/trainyard_tune.yaml", OmegaConf.to_yaml(cfg))
    finished = {"trials": [{"trial_id": f"t{i}", "state": "TERMINATED"} for i in range(cfg.tune.num_samples)],
                "stopped_by": None, "winners": []}
    write_text(f"{uri}/trainyard_trials.json", json.dumps(finished))
    write_text(f"{uri}/{HISTORY}", '{"trial_id": "t0"}\n')
    run_dir = _bucket_run(uri)  # A's folder: make A's stale records in it
    (run_dir / "trainyard_trials.json").write_text(json.dumps({**finished, "stopped_by": "interrupted"}))
    (run_dir / HISTORY).write_text('{"trial_id": "t0"}\n{"trial_id": "t1"}\n')
    with pytest.raises(ConfigError, match="already ran to its end"):
        _search(None, uri)
    assert json.loads((run_dir / "trainyard_trials.json").read_text())["stopped_by"] is None
    assert len((run_dir / HISTORY).read_text().splitlines()) == 2


def test_submit_accepts_bucket_storage_and_deploys_from_a_bucket_registry(tmp_path):
    from trainyard.jobs import stage

    cfg = load_config(CONFIGS / "tune_mlp.yaml", ["storage_path=s3://team-bucket/runs",
                                                  "tune.registry=s3://team-bucket/winners"])
    job = stage(cfg, deploy=True, folder=tmp_path / "job")
    assert job.entrypoint.startswith("python -m trainyard.cli tune job.yaml --address auto && ")
    assert "deploy s3://team-bucket/winners/tune_mlp --name tune_mlp" in job.entrypoint
    carried = load_config(job.folder / "job.yaml")
    assert carried.storage_path == "s3://team-bucket/runs"
    assert not any(k.startswith("AWS_") for k in job.runtime_env["env_vars"])  # never credentials
    for value, message in (("s3://", "names no bucket"), ("s3:///runs", "names no bucket"),
                           ("ftp://host/runs", "scheme 'ftp://'")):
        with pytest.raises(ConfigError, match=f"storage_path: '{value}': .*{message}"):
            stage(load_config(CONFIGS / "mlp_breast_cancer.yaml", [f"storage_path={value}"]),
                  folder=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def _train(storage: str):
    from trainyard.train.driver import run_training

    return run_training(load_config(CONFIGS / "mlp_breast_cancer.yaml", [f"storage_path={storage}",
                                                                         "train.epochs=1"]))


def test_bad_object_storage_is_one_line_naming_the_uri_before_anything_starts(s3_bucket, s3_server,
                                                                               monkeypatch, tmp_path):
    """Each is refused by the check before Ray is contacted: run alone, this test never
    starts Ray."""
    import ray

    from trainyard.serve.config import application_specs, load_serve_config
    from trainyard.tune.driver import run_tuning

    ray_before = ray.is_initialized()

    missing = "s3://no-such-bucket-here/runs"
    with pytest.raises(ConfigError, match=f"^storage_path: '{missing}': the bucket 'no-such-bucket-here' "
                                          f"does not exist at {s3_server.endpoint}"):
        _train(missing)
    search = load_config(CONFIGS / "tune_mlp.yaml", [f"storage_path={tmp_path}", f"tune.registry={missing}"])
    with pytest.raises(ConfigError, match=f"^tune.registry: '{missing}': the bucket .* does not exist"):
        run_tuning(search)
    serve_cfg = load_serve_config(base={"models": [{"winner": f"{missing}/w", "name": "m"}]})
    with pytest.raises(ConfigError, match=f"^WINNER: '{missing}/w': the bucket .* does not exist"):
        application_specs(serve_cfg)
    from trainyard.export import export_checkpoint

    with pytest.raises(ConfigError, match=f"^CHECKPOINT: '{missing}/w': the bucket .* does not exist"):
        export_checkpoint(f"{missing}/w", "onnx", tmp_path / "exported")
    with pytest.raises(ConfigError, match=f"^--resume: no tuning run found at '{s3_bucket}/runs/none' "
                                          r"\(it holds no trainyard_tune.yaml\)$"):
        run_tuning(None, resume=f"{s3_bucket}/runs/none")
    with pytest.raises(ConfigError, match=f"^--resume: '{missing}/none': the bucket .* does not exist"):
        run_tuning(None, resume=f"{missing}/none")
    with pytest.raises(TrainyardError, match=f"{s3_bucket}/nothing: not a checkpoint, a winners folder"):
        application_specs(load_serve_config(base={"models": [{"winner": f"{s3_bucket}/nothing", "name": "m"}]}))

    with monkeypatch.context() as env:  # no credentials anywhere
        env.delenv("AWS_ACCESS_KEY_ID")
        env.delenv("AWS_SECRET_ACCESS_KEY")
        with pytest.raises(ConfigError, match=f"^storage_path: '{s3_bucket}/a': no AWS credentials found "
                                              r"\(set AWS_ACCESS_KEY_ID"):
            _train(f"{s3_bucket}/a")
    with monkeypatch.context() as env:  # credentials the store does not know
        env.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEEXAMPLE00")
        env.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        with pytest.raises(ConfigError, match=f"^storage_path: '{s3_bucket}/b': the store refused the "
                                              "credentials from AWS_ACCESS_KEY_ID"):
            _train(f"{s3_bucket}/b")
    with monkeypatch.context() as env:  # an endpoint where nothing listens
        down = f"http://127.0.0.1:{free_port()}"
        env.setenv("AWS_ENDPOINT_URL", down)
        with pytest.raises(ConfigError, match=f"^storage_path: '{s3_bucket}/c': cannot reach the storage "
                                              f"endpoint {down} \\(AWS_ENDPOINT_URL\\)"):
            _train(f"{s3_bucket}/c")
    assert ray.is_initialized() == ray_before


@pytest.mark.parametrize("command", [
    ["tune", str(CONFIGS / "tune_mlp.yaml"), "tune.registry=s3://no-such-bucket-cli/winners"],
    ["deploy", "s3://no-such-bucket-cli/winners/tune_mlp"],
])
def test_the_cli_says_so_in_one_line_before_it_contacts_ray(s3_server, tmp_path, command):
    """Nothing listens at the Ray address given: the storage error comes first, so the
    bucket was checked before any Ray connection, let alone a worker."""
    extra = [f"storage_path={tmp_path}"] if command[0] == "tune" else []
    result = subprocess.run(
        [sys.executable, "-m", "trainyard.cli", *command, *extra, "--address", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "no-such-bucket-cli" in lines[0] and "does not exist" in lines[0], lines
    assert "Traceback" not in result.stderr and "Ray cluster" not in lines[0]
