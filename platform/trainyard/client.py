"""A small HTTP client for models trainyard serves (no trainyard import needed to use the
routes; this is a convenience for Python callers)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from trainyard.errors import TrainyardError


class Client:
    """``Client("http://127.0.0.1:8000").predict("mlp", [[...30 floats...]])``."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 30):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def _call(self, path: str, body: Any = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except ValueError:
                message = exc.reason
            raise TrainyardError(f"{self.url}{path}: {exc.code} {message}") from None
        except urllib.error.URLError as exc:
            raise TrainyardError(f"cannot reach {self.url}: {exc.reason}") from None

    def ready(self) -> bool:
        return bool(self._call("/v2/health/ready").get("ready"))

    def models(self) -> list[str]:
        return [m["name"] for m in self._call("/v2/models")["models"]]

    def metadata(self, model: str) -> dict:
        return self._call(f"/v2/models/{model}")

    def predict(self, model: str, inputs: list) -> list[dict]:
        """Raw inputs (feature rows, image arrays, strings) to labels and scores."""
        return self._call(f"/v2/models/{model}/predict", {"inputs": list(inputs)})["predictions"]

    def infer(self, model: str, body: dict) -> dict:
        """An Open Inference Protocol request body, as is."""
        return self._call(f"/v2/models/{model}/infer", body)
