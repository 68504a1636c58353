"""Connecting to Ray: an existing cluster, or an embedded local one."""

from __future__ import annotations

import os
import re

from trainyard.errors import TrainingError
from trainyard.runtime.ingress import HAPROXY_FORCED, ingress_env

#: Names of variables that hold secrets: never put in a runtime_env (Ray shows runtime_envs
#: in its dashboard and state API, and Serve copies the driver's into every deployment).
SECRET_NAME = re.compile(r"(^|_)(API_?KEY|KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)$", re.IGNORECASE)

#: What the embedded Ray's Serve was started with (HAProxy's ports, private folder, ...):
#: set by init_ray when it starts an embedded Ray, for diagnostics and tests.
SERVE_ENV: dict[str, str] = {}


def carried_env(environ: dict | None = None) -> dict[str, str]:
    """The variables an embedded Ray's driver carries to its workers (runtime_env): the
    plugin switches that decide which plugins load there (``trainyard.plugins.SWITCHES``),
    never a secret such as TRAINYARD_API_KEY. Replicas read an API key by reference (the
    variable's name or a file path in their options), from their own node's environment."""
    from trainyard.plugins import SWITCHES

    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in SWITCHES if environ.get(k) and not SECRET_NAME.search(k)}


def init_ray(address: str | None = None, ingress: str | None = None) -> None:
    """Connect to ``address`` (a running cluster), or start an embedded local Ray whose Serve
    takes HTTP through ``ingress`` (see ``trainyard.runtime.ingress``; fixed at start)."""
    import logging

    import ray

    # Ray Train's controller polls its workers at this interval; its default (2 s) adds
    # seconds to every start-up. Ray Train passes it on to the controller and workers.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if ray.is_initialized():
        return
    if not address and not os.environ.get("RAY_ADDRESS"):
        # An embedded Ray: one machine, no autoscaler, no node that can be drained for
        # preemption. Ray Train's preemption watcher (an actor, one process per run, about
        # 3 s of a CPU to start) would watch for nothing. A user's own setting wins.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    env = carried_env()
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        # A driver started by the Jobs API: the job's runtime_env (working_dir, env_vars)
        # already reaches every worker, and Ray refuses to merge the same keys twice.
        env = {}
        # Seen with Ray 2.60: in a job driver whose runtime_env has a working_dir, importing
        # torch after ray.init() aborts ("Intel oneMKL FATAL ERROR: Cannot load
        # libtorch_cpu.so"); imported before, it is fine.
        import torch  # noqa: F401
    kwargs: dict = dict(
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        runtime_env={"env_vars": env} if env else None,
    )
    if address:
        kwargs.pop("include_dashboard")
        _check_reachable(address)
    # Serve's HTTP ingress is fixed when Ray starts: its settings go in the environment of
    # the Ray processes an embedded start spawns, and only theirs: this process and its
    # children keep their own environment.
    # A user's own setting wins, except HAProxy's binary: the wrapper trainyard writes runs it.
    wanted = ingress_env(ingress) if not address else {}
    serve_env = {k: v for k, v in wanted.items() if k not in os.environ or k in HAPROXY_FORCED}
    saved = {k: os.environ[k] for k in serve_env if k in os.environ}
    os.environ.update(serve_env)
    import signal
    import threading

    # ray.init installs a crash handler for SIGTERM that prints a native stack dump and
    # aborts; a handler this process set (trainyard's CLI: stop as for Ctrl-C) is put back.
    own_sigterm = signal.getsignal(signal.SIGTERM) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        ray.init(address=address or None, **kwargs)
    except ConnectionError as exc:
        raise TrainingError(f"cannot reach a Ray cluster at {address!r}: {exc}{_token_hint()}") from None
    except ray.exceptions.AuthenticationError:
        raise TrainingError(
            f"the Ray cluster at {address!r} wants an authentication token and none was found: set "
            "RAY_AUTH_TOKEN (or put the head's token in ~/.ray/auth_token) and RAY_AUTH_MODE=token, "
            "as docs/cluster.md says") from None
    finally:
        for key in serve_env:
            os.environ.pop(key, None)
        os.environ.update(saved)
        if callable(own_sigterm):
            signal.signal(signal.SIGTERM, own_sigterm)
    SERVE_ENV.clear()
    SERVE_ENV.update({k: serve_env.get(k, os.environ.get(k, v)) for k, v in wanted.items()})


