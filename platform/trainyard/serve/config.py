"""Serve configs (``trainyard deploy --config``), and the Serve applications they stand
for, in Serve's own config-file shape (deployed here, or written for ``serve deploy``)."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from trainyard.errors import TrainyardError
from trainyard.names import check_name
from trainyard.runtime.ingress import Ingress
from trainyard.winners import model_name_for, resolve_checkpoint

#: The root application (health routes, model list, 404s), and its one replica's CPUs.
ROOT_APP = "trainyard"
ROOT_CPUS = 0.05
#: Most examples in one forward pass: requests batched together (up to max_batch_size of
#: them, each up to max_items examples) run in passes of at most this many.
MAX_FORWARD_EXAMPLES = 1024
#: Starts the reason a replica gives when it refuses to start for want of its API key;
#: ``trainyard deploy`` finds that line in Serve's report by it.
API_KEY_MARK = "trainyard API key:"
#: The environment variable that holds the API key, unless a serve config names another.
API_KEY_ENV = "TRAINYARD_API_KEY"
#: Requests that may wait for a replica beyond those it works on, before new ones are shed.
DEFAULT_MAX_QUEUED = 64

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
    #: Dynamic batching: requests that arrive while a forward pass runs share the next one
    #: (at most max_batch_size of them), which starts as soon as the last one ends.
    max_batch_size: int = 32
    #: How long a pass with room for more requests waits for them, counted from its oldest
    #: request's arrival. 0: no wait; batches form from what arrives during passes.
    batch_wait_ms: float = 0.0
    #: Most examples in one forward pass; a larger batch runs as several passes.
    max_forward_examples: int = MAX_FORWARD_EXAMPLES
    #: A forward pass the replica expects to take at most this long (the median of its last
    #: 15 passes, per example) runs on its event loop, not handed to its forward thread: on a
    #: small model the hand-off costs more than the pass. 0: every pass in the thread.
    inline_forward_ms: float = 2.0
    #: Requests a replica works on at once (Serve's max_ongoing_requests); 0: the larger of
    #: 64 and twice max_batch_size, so a batch is never capped by it.
    max_ongoing_requests: int = 0
    #: Load shedding: requests waiting beyond max_ongoing_requests, per replica behind
    #: HAProxy or per proxy behind Serve's own; past it a request is answered 503 at once,
    #: with Retry-After, instead of waiting. -1: no limit (every request waits its turn).
    max_queued_requests: int = DEFAULT_MAX_QUEUED
    #: The Retry-After a shed request gets, in seconds (rounded up to whole seconds).
    retry_after_s: float = 1.0


@dataclass
class ServeConfig:
    """``trainyard deploy --config FILE``: the server and the models it serves."""

    host: str = "127.0.0.1"
    port: int = 8000
    #: Inference routes need a key when one of the three below gives one; with none, they
    #: are open, which only a loopback host (127.0.0.1, ::1, localhost) or insecure allows.
    #: The key itself. It reaches the replicas by reference only: written to a file only you
    #: can read (for an embedded Ray), never into Serve's deployment args. Prefer the next two.
    api_key: str = ""
    #: The environment variable that holds the key where you deploy and on every node that
    #: runs replicas; a replica whose node lacks it refuses to start.
    api_key_env: str = API_KEY_ENV
    #: Or a file that holds the key (absolute path), readable on every replica's node.
    api_key_file: str = ""
    #: Serve on a host other than loopback with no API key: every route open to anyone who
    #: reaches the port.
    insecure: bool = False
    #: Requests over this size get 413 before the body is read whole.
    max_body_bytes: int = 1_000_000
    #: Most examples in one request.
    max_items: int = 1024
    #: How HTTP reaches the replicas on an embedded Ray: auto (haproxy where Ray Serve finds
    #: an HAProxy binary, else proxy), haproxy, or proxy (Serve's own Python proxy).
    #: Fixed when the embedded Ray starts; see ``ingress_env``.
    ingress: Ingress = "auto"
    models: list[ServedModel] = field(default_factory=list)


#: Hosts that only this machine reaches: serving there needs no API key.
LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_key_file(path: str) -> str:
    """The API key in the file ``path``, surrounding whitespace (its last newline) dropped;
    a ValueError saying why there is none ("cannot be read (...)" or "is empty"). Both the
    replicas (which then refuse to start) and ``deploy`` (before anything starts) read it so."""
    try:
        with open(path, encoding="utf-8") as f:
            key = f.read().strip()
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"cannot be read ({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
    if not key:
        raise ValueError("is empty")
    return key


def has_api_key(cfg: Any) -> bool:
    """Whether the served models will require a key: one given directly, a key file, or the
    key variable set where you deploy."""
    return bool(cfg.api_key or cfg.api_key_file or os.environ.get(cfg.api_key_env))


def check_exposure(cfg: Any, host: str) -> None:
    """Refuse to serve on a host other than loopback with no API key, unless insecure."""
    if has_api_key(cfg) or cfg.insecure or is_loopback(host):
        return
    raise TrainyardError(
        f"refusing to serve on {host} without an API key (anyone who reaches the port could use "
        f"every model): set {cfg.api_key_env}, or give --api-key-file FILE, or pass --insecure "
        "to serve with no key")


def auth_options(cfg: Any, key_file: str | None = None) -> dict[str, str]:
    """What tells the replicas where their key is (never the key): ``api_key_file`` (the
    config's key file, else ``key_file``, where deploy wrote a key given directly) or
    ``api_key_env``; empty for open models. A key given directly with no file to carry it (a
    Serve config written for a cluster) is read from ``api_key_env`` on the nodes."""
    if cfg.api_key_file:
        return {"api_key_file": os.path.abspath(os.path.expanduser(cfg.api_key_file))}
    if cfg.api_key and key_file:
        return {"api_key_file": key_file}
    if cfg.api_key or os.environ.get(cfg.api_key_env):
        return {"api_key_env": cfg.api_key_env}
    return {}


def max_ongoing(m: Any) -> int:
    """A served model's max_ongoing_requests: its own, else the larger of 64 and twice its
    max_batch_size."""
    return int(m.max_ongoing_requests) or max(64, 2 * int(m.max_batch_size))


def _in_models(exc: Exception, path: str | Path | None, base: dict | None) -> Exception:
    """``exc`` (a serve config's error) with the model it is about named: OmegaConf reports
    a key inside a list's item without the item (``num_replicas``, not ``models[1].num_replicas``).
    Each item is checked alone to find it; ``exc`` itself when none fails alone."""
    from omegaconf import DictConfig, OmegaConf

    from trainyard.config import merge_config
    from trainyard.errors import ConfigError

    models: list = []
    try:  # the file merge_config read (one it refused as YAML: exc says so already)
        loaded = OmegaConf.load(path) if path is not None and Path(path).is_file() else None
    except Exception:  # noqa: BLE001 - OmegaConf's and YAML's errors alike
        return exc
    for layer in (loaded, base):
        if layer is not None and not isinstance(layer, (dict, DictConfig)):
            continue
        found = layer.get("models") if layer is not None else None
        if found is not None and not isinstance(found, (str, bytes)):
            models = list(found)
    for i, model in enumerate(models):
        if not hasattr(model, "keys"):
            return ConfigError(f"models[{i}]: must be a mapping with a winner (winner: PATH, name: ...), "
                               f"got {model!r}")
        try:
            merge_config(ServedModel, base=model, what="serve config")
        except ConfigError as inner:
            text = str(inner)
            if "unknown key" in text and text.split(":", 1)[0] in {f.name for f in fields(ServeConfig)}:
                text += " (a server option: it goes at the top level, not in a model)"
            return ConfigError(f"models[{i}].{text}")
    return exc


def load_serve_config(path: str | Path | None = None, overrides: list[str] | None = None,
                      base: dict | None = None) -> Any:
    """A serve config, type-checked like job configs; errors name the key's path."""
    from trainyard.config import check_rules, merge_config
    from trainyard.errors import ConfigError

    try:
        cfg = merge_config(ServeConfig, path, overrides, base, what="serve config")
    except ConfigError as exc:
        raise _in_models(exc, path, base) from None
    if not cfg.models:
        raise ConfigError("models: give at least one model to serve")
    rules = [(0 < cfg.port < 65536, "port", "must be 1-65535"),
             (cfg.max_body_bytes >= 1, "max_body_bytes", "must be at least 1"),
             (cfg.max_items >= 1, "max_items", "must be at least 1"),
             (bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", cfg.api_key_env)), "api_key_env",
              "must be an environment variable's name")]
    for i, m in enumerate(cfg.models):
        key = f"models[{i}]"
        if m.name:
            check_name(m.name, f"{key}.name", reserved=True)
        check_name(str(m.version), f"{key}.version")  # a part of the model's routes
        rules += [
            (m.num_replicas >= 1, f"{key}.num_replicas", "must be at least 1"),
            (m.max_replicas == 0 or m.max_replicas >= m.min_replicas >= 0, f"{key}.max_replicas",
             "must be at least min_replicas"),
            (m.num_cpus >= 0, f"{key}.num_cpus", "must not be negative"),
            (m.num_gpus >= 0, f"{key}.num_gpus", "must not be negative"),
            (m.max_batch_size >= 1, f"{key}.max_batch_size", "must be at least 1"),
            (m.batch_wait_ms >= 0, f"{key}.batch_wait_ms", "must not be negative"),
            (m.max_forward_examples >= 1, f"{key}.max_forward_examples", "must be at least 1"),
            (0 <= m.inline_forward_ms <= 1000, f"{key}.inline_forward_ms", "must be 0-1000 ms"),
            (m.max_ongoing_requests >= 0, f"{key}.max_ongoing_requests",
             "must be at least 1 (or 0 for the default)"),
            (m.max_queued_requests >= 1 or m.max_queued_requests == -1, f"{key}.max_queued_requests",
             "must be at least 1, or -1 for no limit"),
            (0 <= m.retry_after_s <= 3600, f"{key}.retry_after_s", "must be 0-3600 seconds"),
        ]
    check_rules(cfg, rules)
    return cfg


def application_specs(cfg: Any, auth: dict | None = None) -> list[dict]:
    """Serve applications for a serve config, in Serve's config-file shape.

    The same specs are deployed by ``trainyard deploy`` and written by ``--config-out``
    for ``serve deploy`` on a cluster, so the two cannot differ. ``auth``: where replicas
    find their API key (``auth_options``; by default, from the config alone). No key value
    is ever in a spec: Serve shows deployment args in its API and dashboard.
    """
    auth = auth_options(cfg) if auth is None else auth
    apps, names = [], []
    for i, m in enumerate(cfg.models):
        checkpoint = resolve_checkpoint(m.winner)
        name = m.name or check_name(model_name_for(checkpoint), f"models[{i}].name (the checkpoint's run "
                                    "name; give the model a name)", reserved=True, error=TrainyardError)
        if name in names:
            raise TrainyardError(f"two models would be served as {name!r}; give each a name")
        names.append(name)
        deployment: dict = {
            "ray_actor_options": {"num_cpus": m.num_cpus, "num_gpus": m.num_gpus},
            # Serve's default (5 requests at a time per replica) would cap every batch at 5
            # and queue the rest in the proxy.
            "max_ongoing_requests": max_ongoing(m),
            # Load shedding: Serve answers past the queue at once, 503 with Retry-After.
            "max_queued_requests": m.max_queued_requests,
            "backpressure_config": {"status_code": 503, "retry_after_s": float(m.retry_after_s)},
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
                            "max_forward_examples": m.max_forward_examples,
                            "inline_forward_ms": m.inline_forward_ms, **auth},
            },
        })
    # The root lists what Serve runs (trainyard.serve.app.Root): it takes no args.
    apps.append({"name": ROOT_APP, "route_prefix": "/", "import_path": "trainyard.serve.app:root_app", "args": {}})
    return apps


