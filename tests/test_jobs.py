"""What `trainyard submit` sends, and how it finds the cluster and the token: pure logic, no Ray."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
import warnings

import pytest
from omegaconf import OmegaConf
from trainyard.config import load_config
from trainyard.errors import ConfigError
from trainyard.jobs import DEFAULT_ADDRESS, JobsError, find_token, jobs_address, stage

from tests.conftest import CONFIGS, ROOT

EXAMPLE_CONFIG = ROOT / "examples" / "trainyard-example-plugin" / "configs" / "wine_resmlp.yaml"


def test_jobs_address(monkeypatch):
    monkeypatch.delenv("TRAINYARD_JOBS_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert jobs_address(None) == DEFAULT_ADDRESS
    assert jobs_address("head:8265") == "http://head:8265"
    assert jobs_address("https://ray.example.com/") == "https://ray.example.com"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://other:8265")
    assert jobs_address(None) == "http://other:8265"
    monkeypatch.setenv("TRAINYARD_JOBS_ADDRESS", "http://mine:8265")
    assert jobs_address(None) == "http://mine:8265"
    assert jobs_address("http://[::1]:8265") == "http://[::1]:8265"  # IPv6, in brackets as URLs write it
    assert jobs_address("[fd00::2]:8265") == "http://[fd00::2]:8265"
    for wrong in ("ray://head:10001", "auto", "http://a b:1", "http://[::1:8265", "http://::1:8265"):
        with pytest.raises(JobsError, match="address"):
            jobs_address(wrong)


def test_token_lookup_order(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert find_token().value is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert find_token().value == "from-home"
    named = tmp_path / "token"
    named.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(named))
    assert find_token().value == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    token = find_token()
    assert token.value == "from-env" and token.source == "RAY_AUTH_TOKEN"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    named.write_text("")
    with pytest.raises(JobsError, match="RAY_AUTH_TOKEN_PATH=.*empty"):
        find_token()
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(JobsError, match="RAY_AUTH_TOKEN_PATH=.*cannot read"):
        find_token()


def _shared(tmp_path) -> list[str]:
    return [f"storage_path={tmp_path / 'runs'}", f"tune.registry={tmp_path / 'winners'}"]


def test_a_staged_job_carries_its_resolved_config_and_trainyard(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINYARD_API_KEY", "secret")  # never carried: runtime_env is visible
    monkeypatch.setenv("TRAINYARD_DISABLE_PLUGINS", "nothing")
    cfg = load_config(CONFIGS / "mlp_breast_cancer.yaml", [f"storage_path={tmp_path}", "train.epochs=3"])
    job = stage(cfg, folder=tmp_path / "job")
    assert job.mode == "train"
    assert job.entrypoint == "python -m trainyard.cli train job.yaml --address auto"
    carried = load_config(job.folder / "job.yaml")
    assert OmegaConf.to_container(carried) == OmegaConf.to_container(cfg)
    assert (job.folder / "trainyard" / "cli.py").exists()
    assert (job.folder / "trainyard_builtins" / "mlp.py").exists()
    assert not list(job.folder.rglob("__pycache__"))
    shipped = {d.metadata["Name"]: d for d in md.distributions(path=[str(job.folder)])}
    assert "trainyard" in shipped
    assert {ep.name for ep in shipped["trainyard"].entry_points.select(group="trainyard")} >= {"mlp", "cnn", "bert"}
    env = job.runtime_env["env_vars"]
    assert "TRAINYARD_API_KEY" not in env and env["TRAINYARD_DISABLE_PLUGINS"] == "nothing"
    assert job.runtime_env["working_dir"] == str(job.folder)
    assert job.metadata["trainyard_mode"] == "train"


def test_a_search_with_deploy_runs_tune_then_deploys_the_registry(tmp_path):
    cfg = load_config(CONFIGS / "tune_mlp.yaml", _shared(tmp_path))
    job = stage(cfg, deploy=True, serve_port=8123, pip=("rich",), folder=tmp_path / "job")
    assert job.mode == "tune"
    assert job.entrypoint.startswith("python -m trainyard.cli tune job.yaml --address auto && ")
    assert f"deploy {tmp_path / 'winners'}/tune_mlp --name tune_mlp" in job.entrypoint
    assert job.entrypoint.endswith("--port 8123 --detach")  # a key is required on the cluster
    assert stage(cfg, deploy=True, insecure=True, folder=tmp_path / "job3").entrypoint.endswith(
        "--detach --insecure")
    assert job.runtime_env["pip"] == ["rich"]
    train_only = stage(cfg, mode="train", folder=tmp_path / "job2")
    assert train_only.entrypoint.startswith("python -m trainyard.cli train ")
    # A search stopped on the cluster (jobs stop, a dead driver) is resumed by submitting it again
    # with --resume: the job resumes it by its name under the shared storage_path.
    resumed = stage(cfg, resume=True, folder=tmp_path / "job4")
    assert resumed.entrypoint == "python -m trainyard.cli tune job.yaml --address auto --resume tune_mlp"
    with pytest.raises(ConfigError, match="--resume resumes a search"):
        stage(cfg, mode="train", resume=True, folder=tmp_path / "job5")


@pytest.mark.parametrize(("config", "overrides", "message"), [
    ("mlp_breast_cancer", ["storage_path=runs"], r"storage_path: 'runs' is relative"),
    ("tune_mlp", ["storage_path=/shared/runs", "tune.registry=winners"], r"tune.registry: 'winners' is relative"),
    ("mlp_breast_cancer", ["storage_path=/shared/runs", "model.params.activation=nope"], r"model.params.activation"),
    ("tune_mlp", ["storage_path=/shared", "tune.registry=/shared/w", "tune.space.train.lr.low=1"], r"tune.space"),
])
def test_bad_jobs_are_refused_while_staging(tmp_path, config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        stage(load_config(CONFIGS / f"{config}.yaml", overrides), folder=tmp_path / "job")
    assert not (tmp_path / "job").exists()  # nothing staged, nothing sent


def test_train_config_cannot_be_submitted_as_a_search_or_deployed(tmp_path):
    cfg = load_config(CONFIGS / "mlp_breast_cancer.yaml", [f"storage_path={tmp_path}"])
    with pytest.raises(ConfigError, match="no tune section"):
        stage(cfg, mode="tune", folder=tmp_path / "a")
    with pytest.raises(ConfigError, match="--deploy"):
        stage(cfg, deploy=True, folder=tmp_path / "b")


def test_a_third_party_plugin_the_config_uses_travels_with_the_job(tmp_path):
    try:
        md.distribution("trainyard-example-plugin")
    except md.PackageNotFoundError:
        pytest.skip("the example plugin is not installed (python3 .ci/bootstrap.py installs it)")
    cfg = load_config(EXAMPLE_CONFIG, _shared(tmp_path))
    job = stage(cfg, folder=tmp_path / "job")
    assert [s.distribution for s in job.shipped] == ["trainyard", "trainyard-example-plugin"]
    assert "trainyard-example-plugin==0.1.0" in job.metadata["trainyard_plugins"]
    # From the job folder alone (as on a node where it is not installed), the plugin is
    # found through its entry point and imported from the folder.
    probe = (
        "import sys, importlib.metadata as md; sys.path.insert(0, sys.argv[1]);"
        "d = next(d for d in md.distributions(path=[sys.argv[1]]) if d.metadata['Name'] == 'trainyard-example-plugin');"
        "ep = next(iter(d.entry_points.select(group='trainyard')));"
        "print(ep.load().__file__)"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(job.folder)], capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith(str(job.folder))
    # A config of built-ins only carries no third-party package.
    builtins_only = stage(load_config(CONFIGS / "tune_mlp.yaml", _shared(tmp_path)), folder=tmp_path / "job2")
    assert [s.distribution for s in builtins_only.shipped] == ["trainyard"]


def test_a_name_that_could_reach_a_shell_is_refused_naming_the_rule(tmp_path):
    for name in ("x;touch pwned;#", "a/b", "$(id)", "-rf", "a b", "x" * 65):
        with pytest.raises(ConfigError, match=r"^name: must be 1-64 characters"):
            load_config(CONFIGS / "tune_mlp.yaml", [*_shared(tmp_path), f"name={name}"])
    load_config(CONFIGS / "tune_mlp.yaml", [*_shared(tmp_path), "name=run-2.v1_b"])


def test_every_value_in_the_job_entrypoint_is_quoted_for_the_shell(tmp_path):
    """The entrypoint runs through a real shell (as Ray runs it on the head), with a stub
    `python` first on PATH: a registry path holding shell syntax stays one argument."""
    marker = tmp_path / "pwned"
    registry = f"{tmp_path}/w;touch {marker};#"
    cfg = load_config(CONFIGS / "tune_mlp.yaml", [f"storage_path={tmp_path / 'runs'}",
                                                   f"tune.registry={registry}"])
    job = stage(cfg, deploy=True, folder=tmp_path / "job")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    args_log = tmp_path / "args"
    (stubs / "python").write_text(f'#!/bin/sh\nfor a in "$@"; do echo "$a"; done >> {args_log}\n')
    (stubs / "python").chmod(0o755)
    subprocess.run(["/bin/sh", "-c", job.entrypoint], cwd=job.folder, check=True,
                   env={"PATH": f"{stubs}:/usr/bin:/bin"})
    assert not marker.exists()
    assert f"{registry}/tune_mlp" in args_log.read_text().splitlines()


def test_a_token_bound_for_a_remote_head_over_plain_http_is_warned_about(monkeypatch):
    from trainyard.jobs import InsecureTokenWarning, Token, token_travels_safely, warn_if_exposed

    assert token_travels_safely("http://127.0.0.1:8265") and token_travels_safely("https://head:8265")
    assert token_travels_safely("http://localhost:8265")
    assert not token_travels_safely("http://head.example.com:8265")
    token = Token("secret-token-value", "RAY_AUTH_TOKEN")
    with pytest.warns(InsecureTokenWarning, match="plain HTTP") as caught:
        warn_if_exposed(token, "http://head.example.com:8265")
    assert all("secret-token-value" not in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_exposed(token, "https://head.example.com:8265")
        warn_if_exposed(Token(None, "none found"), "http://head.example.com:8265")


# --------------------------------------------------------------------------------------
# Following a job's log: Ray's websocket stream, against a stand-in for the head's Jobs API
# (real aiohttp server, real JobSubmissionClient; no Ray cluster).
# --------------------------------------------------------------------------------------


class FakeHead:
    """The Jobs API routes ``JobsClient.follow_logs`` uses: ``/api/version`` (the client's
    connection check), ``/api/jobs/ID`` and ``/api/jobs/ID/logs``, and the websocket
    ``/api/jobs/ID/logs/tail``, which needs ``Bearer TOKEN``, as a head with token auth does.
    ``script[ID]``: what the tail sends, in order: a string, "wait" (until ``go`` is set),
    "close" (a normal close: the job ended) or "drop" (the connection cut mid-stream)."""

    def __init__(self, token: str, script: dict[str, list[str]], whole_logs: dict[str, str] | None = None):
        import asyncio
        import threading

        self.token, self.script, self.whole_logs = token, script, whole_logs or {}
        self.tail_headers: list[str | None] = []
        self.log_downloads = 0
        self.go = threading.Event()
        self.closed_by_client = threading.Event()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(started,), daemon=True)
        self.thread.start()
        assert started.wait(10)
        self.url = f"http://127.0.0.1:{self.port}"

    def _serve(self, started):
        import asyncio

        from aiohttp import web

        app = web.Application()
        app.router.add_get("/api/version", self._version)
        app.router.add_get("/api/jobs/{job}/logs/tail", self._tail)
        app.router.add_get("/api/jobs/{job}/logs", self._logs)
        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()
        self.loop.close()

    async def _version(self, request):
        from aiohttp import web

        return web.json_response({"version": "4", "ray_version": "2.60.0", "ray_commit": "x"})

    async def _logs(self, request):
        from aiohttp import web

        self.log_downloads += 1
        job = request.match_info["job"]
        if job not in self.whole_logs:
            return web.Response(status=404, text=f"Job {job} does not exist")
        return web.json_response({"logs": self.whole_logs[job]})

    async def _tail(self, request):
        import asyncio

        from aiohttp import WSMsgType, web

        given = request.headers.get("Authorization")
        self.tail_headers.append(given)
        if not given:
            return web.Response(status=401, text="Unauthorized: Missing authentication token")
        if given != f"Bearer {self.token}":
            return web.Response(status=403, text="Forbidden: Invalid authentication token")
        job = request.match_info["job"]
        if job not in self.script:
            return web.Response(status=404, text=f"Job {job} does not exist")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        for step in self.script[job]:
            if step == "wait":
                while not self.go.is_set():
                    await asyncio.sleep(0.01)
            elif step == "drop":
                request.transport.abort()
                return ws
            elif step == "close":
                await ws.close()
                return ws
            elif step == "hold":  # a job that goes on: until the reader hangs up
                message = await ws.receive()
                if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                    self.closed_by_client.set()
                return ws
            else:
                await ws.send_str(step)
        await ws.close()
        return ws

    def stop(self):
        import asyncio

        if not self.thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def fake_head(monkeypatch, tmp_path):
    heads = []

    def make(script, whole_logs=None, token="tok-123"):
        head = FakeHead(token, script, whole_logs)
        heads.append(head)
        return head

    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-123")
    yield make
    for head in heads:
        head.stop()


def test_following_a_log_streams_each_chunk_once_as_it_is_written_with_the_token(fake_head, capfd):
    from trainyard.jobs import JobsClient

    head = fake_head({"raysubmit_1": ["epoch 1/2\n", "wait", "epoch 2/2\n", "done\n", "close"]})
    client = JobsClient(head.url)
    chunks = []
    for chunk in client.follow_logs("raysubmit_1"):
        chunks.append(chunk)
        head.go.set()  # the rest is written only after the first chunk arrived: it streams
    assert chunks == ["epoch 1/2\n", "epoch 2/2\n", "done\n"]
    assert head.tail_headers == ["Bearer tok-123"]  # the token reached the websocket
    assert head.log_downloads == 0  # the whole log was never fetched again
    assert list(client.follow_logs("raysubmit_1")) == chunks  # the call the CLI makes
    assert "WebSocket closed" not in capfd.readouterr().err  # no Ray INFO line after the log


def test_a_job_that_ended_before_its_driver_started_gives_its_whole_log_once(fake_head):
    from trainyard.jobs import JobsClient

    head = fake_head({"raysubmit_2": ["close"]}, whole_logs={"raysubmit_2": "runtime_env setup failed\n"})
    assert list(JobsClient(head.url).follow_logs("raysubmit_2")) == ["runtime_env setup failed\n"]
    assert head.log_downloads == 1


def test_following_a_log_translates_failures_like_the_other_calls(fake_head, monkeypatch):
    from trainyard.jobs import JobsClient

    head = fake_head({"raysubmit_3": ["a\n", "drop"]}, token="the-real-one")
    client = JobsClient(head.url)
    with pytest.raises(JobsError, match="refused the authentication token from RAY_AUTH_TOKEN") as wrong:
        list(client.follow_logs("raysubmit_3"))
    assert "tok-123" not in str(wrong.value)
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    with pytest.raises(JobsError, match="requires an authentication token and none was found"):
        list(JobsClient(head.url).follow_logs("raysubmit_3"))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "the-real-one")
    client = JobsClient(head.url)
    with pytest.raises(JobsError, match=r"no job raysubmit_nope on the cluster at http://127\.0\.0\.1") as err:
        list(client.follow_logs("raysubmit_nope"))
    assert f"(`trainyard jobs list --address {head.url}` shows the jobs)" in str(err.value)  # copyable as is
    got = []
    with pytest.raises(JobsError, match="log stream of job raysubmit_3 .* broke off before the job ended") as err:
        for chunk in client.follow_logs("raysubmit_3"):
            got.append(chunk)
    assert f"`trainyard jobs status raysubmit_3 --address {head.url}` shows whether it still runs" in str(err.value)
    assert got == ["a\n"]
    head.stop()
    with pytest.raises(JobsError, match="cannot reach Ray's Jobs API at http://127.0.0.1"):
        list(client.follow_logs("raysubmit_3"))


def test_a_reader_that_stops_early_hangs_up_the_websocket(fake_head):
    from trainyard.jobs import JobsClient

    head = fake_head({"raysubmit_4": ["first\n", "hold"]})
    stream = JobsClient(head.url).follow_logs("raysubmit_4")
    assert next(stream) == "first\n"
    stream.close()  # as Ctrl-C or a break in the caller's loop does
    assert head.closed_by_client.wait(10)


def test_an_address_that_is_not_ray_s_jobs_api_is_said_to_be_so(monkeypatch):
    """A web server that is not Ray's dashboard (404 to everything) was reported as a
    missing job named '?'."""
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from trainyard.jobs import JobsClient

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    address = f"http://127.0.0.1:{server.server_port}"
    try:
        with pytest.raises(JobsError) as refused:
            JobsClient(address).list()
    finally:
        server.shutdown()
    assert str(refused.value).startswith(f"{address} is not Ray's Jobs API (Version check returned 404)")
    assert "port 8265" in str(refused.value) and "no job" not in str(refused.value)


def test_a_job_naming_local_data_or_an_unreadable_pip_requirement_is_refused_before_sending(tmp_path, monkeypatch):
    """A data file given relative to this folder is not on the cluster (the job failed there
    with 'does not exist'); a --pip value pip cannot read failed after minutes of the job's
    environment set-up, as a Ray traceback. Both are one line here, and nothing is sent."""
    import re

    from trainyard.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_text("a,target\n1,0\n2,1\n")
    base = {"data": {"name": "table", "params": {"path": "data.csv", "label": "target"}}}
    cfg = load_config(CONFIGS / "mlp_breast_cancer.yaml", ["storage_path=/mnt/shared/runs"], base=base)
    with pytest.raises(ConfigError) as err:
        stage(cfg, folder=tmp_path / "job")
    assert str(err.value).startswith("data.params.path: 'data.csv' is a path on this machine, relative to this "
                                     "folder; the job runs on the cluster")
    cfg.data.params.path = str(tmp_path / "data.csv")  # absolute: a shared folder's path, taken
    assert stage(cfg, folder=tmp_path / "job2").mode == "train"
    for bad, said in (("/tmp/no_such_pkg_dir", "a local path, which the cluster's nodes do not have"),
                      ("torch>=>2", "not a pip requirement"), ("-r requirements.txt", "'requirements.txt' is a local path"),
                      ("-e ./pkg", "'./pkg' is a local path"), ("pkg @ ./local", "a local path"),
                      ("pkg @ file:///nowhere/x.whl", "a local path"), ("x-1.0-py3-none-any.whl", "a local path")):
        with pytest.raises(ConfigError, match=f"--pip '{re.escape(bad)}': {said}"):
            stage(cfg, pip=(bad,), folder=tmp_path / "job3")
    # What a requirements file takes, a URL, and a path that exists here (maybe a shared folder) pass.
    fine = ("rich>=13", "git+https://example.com/x.git", "pkg==1.0 --hash=sha256:abc", "pkg  # pinned",
            "pkg[extra]>=1; python_version>'3.8'", "pkg @ https://example.com/p.whl", "torch==2.4.0+cpu",
            "-r https://example.com/req.txt", str(tmp_path / "data.csv"))
    assert stage(cfg, pip=fine, folder=tmp_path / "job4").runtime_env["pip"] == list(fine)
    # A param that only shares its name with a folder here (a format, a column) is no path.
    (tmp_path / "images").mkdir()
    (tmp_path / "label").mkdir()
    files = {"data": {"name": "files", "params": {"uri": "s3://bucket/pets", "format": "images", "label": "label"}}}
    cfg = load_config(CONFIGS / "cnn_digits.yaml", ["storage_path=/mnt/shared/runs"], base=files)
    stage(cfg, mode="train", folder=tmp_path / "job5")
