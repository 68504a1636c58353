"""Jobs on a real Ray cluster of two nodes on this machine (a head and a worker, each started
with `ray start`, token authentication on), submitted and followed through the trainyard CLI."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.conftest import CONFIGS
from tests.helpers_cluster import local_cluster
from tests.ports import free_ports


@pytest.fixture(scope="module")
def two_nodes():
    with local_cluster(nodes=2, cpus=1) as cluster:
        yield cluster


def _job_id(output: str) -> str:
    found = re.search(r"submitted \w+ job (\S+)", output)
    assert found, output
    return found.group(1)


def test_two_worker_job_runs_one_worker_per_node(two_nodes, tmp_path):
    runs = tmp_path / "runs"
    done = two_nodes.cli("submit", str(CONFIGS / "mlp_breast_cancer.yaml"), "scaling.num_workers=2",
                         "train.epochs=2", f"storage_path={runs}", "name=twonode", "--address", two_nodes.url)
    assert done.returncode == 0, done.stdout + done.stderr
    job = _job_id(done.stdout)
    assert "trainyard jobs logs" in done.stdout  # it says how to follow the job

    status = two_nodes.cli("jobs", "status", job, "--wait", "--timeout", "300", "--address", two_nodes.url)
    logs = two_nodes.cli("jobs", "logs", job, "--address", two_nodes.url)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout, status.stdout + status.stderr + logs.stdout
    assert "epoch 2/2" in logs.stdout and "rank 1 on" in logs.stdout, logs.stdout

    placed = json.loads((runs / "twonode" / "workers.json").read_text())
    assert [w["rank"] for w in placed] == [0, 1]
    assert {w["node_id"] for w in placed} == two_nodes.alive_nodes()  # one worker on each node
    rows = [json.loads(line) for line in (runs / "twonode" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[-1]["val_accuracy"] > 0.85

    listed = two_nodes.cli("jobs", "list", "--address", two_nodes.url)
    assert listed.returncode == 0 and job in listed.stdout and "SUCCEEDED" in listed.stdout
    assert "train twonode" in listed.stdout


def test_stop_a_running_job(two_nodes, tmp_path):
    done = two_nodes.cli("submit", str(CONFIGS / "mlp_breast_cancer.yaml"), "train.epochs=1000",
                         f"storage_path={tmp_path / 'runs'}", "name=long", "--address", two_nodes.url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Uploading package" not in done.stdout + done.stderr  # Ray's INFO lines as it packs the job
    job = _job_id(done.stdout)
    # Stopped once its driver runs (as it starts its Ray Train run: waiting for the first
    # epoch would add Ray Train's start-up, ~30 s here, to what the stop is tested on).
    deadline = time.monotonic() + 180
    while f"job {job}: RUNNING" not in two_nodes.cli("jobs", "status", job, "--address", two_nodes.url).stdout:
        assert time.monotonic() < deadline, "the job never started running"
        time.sleep(1)
    stopped = two_nodes.cli("jobs", "stop", job, "--address", two_nodes.url)
    assert stopped.returncode == 0 and f"stopping job {job}" in stopped.stdout
    status = two_nodes.cli("jobs", "status", job, "--wait", "--timeout", "120", "--address", two_nodes.url)
    assert "STOPPED" in status.stdout and status.returncode == 1, status.stdout + status.stderr
    # Its id is taken: a new job under it is refused in one line (the Jobs API answered a
    # 500 holding two server-side tracebacks).
    again = two_nodes.cli("submit", str(CONFIGS / "mlp_breast_cancer.yaml"), f"storage_path={tmp_path / 'runs'}",
                          "name=again", "--job-id", job, "--address", two_nodes.url)
    assert again.returncode == 1, again.stdout + again.stderr
    assert again.stderr.strip().splitlines()[-1] == (
        f"error: a job with id {job} already exists on the cluster at {two_nodes.url}; give another --job-id "
        f"(`trainyard jobs list --address {two_nodes.url}` shows the jobs)"), again.stderr
    assert "Traceback" not in again.stdout + again.stderr


def _without_token(env: dict, home: Path) -> dict:
    env = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
    env["HOME"] = str(home)  # no ~/.ray/auth_token there
    return env


def test_token_cases(two_nodes, tmp_path):
    no_token = _without_token(two_nodes.env, tmp_path)
    missing = two_nodes.cli("jobs", "list", "--address", two_nodes.url, env=no_token)
    assert missing.returncode == 1
    assert "requires an authentication token and none was found" in missing.stderr, missing.stderr
    assert "RAY_AUTH_TOKEN" in missing.stderr and "Traceback" not in missing.stderr

    wrong = two_nodes.cli("jobs", "list", "--address", two_nodes.url, env={**no_token, "RAY_AUTH_TOKEN": "not-it"})
    assert wrong.returncode == 1
    assert "refused the authentication token from RAY_AUTH_TOKEN" in wrong.stderr, wrong.stderr
    assert "not-it" not in wrong.stderr + wrong.stdout  # the token itself is never printed

    token_file = tmp_path / "token"
    token_file.write_text(two_nodes.token + "\n")
    from_file = two_nodes.cli("jobs", "list", "--address", two_nodes.url,
                              env={**no_token, "RAY_AUTH_TOKEN_PATH": str(token_file)})
    assert from_file.returncode == 0, from_file.stderr
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(two_nodes.token)
    from_home = two_nodes.cli("jobs", "list", "--address", two_nodes.url, env=no_token)
    assert from_home.returncode == 0, from_home.stderr


def test_bad_submissions_are_refused_before_anything_is_sent(two_nodes, tmp_path):
    def count() -> int:
        return len(two_nodes.get("/api/jobs/"))

    before = count()
    config = str(CONFIGS / "mlp_breast_cancer.yaml")
    bad_value = two_nodes.cli("submit", config, "train.epochs=abc", f"storage_path={tmp_path}",
                              "--address", two_nodes.url)
    assert bad_value.returncode == 2 and "train.epochs" in bad_value.stderr, bad_value.stderr
    relative = two_nodes.cli("submit", config, "--address", two_nodes.url)
    assert relative.returncode == 2 and "storage_path" in relative.stderr and "relative" in relative.stderr
    deploy_train = two_nodes.cli("submit", config, f"storage_path={tmp_path}", "--deploy", "--address", two_nodes.url)
    assert deploy_train.returncode == 2 and "--deploy" in deploy_train.stderr
    assert count() == before  # nothing reached the cluster

    nowhere = two_nodes.cli("jobs", "list", "--address", f"http://127.0.0.1:{free_ports(1)[0]}")
    assert nowhere.returncode == 1 and "cannot reach Ray's Jobs API" in nowhere.stderr
    client_address = two_nodes.cli("jobs", "list", "--address", "ray://127.0.0.1:10001")
    assert client_address.returncode == 1 and "http://HEAD:8265" in client_address.stderr
    unknown = two_nodes.cli("jobs", "status", "raysubmit_nosuchjob", "--address", two_nodes.url)
    assert unknown.returncode == 1 and "no job raysubmit_nosuchjob" in unknown.stderr, unknown.stderr
    for result in (bad_value, relative, deploy_train, nowhere, client_address, unknown):
        assert "Traceback" not in result.stderr


def test_tune_job_deploys_its_winner_on_the_cluster(two_nodes, tmp_path):
    # Last: its Serve replica keeps a share of a node's only CPU.
    shared = tmp_path / "shared"
    done = two_nodes.cli("submit", str(CONFIGS / "tune_mlp.yaml"), f"storage_path={shared / 'runs'}",
                         f"tune.registry={shared / 'winners'}", "tune.num_samples=2", "train.epochs=2",
                         "tune.max_concurrent_trials=2", "--deploy", "--serve-port", str(two_nodes.serve_port),
                         "--address", two_nodes.url, "--follow")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "SUCCEEDED" in done.stdout and "winner #1" in done.stdout
    job = _job_id(done.stdout)
    whole = two_nodes.cli("jobs", "logs", job, "--address", two_nodes.url).stdout
    assert whole and done.stdout.count(whole) == 1, done.stdout[-4000:]  # streamed whole, each line once
    assert done.stdout.count(f"Running entrypoint for job {job}") == 1
    assert (shared / "winners" / "tune_mlp" / "winners.json").exists()
    # The winner answers over HTTP from the cluster's Serve, after the job's driver exited.
    from trainyard.client import Client
    from trainyard.train.data import sample_input

    sample = sample_input(shared / "winners" / "tune_mlp" / "rank_1")
    url = f"http://127.0.0.1:{two_nodes.serve_port}"
    from trainyard.errors import TrainyardError

    with pytest.raises(TrainyardError, match="401"):
        Client(url, api_key="").predict("tune_mlp", [sample])
    answer = Client(url, api_key=two_nodes.env["TRAINYARD_API_KEY"]).predict("tune_mlp", [sample])[0]
    assert answer["label"] in ("malignant", "benign") and abs(sum(answer["scores"].values()) - 1) < 1e-4
