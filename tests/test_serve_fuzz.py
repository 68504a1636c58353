"""Hostile request bodies against a live deployment (real Ray Serve, real HTTP on loopback).

Whatever a body holds, it is answered with a 4xx and a JSON ``{"error": ...}`` naming what is
wrong, never a 5xx, and the model keeps serving. Two fuzzers:

- schemathesis (its CLI, with tests/helpers_fuzz.py's hooks and check), driven by each
  model's own live OpenAPI document (``<route>/openapi.json``): bodies the document calls
  valid are accepted, bodies it calls invalid are refused, and every answer is what the
  document says (status, content type, schema);
- a hypothesis fuzzer of what no schema describes: pathological nesting, numbers past any
  float, NaN and Infinity literals, strings and booleans where numbers belong, truncated and
  non-UTF-8 JSON, wrong content types, and the binary tensor extension with wrong byte
  counts, header lengths and sizes; next to valid bodies (JSON and binary) that must be
  answered with well-formed outputs.

The run is bounded (``TRAINYARD_FUZZ_EXAMPLES`` examples per fuzzer, derandomized so CI
runs the same bodies each time); raise it for a longer local hunt.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import subprocess
import sys
import urllib.parse

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT, remove_applications
from tests.helpers_fuzz import UNFORESEEN
from tests.test_serving import make_checkpoint

MODELS = {"fz_cnn": "cnn_digits", "fz_bert": "bert_sentiment"}  # an image model and a text model
MAX_ITEMS = 8
MAX_BODY = 64_000
EXAMPLES = int(os.environ.get("TRAINYARD_FUZZ_EXAMPLES", "60"))

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzzed(ray_cluster, tmp_path_factory, serve_port):
    """Two tiny models, deployed once for the module, with small limits (so the fuzzers
    reach them): at most MAX_ITEMS inputs and MAX_BODY bytes a request."""
    from trainyard.serve.config import load_serve_config
    from trainyard.serve.deploy import deploy

    root = tmp_path_factory.mktemp("fuzz")
    port = serve_port
    samples, infos = {}, {}
    for name, config_name in MODELS.items():
        _, inputs, info = make_checkpoint(root / name, config_name, name)
        samples[name], infos[name] = inputs, info
    cfg = load_serve_config(base={"port": port, "max_items": MAX_ITEMS, "max_body_bytes": MAX_BODY, "models": [
        {"winner": str(root / name), "name": name, "num_cpus": 0.1} for name in MODELS]})
    endpoints = deploy(cfg)
    first = {name: post(endpoints[name] + "/infer", sample_body(name, samples[name]))
             for name in MODELS}
    assert all(status == 200 for status, _, _ in first.values()), first
    yield {"endpoints": endpoints, "samples": samples, "infos": infos, "first": first}
    remove_applications()


def post(url: str, body: bytes | dict | list, headers: dict | None = None,
         content_type: str | None = "application/json") -> tuple[int, dict, dict]:
    """POST ``body`` (bytes as they are); the status, the JSON answer (a binary answer's JSON
    header, with its raw bytes under ``"_binary"``) and the response headers."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    parts = urllib.parse.urlsplit(url)
    sent = dict(headers or {})
    if content_type is not None:
        sent.setdefault("Content-Type", content_type)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("POST", parts.path, body=raw, headers=sent)
        response = conn.getresponse()
        content, got = response.read(), {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()
    if "inference-header-content-length" in got:
        length = int(got["inference-header-content-length"])
        return response.status, {**json.loads(content[:length]), "_binary": content[length:]}, got
    try:
        return response.status, json.loads(content), got
    except ValueError:
        return response.status, {"_not_json": content[:200]}, got


def get(url: str) -> tuple[int, bytes]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("GET", parts.path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def sample_body(name: str, inputs) -> dict:
    if name == "fz_bert":
        return {"inputs": [{"name": "text", "shape": [len(inputs)], "datatype": "BYTES", "data": list(inputs)}]}
    array = np.asarray(inputs, dtype=np.float32)
    return {"inputs": [{"name": "input-0", "shape": list(array.shape), "datatype": "FP32",
                        "data": array.reshape(-1).tolist()}]}


def assert_refused(status: int, answer: dict, what: object) -> None:
    """A 4xx with one JSON ``{"error": "..."}`` that names a problem (not the catch-all)."""
    assert 400 <= status < 500, (status, answer, repr(what)[:300])
    assert isinstance(answer.get("error"), str) and answer["error"], (status, answer, repr(what)[:300])
    assert UNFORESEEN not in answer["error"], (answer, repr(what)[:300])


def assert_outputs(answer: dict, n: int, classes: list[str], binary: bool = False) -> None:
    """A well-formed OIP answer for ``n`` inputs: a label each, and probabilities summing to 1."""
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert set(outputs) == {"label", "probabilities"}
    assert outputs["label"]["shape"] == [n] and outputs["probabilities"]["shape"] == [n, len(classes)]
    if binary:
        sizes = [o["parameters"]["binary_data_size"] for o in answer["outputs"]]
        assert sum(sizes) == len(answer["_binary"])
        return
    assert len(outputs["label"]["data"]) == n and set(outputs["label"]["data"]) <= set(classes)
    probs = np.asarray(outputs["probabilities"]["data"]).reshape(n, len(classes))
    assert np.allclose(probs.sum(1), 1, atol=1e-4)


# --------------------------------------------------------------------------------------
# The bodies found by hand against a live deployment, each once a 500 (or a 200 for a
# request that is not valid): the parsers alone, no deployment
# --------------------------------------------------------------------------------------

def _oip(**tensor) -> bytes:
    base = {"name": "input-0", "shape": [1, 30], "datatype": "FP32", "data": [0.5] * 30}
    return json.dumps({"inputs": [{**base, **tensor}]}).encode()


HAND_FOUND = {  # label: (route, body, Inference-Header-Content-Length, what the error says)
    "100000 [": ("infer", b"[" * 100_000, None, "malformed JSON: nested too deeply"),
    "nesting in data": ("infer", _oip().replace(b"[0.5", b"[" * 5000 + b"0.5", 1), None, "nested too deeply"),
    "40 deep in data": ("infer", _oip(data=json.loads("[" * 40 + "1" + "]" * 40)), None, "nested more than 32 deep"),
    "shape [true, 30]": ("infer", _oip(shape=[True, 30]), None, "shape must be a list of non-negative integers"),
    "10**400 in data": ("infer", _oip(data=[10**400] + [0] * 29), None, "too large (past FP64's range)"),
    "10**30 as INT64": ("infer", _oip(datatype="INT64", data=[10**30] + [0] * 29), None, "INT64 values must be within"),
    "2**63 as INT64": ("infer", _oip(datatype="INT64", data=[2**63] + [0] * 29), None, "INT64 values must be within"),
    "0.5 as INT8": ("infer", _oip(datatype="INT8"), None, "INT8 values must be whole numbers"),
    "70000 as FP16": ("infer", _oip(datatype="FP16", data=[70000.0] * 30), None, "FP16 values must be at most 65504"),
    "past FP32 by a hair": ("infer", _oip(data=[3.4028235e38] * 30), None, "finite FP32"),
    "numeric strings": ("infer", _oip(data=["1"] * 30), None, "must be numbers, not a string"),
    "true among numbers": ("infer", _oip(data=[0.5] * 29 + [True]), None, "must be numbers, not true/false"),
    "datatype a list": ("infer", _oip(datatype=["FP32"]), None, "datatype must be a string"),
    "name a number": ("infer", _oip(name=5), None, "this model's input is 'input-0', not 5"),
    "parameters a list": ("infer", _oip(parameters=[1]), None, "inputs[0].parameters must be an object"),
    "id a number": ("infer", json.dumps({**json.loads(_oip()), "id": 5}).encode(), None, "'id' must be a string"),
    "an output twice": ("infer", json.dumps({**json.loads(_oip()), "outputs": [{"name": "label"}, {"name": "label"}]}).encode(),
                        None, "'label' asked for more than once"),
    "outputs[0].parameters null": ("infer", json.dumps({**json.loads(_oip()), "outputs": [{"name": "label", "parameters": None}]}).encode(),
                                   None, "outputs[0].parameters must be an object"),
    "lone surrogate key": ("infer", b'{"\\ud800": 1}', None, "unknown field(s): \ud800"),
    "UTF-16": ("infer", json.dumps(json.loads(_oip())).encode("utf-16"), None, "not UTF-8 text"),
    "a 5000-digit number": ("infer", b'{"id": ' + b"9" * 5000 + b"}", None, "more than 4300 digits"),
    "header length of 5000 digits": ("infer", _oip(), "9" * 5000, "does not fit the body"),
    "header length '\u00b2'": ("infer", _oip(), "\u00b2", "does not fit the body"),
    "binary datatype a list": ("infer", b'{"inputs":[{"datatype":["FP32"],"parameters":{"binary_data_size":0}}]}',
                               "binary", "an array is not an OIP datatype"),
    "binary inputs a number": ("infer", b'{"inputs": 5}', "binary", "'inputs' must be a list"),
    "predict: numeric strings": ("predict", json.dumps({"inputs": [["1"] * 30]}).encode(), None, "must be numbers, not a string"),
    "predict: 10**400": ("predict", json.dumps({"inputs": [[10**400] * 30]}).encode(), None, "too large"),
    # JSON reads 1e400 as Infinity, which the client never sent: the message says what it did.
    "predict: 1e400": ("predict", b'{"inputs": [[1e400' + b", 1" * 29 + b"]]}", None,
                       "a number is too large (past FP64's range)"),
    # The data nested otherwise than its shape says (the OpenAPI document's rows hold numbers).
    "data nested deeper than its shape": ("infer", _oip(data=[[[0.5]] * 30]), None,
                                          "nested as [1, 30, 1], not as its shape [1, 30]"),
    "data of shape [1, 60] for [2, 30]": ("infer", _oip(shape=[2, 30], data=[[0.5] * 60]), None,
                                          "nested as [1, 60], not as its shape [2, 30]"),
    "infer: -1e400": ("infer", _oip().replace(b"[0.5", b"[-1e400", 1), None, "too large (past FP64's range)"),
    # The id is echoed back; a lone surrogate there made the answer itself invalid JSON.
    "lone surrogate id": ("infer", _oip().replace(b"{", b'{"id": "a\\udfffb", ', 1), None,
                          "'id': not valid Unicode text (surrogates not allowed at character 1)"),
    "predict: true": ("predict", json.dumps({"inputs": [[True] * 30]}).encode(), None, "not true/false"),
}


@pytest.mark.parametrize("label", sorted(HAND_FOUND))
def test_each_body_found_by_hand_is_refused_naming_its_problem(label):
    from trainyard.serve.protocol import (ModelSignature, RequestError, oip_to_raw, parse_binary_request,
                                          parse_json, raw_from_json, requested_outputs)

    route, raw, length, message = HAND_FOUND[label]
    sig = ModelSignature("tabular", [30], "classification", ["benign", "malignant"])
    with pytest.raises(RequestError) as refused:
        if length is not None:
            body = parse_binary_request(raw, str(len(raw)) if length == "binary" else length, parse_json)
        else:
            body = parse_json(raw)
        if route == "predict":
            raw_from_json(body, sig, MAX_ITEMS)
        else:
            oip_to_raw(body, sig, MAX_ITEMS)
            requested_outputs(body, ("label", "probabilities"))
    assert message in str(refused.value) and 400 <= refused.value.status < 500


# --------------------------------------------------------------------------------------
# Each model's OpenAPI document describes its real bodies
# --------------------------------------------------------------------------------------


def _validator(doc: dict, name: str):
    """A JSON Schema validator of ``#/components/schemas/<name>`` of an OpenAPI document."""
    import jsonschema

    return jsonschema.Draft202012Validator({**doc["components"]["schemas"][name],
                                            "components": doc["components"]})


def test_each_model_serves_an_openapi_document_of_its_own_bodies(fuzzed):
    for name, url in fuzzed["endpoints"].items():
        status, raw = get(url + "/openapi.json")
        assert status == 200, raw[:300]
        doc = json.loads(raw)
        assert doc["servers"] == [{"url": f"/v2/models/{name}"}]
        infer = doc["paths"]["/infer"]["post"]
        assert infer["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/InferRequest"}
        assert {"200", "400", "413", "415", "422"} <= set(infer["responses"])
        assert "requestBody" in doc["paths"]["/predict"]["post"]
        info = fuzzed["infos"][name]
        # The real request (the one the fixture sent) fits the document, and so does its answer.
        _validator(doc, "InferRequest").validate(sample_body(name, fuzzed["samples"][name]))
        _validator(doc, "InferResponse").validate(fuzzed["first"][name][1])
        request = doc["components"]["schemas"]["InferRequest"]
        labels = doc["components"]["schemas"]["InferResponse"]["properties"]["outputs"]["items"]["oneOf"][0]
        assert labels["properties"]["data"]["items"]["enum"] == list(info.classes)
        tensor = request["properties"]["inputs"]["items"]
        if name == "fz_bert":
            assert tensor["properties"]["name"]["const"] == "text"
            assert tensor["properties"]["datatype"] == {"const": "BYTES"}
            assert tensor["properties"]["shape"]["prefixItems"] == [{"type": "integer", "minimum": 1, "maximum": MAX_ITEMS}]
        else:
            fp32 = tensor["anyOf"][0]["properties"]
            assert fp32["name"]["const"] == "input-0" and fp32["datatype"] == {"enum": ["FP32", "FP64"]}
            shapes = [s["prefixItems"][1:] for s in fp32["shape"]["anyOf"]]  # with and without the channel
            assert shapes == [[{"const": 1}, {"const": 8}, {"const": 8}], [{"const": 8}, {"const": 8}]]
            bad = sample_body(name, fuzzed["samples"][name])
            bad["inputs"][0]["data"][0] = "1"  # a string where a number belongs: invalid for both
            assert not _validator(doc, "InferRequest").is_valid(bad)
            assert_refused(*post(url + "/infer", bad)[:2], bad)
        status, html = get(url + "/docs")
        assert status == 200 and f"/v2/models/{name}/openapi.json".encode() in html


def test_a_secured_models_document_names_its_keys():
    from trainyard.serve.app import model_api, model_openapi
    from trainyard.serve.protocol import ModelSignature

    sig = ModelSignature("tabular", [30], "regression", [])
    doc = model_openapi(model_api.routes, "/v2/models/m", sig, "m", "3", 16, 1000, secured=True)
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    infer = doc["paths"]["/infer"]["post"]
    assert {"401", "403"} <= set(infer["responses"]) and infer["security"]
    assert "security" not in doc["paths"]["/ready"]["get"]  # health stays open, as served
    # Past its queue a deployment sheds every route, readiness and metadata too: documented.
    for path, method in (("/ready", "get"), ("/", "get"), ("/infer", "post")):
        assert "Retry-After" in doc["paths"][path][method]["responses"]["503"]["headers"], path
    value = doc["components"]["schemas"]["InferResponse"]["properties"]["outputs"]["items"]
    assert value["properties"]["name"] == {"const": "value"}
    version = doc["paths"]["/versions/{version}/infer"]["post"]["parameters"][0]
    assert version["schema"] == {"type": "string", "enum": ["3"]}


# --------------------------------------------------------------------------------------
# schemathesis, from each model's live OpenAPI document
# --------------------------------------------------------------------------------------


#: Checks whose statuses differ from schemathesis' defaults: a body over the byte limit is
#: refused (413) before it is read; a valid body of numbers too large for the model's FP32
#: arithmetic is accepted, and answered 422 (helpers_fuzz checks that is the reason).
SCHEMATHESIS_CONFIG = """
[checks.negative_data_rejection]
expected-statuses = ["400", "404", "405", "413", "415", "422"]
[checks.positive_data_acceptance]
expected-statuses = ["200", "422"]
"""

#: The image model's inference schema (ten datatypes, two shapes) makes schemathesis' coverage
#: phase long: it gets the fuzzing phase; the text model gets every phase.
SCHEMATHESIS_RUNS = {"fz_bert": "examples,coverage,fuzzing", "fz_cnn": "fuzzing"}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_schemathesis_finds_every_answer_as_each_models_live_document_says(fuzzed, tmp_path, name):
    """The schemathesis CLI against the live ``openapi.json``, every check on (server errors,
    schema-valid bodies accepted, schema-invalid ones refused, answers as documented) and
    helpers_fuzz's own: every refusal one JSON error naming its problem."""
    (tmp_path / "schemathesis.toml").write_text(SCHEMATHESIS_CONFIG)
    report = tmp_path / "report.json"
    examples = max(EXAMPLES // 4, 5)
    command = [sys.executable, "-c", "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())",
               "--config-file", str(tmp_path / "schemathesis.toml"), "--no-color", "run",
               fuzzed["endpoints"][name] + "/openapi.json", "--checks", "all", "--seed", "1",
               "--max-examples", str(examples), "--phases", SCHEMATHESIS_RUNS[name],
               "--exclude-path-regex", "^/versions/",  # the same handlers as the unversioned routes
               "--workers", "1", "--request-timeout", "60", "--generation-database", "none",
               "--report", "json", "--report-json-path", str(report)]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.helpers_fuzz", "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["complete"] and result["operations"]["tested"] == 4, result["operations"]
    assert result["test_cases"]["with_failures"] == 0 and result["test_cases"]["generated"] >= 4 * examples
    # Schema-valid inference bodies were generated and accepted, not only refusals.
    fuzzing = result["valid_rates"]["POST /infer"]["fuzzing"]
    assert fuzzing["accepted"] >= examples // 2, result["valid_rates"]


# --------------------------------------------------------------------------------------
# hypothesis: valid bodies of every form, and what no schema describes
# --------------------------------------------------------------------------------------

INT_RANGES = {f"{u}INT{b}": ((0, 2**b - 1) if u else (-2**(b - 1), 2**(b - 1) - 1))
              for u in ("", "U") for b in (8, 16, 32, 64)}
NUMPY = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8", "INT8": "i1", "INT16": "<i2", "INT32": "<i4",
         "INT64": "<i8", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8"}
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)


@st.composite
def valid_requests(draw, name: str):
    """A valid inference request for ``name``: (body bytes, headers, n, whether binary outputs)."""
    n = draw(st.integers(1, MAX_ITEMS))
    binary_in = draw(st.booleans())
    if name == "fz_bert":
        data = draw(st.lists(texts, min_size=n, max_size=n))
        tensor = {"name": "text", "shape": [n], "datatype": "BYTES"}
        blob = b"".join(len(t.encode()).to_bytes(4, "little") + t.encode() for t in data)
    else:
        datatype = draw(st.sampled_from(sorted(NUMPY)))
        item = draw(st.sampled_from([[1, 8, 8], [8, 8]]))
        size = n * math.prod(item)
        if datatype in INT_RANGES:
            lo, hi = INT_RANGES[datatype]
            values = draw(st.lists(st.integers(max(lo, -1000), min(hi, 1000)), min_size=size, max_size=size))
        else:
            values = draw(st.lists(st.floats(-100, 100, width=16 if datatype == "FP16" else 32),
                                   min_size=size, max_size=size))
        tensor = {"name": "input-0", "shape": [n, *item], "datatype": datatype}
        nested = draw(st.booleans())
        data = np.asarray(values).reshape(n, *item).tolist() if nested else values
        blob = np.asarray(values, dtype=NUMPY[datatype]).tobytes()
    body: dict = {"inputs": [tensor]}
    if draw(st.booleans()):
        body["id"] = draw(texts)
    binary_out = draw(st.booleans())
    if binary_out:
        body["parameters"] = {"binary_data_output": True}
    if draw(st.booleans()):
        body["outputs"] = [{"name": "probabilities"}, {"name": "label"}]
    if not binary_in:
        tensor["data"] = data
        return json.dumps(body).encode(), {}, n, binary_out
    tensor["parameters"] = {"binary_data_size": len(blob)}
    header = json.dumps(body).encode()
    return header + blob, {"Inference-Header-Content-Length": str(len(header))}, n, binary_out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_valid_bodies_of_every_form_get_well_formed_outputs(fuzzed, name):
    url, classes = fuzzed["endpoints"][name] + "/infer", list(fuzzed["infos"][name].classes)
    answered = []

    @FUZZ
    @given(valid_requests(name))
    def check(request):
        body, headers, n, binary = request
        status, answer, _ = post(url, body, headers, "application/octet-stream" if headers else "application/json")
        assert status == 200, (answer, body[:300])
        assert_outputs(answer, n, classes, binary)
        answered.append(bool(headers))

    check()
    assert len(answered) >= EXAMPLES and 0 < sum(answered) < len(answered)  # JSON and binary bodies both


def json_values(max_leaves: int = 12):
    """Any JSON value, NaN and Infinity literals and numbers past every float included."""
    leaves = (st.none() | st.booleans() | st.integers() | st.integers(10**300, 10**400)
              | st.floats() | texts)
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(texts, inner, max_size=4), max_leaves=max_leaves)


@st.composite
def mutated(draw, body: dict):
    """``body`` with one place in it replaced, dropped, or given a stranger beside it."""
    body = json.loads(json.dumps(body))
    node, path = body, []
    while isinstance(node, (dict, list)) and node and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(node)) if isinstance(node, dict) else st.integers(0, len(node) - 1))
        path.append((node, key))
        node = node[key]
    if not path:
        return draw(json_values())
    parent, key = path[-1]
    action = draw(st.sampled_from(["replace", "drop", "add"]))
    if action == "replace":
        parent[key] = draw(json_values())
    elif action == "drop":
        del parent[key]
    elif isinstance(parent, dict):
        parent[draw(texts)] = draw(json_values())
    else:
        parent.append(draw(json_values()))
    return body


