"""Serving securely, with real Ray Serve over real HTTP on loopback: the API key fails closed
and reaches replicas by reference only, HAProxy's own ports stay on loopback, batched requests
are isolated from each other, and the Python client keeps the key from other hosts."""

from __future__ import annotations

import json
import socket
import stat
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import remove_applications
from tests.test_serving import make_checkpoint

pytestmark = pytest.mark.usefixtures("ray_cluster")

KEY = "k3y-by-reference-8c1f"  # given directly (as --api-key would): must never reach Serve's args
AUTH = {"Authorization": f"Bearer {KEY}"}


def call(url, body=None, headers=None, method=None):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def together(calls):
    """Run ``calls`` (url, body) at the same moment, each from its own thread; their answers."""
    barrier = threading.Barrier(len(calls))
    answers = [None] * len(calls)

    def one(i, url, body):
        barrier.wait()
        answers[i] = call(url, body, AUTH)

    threads = [threading.Thread(target=one, args=(i, *c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


@pytest.fixture(scope="module")
def secured(tmp_path_factory, serve_port):
    """One deploy for the module: three tiny models behind a key given directly."""
    from trainyard.serve.config import load_serve_config
    from trainyard.serve.deploy import deploy

    root = tmp_path_factory.mktemp("secure")
    port = serve_port
    samples = {}
    for name, config_name in (("sec_mlp", "mlp_breast_cancer"), ("sec_cnn", "cnn_digits"),
                              ("sec_bert", "bert_sentiment")):
        _, inputs, _ = make_checkpoint(root / name, config_name, name)
        samples[name] = inputs
    models = [
        {"winner": str(root / "sec_mlp"), "name": "sec_mlp", "num_cpus": 0.1},
        # A long batch window, so requests sent together are batched together.
        {"winner": str(root / "sec_cnn"), "name": "sec_cnn", "num_cpus": 0.1, "max_batch_size": 16,
         "batch_wait_ms": 150, "max_forward_examples": 8},
        {"winner": str(root / "sec_bert"), "name": "sec_bert", "num_cpus": 0.1, "max_batch_size": 16,
         "batch_wait_ms": 150, "max_forward_examples": 512},
    ]
    cfg = load_serve_config(base={"port": port, "api_key": KEY, "max_items": 2048,
                                  "max_body_bytes": 2_000_000, "models": models})
    endpoints = deploy(cfg)
    yield {"base": f"http://127.0.0.1:{port}", "port": port, "root": root, "cfg": cfg,
           "endpoints": endpoints, "samples": samples}
    remove_applications()


# --------------------------------------------------------------------------------------
# 1-2. The API key: by reference only, fails closed, compared in constant time
# --------------------------------------------------------------------------------------


def test_a_key_given_directly_reaches_replicas_only_as_a_private_file(secured):
    import ray
    from ray.serve.context import _get_global_client

    from trainyard.serve.config import application_specs
    from trainyard.serve.deploy import replica_auth

    url = secured["endpoints"]["sec_mlp"] + "/predict"
    row = np.asarray(secured["samples"]["sec_mlp"][:1]).tolist()
    status, body = call(url, {"inputs": row})
    assert status == 401 and "missing API key" in body["error"]
    with pytest.raises(urllib.error.HTTPError) as refused:  # a 401 names its scheme (RFC 9110)
        urllib.request.urlopen(urllib.request.Request(url, data=json.dumps({"inputs": row}).encode(),
                                                      headers={"Content-Type": "application/json"}), timeout=120)
    assert refused.value.code == 401 and refused.value.headers["WWW-Authenticate"].startswith("Bearer ")
    status, body = call(url, {"inputs": row}, {"Authorization": "Bearer " + KEY[:-1] + "x"})
    assert status == 403 and KEY not in json.dumps(body)
    assert call(url, {"inputs": row}, AUTH)[0] == 200
    assert call(url, {"inputs": row}, {"X-API-Key": KEY})[0] == 200
    assert call(secured["base"] + "/v2/health/ready")[0] == 200  # health stays open

    # What deploy hands Serve: the key file's path, never the key.
    auth = replica_auth(secured["cfg"], None)
    specs = application_specs(secured["cfg"], auth)
    assert KEY not in json.dumps(specs)
    key_file = Path(auth["api_key_file"])
    assert [s["args"]["options"]["api_key_file"] for s in specs[:3]] == [str(key_file)] * 3
    assert key_file.read_text() == KEY
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    # What Serve shows in its API (and dashboard), and the driver's runtime_env.
    details = json.dumps(_get_global_client().get_serve_details(), default=str)
    assert "sec_mlp" in details and KEY not in details
    assert KEY not in json.dumps(ray.get_runtime_context().runtime_env, default=str)


def test_a_replica_without_its_key_refuses_to_start_and_deploy_says_why(secured, tmp_path, monkeypatch):
    from ray import serve
    from click.testing import CliRunner

    from trainyard.cli import main
    from trainyard.errors import TrainyardError
    from trainyard.serve.app import ApiKeyMissing, load_api_key
    from trainyard.serve.config import load_serve_config
    from trainyard.serve.deploy import deploy

    winner = str(secured["root"] / "sec_mlp")
    # The variable is set where deploy runs, but not on the replica's node (this Ray started
    # without it): the replica refuses to start instead of serving with no key.
    monkeypatch.setenv("TRAINYARD_TEST_ONLY_HERE_KEY", "not-on-the-node")
    cfg = load_serve_config(base={"port": secured["port"], "api_key_env": "TRAINYARD_TEST_ONLY_HERE_KEY",
                                  "models": [{"winner": winner, "name": "keyless", "num_cpus": 0.1}]})
    with pytest.raises(TrainyardError) as failed:
        deploy(cfg)
    message = str(failed.value)
    assert message.startswith("model 'keyless' did not start: trainyard API key: the environment "
                              "variable TRAINYARD_TEST_ONLY_HERE_KEY is not set"), message
    assert "\n" not in message and "not-on-the-node" not in message
    assert "keyless" not in serve.status().applications  # nothing half-deployed is left

    # The command: one line naming the key file, found missing on this machine (whose replicas
    # would read it) before anything is deployed.
    key_file = tmp_path / "missing_key"
    result = CliRunner().invoke(main, ["deploy", winner, "--name", "keyless2", "--num-cpus", "0.1",
                                       "--port", str(secured["port"]), "--api-key-file", str(key_file),
                                       "--detach"])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: the API key file {key_file} cannot be read (No such file or directory); "
                     "nothing was deployed"], result.stderr
    assert "keyless2" not in serve.status().applications
    # An empty key (file or variable) is no key: the same refusal, from the replica's own check.
    empty = tmp_path / "empty_key"
    empty.write_text(" \n")
    result = CliRunner().invoke(main, ["deploy", winner, "--name", "keyless3", "--port", str(secured["port"]),
                                       "--api-key-file", str(empty), "--detach"])
    assert result.exit_code == 1 and result.stderr.strip() == (
        f"error: the API key file {empty} is empty; nothing was deployed"), result.stderr
    with pytest.raises(ApiKeyMissing, match=f"the key file {empty} is empty"):
        load_api_key({"api_key_file": str(empty)})
    monkeypatch.setenv("TRAINYARD_TEST_EMPTY_KEY", "")
    with pytest.raises(ApiKeyMissing, match="variable TRAINYARD_TEST_EMPTY_KEY is not set"):
        load_api_key({"api_key_env": "TRAINYARD_TEST_EMPTY_KEY"})
    empty.write_text("abc\n")
    assert load_api_key({"api_key_file": str(empty)}) == b"abc" and load_api_key({}) is None


def test_serving_beyond_loopback_without_a_key_is_refused_unless_insecure(secured, tmp_path, monkeypatch):
    import yaml
    from click.testing import CliRunner

    from trainyard.cli import main
    from trainyard.errors import TrainyardError
    from trainyard.serve.config import check_exposure, load_serve_config, write_serve_config
    from trainyard.serve.deploy import deploy

    monkeypatch.delenv("TRAINYARD_API_KEY", raising=False)
    winner = str(secured["root"] / "sec_mlp")
    open_cfg = load_serve_config(base={"host": "0.0.0.0", "port": secured["port"],
                                       "models": [{"winner": winner, "name": "public"}]})
    with pytest.raises(TrainyardError, match=r"refusing to serve on 0\.0\.0\.0 without an API key.*--insecure"):
        deploy(open_cfg)
    for host in ("127.0.0.1", "::1", "localhost"):
        check_exposure(load_serve_config(base={"host": host, "models": [{"winner": winner}]}), host)
    open_cfg.insecure = True
    check_exposure(open_cfg, "0.0.0.0")

    runner = CliRunner()
    result = runner.invoke(main, ["deploy", winner, "--host", "0.0.0.0", "--port", str(secured["port"])])
    assert result.exit_code == 1
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        "error: refusing to serve on 0.0.0.0 without an API key (anyone who reaches the port could use "
        "every model): set TRAINYARD_API_KEY, or give --api-key-file FILE, or pass --insecure to "
        "serve with no key"]

    # A Serve config for a cluster listens on 0.0.0.0: the same rule, and never the key.
    out = tmp_path / "serve.yaml"
    result = runner.invoke(main, ["deploy", winner, "--config-out", str(out)])
    assert result.exit_code == 1 and "refusing to serve on 0.0.0.0" in result.stderr and not out.exists()
    result = runner.invoke(main, ["deploy", winner, "--config-out", str(out), "--insecure"])
    assert result.exit_code == 0 and "No API key" in out.read_text()
    result = runner.invoke(main, ["deploy", winner, "--config-out", str(out), "--api-key", ""])
    assert result.exit_code == 2 and "--api-key" in result.stderr and "empty" in result.stderr  # an unset $KEY
    both = runner.invoke(main, ["deploy", winner, "--config-out", str(out), "--api-key", KEY, "--api-key-file",
                                str(tmp_path / "key")])
    assert both.exit_code == 2 and "not both" in both.stderr
    result = runner.invoke(main, ["deploy", winner, "--config-out", str(out), "--api-key", KEY])
    assert result.exit_code == 0, result.output
    assert "warning: --api-key shows the key" in result.stderr  # ps, shell history
    text = out.read_text()
    options = yaml.safe_load(text)["applications"][0]["args"]["options"]
    assert options["api_key_env"] == "TRAINYARD_API_KEY" and KEY not in text
    monkeypatch.setenv("TRAINYARD_API_KEY", KEY)  # the usual way: the nodes' variable
    write_serve_config(load_serve_config(base={"models": [{"winner": winner}]}), out)
    assert KEY not in out.read_text() and "api_key_env: TRAINYARD_API_KEY" in out.read_text()
    key_file = tmp_path / "key"
    result = runner.invoke(main, ["deploy", winner, "--config-out", str(out), "--api-key-file", str(key_file)])
    options = yaml.safe_load(out.read_text())["applications"][0]["args"]["options"]
    assert result.exit_code == 0 and options["api_key_file"] == str(key_file)
    assert "api_key_env" not in options


def test_the_key_is_compared_in_constant_time():
    import inspect

    from trainyard.serve import app

    source = inspect.getsource(app._check_key)
    assert "hmac.compare_digest(" in source and "!= api_key" not in source and "== api_key" not in source


# --------------------------------------------------------------------------------------
# 3. No secret in the runtime_env
# --------------------------------------------------------------------------------------


def test_only_the_plugin_switches_travel_in_the_runtime_env():
    import ray

    from trainyard.jobs import CARRIED_ENV
    from trainyard.runtime.cluster import carried_env

    environ = {"TRAINYARD_API_KEY": "a", "TRAINYARD_MY_TOKEN": "b", "TRAINYARD_DB_PASSWORD": "c",
               "TRAINYARD_S3_SECRET": "d", "TRAINYARD_OTHER_KEY": "e", "TRAINYARD_STORAGE_PATH": "/x",
               "TRAINYARD_PLUGINS": "p", "TRAINYARD_DISABLE_PLUGINS": "q", "PATH": "/bin"}
    assert carried_env(environ) == {"TRAINYARD_PLUGINS": "p", "TRAINYARD_DISABLE_PLUGINS": "q"}
    carried = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
    assert set(carried) <= set(CARRIED_ENV)


# --------------------------------------------------------------------------------------
# 4. HAProxy: stats and metrics on loopback, its files in a private folder
# --------------------------------------------------------------------------------------


def _listening(port: int) -> set[str]:
    """The local addresses with a socket listening on ``port``, from /proc/net/tcp{,6}."""
    import ipaddress

    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, state = fields[1], fields[3]
            address, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            # /proc prints each 32-bit word in host (little-endian) order.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(raw)
            if ip.version == 6 and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            found.add(str(ip))
    return found


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


def test_haproxy_stats_and_metrics_listen_on_loopback_only_and_its_folder_is_private(secured):
    from trainyard.runtime.cluster import SERVE_ENV

    if SERVE_ENV.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        pytest.skip("this session's embedded Ray serves through Serve's proxy, not HAProxy")
    folder = Path(SERVE_ENV["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent
    assert not str(folder).startswith("/tmp/haproxy-serve")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    (socket_path,) = folder.glob("*/admin.sock")  # Serve adds a folder per node
    assert stat.S_ISSOCK(socket_path.stat().st_mode)
    assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(socket_path.stat().st_mode) & 0o077 == 0  # was mode 666
    ports = {k: int(SERVE_ENV[f"RAY_SERVE_HAPROXY_{k}_PORT"]) for k in ("STATS", "METRICS")}
    # What the kernel says listens on each port (Serve may be rewriting its config file at
    # any moment, to be rewritten again by the wrapper before HAProxy reads it): loopback only.
    for name, port in ports.items():
        deadline = time.monotonic() + 30
        while True:
            addresses = _listening(port)
            if addresses == {"127.0.0.1"} or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert addresses == {"127.0.0.1"}, (name, port, addresses)
        # Only loopback is probed: the tests send nothing to any other address.
        assert _reachable("127.0.0.1", port), f"{name} should still listen on loopback"
    # HAProxy still serves the models through the wrapper.
    assert call(secured["base"] + "/v2/health/ready")[0] == 200


# --------------------------------------------------------------------------------------
# 5. Batching isolates requests
# --------------------------------------------------------------------------------------


def _probabilities(body):
    return np.asarray([[p["scores"][c] for c in sorted(p["scores"])] for p in body["predictions"]])


def test_batched_image_requests_of_either_shape_and_a_bad_one_are_answered_each_on_its_own(secured):
    url = secured["endpoints"]["sec_cnn"] + "/predict"
    images = np.asarray(secured["samples"]["sec_cnn"], dtype=np.float32)  # [4, 1, 8, 8]
    with_channel = {"inputs": images.tolist()}
    without_channel = {"inputs": images[:, 0].tolist()}  # [N, 8, 8]: a one-channel image's short form
    alone = {}
    for key, body in (("with", with_channel), ("without", without_channel)):
        status, answer = call(url, body, AUTH)
        assert status == 200, answer
        alone[key] = _probabilities(answer)
    assert np.allclose(alone["with"], alone["without"], atol=1e-6)
    mixed = {"inputs": [images[0].tolist(), images[1, 0].tolist()]}  # [1,8,8] and [8,8] in one batch
    big = {"inputs": np.concatenate([images] * 5).tolist()}  # 20 images: forward passes of at most 8
    calls = [(url, with_channel), (url, without_channel), (url, mixed), (url, with_channel),
             (url, without_channel), (url, big)]
    answers = together(calls)
    for (_, body), (status, answer) in zip(calls, answers):
        if body is mixed:
            assert status == 400 and "'inputs' must be a list of arrays of shape [1, 8, 8]" in answer["error"]
            continue
        assert status == 200, answer
        expected = np.concatenate([alone["with"]] * 5) if body is big else alone["with"]
        assert np.allclose(_probabilities(answer), expected, atol=1e-5)
    # OIP: an FP32 overflow is refused, not turned into Infinity.
    status, answer = call(secured["endpoints"]["sec_mlp"] + "/infer", {"inputs": [
        {"name": "input-0", "shape": [1, 30], "datatype": "FP64", "data": [1e39] * 30}]}, AUTH)
    assert status == 400 and "finite FP32" in answer["error"]


def test_batches_are_reported_in_ray_metrics_under_serve_s_batching_names(secured):
    """trainyard's batcher reports what Serve's @serve.batch did (serve_actual_batch_size and
    the rest), with Serve's application tag: read from the node's Prometheus endpoint."""
    import ray

    url = secured["endpoints"]["sec_cnn"] + "/predict"
    body = {"inputs": [np.asarray(secured["samples"]["sec_cnn"][0]).tolist()]}
    assert all(status == 200 for status, _ in together([(url, body)] * 6))
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])

    def scrape() -> dict[str, float]:
        """sec_cnn's batching metrics in one read of the endpoint, each summed over its series."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        found: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("ray_serve_") and 'application="sec_cnn"' in line \
                    and 'function_name="predict_batch"' in line:
                name = line.split("{", 1)[0][len("ray_"):]
                found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return found

    # Ray exports metrics every few seconds, a histogram's parts not always in the same export,
    # and an export may hold only the first of the requests above (CI: 5 batches of one):
    # read until one shows a batch of more than one request, for at most 90 s.
    deadline = time.monotonic() + 90
    while True:
        metrics = scrape()
        count, total = metrics.get("serve_actual_batch_size_count"), metrics.get("serve_actual_batch_size_sum")
        if (count and total and total > count) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert count is not None, f"no serve_actual_batch_size for sec_cnn in Ray's metrics: {metrics}"
    # Sent together into a 150 ms window: fewer passes than requests.
    assert count >= 1 and total is not None and total > count, metrics
    assert metrics.get("serve_batches_processed_total", 0) >= 1, metrics


def test_a_lone_surrogate_gets_a_4xx_and_the_requests_batched_with_it_their_answers(secured):
    url = secured["endpoints"]["sec_bert"] + "/predict"
    good = [{"inputs": ["The food was wonderful."]}, {"inputs": ["Awful service.", "Fine."]},
            {"inputs": ["Lovely film."]}]
    alone = []
    for body in good:
        status, answer = call(url, body, AUTH)
        assert status == 200, answer
        alone.append(_probabilities(answer))
    bad = {"inputs": ["fine", "\ud800 broken"]}  # JSON can spell it ("\\ud800"); UTF-8 cannot
    assert "\\ud800" in json.dumps(bad)
    bad_oip = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["\udfff"]}]}
    calls = [(url, good[0]), (url, bad), (url, good[1]), (url.replace("/predict", "/infer"), bad_oip),
             (url, good[2])]
    answers = together(calls)
    status, answer = answers[1]
    assert status == 400 and "inputs[1]: not valid Unicode text" in answer["error"], answer
    status, answer = answers[3]
    assert status == 400 and "inputs[0].data[0]: not valid Unicode text" in answer["error"], answer
    for i, expected in zip((0, 2, 4), alone):
        status, answer = answers[i]
        assert status == 200, answer
        assert np.allclose(_probabilities(answer), expected, atol=1e-5)


def test_a_failing_batch_is_retried_request_by_request_in_passes_of_capped_size(secured):
    """The model's own forward pass, on inputs that skipped validation: a batch that fails is
    run again one request at a time, so only the bad request gets its error."""
    from trainyard.checkpoint import load_predictor
    from trainyard.serve.app import BatchRunner
    from trainyard.serve.protocol import RequestError

    predictor = load_predictor(secured["root"] / "sec_bert")
    passes = []

    class Counted:  # the real predictor, counting the examples of each forward pass
        processor = predictor.processor

        def forward(self, inputs):
            passes.append(len(inputs))
            return predictor.forward(inputs)

    runner = BatchRunner(Counted(), max_examples=3)
    good = [["The food was wonderful."], ["Awful service.", "Fine.", "Okay.", "Great!"]]
    alone = [runner.forward_many([b])[0] for b in good]
    assert passes == [1, 3, 1]  # a request of 4 examples: passes of 3 and 1
    passes.clear()
    results = runner.forward_many([good[0], ["ok", "\ud800"], good[1]])
    assert isinstance(results[1], RequestError) and results[1].status == 422
    for result, expected in zip((results[0], results[2]), alone):
        assert not isinstance(result, RequestError)
        assert result[0] == expected[0] and np.allclose(result[1], expected[1], atol=1e-5)
    assert max(passes) <= 3


def test_only_passes_expected_to_be_short_run_on_the_event_loop():
    from trainyard.serve.app import InlinePolicy

    policy = InlinePolicy(budget_s=0.002, warmup=3)
    assert not policy.inline(1)  # nothing timed yet: the thread
    for _ in range(3):
        policy.observe(4, 0.0004)  # 0.1 ms an example
    assert policy.inline(1) and policy.inline(20) and not policy.inline(21)
    policy.observe(1, 0.05)  # one slow pass (descheduled on a busy machine): still inline
    assert policy.inline(1) and policy.inline(20)
    policy.observe(1, 0.05)
    policy.observe(1, 0.05)  # most of the recent passes slow: the model is slow now
    assert not policy.inline(1)
    for _ in range(15):  # fast again: the slow passes leave the window
        policy.observe(1, 0.0001)
    assert policy.inline(20)
    assert not InlinePolicy(budget_s=0, warmup=0).inline(1)  # 0: never inline


def test_health_and_metadata_answer_while_a_large_forward_pass_runs(secured):
    url = secured["endpoints"]["sec_bert"]
    big = {"inputs": ["the food was wonderful and the service was slow but friendly " * 3] * 2048}
    started = time.perf_counter()
    status, answer = call(url + "/predict", big, AUTH)
    alone = time.perf_counter() - started
    assert status == 200 and len(answer["predictions"]) == 2048
    done = threading.Event()
    thread = threading.Thread(target=lambda: (call(url + "/predict", big, AUTH), done.set()))
    thread.start()
    time.sleep(min(0.3, alone / 5))
    latencies = []  # of every metadata call sent while the large request was in flight
    while not done.is_set():
        start = time.perf_counter()
        status, body = call(url + "/ready")
        assert status == 200 and body["ready"] is True
        latencies.append(time.perf_counter() - start)
        time.sleep(0.05)
    thread.join()
    # With the forward pass on the event loop, a call sent during it would wait for its end.
    assert len(latencies) >= 3, (alone, latencies)
    assert max(latencies) < max(0.25, alone / 4), (alone, latencies)


# --------------------------------------------------------------------------------------
# 6. The Python client keeps the key from other hosts
# --------------------------------------------------------------------------------------


def _server(handler_cls):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_cls)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_the_client_does_not_send_the_key_across_a_redirect_to_another_host():
    from trainyard.client import Client, _KeepKeyAtHome

    seen: list[tuple[str, dict]] = []

    class Target(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, dict(self.headers)))
            data = json.dumps({"ready": True, "models": [{"name": "m"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    other = _server(Target)

    class Redirector(Target):
        def do_GET(self):
            if self.path == "/v2/health/ready":  # to another host
                location = f"http://localhost:{other.server_address[1]}/elsewhere"
            elif self.path == "/v2/models":  # within the same origin
                location = "/v2/models/here"
            else:
                return super().do_GET()
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

    home = _server(Redirector)
    try:
        client = Client(f"http://127.0.0.1:{home.server_address[1]}", api_key="s3cret")
        assert client.ready() is True
        path, headers = seen[-1]
        assert path == "/elsewhere"
        assert not {h.lower() for h in headers} & {"authorization", "x-api-key"}, headers
        assert client.models() == ["m"]
        path, headers = seen[-1]
        assert path == "/v2/models/here" and headers.get("Authorization") == "Bearer s3cret"
        # X-API-Key, the other header the server takes, is dropped too.
        opener = urllib.request.build_opener(_KeepKeyAtHome)
        request = urllib.request.Request(f"http://127.0.0.1:{home.server_address[1]}/v2/health/ready",
                                         headers={"X-API-Key": "s3cret"})
        with opener.open(request, timeout=10) as response:
            assert response.status == 200
        path, headers = seen[-1]
        assert path == "/elsewhere" and "x-api-key" not in {h.lower() for h in headers}
    finally:
        home.shutdown()
        other.shutdown()


# --------------------------------------------------------------------------------------
# Names: one rule for served names, those read from a checkpoint included
# --------------------------------------------------------------------------------------


def test_a_served_name_from_a_checkpoint_manifest_is_checked_like_a_given_one(tmp_path):
    """A manifest naming its run `mlp/infer` would take over model mlp's infer route, and
    one named `trainyard` the root app: both are refused before anything is deployed."""
    import json as _json

    from trainyard.errors import TrainyardError
    from trainyard.serve.config import application_specs

    from tests.test_serving import make_checkpoint, serve_config

    folder, _, _ = make_checkpoint(tmp_path / "ckpt", "mlp_breast_cancer", "mlp")
    manifest = folder / "manifest.json"
    for hostile, reason in (("mlp/infer", "not a valid name"), ("trainyard", "reserved")):
        data = _json.loads(manifest.read_text())
        data["run"] = hostile
        manifest.write_text(_json.dumps(data))
        with pytest.raises(TrainyardError, match=reason):
            application_specs(serve_config(8000, [(str(folder), "")]))
    with pytest.raises(TrainyardError, match=r"models\[0\]\.name: 'trainyard' is reserved"):
        serve_config(8000, [(str(folder), "trainyard")])
    assert application_specs(serve_config(8000, [(str(folder), "renamed")]))[0]["name"] == "renamed"


def test_the_key_appears_in_no_log_of_the_ray_session(secured):
    """After a deploy with a key and requests with right and wrong keys, nothing Ray wrote
    in its session folder (driver, replicas, Serve controller, proxy, HAProxy) holds it."""
    from ray._private.worker import global_worker

    row = np.asarray(secured["samples"]["sec_mlp"][:1]).tolist()
    url = secured["endpoints"]["sec_mlp"] + "/predict"
    assert call(url, {"inputs": row}, AUTH)[0] == 200
    assert call(url, {"inputs": row}, {"Authorization": "Bearer " + KEY[:-1] + "x"})[0] == 403
    session = Path(global_worker.node.get_session_dir_path())
    logs = [p for p in (session / "logs").rglob("*") if p.is_file()]
    assert len(logs) > 5  # the replicas' and Serve's logs were read, not an empty folder
    leaked = [str(p) for p in logs if KEY.encode() in p.read_bytes()]
    assert leaked == []
