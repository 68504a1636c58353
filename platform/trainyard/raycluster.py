"""Connecting to Ray: an existing cluster, or an embedded local one."""

from __future__ import annotations

import os

from trainyard.errors import TrainingError


def init_ray(address: str | None = None) -> None:
    """Connect to ``address`` (a running cluster), or start an embedded local Ray."""
    import logging

    import ray

    if ray.is_initialized():
        return
    env = {k: v for k, v in os.environ.items() if k.startswith("TRAINYARD_")}
    kwargs: dict = dict(
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        runtime_env={"env_vars": env} if env else None,
    )
    if address:
        kwargs.pop("include_dashboard")
    try:
        ray.init(address=address or None, **kwargs)
    except ConnectionError as exc:
        raise TrainingError(f"cannot reach a Ray cluster at {address!r}: {exc}") from None
