"""The Ray Serve applications: one per served model, and a root for health and 404s.

Imported only where Serve runs (it pulls in FastAPI and Ray Serve).
"""


import json
import logging
import os
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from trainyard.serving import ModelSignature, RequestError, oip_to_raw, outputs_to_oip, raw_from_json

logger = logging.getLogger("trainyard.serve")


def _reject_constant(name: str) -> Any:
    raise RequestError(f"{name} is not valid JSON here: NaN and Infinity are not accepted")


async def read_json(request: Request, max_bytes: int) -> Any:
    """The request's JSON body; 415 for another content type, 413 past ``max_bytes``
    (refused from Content-Length, or while streaming, never held whole in memory)."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise RequestError(f"content type must be application/json, got {ctype or 'none'}", 415)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise RequestError(f"body of {length} bytes is over the limit of {max_bytes}", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestError(f"body is over the limit of {max_bytes} bytes", 413)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks), parse_constant=_reject_constant)
    except RequestError:
        raise
    except ValueError as exc:
        raise RequestError(f"malformed JSON: {exc}") from None


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _check_key(request: Request, api_key: str | None) -> JSONResponse | None:
    if not api_key:
        return None
    given = request.headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    if not token:
        return error(401, "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key'")
    if token != api_key:
        return error(403, "wrong API key")
    return None


model_api = FastAPI(title="trainyard model", description="Open Inference Protocol (KServe V2) "
                    "routes and a plain JSON route for one served model.")


@serve.deployment
@serve.ingress(model_api)
class ModelServer:
    """One model: the checkpoint's model with its plugin's pre- and post-processing."""

    def __init__(self, name: str, version: str, checkpoint: str, options: dict):
        from trainyard.checkpoint import load_predictor

        self.name, self.version = name, version
        self.predictor = load_predictor(checkpoint)
        info = self.predictor.info
        self.signature = ModelSignature(info.inputs, list(info.input_shape), info.task, list(info.classes))
        self.max_body = int(options.get("max_body_bytes", 1_000_000))
        self.max_items = int(options.get("max_items", 1024))
        self.api_key = options.get("api_key") or (
            os.environ.get(options["api_key_env"]) if options.get("api_key_env") else None) or None
        self.predict_batch.set_max_batch_size(int(options.get("max_batch_size", 32)))
        self.predict_batch.set_batch_wait_timeout_s(float(options.get("batch_wait_timeout_s", 0.005)))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def predict_batch(self, batches: list[Any]) -> list[tuple[list[dict], Any]]:
        """Requests that arrive together run as one forward pass (Serve's batching)."""
        import numpy as np

        sizes = [len(b) for b in batches]
        if isinstance(batches[0], list):  # text: one flat list of strings
            merged = [text for batch in batches for text in batch]
        else:
            merged = np.concatenate(batches)
        outputs = self.predictor.forward(merged).float().cpu()
        answers = self.predictor.processor.decode(outputs)
        results, start = [], 0
        for size in sizes:
            results.append((answers[start:start + size], outputs[start:start + size].numpy()))
            start += size
        return results

    def _metadata(self) -> dict:
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "pytorch",
            "inputs": self.signature.input_metadata(),
            "outputs": self.signature.output_metadata(),
            "parameters": {"task": self.signature.task, "classes": self.signature.classes,
                           "model": self.predictor.manifest.get("model")},
        }

    def _check_version(self, version: str | None) -> JSONResponse | None:
        if version is not None and version != self.version:
            return error(404, f"model {self.name!r} has no version {version!r} (served: {self.version})")
        return None

    @model_api.get("/")
    @model_api.get("/versions/{version}")
    async def metadata(self, version: str | None = None):
        return self._check_version(version) or self._metadata()

    @model_api.get("/ready")
    @model_api.get("/versions/{version}/ready")
    async def ready(self, version: str | None = None):
        return self._check_version(version) or {"name": self.name, "ready": True}

    @model_api.post("/infer")
    @model_api.post("/versions/{version}/infer")
    async def infer(self, request: Request, version: str | None = None):
        denied = _check_key(request, self.api_key) or self._check_version(version)
        if denied:
            return denied
        try:
            body = await read_json(request, self.max_body)
            raw = oip_to_raw(body, self.signature, self.max_items)
        except RequestError as exc:
            return error(exc.status, str(exc))
        answers, outputs = await self.predict_batch(raw)
        response = {"model_name": self.name, "model_version": self.version,
                    "outputs": outputs_to_oip(answers, outputs, self.signature)}
        if isinstance(body.get("id"), str):
            response["id"] = body["id"]
        return response

    @model_api.post("/predict")
    async def predict(self, request: Request):
        """Plain JSON: ``{"inputs": [raw, ...]}`` to ``{"predictions": [...]}``."""
        denied = _check_key(request, self.api_key)
        if denied:
            return denied
        try:
            raw = raw_from_json(await read_json(request, self.max_body), self.signature, self.max_items)
        except RequestError as exc:
            return error(exc.status, str(exc))
        answers, _ = await self.predict_batch(raw)
        return {"model_name": self.name, "model_version": self.version, "predictions": answers}


root_api = FastAPI(title="trainyard", description="Health routes and the list of served models.")


@serve.deployment
@serve.ingress(root_api)
class Root:
    """Health routes, the model list, and a JSON 404 for models that are not served."""

    def __init__(self, models: list[str]):
        self.models = list(models)

    @root_api.get("/v2/health/live")
    async def live(self):
        return {"live": True}

    @root_api.get("/v2/health/ready")
    async def ready(self):
        return {"ready": True}

    @root_api.get("/v2")
    async def server_metadata(self):
        return {"name": "trainyard", "version": "2", "extensions": ["trainyard_json_predict"]}

    @root_api.get("/v2/models")
    async def models_list(self):
        return {"models": [{"name": n} for n in sorted(self.models)]}

    @root_api.api_route("/v2/models/{name}{rest:path}", methods=["GET", "POST"])
    async def unknown_model(self, name: str, rest: str = ""):
        served = ", ".join(sorted(self.models)) or "none"
        return error(404, f"no model named {name!r} is served (served: {served})")


def model_app(args: dict):
    """Serve application builder for one model (``import_path`` of a Serve config)."""
    deployment = dict(args.get("deployment") or {})
    return ModelServer.options(name="model", **deployment).bind(
        args["name"], str(args.get("version", "1")), args["checkpoint"], dict(args.get("options") or {}))


def root_app(args: dict):
    """Serve application builder for the health routes and 404s."""
    return Root.bind(list(args.get("models") or []))
