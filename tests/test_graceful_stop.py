"""SIGTERM (what systemd, Kubernetes or a CI runner sends) and Ctrl-C to a real
`trainyard deploy`: requests in flight are answered, Serve and the embedded Ray stop, one
line says so, exit 0, no native crash dump, no Ray process left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from tests.ports import free_port
from tests.test_serving import make_checkpoint


def _ray_processes(marker: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if "pgrep" not in line]


class Deploy:
    """A real `trainyard deploy` of a small checkpoint in its own process and its own Ray
    (RAY_TMPDIR of its own, so its processes can be told from others), its stdout read as it
    comes."""

    def __init__(self, tmp_path, name: str, ingress: str):
        self.folder, self.inputs, _ = make_checkpoint(tmp_path / "ckpt", "mlp_breast_cancer", name)
        self.port = free_port()
        self.ray_tmp = tempfile.mkdtemp(prefix="tyst", dir="/tmp")  # short: Ray's socket paths
        env = {**os.environ, "COLUMNS": "200", "RAY_TMPDIR": self.ray_tmp}
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trainyard.cli", "deploy", str(self.folder), "--port", str(self.port),
             "--ingress", ingress],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self.serving = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.out = self.err = ""

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if "serving until Ctrl-C or SIGTERM" in line:
                self.serving.set()

    def wait_serving(self) -> None:
        assert self.serving.wait(240), "".join(self.lines)[-3000:] + self.proc.stderr.read()[-3000:]

    def stop(self, sig) -> None:
        """Send ``sig`` and wait for the process to end."""
        self.proc.send_signal(sig)
        self.proc.wait(timeout=120)
        self.reader.join(timeout=30)
        self.out, self.err = "".join(self.lines), self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()

    def assert_stopped_cleanly(self, name: str) -> None:
        """Exit 0, the one line, no crash dump, no Ray process left."""
        assert self.proc.returncode == 0, self.out[-2000:] + self.err[-3000:]
        assert f"{name}: requests in flight answered; Serve and the embedded Ray stopped" in self.out
        for crash in ("Traceback", "Fatal Python error", "*** SIG", "Aborted", "core dumped"):
            assert crash not in self.err and crash not in self.out, self.err[-3000:]
        deadline = time.monotonic() + 30
        while _ray_processes(self.ray_tmp) and time.monotonic() < deadline:
            time.sleep(1)
        assert _ray_processes(self.ray_tmp) == []
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def test_ctrl_c_to_deploy_drains_stops_ray_and_exits_zero(tmp_path):
    """Ctrl-C (SIGINT) through Serve's own proxy ingress. SIGTERM takes the same handler and is
    sent in the HAProxy test below, which checks the same clean stop."""
    sig = signal.SIGINT
    deploy = Deploy(tmp_path, "graceful", "proxy")
    url = f"http://127.0.0.1:{deploy.port}/v2/models/graceful/predict"
    body = json.dumps({"inputs": [list(map(float, row)) for row in deploy.inputs]}).encode()

    def ask() -> int:
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status

    try:
        deploy.wait_serving()
        assert ask() == 200
        answered: list[int] = []
        stop_load = threading.Event()

        def load() -> None:  # requests keep arriving while the signal lands
            while not stop_load.is_set():
                try:
                    answered.append(ask())
                except OSError:
                    return  # the port closed: no request is taken after the drain began

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        deploy.stop(sig)
        stop_load.set()
        for t in threads:
            t.join(timeout=30)
    finally:
        deploy.kill()
    assert answered and set(answered) == {200}  # every request that was taken was answered
    deploy.assert_stopped_cleanly(signal.Signals(sig).name)


def test_sigterm_behind_haproxy_answers_what_it_took_on_open_keep_alive_connections(tmp_path):
    """Behind HAProxy (the default ingress) clients keep their connections open. At SIGTERM a
    request sent on one is answered (and the connection then closed), or never taken (a new
    connection is refused): HAProxy is drained before Serve stops, rather than killed with
    requests on their way through it. One line on stdout, and nothing of Ray's."""
    import http.client

    deploy = Deploy(tmp_path, "keepalive", "haproxy")
    port = deploy.port
    body = json.dumps({"inputs": [list(map(float, row)) for row in deploy.inputs] * 32})
    outcomes: list[str] = []  # per request: "200", "refused" (never taken), or "dropped"
    stop_load = threading.Event()

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while not stop_load.is_set():
            try:
                connection.request("POST", "/v2/models/keepalive/predict", body,
                                   {"Content-Type": "application/json"})
            except ConnectionRefusedError:
                outcomes.append("refused")
                return
            except OSError:  # the connection was closed while idle: open another
                connection.close()
                continue
            try:
                response = connection.getresponse()
                response.read()
                outcomes.append(str(response.status))
                if response.getheader("connection", "").lower() == "close":
                    connection.close()
            except (http.client.RemoteDisconnected, ConnectionResetError, http.client.IncompleteRead):
                outcomes.append("dropped")
                connection.close()

    try:
        deploy.wait_serving()
        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(2.0)
        taken = len(outcomes)
        deploy.stop(signal.SIGTERM)
        stop_load.set()
        for t in threads:
            t.join(timeout=60)
    finally:
        deploy.kill()
    assert taken > 20 and outcomes.count("200") > taken, outcomes
    # Each of the 8 clients had a request on its way at the signal; killing HAProxy cut them.
    # A request sent at the very moment HAProxy closed its idle connection may still be lost
    # (HTTP/1.1 has no way to tell it was not taken): at most one.
    assert outcomes.count("dropped") <= 1, outcomes[-40:]
    assert set(outcomes) <= {"200", "refused", "dropped"}, set(outcomes)
    assert "(raylet)" not in deploy.out and "graceful_shutdown failed" not in deploy.out, deploy.out[-2000:]
    assert deploy.out.strip().splitlines()[-1] == ("SIGTERM: requests in flight answered; Serve and the "
                                                   "embedded Ray stopped")
    deploy.assert_stopped_cleanly("SIGTERM")
