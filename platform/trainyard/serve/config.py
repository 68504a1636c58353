"""Serve configs (``trainyard deploy --config``), and the Serve applications they stand
for, in Serve's own config-file shape (deployed here, or written for ``serve deploy``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from trainyard.errors import TrainyardError
from trainyard.runtime.ingress import Ingress
from trainyard.winners import model_name_for, resolve_checkpoint

#: The root application (health routes, model list, 404s), and its one replica's CPUs.
ROOT_APP = "trainyard"
ROOT_CPUS = 0.05

@dataclass
class ServedModel:
    """One model to serve (an entry of a serve config's ``models`` list)."""

    #: A winners folder, a tuning run, a training run or a checkpoint.
    winner: str = MISSING
    #: Served as /v2/models/<name>; empty: the run name in the checkpoint.
    name: str = ""
    version: str = "1"
    #: Fixed replicas; or set max_replicas to autoscale between min and max.
    num_replicas: int = 1
    min_replicas: int = 1
    max_replicas: int = 0
    target_ongoing_requests: float = 8.0
    num_cpus: float = 0.25
    num_gpus: float = 0.0
    #: Serve's dynamic batching: requests arriving together run as one forward pass.
    max_batch_size: int = 32
    batch_wait_ms: float = 5.0


@dataclass
class ServeConfig:
    """``trainyard deploy --config FILE``: the server and the models it serves."""

    host: str = "127.0.0.1"
    port: int = 8000
    #: Inference routes need this key (also from TRAINYARD_API_KEY); empty: open.
    api_key: str = ""
    #: Requests over this size get 413 before the body is read whole.
    max_body_bytes: int = 1_000_000
    #: Most examples in one request.
    max_items: int = 1024
    #: How HTTP reaches the replicas on an embedded Ray: auto (haproxy where Ray Serve finds
    #: an HAProxy binary, else proxy), haproxy, or proxy (Serve's own Python proxy).
    #: Fixed when the embedded Ray starts; see ``ingress_env``.
    ingress: Ingress = "auto"
    models: list[ServedModel] = field(default_factory=list)


#: Where replicas read the API key when the config gives none.
API_KEY_ENV = "TRAINYARD_API_KEY"


def load_serve_config(path: str | Path | None = None, overrides: list[str] | None = None,
                      base: dict | None = None) -> Any:
    """A serve config, type-checked like job configs; errors name the key's path."""
    from trainyard.config import check_rules, merge_config
    from trainyard.errors import ConfigError

    cfg = merge_config(ServeConfig, path, overrides, base, what="serve config")
    if not cfg.models:
        raise ConfigError("models: give at least one model to serve")
    rules = [(0 < cfg.port < 65536, "port", "must be 1-65535")]
    for i, m in enumerate(cfg.models):
        key = f"models[{i}]"
        rules += [
            (m.num_replicas >= 1, f"{key}.num_replicas", "must be at least 1"),
            (m.max_replicas == 0 or m.max_replicas >= m.min_replicas >= 0, f"{key}.max_replicas",
             "must be at least min_replicas"),
            (m.num_cpus >= 0, f"{key}.num_cpus", "must not be negative"),
            (m.num_gpus >= 0, f"{key}.num_gpus", "must not be negative"),
            (m.max_batch_size >= 1, f"{key}.max_batch_size", "must be at least 1"),
            (m.batch_wait_ms >= 0, f"{key}.batch_wait_ms", "must not be negative"),
            ("/" not in m.name, f"{key}.name", "must not contain '/'"),
        ]
    check_rules(cfg, rules)
    if not cfg.api_key:
        cfg.api_key = os.environ.get(API_KEY_ENV, "")
    return cfg


def application_specs(cfg: Any, existing: list[str] | None = None) -> list[dict]:
    """Serve applications for a serve config, in Serve's config-file shape.

    The same specs are deployed by ``trainyard deploy`` and written by ``--config-out``
    for ``serve deploy`` on a cluster, so the two cannot differ.
    """
    apps, names = [], []
    for m in cfg.models:
        checkpoint = resolve_checkpoint(m.winner)
        name = m.name or model_name_for(checkpoint)
        if name in names:
            raise TrainyardError(f"two models would be served as {name!r}; give each a name")
        names.append(name)
        deployment: dict = {
            "ray_actor_options": {"num_cpus": m.num_cpus, "num_gpus": m.num_gpus},
            # Serve's default (5 requests at a time per replica) would cap every batch at 5
            # and queue the rest in the proxy.
            "max_ongoing_requests": max(64, 2 * m.max_batch_size),
        }
        if m.max_replicas:
            deployment["autoscaling_config"] = {"min_replicas": m.min_replicas,
                                                "max_replicas": m.max_replicas,
                                                "target_ongoing_requests": m.target_ongoing_requests}
        else:
            deployment["num_replicas"] = m.num_replicas
        apps.append({
            "name": name,
            "route_prefix": f"/v2/models/{name}",
            "import_path": "trainyard.serve.app:model_app",
            "args": {
                "name": name, "version": str(m.version), "checkpoint": str(checkpoint),
                "deployment": deployment,
                "options": {"max_batch_size": m.max_batch_size,
                            "batch_wait_timeout_s": m.batch_wait_ms / 1000,
                            "max_body_bytes": cfg.max_body_bytes, "max_items": cfg.max_items,
                            "api_key_env": API_KEY_ENV if cfg.api_key else ""},
            },
        })
    every = sorted(set(existing or []) | set(names))
    apps.append({"name": ROOT_APP, "route_prefix": "/", "import_path": "trainyard.serve.app:root_app",
                 "args": {"models": every}})
    return apps


def write_serve_config(cfg: Any, path: str | Path) -> Path:
    """A Ray Serve config file for ``serve deploy FILE`` on a cluster."""
    import yaml

    document = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": int(cfg.port)},
        "applications": application_specs(cfg),
    }
    path = Path(path)
    header = ("# Ray Serve config written by `trainyard deploy --config-out`.\n"
              "# Run on a cluster: serve deploy " + path.name + "\n"
              "# Checkpoint paths must be reachable from every node (shared storage).\n")
    if cfg.api_key:
        header += f"# The API key is read from {API_KEY_ENV} on the replicas; it is not in this file.\n"
    path.write_text(header + yaml.safe_dump(document, sort_keys=False))
    return path

