"""Serving winners with Ray Serve over HTTP: the Open Inference Protocol and a JSON route.

Each served model is its own Serve application at ``/v2/models/<name>``; a small root
application answers the health routes and 404s for models that are not served. The model
plugin's own processor turns raw inputs into a batch and outputs into labels and scores,
exactly as in training.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
class ServeOptions:
    """Per-model serving options (``trainyard deploy --help`` lists their flags)."""

    num_replicas: int = 1
    num_cpus: float = 0.25
    num_gpus: float = 0.0
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.005
    max_body_bytes: int = 1_000_000
    max_items: int = 1024
    api_key: str = ""

    def to_options(self) -> dict:
        return {"max_batch_size": self.max_batch_size, "batch_wait_timeout_s": self.batch_wait_timeout_s,
                "max_body_bytes": self.max_body_bytes, "max_items": self.max_items,
                "api_key": self.api_key}


def model_name_for(checkpoint: Path) -> str:
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    return str(manifest.get("run") or manifest["model"])


def deploy(
    targets: list[str],
    names: list[str] | None = None,
    version: str = "1",
    options: ServeOptions | None = None,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
) -> dict[str, str]:
    """Serve each target as its own application; return ``{name: endpoint URL}``.

    Deploying a name that is already served replaces it with Serve's rolling update, so
    requests in flight are answered by the old replicas.
    """
    from ray import serve

    from trainyard.raycluster import init_ray
    from trainyard.serve_app import ModelServer, Root

    options = options or ServeOptions()
    names = list(names or [])
    if names and len(names) != len(targets):
        raise TrainyardError("give one --name per WINNER, or none")
    checkpoints = [resolve_checkpoint(t) for t in targets]
    names = names or [model_name_for(c) for c in checkpoints]
    for name in names:
        if not name or "/" in name:
            raise TrainyardError(f"model name {name!r} must be non-empty and without '/'")
    init_ray(address)
    serve.start(http_options={"host": host, "port": port})
    served = {app: "" for app in serve.status().applications if app != ROOT_APP}
    for name, checkpoint in zip(names, checkpoints):
        app = ModelServer.options(
            name="model",
            num_replicas=options.num_replicas,
            ray_actor_options={"num_cpus": options.num_cpus, "num_gpus": options.num_gpus},
        ).bind(name, version, str(checkpoint), options.to_options())
        serve.run(app, name=name, route_prefix=f"/v2/models/{name}", blocking=False)
        served[name] = version
    serve.run(Root.bind({n: v or version for n, v in served.items()}), name=ROOT_APP,
              route_prefix="/", blocking=False)
    base = f"http://{host}:{port}"
    return {name: f"{base}/v2/models/{name}" for name in names}
