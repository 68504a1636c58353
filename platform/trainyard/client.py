"""A small HTTP client for models trainyard serves (no trainyard import needed to use the
routes; this is a convenience for Python callers)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from trainyard.errors import TrainyardError

#: Headers that carry the API key: never sent on to another origin by a redirect.
CREDENTIAL_HEADERS = ("Authorization", "X-api-key")


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(scheme)


class _KeepKeyAtHome(urllib.request.HTTPRedirectHandler):
    """Follows redirects as urllib does, but drops the API key headers when the redirect
    leads to another origin (scheme, host or port): a redirect must not hand the key to a
    server it was not meant for."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            for name in CREDENTIAL_HEADERS:
                new.remove_header(name)
        return new


class Client:
    """``Client("http://127.0.0.1:8000").predict("mlp", [[...30 floats...]])``.

    ``api_key``: sent as ``Authorization: Bearer KEY`` to ``url`` (and to redirects within its
    origin, never to another host); None: TRAINYARD_API_KEY if set; "": none.
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 30):
        self.url = url.rstrip("/")
        self.api_key = os.environ.get("TRAINYARD_API_KEY") if api_key is None else api_key
        self.timeout = timeout
        self._opener = urllib.request.build_opener(_KeepKeyAtHome)

    def _call(self, path: str, body: Any = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, headers=headers)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except (ValueError, AttributeError):
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
