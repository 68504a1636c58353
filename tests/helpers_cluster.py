"""A real Ray cluster of several nodes on this machine: a head and workers, each started with
`ray start` (token authentication on), for tests of what only a cluster shows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.ports import free_ports

BIN = Path(sys.executable).parent


@dataclass
class Cluster:
    url: str  # the dashboard (Jobs API)
    address: str  # the GCS, host:port, for a driver that connects directly
    token: str
    env: dict
    serve_port: int

    def get(self, path: str):
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def alive_nodes(self) -> set[str]:
        nodes = self.get("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        return {n["node_id"] for n in nodes if n["state"] == "ALIVE"}

    def cli(self, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "trainyard.cli", *args], env=env or self.env,
                              capture_output=True, text=True, timeout=timeout, check=False)


@contextmanager
def local_cluster(nodes: int = 2, cpus: int = 1, object_store_bytes: int | None = None, prefix: str = "ty2n"):
    """``nodes`` Ray nodes of ``cpus`` CPUs (and ``object_store_bytes`` of object store each,
    if given) on this machine; every process of the cluster is stopped on exit."""
    temp = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # short: Ray's socket paths
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0", COLUMNS="200",
               # As cluster.yaml does on every node: Serve replicas there read the API key
               # from their node's environment (a --deploy job serves beyond loopback).
               TRAINYARD_API_KEY=uuid.uuid4().hex)
    p = free_ports(8 + 4 * (nodes - 1))
    store = [f"--object-store-memory={object_store_bytes}"] if object_store_bytes else []
    head = ["ray", "start", "--head", f"--port={p[0]}", f"--num-cpus={cpus}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={p[1]}", f"--ray-client-server-port={p[2]}",
            f"--dashboard-agent-listen-port={p[3]}", f"--dashboard-agent-grpc-port={p[4]}",
            f"--runtime-env-agent-port={p[5]}", f"--metrics-export-port={p[6]}",
            f"--temp-dir={temp}", "--include-dashboard=true", "--disable-usage-stats", *store]
    commands = [head]
    for i in range(nodes - 1):
        q = p[8 + 4 * i: 12 + 4 * i]
        commands.append(["ray", "start", f"--address=127.0.0.1:{p[0]}", f"--num-cpus={cpus}",
                         f"--dashboard-agent-listen-port={q[0]}", f"--dashboard-agent-grpc-port={q[1]}",
                         f"--runtime-env-agent-port={q[2]}", f"--metrics-export-port={q[3]}",
                         "--disable-usage-stats", *store,
                         # Its own folder, as a node on another machine has: with the head's,
                         # its runtime-env agent would clean up the job's working_dir under
                         # the driver.
                         f"--temp-dir={temp / f'w{i}'}"])
    try:
        for command in commands:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, check=False)
            assert done.returncode == 0, done.stdout + done.stderr
        cluster = Cluster(f"http://127.0.0.1:{p[1]}", f"127.0.0.1:{p[0]}", token, env, p[7])
        deadline = time.monotonic() + 90
        while True:
            try:
                if len(cluster.alive_nodes()) == nodes:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"the {nodes}-node cluster did not come up"
            time.sleep(1)
        yield cluster
    finally:
        # Only this cluster's processes: every one of them names its temp dir.
        subprocess.run(["pkill", "-f", str(temp)], check=False)
        time.sleep(2)
        subprocess.run(["pkill", "-9", "-f", str(temp)], check=False)
        shutil.rmtree(temp, ignore_errors=True)
