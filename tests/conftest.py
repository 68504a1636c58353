"""Shared fixtures: one real local Ray cluster for the whole session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gcsserver import gcs_bucket, gcs_server  # noqa: F401 - fixtures
from tests.s3server import s3_bucket, s3_server, session_uses  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
#: One row (features only) of breast_cancer, as a client sends it.
ROW = [17.99, 10.38, 122.8, 1001, 0.1184, 0.2776, 0.3001, 0.1471, 0.2419, 0.07871, 1.095, 0.9053,
       8.589, 153.4, 0.006399, 0.04904, 0.05373, 0.01587, 0.03003, 0.006193, 25.38, 17.33, 184.6,
       2019, 0.1622, 0.6656, 0.7119, 0.2654, 0.4601, 0.1189]


@pytest.fixture(scope="session")
def ray_cluster(request):
    """A real embedded Ray, started once by trainyard's own start-up path. When the session
    has tests using the S3 or GCS server, they start first, so Ray's processes inherit
    their environment (tests/s3server.py, tests/gcsserver.py)."""
    import ray

    for server in ("s3_server", "gcs_server"):
        if session_uses(request.session, server):
            request.getfixturevalue(server)

    from trainyard.runtime.cluster import init_ray

    init_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_port():
    """The port of the session's Serve. Serve is one per Ray cluster, and its port is fixed
    when it starts: the modules that deploy in-process deploy on this one and, when done,
    remove their applications (``remove_applications``) rather than stop Serve, so modules that
    follow one another share one start (about 12 s each start and stop here)."""
    from tests.ports import free_port

    return free_port()


def remove_applications() -> None:
    """Delete every application, trainyard's root too (its replica holds a share of a CPU a
    training run's workers may need), all at once, and wait until they are gone."""
    import time

    from ray import serve

    names = list(serve.status().applications)
    for name in names:
        serve.delete(name, _blocking=False)
    deadline = time.monotonic() + 60
    while any(n in serve.status().applications for n in names) and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.fixture(autouse=True, scope="module")
def _no_serve_for_modules_that_do_not_deploy(request):
    """Serve left running by the modules before is stopped ahead of a module whose tests do not
    deploy on ``serve_port``: idle, its controller and proxy take about 7% of a core here."""
    import sys

    ray = sys.modules.get("ray")
    uses = any("serve_port" in item.fixturenames for item in request.session.items
               if getattr(item, "module", None) is request.module)
    if not uses and ray is not None and ray.is_initialized():
        from ray import serve

        serve.shutdown()  # with no Serve running, a no-op
    yield


@pytest.fixture
def job_config(tmp_path):
    """``job_config(name, *overrides)``: a built-in config with its runs under tmp_path."""
    from trainyard.config import load_config

    def make(config_name: str, *overrides: str):
        return load_config(CONFIGS / f"{config_name}.yaml", [f"storage_path={tmp_path / 'runs'}", *overrides])

    return make