def _with_literal(valid: dict, field: str, literal: str) -> bytes:
    """``valid`` with its input's ``field`` (or its ``id``) spelled as ``literal``, raw JSON
    text that json.dumps would never write."""
    body = json.loads(json.dumps(valid))
    (body if field == "id" else body["inputs"][0])[field] = "@@"
    return json.dumps(body).replace('"@@"', literal, 1).encode()


def _tensor_bytes(name: str, data: list) -> bytes:
    if name == "fz_bert":
        return b"".join(len(t.encode()).to_bytes(4, "little") + t.encode() for t in data)
    return np.asarray(data, dtype="<f4").tobytes()


HOSTILE_KINDS = ["mutated", "nesting", "numbers", "wrong types", "bytes", "binary", "content type", "predict"]


@st.composite
def hostile_requests(draw, name: str, valid: dict):
    """(route, body bytes, headers, content type) of a request that is not a valid one, or
    (a few of the number spellings) one that is valid only as an edge case."""
    kind = draw(st.sampled_from(HOSTILE_KINDS))
    route, headers, ctype = "/infer", {}, "application/json"
    text = json.dumps(valid)
    if kind == "mutated":
        raw = json.dumps(draw(mutated(valid))).encode()  # NaN and Infinity as their literals
    elif kind == "nesting":
        depth = draw(st.integers(2, MAX_BODY // 2 - 200))
        inner = draw(st.sampled_from(["", "1", '"x"', "{}"]))
        nest = "[" * depth + inner + "]" * (depth if draw(st.booleans()) else 0)
        field = draw(st.sampled_from(["", "data", "shape", "datatype", "id"]))
        raw = _with_literal(valid, field, nest) if field else nest.encode()
    elif kind == "numbers":
        literal = draw(st.sampled_from(["1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1e39", "-3.5e38",
                                        "9" * 5000, "0." + "9" * 5000, "1E+99999", "1e-99999", "-0",
                                        "18446744073709551616", "65505", "4.2", "true", "null"]))
        field = draw(st.sampled_from(["data", "shape", "id"]))
        body = json.loads(text)
        if field != "id":
            tensor = body["inputs"][0]
            tensor[field] = ["@@"] + list(tensor[field])[1:]
            if name != "fz_bert":
                tensor["datatype"] = draw(st.sampled_from(sorted(NUMPY)))
        else:
            body["id"] = "@@"
        raw = json.dumps(body).replace('"@@"', literal, 1).encode()
    elif kind == "wrong types":
        value = draw(st.sampled_from(["1", "", "NaN", "0x10", "1e3", True, None, {}, [[]], 1, -1, 2.5]))
        field = draw(st.sampled_from(["data item", "shape item", "data", "shape", "datatype", "name",
                                      "parameters", "id", "outputs", "inputs"]))
        body = json.loads(text)
        tensor = body["inputs"][0]
        if field in ("data item", "shape item"):
            key = field.split()[0]
            tensor[key] = [value] + list(tensor[key])[1:]
        elif field in ("id", "outputs", "inputs"):
            body[field] = value
        else:
            tensor[field] = value
        raw = json.dumps(body).encode()
    elif kind == "bytes":
        cut = draw(st.integers(0, len(text) - 1))
        raw = draw(st.sampled_from([
            text[:cut].encode(),                                      # cut short
            text[:cut].encode() + b"\xff\xfe" + text[cut:].encode(),  # not UTF-8
            text.encode("utf-16"),                                    # UTF-16, BOM and all
            b"\xef\xbb\xbf" + text.encode(),                          # a UTF-8 BOM
            b"", b"null", b"[]", b'"inputs"', b"{}",
        ])) if draw(st.booleans()) else draw(st.binary(max_size=300))
    elif kind == "binary":  # the binary tensor extension, each time with one thing wrong
        tensor = json.loads(json.dumps(valid["inputs"][0]))
        blob = _tensor_bytes(name, tensor.pop("data"))
        size, length_of = len(blob), None
        fault = draw(st.sampled_from(["size", "trailing", "missing", "datatype", "header length", "content"]))
        if fault == "size":
            size = draw(st.sampled_from([size - 1, size + 1, size + 4, 0, -1, 0.5, "8", True, None, [], 2**70]))
        elif fault == "trailing":
            blob += b"\x00"
        elif fault == "missing":
            blob = blob[:-1]
        elif fault == "datatype":
            tensor["datatype"] = draw(st.sampled_from(["BF16", "", 7, None, "INT4", "UINT8", "FP16", "FP64",
                                                       "FP32" if name == "fz_bert" else "BYTES"]))
        elif fault == "header length":
            length_of = draw(st.sampled_from(["+3", "-1", "0", "neg", "1e3", " 12", "9" * 30, "\u00b2", ""]))
        elif name == "fz_bert":  # content: a string's length running past the end
            blob = (len(blob) + 7).to_bytes(4, "little") + blob[4:]
        else:  # content: NaN, sent as raw FP32
            blob = np.full(len(blob) // 4, np.nan, dtype="<f4").tobytes()
        tensor["parameters"] = {"binary_data_size": size}
        head = json.dumps({"inputs": [tensor]}).encode()
        length = {"+3": str(len(head) + 3), "-1": str(len(head) - 1), "neg": "-1"}.get(length_of, length_of)
        headers = {"Inference-Header-Content-Length": str(len(head)) if length is None else length}
        ctype, raw = "application/octet-stream", head + blob
    elif kind == "content type":
        raw = text.encode()
        ctype = draw(st.sampled_from(["text/plain", "application/xml", "multipart/form-data",
                                      "application/x-www-form-urlencoded", "application/octet-stream",
                                      "application/jsonx", "text/json"]))
    else:
        route = "/predict"
        data = valid["inputs"][0]["data"]
        good = {"inputs": data[:1] if name == "fz_bert" else [np.asarray(data).reshape(-1, 1, 8, 8)[0].tolist()]}
        raw = json.dumps(draw(mutated(good))).encode()
    return kind, route, raw, headers, ctype


def _is_valid(name: str, route: str, raw: bytes, headers: dict, ctype: str) -> bool:
    """Whether a fuzzed request happens to be a valid one after all (a mutation can land on
    a value the request may hold, or drop an optional field): the same checks the server
    runs, in process."""
    from trainyard.serve.protocol import (ModelSignature, RequestError, binary_outputs, oip_to_raw,
                                          parse_binary_request, parse_json, raw_from_json,
                                          requested_outputs)

    if ctype != "application/json" and not (headers and ctype == "application/octet-stream"):
        return False
    sig = ModelSignature(*(("text", [64]) if name == "fz_bert" else ("image", [1, 8, 8])),
                         "classification", ["a", "b"])
    try:
        if len(raw) > MAX_BODY:
            return False
        if route == "/predict":
            raw_from_json(parse_json(raw), sig, MAX_ITEMS)
            return True
        length = headers.get("Inference-Header-Content-Length")
        body = parse_json(raw) if length is None else parse_binary_request(raw, length, parse_json)
        oip_to_raw(body, sig, MAX_ITEMS)
        wanted = requested_outputs(body, ("label", "probabilities"))
        binary_outputs(body, list(wanted or ("label", "probabilities")))
        return True
    except RequestError:
        return False


@pytest.mark.parametrize("name", sorted(MODELS))
def test_hostile_bodies_get_a_4xx_naming_the_problem_never_a_5xx(fuzzed, name):
    base = fuzzed["endpoints"][name]
    valid = sample_body(name, fuzzed["samples"][name][:2])
    seen: dict[int, int] = {}
    kinds: set[str] = set()

    @FUZZ
    @given(hostile_requests(name, valid))
    def check(request):
        kind, route, raw, headers, ctype = request
        status, answer, _ = post(base + route, raw, headers, ctype)
        seen[status] = seen.get(status, 0) + 1
        kinds.add(kind)
        if status == 200:  # a mutation that left a valid request: must be one
            assert _is_valid(name, route, raw, headers, ctype), (raw[:300], headers, ctype)
            return
        if status == 422:  # valid, but past what the model's FP32 arithmetic holds
            assert "not finite" in answer.get("error", ""), answer
            return
        assert_refused(status, answer, (raw[:300], headers, ctype))

    check()
    assert sum(seen.values()) >= EXAMPLES and sum(n for s, n in seen.items() if 400 <= s < 500) > EXAMPLES // 2, seen
    assert kinds == set(HOSTILE_KINDS)  # every kind of hostile body was sent


def test_the_bodies_found_by_hand_get_a_json_4xx_from_the_live_models(fuzzed):
    """Through HTTP and the app too (a lone surrogate in a message once broke the error
    answer's own encoding: a 500)."""
    for name, url in fuzzed["endpoints"].items():
        for label, (route, raw, length, _) in sorted(HAND_FOUND.items()):
            headers = {}
            if length is not None:
                headers = {"Inference-Header-Content-Length": str(len(raw)) if length == "binary" else length}
            status, answer, got = post(f"{url}/{route}", raw, headers,
                                       "application/octet-stream" if headers else "application/json")
            assert_refused(status, answer, (name, label))
            assert got["content-type"] == "application/json"


def test_the_models_keep_serving_the_same_answers_after_the_fuzzing(fuzzed):
    for name, url in fuzzed["endpoints"].items():
        status, answer, _ = post(url + "/infer", sample_body(name, fuzzed["samples"][name]))
        assert status == 200, answer
        before = {o["name"]: o["data"] for o in fuzzed["first"][name][1]["outputs"]}
        after = {o["name"]: o["data"] for o in answer["outputs"]}
        assert after["label"] == before["label"]
        assert np.allclose(after["probabilities"], before["probabilities"], atol=1e-6)
        status, raw = get(url + "/ready")
        assert status == 200 and json.loads(raw)["ready"] is True


def test_oip_outputs_take_a_plugins_scores_by_class_name_or_in_order_and_say_what_else_it_gave():
    """A model plugin's decode gives ``scores`` by class name (the contract); a list of one
    score per class, in order, is taken too. Anything else is the plugin's fault, said in
    one line (the route answers it as a JSON 500, not Starlette's plain-text one)."""
    import asyncio

    from starlette.requests import Request

    from trainyard.serve.app import server_error
    from trainyard.serve.protocol import ModelSignature, outputs_to_oip

    sig = ModelSignature("tabular", [2], "classification", ["no", "yes"])
    by_name = [{"label": "yes", "scores": {"yes": 0.75, "no": 0.25}}]
    in_order = [{"label": "yes", "scores": [0.25, 0.75]}]
    for answers in (by_name, in_order):
        label, probs = outputs_to_oip(answers, None, sig)
        assert label["data"] == ["yes"] and probs["data"] == [0.25, 0.75] and probs["shape"] == [1, 2]
    for scores, said in (([0.1, 0.2, 0.7], "'scores' of type list"), (None, "no 'scores'"),
                         ({"yes": 1.0}, "'scores' without the classes \\['no'\\]")):
        with pytest.raises(ValueError, match=f"the model plugin's decode gave {said}; OIP outputs need a score "
                                             "for each of the 2 classes"):
            outputs_to_oip([{"label": "yes", "scores": scores}], None, sig)
    scope = {"type": "http", "method": "POST", "path": "/infer", "headers": [], "query_string": b""}
    answer = asyncio.run(server_error(Request(scope), KeyError("x")))
    assert answer.status_code == 500 and answer.media_type == "application/json"
    assert json.loads(answer.body) == {"error": "internal error (KeyError); the replica's log has the details"}
