"""The Open Inference Protocol (KServe V2) and the plain JSON route, as pure functions:
request bodies to raw model inputs, model outputs to response tensors. No Ray, no HTTP
framework: tested directly, used by the Serve application."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from itertools import chain
from typing import Any

OIP_FLOAT_TYPES = {"FP16", "FP32", "FP64"}
OIP_INT_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
#: The whole numbers each OIP integer datatype holds.
OIP_INT_RANGES = {f"{u}INT{bits}": ((0, 2**bits - 1) if u else (-2**(bits - 1), 2**(bits - 1) - 1))
                  for u in ("", "U") for bits in (8, 16, 32, 64)}
FP16_MAX = 65504.0
FP32_MAX = 3.4028234663852886e38
#: Nesting deeper than this in a tensor's data is refused (numpy's own limit is 64).
MAX_NESTING = 32

_JSON_TYPES = {str: "a string", bool: "true/false", type(None): "null", dict: "an object",
               list: "an array", int: "a number", float: "a number"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _fields(keys: set) -> str:
    """Object keys a client sent, for a message: sorted, each cut short."""
    return ", ".join(sorted(k if len(k) <= 40 else f"{k[:40]}..." for k in map(str, keys)))


def _show(value: Any, limit: int = 40) -> str:
    """A client's value for a message: short (never a whole body echoed back), and never
    failing whatever the value is (deep nesting, a huge number, a lone surrogate)."""
    if isinstance(value, (dict, list, type(None), bool)):
        return _json_type(value)
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


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

    @property
    def input_name(self) -> str:
        """The name of the model's one input tensor (as its metadata gives it)."""
        return "text" if self.inputs == "text" else "input-0"

    def item_shapes(self) -> list[list[int]]:
        """Every shape one example may be sent in: the model's input shape, and ``H x W``
        for a one-channel image sent without its channel axis."""
        if self.inputs == "image" and len(self.input_shape) == 3 and self.input_shape[0] == 1:
            return [list(self.input_shape), list(self.input_shape[1:])]
        return [list(self.input_shape)]

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


def _leaf_kinds(data: list) -> set[type]:
    """The types of the values of a flat or nested JSON list (its innermost level, never
    built as one list). Raises RequestError for nesting past MAX_NESTING, or lists mixed
    with other values at one depth."""
    level, depth = data, 1
    kinds = set(map(type, level))
    while list in kinds:
        if len(kinds) > 1:
            others = sorted({_JSON_TYPES.get(k, k.__name__) for k in kinds} - {"an array"})
            raise RequestError(f"lists mixed with {', '.join(others)} at depth {depth}")
        depth += 1
        if depth > MAX_NESTING:
            raise RequestError(f"nested more than {MAX_NESTING} deep")
        kinds = set(map(type, chain.from_iterable(level)))
        if list in kinds:
            level = list(chain.from_iterable(level))
    return kinds


def _flat(data: list) -> list:
    while any(isinstance(v, list) for v in data):
        data = list(chain.from_iterable(data))
    return data


def json_numbers(data: Any, where: str, ragged: str | None = None) -> Any:
    """A flat or nested list of JSON numbers as a float64 array. Strings, true/false, null and
    objects are refused by name, whatever numpy would make of them ("1" and true are
    numbers to numpy); so are numbers past float64's range and ragged nesting (``ragged``:
    the message for that, default a generic one)."""
    import numpy as np

    if not isinstance(data, list):
        raise RequestError(f"{where}: must be a list of numbers (flat or nested), not {_json_type(data)}")
    try:
        kinds = _leaf_kinds(data)
    except RequestError as exc:
        raise RequestError(ragged or f"{where}: must be numbers (flat or nested): {exc}") from None
    odd = kinds - {int, float}
    if odd:
        found = ", ".join(sorted({_JSON_TYPES.get(k, k.__name__) for k in odd}))
        raise RequestError(f"{where}: must be numbers, not {found}")
    try:
        return np.asarray(data, dtype=np.float64)
    except OverflowError:
        raise RequestError(f"{where}: a number is too large (past FP64's range)") from None
    except ValueError:  # nested lists of unequal lengths
        raise RequestError(ragged or f"{where}: must be numbers (flat or nested), as a "
                           "rectangular array (nested lists of unequal lengths)") from None


