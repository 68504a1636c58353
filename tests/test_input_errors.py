"""Bad input found by trying the CLI as a user would: each gets one line naming what is
wrong, before anything runs (and nothing is written where it should not be)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from trainyard.cli import main
from trainyard.config import load_config
from trainyard.errors import ConfigError

MLP = "configs/mlp_breast_cancer.yaml"
TUNE = "configs/tune_mlp.yaml"


@pytest.mark.parametrize("override, message", [
    ("seed=-1", "seed: must be 0 to 2**32 - 1"),
    ("train.lr=inf", "train.lr: must be a finite number"),
    ("train.lr=nan", "train.lr: must be a finite number"),
    ("train.momentum=-5", "train.momentum: must be a finite number, not negative"),
    ("scaling.cpus_per_worker=inf", "scaling.cpus_per_worker: must be a positive finite number"),
    ("model.params=[1,2]", "model.params: a list does not fit here"),
    ("data.params=[a]", "data.params: a list does not fit here"),
    ("model=5", "model: a plain value (5) does not fit here"),
    ("scaling.resources_per_worker=[1]", "scaling.resources_per_worker: a list does not fit here"),
    ("storage_path=", "storage_path: must not be empty (a value of type 'str')"),
    ("train.epochs=", "train.epochs: must not be empty (a value of type 'int')"),
])
def test_a_bad_value_is_named_in_one_line(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(MLP, [override])
    assert str(caught.value).startswith(message), caught.value
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("yaml_text, message", [
    ("tune:\n  space:\n    train.lr: [0.1, 0.2]\n", "tune.space.train.lr: a list does not fit here"),
    ("train:\n  metrics: {a: 1}\n", "train.metrics: a mapping of keys does not fit here"),
    ("model: mlp\n", "model: a plain value ('mlp') does not fit here"),
])
def test_a_section_given_the_wrong_shape_in_a_file_is_named(tmp_path, yaml_text, message):
    (tmp_path / "bad.yaml").write_text(yaml_text)
    from omegaconf import OmegaConf

    with pytest.raises(ConfigError, match=f"^{message}".replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace(".", r"\.")):
        load_config(TUNE, base=OmegaConf.load(tmp_path / "bad.yaml"))


def test_an_unset_environment_variable_in_a_config_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("TY_SURELY_UNSET", raising=False)
    job = tmp_path / "job.yaml"
    job.write_text("name: envjob\ndata: {name: breast_cancer}\nmodel: {name: mlp}\n"
                   "train:\n  epochs: ${oc.env:TY_SURELY_UNSET}\n")
    result = CliRunner().invoke(main, ["train", str(job), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == ('error: train.epochs: KeyError raised while resolving interpolation: '
                                     '"Environment variable \'TY_SURELY_UNSET\' not found"')


def test_tune_resume_refuses_overrides_it_would_ignore(tmp_path):
    result = CliRunner().invoke(main, ["tune", TUNE, "tune.num_samples=5", "storage_path=/x",
                                       "--resume", str(tmp_path)])
    assert result.exit_code == 2
    assert "tune.num_samples=5 would change nothing" in result.output
    assert "storage_path" not in result.output.split("would change nothing")[0]


def test_tune_resume_takes_storage_path_without_a_config(tmp_path):
    """`trainyard tune --resume NAME storage_path=DIR`: DIR was taken for a config file."""
    result = CliRunner().invoke(main, ["tune", "--resume", "mysearch", f"storage_path={tmp_path / 'elsewhere'}"])
    assert result.exit_code == 2, result.output
    assert f"no tuning run found at '{tmp_path / 'elsewhere' / 'mysearch'}'" in result.output
    assert "config file" not in result.output


def test_tune_resume_of_a_missing_run_names_the_path_once(tmp_path):
    missing = tmp_path / "nowhere"
    result = CliRunner().invoke(main, ["tune", "--resume", str(missing)])
    assert result.exit_code == 2
    assert result.output.count(str(missing)) == 1, result.output
    assert "no tuning run found" in result.output


@pytest.mark.parametrize("damage", [b"", b"garbage\n", b"\x80\x05\x95"])
def test_a_damaged_tune_state_says_it_cannot_be_resumed(tmp_path, ray_cluster, damage):
    from trainyard.tune.driver import _Tuners

    cfg = load_config(TUNE, [f"storage_path={tmp_path}"])
    (tmp_path / "tuner.pkl").write_bytes(damage)
    tuners = _Tuners(cfg, tmp_path, str(tmp_path), "val_accuracy", "max", [])
    with pytest.raises(ConfigError, match=r"tuner\.pkl\) is damaged and cannot be resumed"):
        tuners.restored()


def test_deploy_on_a_port_another_server_holds_is_refused_before_ray_starts(tmp_path):
    import socket
    import subprocess
    import sys
    import time

    from tests.test_serving import make_checkpoint

    folder, _, _ = make_checkpoint(tmp_path / "ckpt", "mlp_breast_cancer", "porttaken")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "trainyard.cli", "deploy", str(folder), "--port", str(port)],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.strip() == (f"error: port {port} on 127.0.0.1 is already in use (another server "
                                  "listens there); stop it, or serve on another --port")
    assert time.monotonic() - started < 30  # no Ray was started to find it out


def test_up_on_a_port_another_server_holds_is_refused_before_the_search(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "trainyard.cli", "up", TUNE, f"storage_path={tmp_path}",
                              f"tune.registry={tmp_path / 'w'}", "--port", str(port)],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"error: port {port} on 127.0.0.1 is already in use" in out.stderr
    assert not (tmp_path / "tune_mlp").exists()  # no search ran


@pytest.mark.parametrize("raised", [
    # HAProxy's alert inside Serve's RuntimeError (seen in CI), and Serve's own proxy's error.
    "RuntimeError: HAProxy crashed during startup: [NOTICE] ...\n[ALERT] (19297) : Binding [...haproxy.cfg:57] "
    "for frontend http_frontend: cannot bind socket (Address already in use) for [127.0.0.1:36979]\n[ALERT] exiting",
    "ray.exceptions.RayTaskError(RuntimeError): ray::ProxyActor.ready()\nRuntimeError: Failed to bind to "
    "address '127.0.0.1:36979'.",
])
def test_an_ingress_that_cannot_bind_its_port_once_ray_runs_is_named_in_one_line(raised):
    from trainyard.serve.deploy import ingress_failure

    assert str(ingress_failure(raised, "127.0.0.1", 36979)) == (
        "port 36979 on 127.0.0.1 is already in use (another server listens there); stop it, or serve "
        "on another --port")
    other = ingress_failure("RuntimeError: HAProxy crashed\n[ALERT] (1) : cannot open config", "::1", 8000)
    assert str(other) == "Serve's HTTP ingress did not start on ::1:8000: [ALERT] (1) : cannot open config"


def test_deploy_of_a_path_that_does_not_exist_says_so(tmp_path):
    result = CliRunner().invoke(main, ["deploy", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and result.output.strip() == f"error: {tmp_path / 'nowhere'}: no such file or folder"


def test_a_served_version_and_a_job_id_follow_the_name_rule(tmp_path):
    result = CliRunner().invoke(main, ["deploy", str(tmp_path), "--version", "../1"])
    assert result.exit_code == 2 and "models[0].version: '../1' is not a valid name" in result.output
    result = CliRunner().invoke(main, ["submit", MLP, f"storage_path={tmp_path}", "--job-id", "../x", "--dry-run"])
    assert result.exit_code == 2 and "--job-id" in result.output and "'../x' is not a valid name" in result.output


def test_trainyard_s_own_warnings_are_one_line_without_source(capsys):
    """Python's default shows a warning's file, line number and line of code."""
    from trainyard.cli import _show_warning
    from trainyard.jobs import InsecureTokenWarning

    _show_warning(InsecureTokenWarning("the token goes over plain HTTP"), InsecureTokenWarning,
                  "/x/cli.py", 405, line="client = JobsClient(address)")
    assert capsys.readouterr().err == "warning: the token goes over plain HTTP\n"


def test_a_new_search_under_the_name_of_one_that_ran_is_refused_before_ray(tmp_path):
    from trainyard.tune.driver import _search

    cfg = load_config(TUNE, [f"storage_path={tmp_path}", "name=again"])
    run = tmp_path / "again"
    run.mkdir()
    (run / "trainyard_tune.yaml").write_text("name: again\n")  # a search that failed at its start
    assert _search(cfg, None)[1] == run
    for record in ("trainyard_trials.json", "experiment_state-2026-11-27_00-00-00.json"):
        (run / record).write_text("{}")  # one that finished, or one stopped half-way
        with pytest.raises(ConfigError, match=rf"^name: a search named 'again' already ran in {run}; resume it "
                                              rf"\(trainyard tune --resume {run}\) or give this one another name=$"):
            _search(cfg, None)
        (run / record).unlink()


def test_a_run_started_again_with_other_data_is_refused_only_when_it_has_a_checkpoint(tmp_path):
    """A run that failed before its first checkpoint (a data file that was not there) has
    nothing to resume: the corrected command starts it again."""
    from omegaconf import OmegaConf

    from trainyard.train.driver import _check_resumable

    first = load_config(MLP, [f"storage_path={tmp_path}", "name=retry", "data.val_fraction=0.2"])
    fixed = load_config(MLP, [f"storage_path={tmp_path}", "name=retry", "data.val_fraction=0.3"])
    run = tmp_path / "retry"
    run.mkdir()
    _check_resumable(OmegaConf.to_yaml(first), str(run), fixed)  # no checkpoint: starts again
    (run / "checkpoint_000000").mkdir()
    with pytest.raises(ConfigError, match=r"^data: run 'retry' already exists .* different data section, so it "
                                          r"cannot resume"):
        _check_resumable(OmegaConf.to_yaml(first), str(run), fixed)
    _check_resumable(OmegaConf.to_yaml(fixed), str(run), fixed)  # the same config resumes


def test_the_table_dataset_names_the_file_and_what_is_wrong_with_it(tmp_path):
    from trainyard_builtins.tabular import TableParams, load_table

    files = {"empty.csv": "", "header.csv": "a,b,target\n", "quote.csv": 'a,b,target\n1,2,0\n3,"4,1\n5,6,0\n',
             "ok.csv": "a,b,target\n1,2,0\n3,4,1\n", "val.csv": "a,target\n1,0\n2,1\n",
             "gap.csv": "a,b,target\n1,2,0\n3,,1\n5,6,0\n", "unlabelled.csv": "a,b,target\n1,2,0\n3,4,\n5,6,1\n",
             "inf.csv": "a,b,target\n1,2,0\n3,4,1\n5,inf,1\n", "cats.csv": "a,b,target\n1,2,cat\n3,4,cat\n",
             "semi.csv": "a;b;target\n1;2;0\n3;4;1\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    cases = [("empty.csv", None, r"empty\.csv': cannot read it \(No columns to parse from file\)"),
             ("header.csv", None, r"header\.csv' holds no rows"),
             ("quote.csv", None, r"quote\.csv': cannot read it \(.*EOF inside string"),
             ("ok.csv", "val.csv", r"val\.csv: no column\(s\) 'b', which the training file .*ok\.csv has"),
             # would train to a NaN loss, or make a class named 'nan'
             ("gap.csv", None, r"gap\.csv: column 'b' has 1 missing \(NaN\) or infinite value\(s\); drop or fill"),
             ("inf.csv", None, r"inf\.csv: column 'b' has 1 missing \(NaN\) or infinite value\(s\)"),
             ("ok.csv", "gap.csv", r"gap\.csv: column 'b' has 1 missing"),
             ("unlabelled.csv", None, r"unlabelled\.csv: column 'target' has 1 row\(s\) without a label"),
             # trained to a perfect score on one class, exit 0
             ("cats.csv", None, r"cats\.csv: column 'target' holds fewer than two classes \(\['cat'\]\)"),
             ("semi.csv", None, r"semi\.csv: no label column 'target' \(columns: a;b;target\); the file looks "
                                r"';'-separated, and CSV files are read comma-separated")]
    for path, val, message in cases:
        with pytest.raises(ValueError, match=message):
            load_table(TableParams(path=str(tmp_path / path), label="target",
                                   val_path=str(tmp_path / val) if val else None), 0)


@pytest.mark.parametrize("dimension, message", [
    ({"name": {"type": "choice", "values": ["a", "b"]}}, "tune.space.name: name is the search's own setting"),
    ({"storage_path": {"type": "choice", "values": ["/a", "/b"]}}, "tune.space.storage_path: storage_path is the"),
    ({"tune.num_samples": {"type": "choice", "values": [1, 2]}}, "tune.space.tune.num_samples: tune.num_samples is"),
    ({"train.metrics": {"type": "choice", "values": [["accuracy"], ["loss"]]}}, "tune.space.train.metrics: train"),
    ({"train.lr": {"type": "uniform", "low": 0.0, "high": float("inf")}},
     r"tune.space.train.lr.high: must be a finite number \(got inf\)"),
])
def test_a_space_that_searches_the_search_itself_or_to_infinity_is_refused(dimension, message):
    from trainyard.tune.space import validate_space

    with pytest.raises(ConfigError, match=f"^{message}"):
        validate_space(load_config(TUNE, base={"tune": {"space": dimension}}))


def test_a_hand_damaged_checkpoint_is_one_line_naming_the_file(tmp_path):
    import json
    import shutil

    from tests.test_serving import make_checkpoint
    from trainyard.checkpoint import load_predictor
    from trainyard.errors import TrainyardError
    from trainyard.winners import model_name_for

    folder, _, _ = make_checkpoint(tmp_path / "ckpt", "mlp_breast_cancer", "damaged")
    manifest = json.loads((folder / "manifest.json").read_text())

    emptied = tmp_path / "emptied"
    shutil.copytree(folder, emptied)
    (emptied / "manifest.json").write_text("{}")
    with pytest.raises(TrainyardError, match=r"manifest\.json: names no model plugin"):
        load_predictor(emptied)
    with pytest.raises(TrainyardError, match="names no run or model"):
        model_name_for(emptied)

    widened = tmp_path / "widened"
    shutil.copytree(folder, widened)
    params = dict(manifest["model_params"], hidden=[128, 32])
    text = json.dumps({**manifest, "model_params": params})
    (widened / "manifest.json").write_text(text)
    with pytest.raises(TrainyardError, match=r"its weights do not fit the model its manifest\.json") as refused:
        load_predictor(widened)
    assert "\n" not in str(refused.value)


def test_tune_resume_of_a_training_run_says_what_it_is(tmp_path):
    run = tmp_path / "trained"
    run.mkdir()
    (run / "config.yaml").write_text("name: trained\n")
    (run / "metrics.jsonl").write_text("")
    result = CliRunner().invoke(main, ["tune", "--resume", str(run)])
    assert result.exit_code == 2
    assert f"--resume: {run} is a training run, not a search" in result.output


def test_a_training_run_whose_loss_diverges_fails_in_one_line_without_saving_it(ray_cluster, job_config, tmp_path):
    """A NaN or infinite train_loss ends the run at once (no retry of the same loss), before
    that epoch's checkpoint, naming the likely causes. (The CLI prints any trainyard error,
    a TrainingError too, as its one line.)"""
    from trainyard.errors import TrainingError
    from trainyard.train.driver import run_training

    with pytest.raises(TrainingError) as failed:
        run_training(job_config("mlp_breast_cancer", "name=diverges", "train.lr=1e12", "train.epochs=3",
                                "scaling.num_workers=1"))
    assert re.match(r"training failed: train_loss is (nan|-?inf) at epoch 1: the data may hold missing "
                    r"\(NaN\) or infinite values, or train.lr \(1e\+12\) is too high$", str(failed.value))
    assert not list((tmp_path / "runs" / "diverges").glob("checkpoint_*"))


def test_a_relative_data_path_is_the_callers_as_in_the_readme(ray_cluster, tmp_path, monkeypatch):
    """`data.params.path=data.csv` (the README's example) is read from where trainyard ran,
    though Ray starts its workers in folders of their own (this session's Ray started them
    in the folder pytest runs in, not tmp_path)."""
    import pandas as pd
    from sklearn.datasets import load_breast_cancer

    from trainyard.train.driver import run_training

    frame = load_breast_cancer(as_frame=True).frame
    frame.columns = [c.replace(" ", "_") for c in frame.columns]
    frame.to_csv(tmp_path / "data.csv", index=False)
    assert pd.read_csv(tmp_path / "data.csv").shape == frame.shape
    assert not (Path.cwd() / "data.csv").exists()
    mlp = str(Path(MLP).resolve())
    monkeypatch.chdir(tmp_path)
    result = run_training(load_config(mlp, ["storage_path=runs", "name=relative", "data.name=table",
                                            "data.params.path=data.csv", "data.params.label=target",
                                            "train.epochs=1", "scaling.num_workers=1"]))
    assert len(result.history) == 1
    assert list((tmp_path / "runs" / "relative").glob("checkpoint_*"))


def test_a_jobs_api_url_given_to_train_is_one_line_saying_which_address_it_takes(monkeypatch, tmp_path):
    """`--address http://HEAD:8265` (what submit takes) was Ray's ValueError, reported as an
    unexpected trainyard error; a token without RAY_AUTH_MODE reads as 'cannot reach'."""
    from trainyard.errors import TrainingError
    from trainyard.runtime.cluster import _check_reachable, _token_hint

    with pytest.raises(TrainingError) as err:
        _check_reachable("http://127.0.0.1:8265")
    assert str(err.value).startswith("--address 'http://127.0.0.1:8265' is a Jobs API (dashboard) URL, which "
                                     "`trainyard submit` and `trainyard jobs` take; train, tune and deploy take")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token here
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    assert _token_hint() == ""
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t0k3n")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert "RAY_AUTH_MODE is not 'token': export RAY_AUTH_MODE=token" in _token_hint()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert "check that the token is the head's" in _token_hint()


def test_workers_waiting_for_resources_others_hold_are_told_what_and_how_much(ray_cluster):
    """A run whose workers fit the cluster's total but not what is free now (Serve replicas,
    another job) waited with no word; the driver now says what it waits for, judging by its
    own pending placement group (another's, or its own once placed, is no reason)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from trainyard.runtime.cluster import resources_wait_note

    free = ray.available_resources().get("CPU", 0.0)
    total = ray.cluster_resources()["CPU"]
    each = (free + 0.5) / 2
    assert resources_wait_note({"CPU": each}, 2, "the 2 worker(s)") is None  # nothing pending: no note
    others = placement_group([{"CPU": free + 0.25}])  # someone else's group, waiting
    try:
        assert resources_wait_note({"CPU": each}, 2, "the 2 worker(s)") is None
        pending = placement_group([{"CPU": each}, {"CPU": each}])  # what Ray Train asks for, waiting
        try:
            note = resources_wait_note({"CPU": each}, 2, "the 2 worker(s)")
            expected = (f"the 2 worker(s) wait for resources others hold (CPU: needs {free + 0.5:g}, {free:g} of {total:g} "
                        "free)") if free + 0.5 <= total else "the 2 worker(s) wait for resources the cluster does not have yet"
            assert note is not None and note.startswith(expected), note
        finally:
            remove_placement_group(pending)
    finally:
        remove_placement_group(others)
