"""A real S3-protocol server on loopback for the tests: moto's standalone server
(``python -m moto.server``) in a subprocess, with IAM authentication on, so requests
without valid credentials are refused as by S3 itself.

Usage (the fixtures are registered in tests/conftest.py)::

    def test_something(s3_bucket):             # a fresh, empty bucket: "s3://<name>"
        uri = f"{s3_bucket}/runs"              # pass it as storage_path, tune.registry, ...

    def test_other(s3_server):                 # the server itself (session-scoped)
        s3_server.endpoint                     # "http://127.0.0.1:PORT"
        s3_server.make_bucket()                # another fresh bucket, "s3://<name>"
        s3_server.env                          # the variables below, as set
        s3_server.filesystem()                 # a pyarrow S3FileSystem on it (to inspect)

While the session runs, ``os.environ`` holds what a user of an S3-compatible store sets,
so trainyard, pyarrow (which Ray Train uses for ``storage_path``) and every process
started afterwards (Ray's workers, Serve's replicas, CLI subprocesses) reach the server
through their ordinary client code, with nothing mocked:

- ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``: an IAM user's key, made on the server
  with a policy allowing ``s3:*``;
- ``AWS_DEFAULT_REGION``, ``AWS_REGION``: ``us-east-1``;
- ``AWS_ENDPOINT_URL``: the server (pyarrow >= 15 and botocore both honour it;
  ``AWS_ENDPOINT_URL_S3``, which would win over it, is removed);
- ``AWS_EC2_METADATA_DISABLED=true``: a client that finds no credentials never asks the
  EC2 metadata address (no traffic leaves loopback);
- ``AWS_CONFIG_FILE``, ``AWS_SHARED_CREDENTIALS_FILE``: files that do not exist, so a
  developer's ``~/.aws`` plays no part; ``AWS_PROFILE`` and ``AWS_SESSION_TOKEN`` are
  removed;
- ``TRAINYARD_CACHE_DIR``: the server's temporary folder, where trainyard (and Serve's
  replicas) keep the checkpoints they download from a bucket, instead of ``~/.cache``.

The shared ``ray_cluster`` fixture asks for ``s3_server`` first when the session has tests
that use it, so the embedded Ray's processes inherit these variables. A test that changes
them (``monkeypatch.setenv``/``delenv``) changes them for its own process only: a Ray
already running keeps what it started with.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.ports import free_port

REGION = "us-east-1"
#: Variables that would override or confuse what the server's environment says.
_CLEARED = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN",
            "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")


class LoopbackServer:
    """An object-storage server in a subprocess on 127.0.0.1 (a subclass starts it), and the
    environment variables that point clients at it, set in ``os.environ`` while it runs."""

    #: Variables that would override or confuse what the server's environment says.
    CLEARED: tuple[str, ...] = ()
    SCHEME = ""

    def __init__(self, prefix: str) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix=prefix))
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.env: dict[str, str] = {}
        self._saved: dict[str, str | None] = {}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    #: A path on the server that answers once it is up; the server's log file's name.
    READY_PATH = "/"
    LOG = "server.log"

    def command(self) -> list[str]:
        """The server's command line, listening on 127.0.0.1:``self.port``."""
        raise NotImplementedError

    def filesystem(self):
        raise NotImplementedError

    def launch(self, timeout: float = 30.0, env=None) -> None:
        """Start the server on a free port and wait until it answers READY_PATH. ``env``:
        a function giving the server's extra variables once the port is chosen."""
        for _ in range(5):  # a port taken between choosing it and binding it: another
            self.port = free_port()
            log = open(self.folder / self.LOG, "ab")  # noqa: SIM115 - the child keeps it
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **(env() if env else {})})
            log.close()
            if self._wait_listening(timeout):
                return
            self.stop()
        raise RuntimeError(f"{type(self).__name__} did not start; see {self.folder / self.LOG}")

    def _wait_listening(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.endpoint + self.READY_PATH, timeout=2):
                    return True
            except OSError:
                time.sleep(0.1)
        return False

    def keys(self, uri: str) -> list[str]:
        """Every object under ``uri``, relative to it, as the server lists them."""
        import pyarrow.fs

        prefix = uri.removeprefix(self.SCHEME).rstrip("/")
        infos = self.filesystem().get_file_info(pyarrow.fs.FileSelector(prefix, recursive=True, allow_not_found=True))
        return sorted(i.path[len(prefix) + 1:] for i in infos if i.type == pyarrow.fs.FileType.File)

    def apply_env(self) -> None:
        for key in (*self.env, *self.CLEARED):
            self._saved.setdefault(key, os.environ.get(key))
        for key in self.CLEARED:
            os.environ.pop(key, None)
        os.environ.update(self.env)

    def restore_env(self) -> None:
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved.clear()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def close(self) -> None:
        self.stop()
        self.restore_env()
        shutil.rmtree(self.folder, ignore_errors=True)

    @classmethod
    @contextlib.contextmanager
    def running(cls):
        """A server of this kind, started and its environment set, for a session fixture."""
        server = cls()
        try:
            server.start()
            server.apply_env()
            yield server
        finally:
            server.close()


def session_uses(session: pytest.Session, fixture: str) -> bool:
    """Whether any collected test asks for ``fixture`` (directly or through another)."""
    return any(fixture in getattr(item, "fixturenames", ()) for item in session.items)


class S3Server(LoopbackServer):
    """moto's server in a subprocess on 127.0.0.1, with an IAM user whose key the
    environment carries, and authentication enforced from then on."""

    CLEARED = _CLEARED
    SCHEME = "s3://"

    def __init__(self) -> None:
        super().__init__("trainyard-s3-")
        self.access_key = self.secret_key = ""

    READY_PATH = "/moto-api/data.json"
    LOG = "moto.log"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def start(self, timeout: float = 30.0) -> None:
        self.launch(timeout, env=lambda: {"MOTO_PORT": str(self.port)})
        self._make_user()
        self._post("/moto-api/reset-auth", b"0")  # from now on every request must be signed
        self.env = {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(self.folder / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.folder / "no-aws-credentials"),
            # Not an AWS variable: where trainyard keeps checkpoints it downloads from a
            # bucket, here the server's temporary folder rather than ~/.cache.
            "TRAINYARD_CACHE_DIR": str(self.folder / "cache"),
        }

    def _post(self, path: str, body: bytes) -> dict:
        request = urllib.request.Request(self.endpoint + path, data=body, method="POST",
                                         headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"{}")

    def _client(self, service: str, access_key: str = "setup", secret_key: str = "setup"):
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=access_key, aws_secret_access_key=secret_key)

    def _make_user(self) -> None:
        iam = self._client("iam")
        iam.create_user(UserName="trainyard-tests")
        iam.put_user_policy(UserName="trainyard-tests", PolicyName="s3-all", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }))
        key = iam.create_access_key(UserName="trainyard-tests")["AccessKey"]
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name by default); returns ``s3://<name>``."""
        name = name or f"ty-{uuid.uuid4().hex[:16]}"
        self._client("s3", self.access_key, self.secret_key).create_bucket(Bucket=name)
        return f"s3://{name}"

    def filesystem(self):
        """A pyarrow S3FileSystem on the server, for a test to look at what was written."""
        import pyarrow.fs

        return pyarrow.fs.S3FileSystem(access_key=self.access_key, secret_key=self.secret_key,
                                       region=REGION, endpoint_override=self.endpoint)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 for the whole session, its environment set (see the
    module docstring)."""
    with S3Server.running() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the session's S3 server: ``s3://<name>``."""
    return s3_server.make_bucket()
