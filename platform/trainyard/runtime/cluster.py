"""Connecting to Ray: an existing cluster, or an embedded local one."""

from __future__ import annotations

import os

from trainyard.errors import TrainingError
from trainyard.runtime.ingress import ingress_env


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
    env = {k: v for k, v in os.environ.items() if k.startswith("TRAINYARD_")}
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
    serve_env = {k: v for k, v in ingress_env(ingress).items() if k not in os.environ} if not address else {}
    os.environ.update(serve_env)
    try:
        ray.init(address=address or None, **kwargs)
    except ConnectionError as exc:
        raise TrainingError(f"cannot reach a Ray cluster at {address!r}: {exc}") from None
    finally:
        for key in serve_env:
            os.environ.pop(key, None)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes of Ray's retries, when nothing listens at ``address``."""
    import socket
    from urllib.parse import urlparse

    if address == "auto" or address.startswith("local"):
        return
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
