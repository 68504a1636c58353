"""The binary tensor data extension of the Open Inference Protocol for outputs: which outputs a
request asks to get as raw bytes, and how a response carries them, read back by Triton's own
client (tritonclient, written by nobody here). Pure functions: no Ray, no HTTP."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainyard.serve.protocol import (
    RequestError,
    binary_outputs,
    encode_infer_response,
    tensor_bytes,
)

NAMES = ["label", "probabilities"]


def _response(labels=("benign", "malignant"), probs=((0.25, 0.75), (0.9, 0.1))):
    probs = np.asarray(probs, dtype=np.float32)
    return {"model_name": "mlp", "model_version": "1", "id": "r1", "outputs": [
        {"name": "label", "datatype": "BYTES", "shape": [len(labels)], "data": list(labels)},
        {"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape),
         "data": probs.reshape(-1).tolist()}]}


def _triton_result(body: bytes, header_length: int | None):
    from tritonclient.http import InferResult

    return InferResult.from_response_body(body, header_length=header_length)


@pytest.mark.parametrize(("request_body", "expected"), [
    ({}, set()),  # plain JSON unless asked
    ({"parameters": {"binary_data_output": True}}, {"label", "probabilities"}),  # tritonclient's default
    ({"parameters": {"binary_data_output": False}}, set()),
    ({"outputs": [{"name": "label", "parameters": {"binary_data": True}},
                  {"name": "probabilities", "parameters": {"binary_data": False}}]}, {"label"}),
    ({"outputs": [{"name": "probabilities"}], "parameters": {"binary_data_output": True}}, {"probabilities"}),
    ({"outputs": [{"name": "label", "parameters": {"binary_data": False}}, {"name": "probabilities"}],
      "parameters": {"binary_data_output": True}}, {"probabilities"}),  # the output's own choice wins
    ({"outputs": [{"name": "probabilities", "parameters": {}}]}, set()),
])
def test_which_outputs_go_as_binary_data(request_body, expected):
    names = [o["name"] for o in request_body.get("outputs", [])] or NAMES
    assert binary_outputs(request_body, names) == expected


@pytest.mark.parametrize(("request_body", "message"), [
    ({"parameters": {"binary_data_output": "yes"}}, "parameters.binary_data_output must be true or false"),
    ({"parameters": [1]}, "'parameters' must be an object"),
    ({"outputs": [{"name": "label", "parameters": {"binary_data": 1}}]}, r"outputs\[0\].parameters.binary_data must"),
    ({"outputs": [{"name": "label", "parameters": "binary"}]}, r"outputs\[0\].parameters must be an object"),
    ({"outputs": [{"name": "probabilities", "parameters": {"classification": 2}}]}, "classification is not supported"),
    ({"outputs": [{"name": "label", "parameters": {"binary_data": False, "shared_memory_region": "r",
                                                   "shared_memory_byte_size": 64}}]},
     "shared_memory_byte_size, shared_memory_region is not supported"),
])
def test_output_options_that_cannot_be_honoured_are_refused(request_body, message):
    with pytest.raises(RequestError, match=message) as caught:
        binary_outputs(request_body, NAMES)
    assert caught.value.status == 400


def test_binary_outputs_are_raw_bytes_after_the_json_header():
    body, header_length = encode_infer_response(_response(), {"label", "probabilities"})
    header = json.loads(body[:header_length])
    assert [o["parameters"] for o in header["outputs"]] == [{"binary_data_size": 4 + 6 + 4 + 9},
                                                             {"binary_data_size": 16}]
    assert all("data" not in o for o in header["outputs"])
    assert header["id"] == "r1" and header["model_name"] == "mlp"
    rest = body[header_length:]
    assert rest[:23] == (6).to_bytes(4, "little") + b"benign" + (9).to_bytes(4, "little") + b"malignant"
    assert rest[23:] == np.asarray([0.25, 0.75, 0.9, 0.1], dtype="<f4").tobytes()


def test_tritons_own_reader_gets_the_same_tensors_from_binary_and_json_responses():
    response = _response(labels=("café", "b"))  # a non-ASCII label: lengths count bytes
    as_json, none = encode_infer_response(response)
    assert none is None and json.loads(as_json) == response
    for binary in ({"label", "probabilities"}, {"label"}, {"probabilities"}):
        body, header_length = encode_infer_response(response, binary)
        result, reference = _triton_result(body, header_length), _triton_result(as_json, None)
        labels = result.as_numpy("label")
        assert [x.decode() if isinstance(x, bytes) else x for x in labels] == ["café", "b"]
        assert [x.decode() if isinstance(x, bytes) else x for x in reference.as_numpy("label")] == ["café", "b"]
        probs = result.as_numpy("probabilities")
        assert probs.dtype == np.float32 and probs.shape == (2, 2)
        assert np.array_equal(probs, reference.as_numpy("probabilities"))
        for output in result.get_response()["outputs"]:
            assert ("data" in output) == (output["name"] not in binary)
    assert response["outputs"][0]["data"] == ["café", "b"]  # the response itself is left as it was


def test_tensor_bytes_per_datatype():
    assert tensor_bytes({"name": "v", "datatype": "FP32", "shape": [2], "data": [1.0, -2.5]}) == \
        np.asarray([1.0, -2.5], dtype="<f4").tobytes()
    assert tensor_bytes({"name": "v", "datatype": "INT64", "shape": [1], "data": [7]}) == (7).to_bytes(8, "little")
    assert tensor_bytes({"name": "t", "datatype": "BYTES", "shape": [2], "data": [b"\x00\xff", ""]}) == \
        (2).to_bytes(4, "little") + b"\x00\xff" + (0).to_bytes(4, "little")
    with pytest.raises(ValueError, match="no binary form"):
        tensor_bytes({"name": "x", "datatype": "BF16", "shape": [1], "data": [1.0]})


def _binary_request(tensor: dict, blob: bytes, **top) -> tuple[bytes, str]:
    header = json.dumps({"inputs": [tensor], **top}).encode()
    return header + blob, str(len(header))


FP32_2 = np.asarray([1.5, -2], dtype="<f4").tobytes()


@pytest.mark.parametrize(("request_body", "header_length", "message"), [
    # Header lengths that are not a count of bytes (once a 500: int() of 5000 digits, of "²").
    (b"{}", "9" * 5000, "does not fit the body of 2 bytes"),
    (b"{}", "\u00b2", "does not fit"),
    (b"{}", " 2", "does not fit"),
    (b"{}", "", "does not fit"),
    (b"{}", "-1", "does not fit"),
    # A JSON header that is not an object.
    (b"[1]", "3", "the body must be a JSON object"),
    # binary_data_size: a whole number of bytes that fits, nothing else.
    (*_binary_request({"name": "x", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": True}},
                      FP32_2), "binary_data_size must be a whole number of bytes, not true/false"),
    (*_binary_request({"name": "x", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": 0.5}},
                      FP32_2), "must be a whole number of bytes, not 0.5"),
    (*_binary_request({"name": "x", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": "8"}},
                      FP32_2), "must be a whole number of bytes, not '8'"),
    (*_binary_request({"name": "x", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": 2**70}},
                      FP32_2), f"binary_data_size: {2**70} does not fit the body"),
    (*_binary_request({"name": "x", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": 7}},
                      FP32_2), "7 bytes are not whole FP32 values"),
    (*_binary_request({"name": "x", "shape": [1, 2], "datatype": "FP32", "parameters": [8]}, FP32_2),
     "inputs[0].parameters must be an object"),
    # The data twice, or of a datatype that has no binary form here (a list: once a 500).
    (*_binary_request({"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2],
                       "parameters": {"binary_data_size": 8}}, FP32_2), "give its 'data' or parameters.binary_data_size, not both"),
    (*_binary_request({"name": "x", "shape": [1, 2], "datatype": ["FP32"], "parameters": {"binary_data_size": 8}},
                      FP32_2), "an array is not an OIP datatype trainyard takes"),
    (*_binary_request({"name": "x", "shape": [1, 2], "datatype": "BF16", "parameters": {"binary_data_size": 8}},
                      FP32_2), "'BF16' is not an OIP datatype trainyard takes"),
    # BYTES: a length running past the end, bytes that are not UTF-8.
    (*_binary_request({"name": "t", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}},
                      (2**32 - 1).to_bytes(4, "little") + b"hi"), "BYTES data is cut short"),
    (*_binary_request({"name": "t", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}},
                      (2).to_bytes(4, "little") + b"\xff\xfe"), "BYTES data must be UTF-8 text"),
    # A header that is not UTF-8 JSON.
    (b"\xff{}", "3", "not UTF-8 text"),
    (b"[" * 5000, "5000", "nested too deeply"),
])
def test_binary_requests_that_do_not_add_up_are_refused_naming_the_problem(request_body, header_length, message):
    from trainyard.serve.protocol import parse_binary_request, parse_json

    with pytest.raises(RequestError) as caught:
        parse_binary_request(request_body, header_length, parse_json)
    assert message in str(caught.value) and caught.value.status == 400


def test_a_whole_binary_data_size_written_as_a_float_is_its_number_of_bytes():
    from trainyard.serve.protocol import parse_binary_request, parse_json

    body = parse_binary_request(*_binary_request(
        {"name": "x", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": 8.0}}, FP32_2), parse_json)
    assert body["inputs"][0]["data"].tolist() == [1.5, -2.0] and "parameters" not in body["inputs"][0]
