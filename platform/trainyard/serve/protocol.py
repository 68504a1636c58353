"""The Open Inference Protocol (KServe V2) and the plain JSON route, as pure functions:
request bodies to raw model inputs, model outputs to response tensors. No Ray, no HTTP
framework: tested directly, used by the Serve application."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

OIP_FLOAT_TYPES = {"FP16", "FP32", "FP64"}
OIP_INT_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}


class RequestError(ValueError):
    """A bad request: answered with a 4xx and a JSON body naming the problem."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class ModelSignature:
    """What a served model takes and gives, from its checkpoint's DataInfo."""

    inputs: str
    input_shape: list[int]
    task: str
    classes: list[str]

    def item_shape(self, ndim: int) -> list[int]:
        """The shape of one example in a batch of ``ndim`` dimensions: the model's input
        shape, or ``H x W`` for a one-channel image sent without its channel axis."""
        if self.inputs == "image" and ndim == 3 and self.input_shape[0] == 1:
            return list(self.input_shape[1:])
        return list(self.input_shape)

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


def to_model_batch(array: Any, sig: ModelSignature, where: str) -> Any:
    """A request's numbers (shape already checked against ``sig.item_shape``) as FP32 of shape
    ``[n, *input_shape]``: a one-channel image sent as ``[N, H, W]`` gets its channel axis,
    so requests batched together always share one shape."""
    import numpy as np

    with np.errstate(over="ignore"):
        out = np.asarray(array, dtype=np.float32)
    if not np.all(np.isfinite(out)):
        raise RequestError(f"{where}: values must be finite FP32 numbers (at most about 3.4e38 in size)")
    return out.reshape(out.shape[0], *sig.input_shape)


def check_texts(texts: list, where: str) -> list:
    """Strings the model's tokenizer can take: each must be valid Unicode (a lone surrogate
    such as "\\ud800", which JSON can spell, is not)."""
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(f"{where}[{i}]: must be a string")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RequestError(f"{where}[{i}]: not valid Unicode text ({exc.reason} at "
                               f"character {exc.start})") from None
    return texts


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
        return check_texts(list(flat), "inputs[0].data")
    if datatype not in OIP_FLOAT_TYPES | OIP_INT_TYPES:
        raise RequestError(f"inputs[0].datatype: {datatype!r} is not a numeric OIP datatype")
    expected = sig.item_shape(len(shape))
    if list(shape[1:]) != expected:
        raise RequestError(f"inputs[0].shape: expected [N, {', '.join(map(str, expected))}], got {shape}")
    try:
        array = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError):
        raise RequestError("inputs[0].data: must be numbers (flat or nested)") from None
    if array.size != math.prod(shape):
        raise RequestError(f"inputs[0].data: {array.size} values do not fill shape {shape}")
    _finite(array, "inputs[0].data")
    return to_model_batch(array.reshape(shape), sig, "inputs[0].data")


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
        return check_texts(items, "inputs")
    try:
        array = np.asarray(items, dtype=np.float64)
    except (TypeError, ValueError):
        raise RequestError(f"'inputs' must be a list of arrays of shape {sig.input_shape}") from None
    expected = sig.item_shape(array.ndim)
    if list(array.shape[1:]) != expected:
        raise RequestError(f"each input must have shape {expected}, got {list(array.shape[1:])}")
    _finite(array, "inputs")
    return to_model_batch(array, sig, "inputs")


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


def binary_outputs(body: dict, names: list[str]) -> set[str]:
    """Which of the response's outputs (``names``) go as raw data after its JSON, in the binary
    tensor data extension: an output whose ``outputs`` entry has ``"parameters":
    {"binary_data": true}``; one whose entry leaves ``binary_data`` out (or every output, when
    the request lists none) when the request has ``"parameters": {"binary_data_output": true}``,
    as Triton's clients send by default. Output options trainyard cannot honour
    (``classification``, ``shared_memory_*``) are refused rather than ignored."""
    params = body.get("parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise RequestError("'parameters' must be an object")
    default = params.get("binary_data_output", False)
    if not isinstance(default, bool):
        raise RequestError("parameters.binary_data_output must be true or false")
    chosen: dict[str, bool] = {}
    for i, wanted in enumerate(body.get("outputs") or []):
        options = wanted.get("parameters") if isinstance(wanted, dict) else None
        if options is None:
            continue
        if not isinstance(options, dict):
            raise RequestError(f"outputs[{i}].parameters must be an object")
        refused = sorted(k for k in options if k == "classification" or k.startswith("shared_memory"))
        if refused:
            raise RequestError(f"outputs[{i}].parameters: {', '.join(refused)} is not supported "
                               "(outputs come in the response, as JSON or binary_data)")
        if "binary_data" in options:
            if not isinstance(options["binary_data"], bool):
                raise RequestError(f"outputs[{i}].parameters.binary_data must be true or false")
            chosen[wanted["name"]] = options["binary_data"]
    return {n for n in names if chosen.get(n, default)}


def tensor_bytes(tensor: dict) -> bytes:
    """An output tensor's ``data`` as the binary extension carries it: BYTES elements each as
    a 4-byte little-endian length and that many bytes (UTF-8 for text); numbers as
    little-endian values of the datatype, in row-major order."""
    import numpy as np

    datatype, data = tensor["datatype"], tensor["data"]
    if datatype == "BYTES":
        parts = []
        for item in np.asarray(data, dtype=object).reshape(-1):
            raw = item if isinstance(item, bytes) else str(item).encode("utf-8")
            parts += [len(raw).to_bytes(4, "little"), raw]
        return b"".join(parts)
    if datatype not in OIP_NUMPY_TYPES:
        raise ValueError(f"output {tensor.get('name')!r}: no binary form for datatype {datatype!r}")
    return np.ascontiguousarray(data, dtype=OIP_NUMPY_TYPES[datatype]).tobytes()


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def encode_infer_response(response: dict, binary: set[str] | frozenset[str] = frozenset()) -> tuple[bytes, int | None]:
    """An inference response's body, and the length of its JSON header when some outputs go as
    binary data (the ``Inference-Header-Content-Length`` value; None: the body is all JSON).

    Each output named in ``binary`` loses its ``data`` and gets ``"parameters":
    {"binary_data_size": N}``; its N bytes (``tensor_bytes``) follow the JSON, in the order of
    the outputs. The others keep their ``data`` in the JSON."""
    header = dict(response)
    outputs, blobs = [], []
    for tensor in response.get("outputs") or []:
        if tensor["name"] in binary:
            raw = tensor_bytes(tensor)
            tensor = {k: v for k, v in tensor.items() if k != "data"}
            tensor["parameters"] = {**(tensor.get("parameters") or {}), "binary_data_size": len(raw)}
            blobs.append(raw)
        outputs.append(tensor)
    header["outputs"] = outputs
    text = json.dumps(header, allow_nan=False, default=_plain, separators=(",", ":")).encode()
    if not blobs:
        return text, None
    return text + b"".join(blobs), len(text)


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



def _reject_constant(name: str) -> Any:
    raise RequestError(f"{name} is not valid JSON here: NaN and Infinity are not accepted")


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except RequestError:
        raise
    except ValueError as exc:
        raise RequestError(f"malformed JSON: {exc}") from None

