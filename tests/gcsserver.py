"""A real Google Cloud Storage-protocol server on loopback for the tests: the
``gcp-storage-emulator`` package's server (``python -m gcp_storage_emulator start``) in a
subprocess, speaking GCS's JSON API.

Usage (the fixtures are registered in tests/conftest.py)::

    def test_something(gcs_bucket):            # a fresh, empty bucket: "gs://<name>"
        uri = f"{gcs_bucket}/runs"             # pass it as storage_path, a files uri, ...

    def test_other(gcs_server):                # the server itself (session-scoped)
        gcs_server.endpoint                    # "http://127.0.0.1:PORT"
        gcs_server.make_bucket()               # another fresh bucket, "gs://<name>"
        gcs_server.filesystem()                # a pyarrow GcsFileSystem on it (to inspect)

While the session runs, ``os.environ`` holds what a user of a GCS emulator or private
endpoint sets, so trainyard, pyarrow (whose GCS filesystem Ray Train and Ray Data use) and
every process started afterwards (Ray's workers, CLI subprocesses) reach the server through
their ordinary client code, with nothing mocked:

- ``CLOUD_STORAGE_EMULATOR_ENDPOINT``: the server (Google's C++ client, inside pyarrow,
  sends every request there);
- ``GOOGLE_APPLICATION_CREDENTIALS``: a service account key file written for the session,
  with a freshly generated RSA key. Google's client signs its own tokens with it (a
  self-signed JWT), so nothing asks Google's token endpoint; the emulator does not check them;
- ``GOOGLE_CLOUD_PROJECT``: the project new buckets belong to;
- ``CLOUDSDK_CONFIG``: a folder that does not exist, so a developer's gcloud credentials
  play no part; ``GCE_METADATA_HOST`` and ``GCE_METADATA_ROOT`` are removed;
- ``TRAINYARD_CACHE_DIR``: the server's temporary folder (see tests/s3server.py).

The shared ``ray_cluster`` fixture asks for ``gcs_server`` first when the session has tests
that use it, so the embedded Ray's processes inherit these variables.
"""

from __future__ import annotations

import json
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.s3server import LoopbackServer

PROJECT = "trainyard-tests"
_CLEARED = ("GCE_METADATA_HOST", "GCE_METADATA_ROOT")


def write_service_account_key(path: Path) -> None:
    """A service account key file (the JSON ``gcloud iam service-accounts keys create``
    writes) for a made-up account, with a new RSA key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path.write_text(json.dumps({
        "type": "service_account", "project_id": PROJECT, "private_key_id": uuid.uuid4().hex,
        "private_key": pem, "client_email": f"trainyard-tests@{PROJECT}.iam.gserviceaccount.com",
        "client_id": "100000000000000000000", "token_uri": "https://oauth2.googleapis.com/token",
    }))


class GcsServer(LoopbackServer):
    """gcp-storage-emulator's server in a subprocess on 127.0.0.1, objects kept in memory."""

    CLEARED = _CLEARED
    SCHEME = "gs://"

    def __init__(self) -> None:
        super().__init__("trainyard-gcs-")

    READY_PATH = f"/storage/v1/b?project={PROJECT}"
    LOG = "emulator.log"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                "--port", str(self.port), "--in-memory"]

    def start(self, timeout: float = 30.0) -> None:
        self.launch(timeout)
        key = self.folder / "service-account.json"
        write_service_account_key(key)
        self.env = {
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.endpoint,
            "GOOGLE_APPLICATION_CREDENTIALS": str(key),
            "GOOGLE_CLOUD_PROJECT": PROJECT,
            "CLOUDSDK_CONFIG": str(self.folder / "no-gcloud-config"),
            # Not a Google variable: where trainyard keeps checkpoints it downloads from a
            # bucket, here the server's temporary folder rather than ~/.cache.
            "TRAINYARD_CACHE_DIR": str(self.folder / "cache"),
        }

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name by default) through the JSON API; returns
        ``gs://<name>``."""
        name = name or f"ty-{uuid.uuid4().hex[:16]}"
        request = urllib.request.Request(f"{self.endpoint}/storage/v1/b?project={PROJECT}",
                                         data=json.dumps({"name": name}).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10):
            pass
        return f"gs://{name}"

    def filesystem(self):
        """A pyarrow GcsFileSystem on the server, for a test to look at what was written."""
        import pyarrow.fs

        return pyarrow.fs.GcsFileSystem(scheme="http", endpoint_override=f"127.0.0.1:{self.port}",
                                        anonymous=True)


@pytest.fixture(scope="session")
def gcs_server():
    """The GCS emulator on 127.0.0.1 for the whole session, its environment set (see the
    module docstring)."""
    with GcsServer.running() as server:
        yield server


@pytest.fixture
def gcs_bucket(gcs_server) -> str:
    """A fresh, empty bucket on the session's GCS server: ``gs://<name>``."""
    return gcs_server.make_bucket()
