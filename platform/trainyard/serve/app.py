"""The Ray Serve applications: one per served model, and a root for health and 404s.

Imported only where Serve runs (it pulls in FastAPI and Ray Serve).
"""


import asyncio
import hmac
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from ray import serve
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from trainyard.serve.config import API_KEY_MARK, MAX_FORWARD_EXAMPLES, ROOT_APP, ROOT_CPUS, read_key_file
from trainyard.serve.protocol import (
    ERROR_SCHEMA,
    ModelSignature,
    RequestError,
    binary_outputs,
    encode_infer_response,
    infer_request_schema,
    infer_response_schema,
    oip_to_raw,
    outputs_to_oip,
    parse_binary_request,
    parse_json,
    predict_request_schema,
    predict_response_schema,
    raw_from_json,
    requested_outputs,
)

logger = logging.getLogger("trainyard.serve")


async def read_json(request: Request, max_bytes: int, binary: bool = False) -> Any:
    """The request's JSON body; 415 for another content type, 413 past ``max_bytes``
    (refused from Content-Length, or while streaming, never held whole in memory).

    No Content-Type is read as JSON (the protocol does not require one; Triton's clients
    send none). With ``binary``, a request in the binary tensor data extension (an
    Inference-Header-Content-Length header) is taken too.
    """
    ctype = request.headers.get("content-type", "")
    header_length = request.headers.get("inference-header-content-length") if binary else None
    allowed = ("application/json", "application/octet-stream") if header_length else ("application/json",)
    if ctype and ctype.split(";")[0].strip().lower() not in allowed:
        raise RequestError(f"content type must be application/json, got {ctype}", 415)
    if ";" in ctype:  # parameters, rarely sent: JSON is UTF-8 (RFC 8259), a body in another charset is refused
        charset = next((p.split("=", 1)[1].strip().strip('"').lower() for p in ctype.split(";")[1:]
                        if p.strip().lower().startswith("charset=")), "utf-8")
        if charset not in ("utf-8", "utf8"):
            raise RequestError(f"charset must be utf-8 (JSON is UTF-8 text), got {charset[:40]}", 415)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise RequestError(f"Content-Encoding {encoding[:40]!r} is not accepted; send the body as it is", 415)
    length = request.headers.get("content-length")
    if length is not None and length.isascii() and length.isdigit() and \
            (len(length) > 15 or int(length) > max_bytes):
        raise RequestError(f"body of {length[:20]} bytes is over the limit of {max_bytes}", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestError(f"body is over the limit of {max_bytes} bytes", 413)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if header_length is not None:
        return parse_binary_request(raw, header_length, parse_json)
    return parse_json(raw)


def encoded_slash(path: str, name: str) -> Response:
    """The 404 for a model's path with a ``/`` sent encoded (``%2F``): data, not a separator
    (RFC 3986). The root application answers it for one in the model's name, the model's
    own application for one past it."""
    return error(404, f"no route {path!r} for model {name!r} (a '/' encoded as %2F does not "
                      "separate the parts of a path)")


class ModelPath:
    """A model application's paths, checked once per request:

    - ``GET /v2/models/<name>`` (the protocol's metadata route, no trailing slash) answered
      in place: Starlette would redirect it to ``.../<name>/``, and protocol clients do not
      follow redirects;
    - a ``%2F`` anywhere in the path refused: the ASGI path a replica gets is decoded, so
      ``.../mlp%2Fready`` reached the ``ready`` route whenever it came through Serve's own
      proxy (``--ingress proxy``, and HAProxy's fallback while replicas start), and
      ``.../mlp/versions/1%2Finfer`` always."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path, root = scope.get("path", ""), scope.get("root_path", "").rstrip("/")
            raw = scope.get("raw_path") or b""
            if b"%2F" in raw or b"%2f" in raw:
                await encoded_slash(path, root.rsplit("/", 1)[-1])(scope, receive, send)
                return
            if root and path == root:
                scope = {**scope, "path": path + "/", "raw_path": (path + "/").encode()}
        await self.app(scope, receive, send)


class HeadAsGet:
    """HEAD answered wherever GET is, as HTTP asks (load balancers' health checks use it): the
    GET route's status and headers, without its body."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headless(message):
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headless)


def error(status: int, message: str, headers: dict | None = None) -> Response:
    """A JSON ``{"error": message}`` answer. A lone surrogate a client sent (JSON can spell
    one, UTF-8 cannot) and that the message quotes is written out as its escape."""
    text = str(message).encode("utf-8", "backslashreplace").decode("utf-8")
    return Response(json.dumps({"error": text}, ensure_ascii=False), status_code=status,
                    media_type="application/json", headers=headers)


def unreadable(exc: Exception) -> Response:
    """A body that broke a parser in a way no check foresaw: still the client's request, so a
    400 rather than a 500, and logged, so the missing check gets written."""
    logger.warning("a request body failed to parse: %s: %s", type(exc).__name__, str(exc)[:300],
                   exc_info=exc)
    return error(400, f"the request body could not be read ({type(exc).__name__})")


async def http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own 404 and 405 answers, in the same ``{"error": ...}`` form as ours."""
    return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


async def server_error(request: Request, exc: Exception) -> Response:
    """Whatever a route did not foresee: a 500 in the same JSON form (Starlette's own is
    plain text), logged with its trace."""
    logger.error("unexpected %s on %s", type(exc).__name__, request.url.path, exc_info=exc)
    return error(500, f"internal error ({type(exc).__name__}); the replica's log has the details")


async def validation_error(request: Request, exc: RequestValidationError) -> Response:
    problems = exc.errors()
    first = problems[0] if problems else {}
    where = ".".join(str(part) for part in first.get("loc", ()))
    return error(422, f"{where}: {first.get('msg', 'invalid')}" if where else "invalid request")


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy and torch scalars and arrays
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def json_response(document: dict) -> Response:
    """A JSON answer encoded once with the standard library; FastAPI's own path walks the
    document through ``jsonable_encoder`` first, which costs more than the model on the
    hot routes."""
    return Response(json.dumps(document, allow_nan=False, default=_plain, separators=(",", ":")),
                    media_type="application/json")


class ApiKeyMissing(RuntimeError):
    """A replica told to require an API key found none: it refuses to start (fails closed)."""


def load_api_key(options: dict) -> bytes | None:
    """The API key a replica requires, read by reference: from the file ``api_key_file`` or
    the environment variable ``api_key_env`` names, on the replica's own node; None when the
    options name neither (an open deployment). A named source that is missing or empty raises
    ApiKeyMissing, naming it (never the key): the replica does not start, rather than serve
    every route with no key. Surrounding whitespace (a file's last newline) is ignored."""
    path, name = options.get("api_key_file"), options.get("api_key_env")
    if path:
        try:
            return read_key_file(path).encode("utf-8")
        except ValueError as why:
            raise ApiKeyMissing(f"{API_KEY_MARK} the key file {path} {why} on this replica's node; it must "
                                "exist, with the key, on every node that runs a replica") from None
    if name:
        key = os.environ.get(name, "").strip()
        if not key:
            raise ApiKeyMissing(f"{API_KEY_MARK} the environment variable {name} is not set (or "
                                "empty) on this replica's node; set it on every node that runs "
                                "replicas (before Ray starts there), or deploy with --api-key-file")
        return key.encode("utf-8")
    return None


def _check_key(request: Request, api_key: bytes | None) -> Response | None:
    if not api_key:
        return None
    given = request.headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    if not token:
        return error(401, "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key'",
                     {"WWW-Authenticate": 'Bearer realm="trainyard"'})  # RFC 9110: a 401 names its scheme
    # Header values arrive decoded as Latin-1: encoding them back gives the bytes sent.
    # Compared in constant time, so the answer's timing does not leak the key.
    if not hmac.compare_digest(token.strip().encode("latin-1", "replace"), api_key):
        return error(403, "wrong API key")
    return None


class BatchMetrics:
    """What Ray Serve's ``@serve.batch`` reports, under its names (tag ``function_name``:
    ``predict_batch``, the method trainyard batched through before it had its own batcher),
    so dashboards built on Serve's batching metrics keep working. Serve adds the deployment,
    replica and application tags."""

    FUNCTION = {"function_name": "predict_batch"}
    TIME_BUCKETS_MS = [1, 2, 5, 10, 20, 50, 100, 200, 300, 400, 500, 1000, 2000, 5000, 10000, 60000]
    SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    UTILIZATION_BUCKETS = [5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99, 100]

    def __init__(self, max_batch_size: int):
        from ray.serve.metrics import Counter, Gauge, Histogram

        tags = tuple(self.FUNCTION)
        self.max_batch_size = max(1, int(max_batch_size))
        self.wait = Histogram("serve_batch_wait_time_ms", description="Time requests waited for batch "
                              "to fill (in milliseconds).", boundaries=self.TIME_BUCKETS_MS, tag_keys=tags)
        self.run = Histogram("serve_batch_execution_time_ms", description="Time to execute the batch "
                             "function (in milliseconds).", boundaries=self.TIME_BUCKETS_MS, tag_keys=tags)
        self.queued = Gauge("serve_batch_queue_length", description="Number of requests waiting in "
                            "the batch queue.", tag_keys=tags)
        self.utilization = Histogram("serve_batch_utilization_percent", description="Batch utilization "
                                     "as percentage (actual_batch_size / max_batch_size * 100).",
                                     boundaries=self.UTILIZATION_BUCKETS, tag_keys=tags)
        self.size = Histogram("serve_actual_batch_size", description="The actual number of requests in "
                              "each batch.", boundaries=self.SIZE_BUCKETS, tag_keys=tags)
        self.batches = Counter("serve_batches_processed", description="Counter of batches executed.",
                               tag_keys=tags)

    def observe(self, size: int, wait_ms: float, run_ms: float, queued: int) -> None:
        tags = self.FUNCTION
        self.size.observe(size, tags=tags)
        self.utilization.observe(100.0 * size / self.max_batch_size, tags=tags)
        self.wait.observe(wait_ms, tags=tags)
        self.run.observe(run_ms, tags=tags)
        self.queued.set(queued, tags=tags)
        self.batches.inc(tags=tags)


class Batcher:
    """Dynamic batching without a timer: requests that arrive while a forward pass runs
    queue, and the next pass takes all of them (up to ``max_batch_size``) as soon as the
    previous one ends.

    Under light load a request waits for nothing; under heavy load batches grow by
    themselves, because requests pile up during each pass. With ``wait_s`` > 0, a pass that
    would start with fewer than ``max_batch_size`` requests first waits for more, up to
    ``wait_s`` after the oldest of them arrived (Serve's ``@serve.batch`` waits out its
    window even while a pass is running, and forms the next batch before it ends); but not
    when ``in_flight()`` (the requests in the replica, queued or on their way) says none
    is on its way. A request alone in the replica by it runs at once, outside the queue.

    ``run_batch`` takes the requests' inputs and returns one result per request (errors as
    results, not raised). Passes run one at a time, in a task of their own, so a request
    cancelled on the way (its client gone) never leaves the others in its batch unanswered.
    Each pass is reported to ``metrics`` (see :class:`BatchMetrics`), if given.
    """

    def __init__(self, run_batch: Callable[[list[Any]], Awaitable[list[Any]]],
                 max_batch_size: int, wait_s: float = 0.0, metrics: Any = None,
                 in_flight: Callable[[], int] | None = None):
        from collections import deque

        self.run_batch = run_batch
        self.max_batch_size = max(1, int(max_batch_size))
        self.wait_s = max(0.0, float(wait_s))
        self.metrics = metrics
        self.in_flight = in_flight
        self.queue: deque = deque()  # (inputs, future, arrival time)
        self.filled: asyncio.Event | None = None  # set when the queue reaches a full batch
        self.task: asyncio.Task | None = None

    async def submit(self, inputs: Any) -> Any:
        if self.task is None and not self.queue and self.in_flight is not None and self.in_flight() <= 1:
            # Alone in the replica: nothing could join its pass, so it skips the queue and
            # the drain task (at one client at a time they cost 10-15% of the MLP's req/s).
            return (await self._pass([inputs]))[0]
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.queue.append((inputs, future, loop.time()))
        if self.filled is not None and len(self.queue) >= self.max_batch_size:
            self.filled.set()
        if self.task is None:
            self.task = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self.queue:
                if self.wait_s > 0 and len(self.queue) < self.max_batch_size and \
                        (self.in_flight is None or self.in_flight() > len(self.queue)):
                    await self._fill()
                take = min(self.max_batch_size, len(self.queue))
                batch = [self.queue.popleft() for _ in range(take)]
                live = [(inputs, future) for inputs, future, _ in batch if not future.done()]
                if not live:
                    continue
                try:
                    results = await self._pass([inputs for inputs, _ in live], batch[0][2])
                except Exception as exc:  # noqa: BLE001 - answered to each request it held
                    results, failed = [], exc
                for i, (_, future) in enumerate(live):
                    if future.done():
                        continue
                    if results:
                        future.set_result(results[i])
                    else:
                        future.set_exception(failed)
                # Let the answered requests respond, and requests on their way queue.
                await asyncio.sleep(0)
        finally:
            self.task = None
            self.filled = None
            for _, future, _ in self.queue:  # only if this task itself was cancelled
                if not future.done():
                    future.set_exception(RuntimeError("the replica's batcher stopped"))
            self.queue.clear()

    async def _pass(self, inputs: list[Any], arrived: float | None = None) -> list[Any]:
        """One forward pass, reported to ``metrics``: its size, how long its oldest request
        waited (``arrived``, loop time; None: it just came), how long it ran, and the requests
        queued when it ended."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        waited = 0.0 if arrived is None else started - arrived
        try:
            return await self.run_batch(inputs)
        finally:
            if self.metrics is not None:
                self.metrics.observe(len(inputs), waited * 1000, (loop.time() - started) * 1000, len(self.queue))

    async def _fill(self) -> None:
        """Waits until the queue holds a full batch, or ``wait_s`` after its oldest request
        arrived."""
        loop = asyncio.get_running_loop()
        remaining = self.queue[0][2] + self.wait_s - loop.time()
        if remaining <= 0:
            return
        self.filled = asyncio.Event()
        try:
            await asyncio.wait_for(self.filled.wait(), remaining)
        except asyncio.TimeoutError:
            pass
        finally:
            self.filled = None


class InlinePolicy:
    """Whether a forward pass runs on the replica's event loop or in its forward thread.

    The thread keeps the replica answering (health, metadata, new requests to batch) while
    a long pass runs, but the hand-off costs a thread switch each way: on a small model
    that is most of a request's cost. A pass the model is expected to finish within
    ``budget_s`` runs inline; the expectation is the median seconds per example of the last
    ``window`` passes (a pass's fixed cost included, so small passes over-estimate). A
    median, not a mean: on a busy machine a pass descheduled for a few milliseconds would
    otherwise send the next many passes of a small model to the thread. Until ``warmup``
    passes have been timed, every pass goes to the thread."""

    def __init__(self, budget_s: float = 0.002, warmup: int = 8, window: int = 15):
        from collections import deque

        self.budget_s, self.warmup = budget_s, warmup
        self.recent: deque = deque(maxlen=window)
        self.per_example_s = 0.0
        self.timed = 0

    def inline(self, examples: int) -> bool:
        return self.budget_s > 0 and self.timed >= self.warmup and examples * self.per_example_s <= self.budget_s

    def observe(self, examples: int, seconds: float) -> None:
        self.recent.append(seconds / max(1, examples))
        ordered = sorted(self.recent)
        self.per_example_s = ordered[len(ordered) // 2]
        self.timed += 1


class BatchRunner:
    """Requests' inputs through a predictor, each request isolated from the others it is
    batched with.

    Each request's inputs are already validated and shaped ``[n, *input_shape]`` (text: a
    list of valid strings). Requests run together in forward passes of at most
    ``max_examples`` examples (a request larger than that is split over several). When a
    batch of several requests still fails, each of them is run again alone, so only the one
    that fails alone is answered with an error (a ``RequestError``, a 4xx), and a request whose
    outputs are not finite gets a 422 instead of a broken answer.
    """

    def __init__(self, predictor: Any, max_examples: int = MAX_FORWARD_EXAMPLES):
        self.predictor = predictor
        self.max_examples = max(1, int(max_examples))

    def forward_many(self, batches: list[Any]) -> list[Any]:
        """One result per request: ``(answers, outputs)``, or a RequestError."""
        results: list[Any] = [None] * len(batches)
        for group in self._groups([len(b) for b in batches]):
            try:
                for i, result in zip(group, self._forward([batches[i] for i in group])):
                    results[i] = result
                continue
            except Exception as exc:
                if len(group) == 1:
                    results[group[0]] = self._failure(exc)
                    continue
                logger.warning("a batch of %d requests failed (%s: %s); running them one by one",
                               len(group), type(exc).__name__, exc)
            for i in group:
                try:
                    results[i] = self._forward([batches[i]])[0]
                except Exception as exc:
                    results[i] = self._failure(exc)
        return results

    def _groups(self, sizes: list[int]) -> list[list[int]]:
        """Requests packed in order into groups of at most ``max_examples`` examples (a
        larger request is a group of its own, split into forward passes by ``_forward``)."""
        groups: list[list[int]] = []
        current: list[int] = []
        total = 0
        for i, size in enumerate(sizes):
            if current and total + size > self.max_examples:
                groups.append(current)
                current, total = [], 0
            current.append(i)
            total += size
        if current:
            groups.append(current)
        return groups

    def _forward(self, batches: list[Any]) -> list[Any]:
        import numpy as np
        import torch

        sizes = [len(b) for b in batches]
        if isinstance(batches[0], list):  # text: one flat list of strings
            merged: Any = [text for batch in batches for text in batch]
        else:
            merged = batches[0] if len(batches) == 1 else np.concatenate(batches)
        step = self.max_examples
        parts = [self.predictor.forward(merged[start:start + step]).float().cpu()
                 for start in range(0, sum(sizes), step)]
        outputs = parts[0] if len(parts) == 1 else torch.cat(parts)
        answers = self.predictor.processor.decode(outputs)
        values = outputs.numpy()
        # One check for every request's outputs (torch's isfinite costs more per call here).
        finite = np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        results, start = [], 0
        for size in sizes:
            if finite[start:start + size].all():
                results.append((answers[start:start + size], values[start:start + size]))
            else:
                results.append(RequestError("the model's output for these inputs is not finite "
                                            "(NaN or Infinity); are they far outside the range "
                                            "it was trained on?", 422))
            start += size
        return results

    @staticmethod
    def _failure(exc: Exception) -> RequestError:
        if isinstance(exc, RequestError):
            return exc
        text = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, MemoryError) or "out of memory" in text.lower():
            logger.error("a request ran out of memory in the model: %s", text[:300])
            return RequestError("the model ran out of memory on this request; send fewer inputs "
                                "at a time", 503)
        logger.warning("a request failed in the model: %s", text[:300])
        return RequestError(f"the model could not process these inputs ({text[:300]})", 422)


MODEL_API_DESCRIPTION = ("Open Inference Protocol (KServe V2) routes and a plain JSON route for one "
                         "served model.")

# Each replica serves its own OpenAPI document (``/openapi.json`` and ``/docs`` under the
# model's route), written for its model's inputs and outputs: FastAPI's own would be the
# same for every model, and with no request bodies (the handlers read the raw body).
model_api = FastAPI(title="trainyard model", description=MODEL_API_DESCRIPTION,
                    openapi_url=None, docs_url=None, redoc_url=None)
model_api.add_middleware(ModelPath)
model_api.add_middleware(HeadAsGet)
model_api.add_exception_handler(HTTPException, http_error)
model_api.add_exception_handler(RequestValidationError, validation_error)
model_api.add_exception_handler(Exception, server_error)

_ERROR_STATUSES = {
    "400": "a request that is not valid: the error names what is wrong",
    "413": "a body or batch over the limit",
    "415": ("a content type other than application/json, a charset other than UTF-8, or a compressed "
            "body (Content-Encoding)"),
    "422": "inputs the model could not process (its output not finite, or it failed on them)",
    "503": "the model ran out of memory on this request, or the replica is overloaded",
}


def _metadata_schema() -> dict:
    tensor = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
        "name": {"type": "string"}, "datatype": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}}}}
    return {"type": "object", "required": ["name", "versions", "platform", "inputs", "outputs"], "properties": {
        "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
        "platform": {"type": "string"}, "inputs": {"type": "array", "items": tensor},
        "outputs": {"type": "array", "items": tensor}, "parameters": {"type": "object"}}}


def model_openapi(routes: list, server: str, sig: ModelSignature, name: str, version: str,
                  max_items: int, max_body: int, secured: bool) -> dict:
    """The OpenAPI document of one served model: FastAPI's paths, with the request and
    response bodies this model really takes and gives, and the served version as the only
    value of ``version``."""
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=f"trainyard model {name!r}", version=version, routes=routes,
                      description=MODEL_API_DESCRIPTION, servers=[{"url": server}] if server else None)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["Error"] = ERROR_SCHEMA
    schemas["InferRequest"] = infer_request_schema(sig, max_items)
    schemas["InferResponse"] = infer_response_schema(sig, name, version)
    schemas["PredictRequest"] = predict_request_schema(sig, max_items)
    schemas["PredictResponse"] = predict_response_schema(sig, name, version)
    schemas["ModelMetadata"] = _metadata_schema()
    if secured:
        doc["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}

    def body(ref: str) -> dict:
        return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}

    def failures(*statuses: str) -> dict:
        answers = {s: {"description": _ERROR_STATUSES.get(s, "see the error"), "content": body("Error")}
                   for s in statuses}
        if "503" in answers:  # shed past the queue (max_queued_requests): when to try again
            answers["503"]["headers"] = {"Retry-After": {
                "description": "when overloaded: seconds to wait before trying again",
                "schema": {"type": "integer", "minimum": 0}}}
        return answers

    # Every route of the deployment sheds past its queue, metadata and readiness too.
    overloaded = failures("503")
    overloaded["503"]["description"] = "the replica is overloaded"
    for path, operations in doc.get("paths", {}).items():
        for method, op in operations.items():
            for param in op.get("parameters", []):
                if param.get("name") == "version":
                    param["schema"] = {"type": "string", "enum": [version]}
                    param["description"] = f"the served version ({version}); another is a 404"
            versioned = "{version}" in path or any(p.get("name") == "version" for p in op.get("parameters", []))
            missing = failures("404") if versioned else {}
            if path.endswith("/infer"):
                op["description"] = (
                    "An Open Inference Protocol inference request: one input tensor, answered with "
                    "the model's outputs. The binary tensor data extension (Triton's clients' "
                    "default) is taken too: an Inference-Header-Content-Length header giving the "
                    "length of the JSON, whose inputs' parameters.binary_data_size count the raw "
                    "little-endian bytes that follow it. Outputs asked for as binary_data come "
                    "the same way (application/octet-stream).")
                op["requestBody"] = {"required": True, "content": body("InferRequest")}
                ok = {"description": "the model's outputs", "content": {
                    **body("InferResponse"),
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                      "headers": {"Inference-Header-Content-Length": {
                          "description": "with binary outputs: the length of the JSON before their bytes",
                          "schema": {"type": "integer", "minimum": 0}}}}
                op["responses"] = {"200": ok, **failures("400", "413", "415", "422", "503"), **missing}
            elif path.endswith("/predict"):
                op["description"] = "Plain JSON: one raw input per example, one prediction each."
                op["requestBody"] = {"required": True, "content": body("PredictRequest")}
                op["responses"] = {"200": {"description": "one prediction per input",
                                           "content": body("PredictResponse")},
                                   **failures("400", "413", "415", "422", "503")}
            elif path.endswith("/ready"):
                op["responses"] = {"200": {"description": "the model is ready", "content": {
                    "application/json": {"schema": {"type": "object", "required": ["name", "ready"],
                                                    "properties": {"name": {"const": name},
                                                                   "ready": {"type": "boolean"}}}}}},
                                   **missing, **overloaded}
            else:
                op["responses"] = {"200": {"description": "the model's metadata", "content": body("ModelMetadata")},
                                   **missing, **overloaded}
            if secured and method == "post":
                op["security"] = [{"bearer": []}, {"apiKey": []}]
                op["responses"].update({
                    "401": {"description": "no API key", "content": body("Error")},
                    "403": {"description": "a wrong API key", "content": body("Error")}})
            if method == "post":
                op["description"] += f" Bodies are at most {max_body} bytes; batches at most {max_items} inputs."
    return doc


def replica_device() -> str:
    """Where a replica runs its model: the GPU Ray gave it (``num_gpus`` in the serve
    config), else the CPU."""
    import ray

    if ray.get_gpu_ids():
        import torch

        if torch.cuda.is_available():
            return "cuda"
    return "cpu"


@serve.deployment
@serve.ingress(model_api)
class ModelServer:
    """One model: the checkpoint's model with its plugin's pre- and post-processing."""

    def __init__(self, name: str, version: str, checkpoint: str, options: dict):
        from trainyard.checkpoint import load_predictor

        # First, before the model loads: a replica that should require a key and finds none
        # fails at once (Serve reports the deployment unhealthy; `trainyard deploy` names why).
        self.api_key = load_api_key(options)
        self.name, self.version = name, version
        self.predictor = load_predictor(checkpoint, device=replica_device())
        info = self.predictor.info
        self.signature = ModelSignature(info.inputs, list(info.input_shape), info.task, list(info.classes))
        self.output_names = tuple(o["name"] for o in self.signature.output_metadata())
        self.max_body = int(options.get("max_body_bytes", 1_000_000))
        self.max_items = int(options.get("max_items", 1024))
        self.runner = BatchRunner(self.predictor, int(options.get("max_forward_examples", MAX_FORWARD_EXAMPLES)))
        # Forward passes run here, one at a time, off the event loop: health, metadata and
        # new requests are answered (and batched) while a large forward pass runs.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainyard-forward")
        # ... unless the pass is short enough that the hand-off would cost more than it.
        self.inline = InlinePolicy(float(options.get("inline_forward_ms", 2.0)) / 1000)
        max_batch = int(options.get("max_batch_size", 32))
        # None: batching off (max_batch_size 1), each request its own pass.
        self.batcher = Batcher(self._forward, max_batch, float(options.get("batch_wait_timeout_s", 0.0)),
                               BatchMetrics(max_batch), lambda: self.ongoing) if max_batch > 1 else None
        self.ongoing = 0  # requests in this replica, from arrival to answer
        self.openapi_document: dict | None = None  # written on its first request

    async def run(self, raw: Any) -> Any:
        """One request's inputs through the model: ``(answers, outputs)``, or a RequestError
        for this request alone. With batching on, requests in flight together share forward
        passes (:class:`Batcher`)."""
        if self.batcher is None:
            return (await self._forward([raw]))[0]
        return await self.batcher.submit(raw)

    async def _forward(self, batches: list[Any]) -> list[Any]:
        examples = sum(len(b) for b in batches)
        if self.inline.inline(examples):
            return self._timed(batches, examples)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._timed, batches, examples)

    def _timed(self, batches: list[Any], examples: int) -> list[Any]:
        """The forward passes, timed where they run (not the wait for the event loop)."""
        started = time.perf_counter()
        results = self.runner.forward_many(batches)
        self.inline.observe(examples, time.perf_counter() - started)
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

    def _check_version(self, version: str | None) -> Response | None:
        if version is not None and version != self.version:
            return error(404, f"model {self.name!r} has no version {version!r} (served: {self.version})")
        return None

    # The inference routes first: FastAPI tries a model's routes in the order they are
    # declared, on every request (matching the seven others first cost about 0.1 ms).
    @model_api.post("/infer")
    @model_api.post("/versions/{version}/infer")
    async def infer(self, request: Request, version: str | None = None):
        self.ongoing += 1
        try:
            return await self._infer(request, version)
        finally:
            self.ongoing -= 1

    async def _infer(self, request: Request, version: str | None):
        denied = _check_key(request, self.api_key) or self._check_version(version)
        if denied:
            return denied
        try:
            body = await read_json(request, self.max_body, binary=True)
            raw = oip_to_raw(body, self.signature, self.max_items)
            wanted = requested_outputs(body, self.output_names)
            binary = binary_outputs(body, list(wanted or self.output_names))
        except RequestError as exc:
            return error(exc.status, str(exc))
        except ClientDisconnect:
            raise
        except Exception as exc:  # noqa: BLE001 - the client's body, whatever broke on it
            return unreadable(exc)
        result = await self.run(raw)
        if isinstance(result, RequestError):
            return error(result.status, str(result))
        answers, outputs = result
        try:
            tensors = outputs_to_oip(answers, outputs, self.signature)
        except (ValueError, TypeError, KeyError) as exc:  # the model plugin's decode, not the request
            logger.error("model %r: its answers cannot be OIP outputs: %s", self.name, exc)
            return error(500, f"model {self.name!r}: its answers cannot be given as OIP outputs ({exc})")
        if wanted:
            by_name = {t["name"]: t for t in tensors}
            tensors = [by_name[n] for n in wanted]
        response = {"model_name": self.name, "model_version": self.version, "outputs": tensors}
        if isinstance(body.get("id"), str):
            response["id"] = body["id"]
        content, header_length = encode_infer_response(response, binary)
        if header_length is None:
            return Response(content, media_type="application/json")
        # The binary tensor data extension: the JSON, then each binary output's raw data.
        return Response(content, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(header_length)})

    @model_api.post("/predict")
    async def predict(self, request: Request):
        """Plain JSON: ``{"inputs": [raw, ...]}`` to ``{"predictions": [...]}``."""
        self.ongoing += 1
        try:
            return await self._predict(request)
        finally:
            self.ongoing -= 1

    async def _predict(self, request: Request):
        denied = _check_key(request, self.api_key)
        if denied:
            return denied
        try:
            raw = raw_from_json(await read_json(request, self.max_body), self.signature, self.max_items)
        except RequestError as exc:
            return error(exc.status, str(exc))
        except ClientDisconnect:
            raise
        except Exception as exc:  # noqa: BLE001 - the client's body, whatever broke on it
            return unreadable(exc)
        result = await self.run(raw)
        if isinstance(result, RequestError):
            return error(result.status, str(result))
        answers, _ = result
        return json_response({"model_name": self.name, "model_version": self.version,
                              "predictions": answers})

    @model_api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request):
        """This model's OpenAPI document (its request and response bodies)."""
        if self.openapi_document is None:
            self.openapi_document = model_openapi(
                request.app.routes, request.scope.get("root_path", ""), self.signature, self.name,
                self.version, self.max_items, self.max_body, bool(self.api_key))
        return json_response(self.openapi_document)

    @model_api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        from fastapi.openapi.docs import get_swagger_ui_html

        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title=f"trainyard model {self.name}")

    @model_api.get("/")
    @model_api.get("/versions/{version}")
    async def metadata(self, version: str | None = None):
        return self._check_version(version) or self._metadata()

    @model_api.get("/ready")
    @model_api.get("/versions/{version}/ready")
    async def ready(self, version: str | None = None):
        return self._check_version(version) or {"name": self.name, "ready": True}


root_api = FastAPI(title="trainyard", description="Health routes and the list of served models.")
root_api.add_exception_handler(HTTPException, http_error)
root_api.add_exception_handler(RequestValidationError, validation_error)
root_api.add_exception_handler(Exception, server_error)
root_api.add_middleware(HeadAsGet)


@serve.deployment(ray_actor_options={"num_cpus": ROOT_CPUS})  # light; not a whole CPU (Serve's default)
@serve.ingress(root_api)
class Root:
    """Health routes, the model list, and a JSON 404 for models that are not served.

    The list is Serve's own (its applications, less this one), read when asked: deploying
    or deleting a model leaves this replica running (restarting it cost each later
    ``trainyard deploy`` about 4 s here), and a model deleted by hand leaves the list too.
    """

    #: How old a list a 404 may name the served models from: a flood of requests for unknown
    #: models asks Serve's controller at most this often (each ask is ~30 ms of its time).
    MAX_AGE_404_S = 1.0

    def __init__(self):
        self._ask: tuple[float, asyncio.Future] | None = None  # the last ask: when it began, its list

    async def served(self, max_age_s: float = 0.0) -> list[str]:
        """The models Serve runs now, sorted; concurrent requests share one ask."""
        last = self._ask
        if last is None or last[1].done() and (last[1].exception() or time.monotonic() - last[0] > max_age_s):
            self._ask = last = (time.monotonic(), asyncio.ensure_future(self._names()))
        return await asyncio.shield(last[1])

    @staticmethod
    async def _names() -> list[str]:
        apps = (await asyncio.to_thread(serve.status)).applications
        return sorted(n for n, a in apps.items() if n != ROOT_APP and a.status != "DELETING")

    @root_api.get("/v2/health/live")
    async def live(self):
        return {"live": True}

    @root_api.get("/v2/health/ready")
    async def ready(self):
        return {"ready": True}

    @root_api.get("/v2")
    async def server_metadata(self):
        return {"name": "trainyard", "version": "2",
                "extensions": ["binary_tensor_data", "trainyard_json_predict"]}

    @root_api.get("/v2/models")
    async def models_list(self):
        return {"models": [{"name": n} for n in await self.served()]}

    @root_api.api_route("/v2/models/{name}{rest:path}", methods=["GET", "POST"])
    async def unknown_model(self, name: str, rest: str = ""):
        served = await self.served(self.MAX_AGE_404_S)
        if name in served:  # its own routes did not take it: a '/' sent encoded, as %2F
            return encoded_slash(f"/v2/models/{name}{rest}", name)
        return error(404, f"no model named {name!r} is served (served: {', '.join(served) or 'none'})")


def model_app(args: dict):
    """Serve application builder for one model (``import_path`` of a Serve config)."""
    deployment = dict(args.get("deployment") or {})
    return ModelServer.options(name="model", **deployment).bind(
        args["name"], str(args.get("version", "1")), args["checkpoint"], dict(args.get("options") or {}))


def root_app(args: dict | None = None):
    """Serve application builder for the health routes and 404s (its args: none; a
    ``models`` list in an older Serve config file is ignored)."""
    return Root.bind()