def _token_hint() -> str:
    """Why a cluster that listens may still refuse this process: Ray's token authentication
    (a wrong token, or a token without RAY_AUTH_MODE=token, reads as "cannot connect")."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.exists(os.path.expanduser("~/.ray/auth_token")):
        mode = os.environ.get("RAY_AUTH_MODE", "")
        if mode != "token":
            return ("; a token is set here but RAY_AUTH_MODE is not 'token': export RAY_AUTH_MODE=token "
                    "to send it")
        return "; if the cluster listens there, check that the token is the head's (RAY_AUTH_TOKEN)"
    return ""


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes of Ray's retries, when nothing listens at ``address``."""
    import socket
    from urllib.parse import urlparse

    if address == "auto" or address.startswith("local"):
        return
    if address.split("://", 1)[0].lower() in ("http", "https"):
        raise TrainingError(
            f"--address {address!r} is a Jobs API (dashboard) URL, which `trainyard submit` and "
            "`trainyard jobs` take; train, tune and deploy take the cluster's own address: "
            "HEAD:6379 (on a node of the cluster), ray://HEAD:10001 (from outside), or auto")
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    if not parsed.hostname or not parsed.port:
        raise TrainingError(f"Ray address {address!r} must be host:port, ray://host:port or auto")
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout):
            pass
    except OSError as exc:
        raise TrainingError(
            f"cannot reach a Ray cluster at {address!r} ({exc.strerror or exc}); "
            "is the head node running (ray start --head) and the port open?"
        ) from None


AUTOSCALE_ENV = "TRAINYARD_ALLOW_AUTOSCALE"


class ResourcesWaitWarning(UserWarning):
    """A job waits for resources the cluster has but others hold."""


def resources_wait_note(each: dict[str, float], n: int, what: str) -> str | None:
    """Why ``what`` (``n`` workers asking ``each``) may be waiting: a placement group of
    exactly those bundles is pending (Ray Train asks for its workers' resources so) and the
    cluster has not that much free (held by other jobs, Serve replicas, ...), or not that
    much at all (an autoscaling cluster that must grow). None otherwise: a placed group
    holds its resources itself, while its workers start."""
    import ray

    def ours(bundles: dict) -> bool:
        values = list(bundles.values())
        return len(values) == n and all(
            all(abs(float(b.get(k, 0.0)) - v) < 1e-9 for k, v in each.items() if v) for b in values)

    if not any(pg.get("state") == "PENDING" and ours(pg.get("bundles") or {})
               for pg in ray.util.placement_group_table().values()):
        return None
    need = {k: v * n for k, v in each.items() if v}
    free, total = ray.available_resources(), ray.cluster_resources()
    short = {k: (v, free.get(k, 0.0), total.get(k, 0.0)) for k, v in need.items() if v > free.get(k, 0.0) + 1e-9}
    if not short:
        return None
    held = "; ".join(f"{k}: needs {v:g}, {have:g} of {all_:g} free" for k, (v, have, all_) in short.items())
    if any(v > all_ + 1e-9 for v, _, all_ in short.values()):
        return f"{what} wait for resources the cluster does not have yet ({held}): it starts if it grows"
    return (f"{what} wait for resources others hold ({held}): it starts when they are freed (`ray status` "
            "shows who holds them; Serve replicas keep theirs while they serve)")


def check_capacity(need: dict[str, float], headline: str, advice: str, error: type = TrainingError) -> None:
    """Fail at once, naming what is short, when the cluster's total resources can never
    hold ``need`` (Ray would otherwise wait for them forever); an autoscaling cluster
    (TRAINYARD_ALLOW_AUTOSCALE=1) may still grow to hold it."""
    import ray

    total = ray.cluster_resources()
    short = {k: (v, total.get(k, 0.0)) for k, v in need.items() if v > total.get(k, 0.0) + 1e-9}
    if short and not os.environ.get(AUTOSCALE_ENV):
        what = "; ".join(f"{k}: needs {v:g}, the cluster has {have:g}" for k, (v, have) in short.items())
        raise error(f"the cluster cannot hold {headline} ({what}). {advice}, or set "
                    f"{AUTOSCALE_ENV}=1 on an autoscaling cluster.")