#: The host a Serve config written for a cluster listens on.
CLUSTER_HOST = "0.0.0.0"


def write_serve_config(cfg: Any, path: str | Path) -> Path:
    """A Ray Serve config file for ``serve deploy FILE`` on a cluster (listening on every
    interface, so it needs an API key, or insecure). The key itself is never in the file:
    replicas read it from the variable or the file the config names, on their own node."""
    import yaml

    check_exposure(cfg, CLUSTER_HOST)
    auth = auth_options(cfg)
    document = {
        "proxy_location": "EveryNode",
        "http_options": {"host": CLUSTER_HOST, "port": int(cfg.port)},
        "applications": application_specs(cfg, auth=auth),
    }
    check_serve_schema(document)
    path = Path(path)
    if not path.parent.is_dir():
        raise TrainyardError(f"--config-out {path}: the folder {str(path.parent)!r} does not exist")
    header = ("# Ray Serve config written by `trainyard deploy --config-out`.\n"
              "# Run on a cluster: serve deploy " + path.name + "\n"
              "# Checkpoint paths must be reachable from every node (shared storage).\n")
    if "api_key_env" in auth:
        header += (f"# The API key is read from {auth['api_key_env']} on each replica's node; it is not "
                   "in this file.\n# A replica on a node without it refuses to start.\n")
    elif "api_key_file" in auth:
        header += (f"# The API key is read from the file {auth['api_key_file']} on each replica's node; "
                   "a replica\n# on a node without it refuses to start.\n")
    else:
        header += "# No API key: every route is open to anyone who reaches the port (insecure: true).\n"
    path.write_text(header + yaml.safe_dump(document, sort_keys=False))
    return path