def check_values(array: Any, datatype: str, where: str, data: Any = None) -> None:
    """The numbers of a tensor of ``datatype`` are finite and within its range: whole and in
    range for an integer type, at most 65504 in size for FP16, and within FP32's range for
    FP32 and FP64 alike (the model computes in FP32). ``data``, the JSON values, settles
    64-bit integers too large for float64 to tell apart exactly (None: binary data, whose
    integers are within their type's range as sent)."""
    import numpy as np

    if not array.size:
        return
    # One pass each for the least and the greatest value, which also find NaN (it spreads
    # through min and max) and Infinity: this runs on every request.
    low, high = float(array.min()), float(array.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        # JSON has no NaN or Infinity (they are refused as they are read): here they are a
        # number past FP64's range, which Python's JSON reads as Infinity.
        raise RequestError(f"{where}: NaN and Infinity are not accepted" if data is None else
                           f"{where}: a number is too large (past FP64's range)")
    if datatype in OIP_INT_RANGES:
        lo, hi = OIP_INT_RANGES[datatype]
        if not np.array_equal(array, np.trunc(array)):
            raise RequestError(f"{where}: {datatype} values must be whole numbers")
        if data is None:  # the binary extension's values: within the datatype's range as sent
            return
        if max(-low, high) < 2**53:  # float64 holds these whole numbers exactly
            fits = lo <= low and high <= hi
        else:
            fits = all(lo <= v <= hi for v in _flat(data))
        if not fits:
            raise RequestError(f"{where}: {datatype} values must be within [{lo}, {hi}]")
    elif datatype == "FP16" and max(-low, high) > FP16_MAX:
        raise RequestError(f"{where}: FP16 values must be at most {FP16_MAX:g} in size")
    elif max(-low, high) > FP32_MAX:
        raise RequestError(f"{where}: values must be finite FP32 numbers (at most about 3.4e38 in size)")


def to_model_batch(array: Any, sig: ModelSignature) -> Any:
    """A request's numbers (shape already checked against ``sig.item_shape``) as FP32 of shape
    ``[n, *input_shape]``: a one-channel image sent as ``[N, H, W]`` gets its channel axis,
    so requests batched together always share one shape. The values must have passed
    :func:`check_values` (finite, within FP32's range), so the cast cannot overflow."""
    import numpy as np

    out = np.asarray(array, dtype=np.float32)
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


_LENGTH = re.compile(r"[0-9]{1,15}")


def parse_binary_request(raw: bytes, header_length: str, parse_json: Any) -> Any:
    """A request in the binary tensor data extension of the protocol (Triton's, which its
    clients use by default): ``header_length`` bytes of JSON, then the raw data of each input
    whose ``parameters`` give a ``binary_data_size``, in order (little-endian numbers; BYTES
    as 4-byte lengths, each followed by that many bytes). Returns the JSON body with those
    inputs' ``data`` filled in (a numpy array, or a list of strings)."""
    import numpy as np

    if not _LENGTH.fullmatch(header_length) or int(header_length) > len(raw):
        raise RequestError(f"Inference-Header-Content-Length {_show(header_length)} does not fit the "
                           f"body of {len(raw)} bytes")
    start = int(header_length)
    body = parse_json(raw[:start])
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object with an 'inputs' list")
    inputs = body.get("inputs")
    for i, tensor in enumerate(inputs if isinstance(inputs, list) else []):
        if not isinstance(tensor, dict):
            continue
        params = tensor.get("parameters")
        if "parameters" in tensor and not isinstance(params, dict):
            raise RequestError(f"inputs[{i}].parameters must be an object")
        if params is None or "binary_data_size" not in params:
            continue
        given = params.pop("binary_data_size")
        size = _whole(given)
        if size is None or size < 0:
            raise RequestError(f"inputs[{i}].parameters.binary_data_size must be a whole number of "
                               f"bytes, not {_show(given)}")
        if start + size > len(raw):
            raise RequestError(f"inputs[{i}].parameters.binary_data_size: {size} does not fit the body")
        if "data" in tensor:
            raise RequestError(f"inputs[{i}]: give its 'data' or parameters.binary_data_size, not both")
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
        elif isinstance(datatype, str) and datatype in OIP_NUMPY_TYPES:
            dtype = np.dtype(OIP_NUMPY_TYPES[datatype])
            if size % dtype.itemsize:
                raise RequestError(f"inputs[{i}]: {size} bytes are not whole {datatype} values")
            tensor["data"] = np.frombuffer(chunk, dtype=dtype)
        else:
            raise RequestError(f"inputs[{i}].datatype: {_show(datatype)} is not an OIP datatype trainyard takes")
        if not params:
            del tensor["parameters"]
    if start != len(raw):
        raise RequestError(f"{len(raw) - start} bytes after the inputs' binary data")
    return body


def _whole(value: Any) -> int | None:
    """A JSON whole number as an int (``3.0`` is one, as JSON Schema's "integer" counts it);
    None for anything else (true/false included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def oip_to_raw(body: Any, sig: ModelSignature, max_batch: int) -> Any:
    """An OIP inference request body to raw inputs for the model's processor."""
    import numpy as np

    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object with an 'inputs' list")
    extra = set(body) - {"id", "inputs", "outputs", "parameters"}
    if extra:
        raise RequestError(f"unknown field(s): {_fields(extra)}")
    if "id" in body and not isinstance(body["id"], str):
        raise RequestError(f"'id' must be a string, not {_json_type(body['id'])}")
    try:  # echoed back: it must be text any JSON parser can read
        body.get("id", "").encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(f"'id': not valid Unicode text ({exc.reason} at character {exc.start})") from None
    if "parameters" in body and not isinstance(body["parameters"], dict):
        raise RequestError("'parameters' must be an object")
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
        raise RequestError(f"inputs[0]: unknown field(s): {_fields(extra)}")
    if "parameters" in tensor and not isinstance(tensor["parameters"], dict):
        raise RequestError("inputs[0].parameters must be an object")
    name, shape, datatype, data = tensor["name"], tensor["shape"], tensor["datatype"], tensor["data"]
    if name != sig.input_name:
        raise RequestError(f"inputs[0].name: this model's input is {sig.input_name!r}, not {_show(name)}")
    dims = list(map(_whole, shape)) if isinstance(shape, list) else [None]
    if None in dims or any(d < 0 for d in dims):
        raise RequestError("inputs[0].shape must be a list of non-negative integers")
    shape = dims
    if not shape or shape[0] == 0:
        raise RequestError("inputs[0]: the batch is empty")
    if shape[0] > max_batch:
        raise RequestError(f"inputs[0]: batch of {_show(shape[0])} is over the limit of {max_batch}", 413)
    if not isinstance(datatype, str):
        raise RequestError(f"inputs[0].datatype must be a string (an OIP datatype), not {_json_type(datatype)}")
    if sig.inputs == "text":
        if datatype != "BYTES":
            raise RequestError(f"inputs[0].datatype: this model takes BYTES (text), not {_show(datatype)}")
        flat = data if isinstance(data, list) else None
        if flat is None or len(shape) != 1 or len(flat) != shape[0]:
            raise RequestError(f"inputs[0]: expected {shape[0]} strings for shape {shape}")
        if not all(isinstance(t, str) for t in flat):
            raise RequestError("inputs[0].data: every element must be a string")
        return check_texts(list(flat), "inputs[0].data")
    if datatype not in OIP_FLOAT_TYPES | OIP_INT_TYPES:
        raise RequestError(f"inputs[0].datatype: {_show(datatype)} is not a numeric OIP datatype")
    expected = sig.item_shape(len(shape))
    if list(shape[1:]) != expected:
        raise RequestError(f"inputs[0].shape: expected [N, {', '.join(map(str, expected))}], got {shape}")
    if isinstance(data, np.ndarray):  # the binary extension's: its datatype's values already
        array, exact = data.astype(np.float64), None
    else:
        array, exact = json_numbers(data, "inputs[0].data"), data
    if array.size != math.prod(shape):
        raise RequestError(f"inputs[0].data: {array.size} values do not fill shape {shape}")
    if array.ndim > 1 and list(array.shape) != list(shape):  # OIP: flat, or nested as the shape says
        raise RequestError(f"inputs[0].data: nested as {list(array.shape)}, not as its shape {shape} "
                           "(or send it flat)")
    check_values(array, datatype, "inputs[0].data", exact)
    return to_model_batch(array.reshape(shape), sig)


def raw_from_json(body: Any, sig: ModelSignature, max_batch: int) -> Any:
    """The plain JSON route's ``{"inputs": [...]}`` to raw inputs."""
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
    array = json_numbers(items, "inputs", ragged=f"'inputs' must be a list of arrays of shape {sig.input_shape}")
    expected = sig.item_shape(array.ndim)
    if list(array.shape[1:]) != expected:
        raise RequestError(f"each input must have shape {expected}, got {list(array.shape[1:])}")
    check_values(array, "FP32", "inputs", items)
    return to_model_batch(array, sig)


def requested_outputs(body: dict, available: tuple[str, ...]) -> list[str] | None:
    """The output names a request's ``outputs`` list asks for, checked against the model's
    (None: all of them). Each output may be asked for once."""
    if "outputs" not in body:
        return None
    wanted = body["outputs"]
    if not isinstance(wanted, list) or not all(isinstance(w, dict) and isinstance(w.get("name"), str)
                                               for w in wanted):
        raise RequestError("'outputs' must be a list of objects with a 'name'")
    for i, w in enumerate(wanted):
        extra = set(w) - {"name", "parameters"}
        if extra:
            raise RequestError(f"outputs[{i}]: unknown field(s): {_fields(extra)}")
        if "parameters" in w and not isinstance(w["parameters"], dict):
            raise RequestError(f"outputs[{i}].parameters must be an object")
    names = [w["name"] for w in wanted]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise RequestError(f"outputs: no output named {', '.join(map(_show, unknown))} "
                           f"(this model has {', '.join(available)})")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise RequestError(f"outputs: {', '.join(map(repr, twice))} asked for more than once")
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


def _class_scores(answer: Any, classes: list[str]) -> list:
    """One answer's score per class, in the classes' order: ``scores`` maps each class name
    to its score (the contract); a list of one score per class, in order, is taken too. Else
    a ValueError saying what the model plugin's decode gave."""
    scores = answer.get("scores") if isinstance(answer, dict) else None
    try:  # the contract's form, in one pass (this runs for every answer of every request)
        return [scores[c] for c in classes]
    except (KeyError, TypeError, IndexError):
        pass
    if isinstance(scores, (list, tuple)) and len(scores) == len(classes):
        return list(scores)
    if isinstance(scores, dict):
        gave = f"'scores' without the classes {[c for c in classes if c not in scores]}"
    else:
        gave = "no 'scores'" if scores is None else f"'scores' of type {type(scores).__name__}"
    raise ValueError(f"the model plugin's decode gave {gave}; OIP outputs need a score for each of "
                     f"the {len(classes)} classes (a mapping from class name to score)")


def outputs_to_oip(answers: list[dict], outputs: Any, sig: ModelSignature) -> list[dict]:
    import numpy as np

    n = len(answers)
    if sig.task == "classification":
        probs = np.asarray([_class_scores(a, sig.classes) for a in answers], dtype=np.float32)
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


#: The request bodies' JSON decoder, made once (json.loads with an option makes one a call).
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def parse_json(raw: bytes) -> Any:
    """A request body as JSON: UTF-8 text only (RFC 8259; no UTF-16 or UTF-32 guessing), no
    NaN or Infinity, and nesting too deep for the parser refused like any malformed body."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raise RequestError("malformed JSON: the body starts with a byte order mark (EF BB BF), which "
                           "JSON text must not (RFC 8259)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"the body is not UTF-8 text (byte {exc.start} is not valid UTF-8); "
                           "JSON must be sent as UTF-8") from None
    try:
        return _DECODER.decode(text)
    except RequestError:
        raise
    except RecursionError:
        raise RequestError("malformed JSON: nested too deeply") from None
    except ValueError as exc:
        if "integer string conversion" in str(exc):  # Python's guard on 4300-digit integers
            raise RequestError("malformed JSON: a whole number of more than 4300 digits") from None
        raise RequestError(f"malformed JSON: {exc}") from None



# The OpenAPI description of one served model's routes: JSON Schema (OpenAPI 3.1) of what
# the parsers above accept and the answers they give. What JSON Schema cannot say (the data
# fills the shape exactly) is in the descriptions.

def _nested(leaf: dict, dims: list[int]) -> dict:
    """Arrays nested as ``dims`` (fixed lengths) around ``leaf``."""
    schema = leaf
    for d in reversed(dims):
        schema = {"type": "array", "items": schema, "minItems": d, "maxItems": d}
    return schema


def _number_schema(datatype: str) -> dict:
    if datatype in OIP_INT_RANGES:
        lo, hi = OIP_INT_RANGES[datatype]
        return {"type": "integer", "minimum": lo, "maximum": hi}
    bound = FP16_MAX if datatype == "FP16" else FP32_MAX
    return {"type": "number", "minimum": -bound, "maximum": bound}


def _batch_dim(max_items: int) -> dict:
    return {"type": "integer", "minimum": 1, "maximum": max_items}


def _input_tensor_schema(sig: ModelSignature, max_items: int) -> dict:
    """One OIP input tensor this model takes."""
    common = {"name": {"const": sig.input_name, "description": "the model's input (its metadata names it)"},
              "parameters": {"type": "object", "description": "with the binary tensor data extension: "
                             "binary_data_size, the input's bytes after the JSON"}}
    required = ["name", "shape", "datatype", "data"]
    if sig.inputs == "text":
        return {"type": "object", "required": required, "additionalProperties": False,
                "description": "N strings (valid Unicode) with shape [N]",
                "properties": {**common, "datatype": {"const": "BYTES"},
                               "shape": {"type": "array", "prefixItems": [_batch_dim(max_items)],
                                         "items": False, "minItems": 1},
                               "data": {"type": "array", "items": {"type": "string"},
                                        "minItems": 1, "maxItems": max_items}}}
    shapes = [{"type": "array", "prefixItems": [_batch_dim(max_items), *({"const": d} for d in item)],
               "items": False, "minItems": 1 + len(item)} for item in sig.item_shapes()]
    shape = shapes[0] if len(shapes) == 1 else {"anyOf": shapes}
    size = math.prod(sig.input_shape)
    branches = []
    groups = [["FP32", "FP64"], ["FP16"], *([t] for t in OIP_INT_RANGES)]
    for types in groups:
        number = _number_schema(types[0])
        data = [{"type": "array", "items": number, "minItems": 1, "maxItems": max_items * size,
                 "description": "flat, in row-major order"}]
        data += [{"type": "array", "items": _nested(number, item), "minItems": 1, "maxItems": max_items,
                  "description": "nested as the shape"} for item in sig.item_shapes()]
        branches.append({"type": "object", "required": required, "additionalProperties": False,
                         "properties": {**common, "shape": shape, "datatype": {"enum": types},
                                        "data": {"anyOf": data}}})
    return {"anyOf": branches,
            "description": f"a batch of N inputs of shape {sig.input_shape}: shape "
                           f"{' or '.join(str(['N', *s]) for s in sig.item_shapes())}, and exactly "
                           "N times as many numbers in data (flat or nested), finite and within "
                           "the datatype's range (and FP32's: the model computes in FP32)"}


def infer_request_schema(sig: ModelSignature, max_items: int) -> dict:
    """The body of an OIP inference request to this model."""
    names = [o["name"] for o in sig.output_metadata()]
    output = {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
        "name": {"enum": names},
        "parameters": {"type": "object",
                       "properties": {"binary_data": {"type": "boolean"}},
                       "propertyNames": {"not": {"pattern": "^(classification$|shared_memory)"}},
                       "description": "binary_data: true sends this output as raw bytes after the "
                                      "JSON (the binary tensor data extension)"}}}
    return {"type": "object", "required": ["inputs"], "additionalProperties": False,
            "properties": {
                "id": {"type": "string", "description": "echoed in the response"},
                "inputs": {"type": "array", "items": _input_tensor_schema(sig, max_items),
                           "minItems": 1, "maxItems": 1},
                "outputs": {"type": "array", "items": output, "maxItems": len(names),
                            "allOf": [{"contains": {"type": "object", "required": ["name"],
                                                    "properties": {"name": {"const": n}}},
                                       "minContains": 0, "maxContains": 1} for n in names],
                            "description": "the outputs to answer with, each at most once (default: all)"},
                "parameters": {"type": "object",
                               "properties": {"binary_data_output": {"type": "boolean"}}}}}


def _output_tensor_schemas(sig: ModelSignature) -> list[dict]:
    params = {"type": "object", "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}}

    def tensor(name: str, datatype: str, ndim: tuple[int, int], item: dict, shape: str) -> dict:
        dims = {"type": "array", "items": {"type": "integer", "minimum": 1},
                "minItems": ndim[0], "maxItems": ndim[1], "description": shape}
        return {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
            "name": {"const": name}, "datatype": {"const": datatype}, "shape": dims,
            "data": {"type": "array", "items": item}, "parameters": params},
            "description": "data is left out when the output goes as binary data"}

    if sig.task == "classification":
        return [tensor("label", "BYTES", (1, 1), {"enum": list(sig.classes)}, "[N]"),
                tensor("probabilities", "FP32", (2, 2), {"type": "number", "minimum": 0, "maximum": 1},
                       f"[N, {len(sig.classes)}]")]
    return [tensor("value", "FP32", (1, 2), {"type": "number"}, "[N] or [N, outputs]")]


def infer_response_schema(sig: ModelSignature, name: str, version: str) -> dict:
    """The JSON of an OIP inference response (the header, when outputs go as binary data)."""
    outputs = _output_tensor_schemas(sig)
    return {"type": "object", "required": ["model_name", "model_version", "outputs"], "properties": {
        "model_name": {"const": name}, "model_version": {"const": version},
        "id": {"type": "string"},
        "outputs": {"type": "array", "items": outputs[0] if len(outputs) == 1 else {"oneOf": outputs}}}}


def predict_request_schema(sig: ModelSignature, max_items: int) -> dict:
    """The body of the plain JSON route: ``{"inputs": [raw, ...]}``."""
    if sig.inputs == "text":
        inputs = {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": max_items}
    else:
        forms = [{"type": "array", "items": _nested(_number_schema("FP32"), item), "minItems": 1,
                  "maxItems": max_items} for item in sig.item_shapes()]
        inputs = forms[0] if len(forms) == 1 else {"anyOf": forms, "description": "all of one shape"}
    return {"type": "object", "required": ["inputs"], "additionalProperties": False,
            "properties": {"inputs": inputs}}


def predict_response_schema(sig: ModelSignature, name: str, version: str) -> dict:
    """The plain JSON route's answer, one prediction per input (the built-in decoding: a plugin's
    processor may answer with more)."""
    if sig.task == "classification":
        prediction = {"type": "object", "properties": {
            "label": {"enum": list(sig.classes)},
            "index": {"type": "integer", "minimum": 0, "maximum": max(len(sig.classes) - 1, 0)},
            "scores": {"type": "object", "properties": {c: {"type": "number"} for c in sig.classes}}}}
    else:
        prediction = {"type": "object", "properties": {
            "value": {"anyOf": [{"type": "number"}, {"type": "array", "items": {"type": "number"}}]}}}
    return {"type": "object", "required": ["model_name", "model_version", "predictions"], "properties": {
        "model_name": {"const": name}, "model_version": {"const": version},
        "predictions": {"type": "array", "items": prediction}}}


ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {
    "error": {"type": "string", "description": "what is wrong, in one line"}}}