def _where(loc: tuple) -> str:
    """A pydantic error location as a path: ``applications[0].args.deployment.num_replicas``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _validate(model: Any, data: Any) -> list[tuple[tuple, str]]:
    """``model``'s complaints about ``data`` as ``(location, message)``; none when it fits."""
    check = getattr(model, "model_validate", None) or model.parse_obj  # pydantic 2, else 1
    try:
        check(data)
    except ValueError as exc:  # pydantic's ValidationError (1 and 2) is a ValueError
        errors = getattr(exc, "errors", None)
        if not callable(errors):
            return [((), str(exc))]
        return [(tuple(e.get("loc") or ()), e.get("msg", "invalid")) for e in errors()]
    return []


def check_serve_schema(document: dict) -> None:
    """Check a Serve config against Ray Serve's own schema (``ServeDeploySchema``, as
    ``serve deploy`` reads it), and each model's deployment options (which travel in its
    application's ``args``, where that schema does not look) against ``DeploymentSchema`` and
    ``AutoscalingConfig``. Raises a TrainyardError naming each field that does not fit (and the
    serve config's own key, where one sets it), so no file Serve would refuse is written."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, ServeDeploySchema

    problems = _validate(ServeDeploySchema, document)
    for i, app in enumerate(document.get("applications") or []):
        deployment = (app.get("args") or {}).get("deployment")
        if not isinstance(deployment, dict):
            continue
        at = ("applications", i, "args", "deployment")
        problems += [(at + loc, msg) for loc, msg in
                     _validate(DeploymentSchema, {"name": "model", **deployment})]
        if isinstance(deployment.get("autoscaling_config"), dict):
            problems += [(at + ("autoscaling_config",) + loc, msg) for loc, msg in
                         _validate(AutoscalingConfig, deployment["autoscaling_config"])]
    if not problems:
        return
    keys = set(ServedModel.__dataclass_fields__)
    lines = []
    for loc, msg in problems:
        line = f"{_where(loc)}: {msg}"
        apps = document.get("applications") or []
        if len(loc) > 1 and loc[0] == "applications" and isinstance(loc[1], int) and loc[1] < len(apps):
            line += f" (application {apps[loc[1]].get('name')!r}"
            if loc[-1] in keys and "deployment" in loc:  # models[i] is applications[i]
                line += f"; serve config key models[{loc[1]}].{loc[-1]}"
            line += ")"
        lines.append(line)
    raise TrainyardError("the Serve config does not fit Ray Serve's schema (ray.serve.schema), so "
                         "Serve would refuse it: " + "; ".join(lines))
