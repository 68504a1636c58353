"""Submitting trainyard jobs to a Ray cluster through Ray's Jobs API, and following them.

A submitted job carries everything it needs in its runtime_env ``working_dir``: the resolved
job config (``job.yaml``), trainyard itself (core and built-in plugins) and the third-party
plugin packages the config uses, each with its entry points, so the cluster runs exactly the
code and plugins that validated the job here. Heavy dependencies (torch, Ray) are the
cluster's own (see cluster.yaml's set-up commands).
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
import re
import shlex
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainyard.errors import ConfigError, TrainyardError, reason_line
from trainyard.plugins import SWITCHES

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
#: Where the Jobs API address comes from when --address is not given.
ADDRESS_ENV = ("TRAINYARD_JOBS_ADDRESS", "RAY_API_SERVER_ADDRESS")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
#: Environment variables a job carries from the submitting shell: plugin selection only
#: (runtime_env is visible in the dashboard, so never secrets such as TRAINYARD_API_KEY).
CARRIED_ENV = SWITCHES  # the plugin switches travel with a job
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".pytest_cache")


class JobsError(TrainyardError):
    """The Jobs API refused or could not be reached; the message says why and what to do."""


# --------------------------------------------------------------------------------------
# Address and token
# --------------------------------------------------------------------------------------


def jobs_address(address: str | None) -> str:
    """The Jobs API URL: ``--address``, else TRAINYARD_JOBS_ADDRESS / RAY_API_SERVER_ADDRESS,
    else the local head's dashboard. ``host:port`` gets ``http://``."""
    if not address:
        address = next((os.environ[k] for k in ADDRESS_ENV if os.environ.get(k)), DEFAULT_ADDRESS)
    address = address.rstrip("/")
    if address.startswith("ray://") or address == "auto":
        raise JobsError(
            f"--address {address!r} is a Ray client/GCS address; jobs go to the head's dashboard "
            "(Jobs API), e.g. --address http://HEAD:8265"
        )
    if "://" not in address:
        address = f"http://{address}"
    if not re.fullmatch(r"https?://(\[[0-9A-Fa-f:.]+\]|[^/:\s\[\]]+)(:\d+)?(/.*)?", address):  # IPv6 in brackets
        raise JobsError(f"--address {address!r} is not a URL such as http://HEAD:8265")
    return address


@dataclass
class Token:
    value: str | None
    source: str  # where it came from, for messages (never the token itself)


def find_token() -> Token:
    """Ray's token, looked up as Ray does: RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH
    names, then ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return Token(os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if named:
        path = Path(named).expanduser()
        try:
            text = path.read_text().strip()
        except OSError as exc:
            raise JobsError(f"RAY_AUTH_TOKEN_PATH={named}: cannot read it ({exc.strerror or exc})") from None
        if not text:
            raise JobsError(f"RAY_AUTH_TOKEN_PATH={named}: the file is empty")
        return Token(text, f"RAY_AUTH_TOKEN_PATH ({path})")
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return Token(default.read_text().strip(), str(default))
    return Token(None, "none found")


class InsecureTokenWarning(UserWarning):
    """Ray's token is about to cross the network unencrypted."""


def token_travels_safely(address: str) -> bool:
    """A token sent to ``address`` stays on this machine or is encrypted on the way."""
    from urllib.parse import urlparse

    parsed = urlparse(address)
    if parsed.scheme == "https":
        return True
    host = (parsed.hostname or "").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


def warn_if_exposed(token: Token, address: str) -> None:
    """Warn (never naming the token) when ``token`` would cross the network unencrypted."""
    if token.value and not token_travels_safely(address):
        warnings.warn(
            f"the Ray token from {token.source} goes to {address} over plain HTTP, readable by "
            "anyone on the path; reach the head through an SSH tunnel (ray dashboard "
            "cluster.yaml, then --address http://127.0.0.1:8265) or HTTPS",
            InsecureTokenWarning, stacklevel=3)


_TOKEN_HELP = ("set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding it, or put it in "
               "~/.ray/auth_token (on the head node, `ray get-auth-token` prints it)")


class JobsClient:
    """A thin layer over Ray's ``JobSubmissionClient`` that turns its failures into
    messages naming the address, the token's source and what to do."""

    def __init__(self, address: str | None = None):
        self.address = jobs_address(address)
        self.token = find_token()
        headers = {"Authorization": f"Bearer {self.token.value}"} if self.token.value else {}
        warn_if_exposed(self.token, self.address)
        self._client = self._call(_make_client, self.address, headers)

    def _call(self, fn, *args, **kwargs):
        from ray.exceptions import AuthenticationError

        try:
            return fn(*args, **kwargs)
        except AuthenticationError as exc:
            text = str(exc)
            if self.token.value is None or "required" in text.lower() or "missing" in text.lower():
                raise JobsError(
                    f"the Ray cluster at {self.address} requires an authentication token and "
                    f"none was found: {_TOKEN_HELP}"
                ) from None
            raise JobsError(
                f"the Ray cluster at {self.address} refused the authentication token from "
                f"{self.token.source}: it is not this cluster's token ({_TOKEN_HELP})"
            ) from None
        except ConnectionError:
            raise JobsError(
                f"cannot reach Ray's Jobs API at {self.address}: is the head node running "
                "with its dashboard (ray start --head --dashboard-host 0.0.0.0) and the port "
                "open? (ray up cluster.yaml opens 8265)"
            ) from None
        except RuntimeError as exc:
            text = str(exc)
            if "Version check returned" in text:  # the address answers HTTP, but not as Ray's Jobs API
                raise JobsError(f"{self.address} is not Ray's Jobs API ({text.split('.')[0]}): give the "
                                "head node's dashboard address, usually port 8265") from None
            missing = re.search(r"Job (\S+) does not exist", text)
            if missing or "404" in text:
                what = missing.group(1) if missing else "?"
                raise JobsError(f"no job {what} on the cluster at {self.address} "
                                f"(`trainyard jobs list --address {self.address}` shows the jobs)") from None
            taken = re.search(r"Job with submission_id (\S+) already exists", text)
            if taken:
                raise JobsError(f"a job with id {taken.group(1)} already exists on the cluster at "
                                f"{self.address}; give another --job-id (`trainyard jobs list --address "
                                f"{self.address}` shows the jobs)") from None
            raise JobsError(f"the Jobs API at {self.address} answered: {reason_line(exc)}") from None

    # The operations the CLI uses -------------------------------------------------------

    def submit(self, entrypoint: str, runtime_env: dict, submission_id: str | None,
               metadata: dict) -> str:
        # Ray's INFO lines as it packs and uploads the job's files ("Uploading package ...")
        # would come before trainyard's own; its warnings stay.
        for name in ("ray.dashboard.modules.dashboard_sdk", "ray._private.runtime_env.packaging"):
            logger = logging.getLogger(name)
            logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
        return self._call(self._client.submit_job, entrypoint=entrypoint, runtime_env=runtime_env,
                          submission_id=submission_id, metadata=metadata)

    def list(self) -> list:
        return self._call(self._client.list_jobs)

    def info(self, job_id: str):
        return self._call(self._client.get_job_info, job_id)

    def logs(self, job_id: str) -> str:
        return self._call(self._client.get_job_logs, job_id)

    def stop(self, job_id: str) -> bool:
        return self._call(self._client.stop_job, job_id)

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 1.0):
        """Block until the job ends (or ``timeout`` seconds); returns its info."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = self.info(job_id)
            if str(info.status) in TERMINAL:
                return info
            if deadline is not None and time.monotonic() > deadline:
                return info
            time.sleep(poll)

    def follow_logs(self, job_id: str) -> Iterator[str]:
        """The job's log as it is written, each part once, until the job ends.

        One websocket to the head (Ray's ``tail_job_logs``, which carries this client's
        headers, the token among them), read chunk by chunk in a private event loop, so this
        is a plain iterator and never touches an event loop the caller runs. Failures read as
        the other calls' do (no token, wrong token, head unreachable, no such job). A job that
        ended before its driver started streams nothing; its log (if any) then comes whole.
        """
        import asyncio

        _quiet_stream_close()
        stream = self._client.tail_job_logs(job_id)
        loop = asyncio.new_event_loop()
        streamed = False
        try:
            while True:
                chunk = self._call(self._next_chunk, loop, stream, job_id, streamed)
                if chunk is None:
                    break
                if chunk:
                    streamed = True
                    yield chunk
        finally:
            _close_stream(loop, stream)
        if not streamed:
            text = self.logs(job_id)
            if text:
                yield text

    def _next_chunk(self, loop, stream, job_id: str, streamed: bool) -> str | None:
        """The stream's next chunk (None at its end), its failures as the exceptions
        ``_call`` translates: Ray checks a websocket's handshake status itself nowhere."""
        import aiohttp
        from ray.exceptions import AuthenticationError

        try:
            return loop.run_until_complete(stream.__anext__())
        except StopAsyncIteration:
            return None
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 401:
                raise AuthenticationError(f"Authentication required ({exc.status} {exc.message})") from None
            if exc.status == 403:
                raise AuthenticationError(f"Authentication failed ({exc.status} {exc.message})") from None
            if exc.status == 404:
                raise RuntimeError(f"Job {job_id} does not exist") from None
            raise JobsError(f"the Jobs API at {self.address} refused to stream the log of job "
                            f"{job_id}: {exc.status} {exc.message}") from None
        except (aiohttp.ClientConnectionError, RuntimeError) as exc:
            if not streamed and isinstance(exc, aiohttp.ClientConnectionError):
                raise ConnectionError(str(exc)) from None
            if isinstance(exc, RuntimeError) and not str(exc).startswith("WebSocket"):
                raise
            raise JobsError(f"the log stream of job {job_id} from {self.address} broke off before "
                            f"the job ended ({exc}); `trainyard jobs status {job_id} --address "
                            f"{self.address}` shows whether it still runs, `trainyard jobs logs {job_id} "
                            f"--address {self.address}` prints its whole log") from None


class _NormalCloseFilter(logging.Filter):
    """Drops Ray's INFO line on every log stream's end ("WebSocket closed for job ... with
    close code 1000"), which would follow each job's log on stderr; warnings stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO
                    and str(record.msg).startswith("WebSocket closed for job"))


def _quiet_stream_close() -> None:
    sdk_logger = logging.getLogger("ray.dashboard.modules.job.sdk")
    if not any(isinstance(f, _NormalCloseFilter) for f in sdk_logger.filters):
        sdk_logger.addFilter(_NormalCloseFilter())


def _close_stream(loop, stream) -> None:
    """End a log stream left open (a reader that stopped early, Ctrl-C mid-chunk): its
    pending read is cancelled, its websocket and session closed, then the loop."""
    import asyncio

    try:
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(stream.aclose())
        loop.run_until_complete(loop.shutdown_asyncgens())
    except Exception:  # closing only; the stream's own error (if any) is what matters
        pass
    finally:
        loop.close()


def _make_client(address: str, headers: dict):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers=headers)


# --------------------------------------------------------------------------------------
# What a job carries
# --------------------------------------------------------------------------------------


@dataclass
class Shipped:
    distribution: str
    version: str
    packages: list[str]


def _top_levels(dist: md.Distribution, extra: tuple[str, ...] = ()) -> list[str]:
    names = list(extra)
    text = dist.read_text("top_level.txt") or ""
    names += [line.strip() for line in text.splitlines() if line.strip()]
    names += [ep.value.split(":")[0].split(".")[0] for ep in dist.entry_points if ep.group == "trainyard"]
    return list(dict.fromkeys(names))


def _ship_distribution(dist_name: str, into: Path, extra: tuple[str, ...] = ()) -> Shipped:
    """Copy an installed distribution's packages, and a dist-info with its entry points, into
    ``into`` (which becomes the job's working_dir, on sys.path on every node)."""
    import importlib.util

    dist = md.distribution(dist_name)
    name, version = dist.metadata["Name"], dist.version
    packages = []
    for top in _top_levels(dist, extra):
        spec = importlib.util.find_spec(top)
        if spec is None or spec.origin in (None, "built-in", "frozen"):
            if spec is not None and spec.submodule_search_locations:
                source = Path(next(iter(spec.submodule_search_locations)))
            else:
                raise JobsError(f"plugin distribution {name}: cannot find its package {top!r} to ship")
        else:
            source = Path(spec.origin)
            source = source.parent if source.name == "__init__.py" else source
        target = into / source.name
        if source.is_dir():
            shutil.copytree(source, target, ignore=_IGNORE)
        else:
            shutil.copy2(source, target)
        packages.append(top)
    info = into / f"{re.sub(r'[-_.]+', '_', name)}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(dist.read_text("entry_points.txt") or "")
    return Shipped(name, version, packages)


def plugins_used(cfg: Any, registry: Any) -> list[str]:
    """Names of the distributions of the third-party plugins ``cfg`` uses."""
    used = {("model", cfg.model.name), ("dataset", cfg.data.name)}
    used |= {("metric", m) for m in (cfg.train.metrics or [])}
    infos = {p.name: p for p in registry.plugins}
    dists = []
    for kind, name in sorted(used):
        if name not in registry.table(kind):
            continue
        info = infos.get(registry.owner(kind, name))
        if info is not None and not info.builtin and info.distribution and info.distribution not in dists:
            dists.append(info.distribution)
    return dists


def _check_storage(cfg: Any) -> None:
    """A cluster job's storage must be reachable from every node and outlive the job. A
    bucket URI's form is checked here; whether the bucket exists and the credentials work
    is checked on the cluster (its nodes have their own credentials, such as an instance
    profile), where the job's ``trainyard train``/``tune`` does so before its workers start."""
    from trainyard.runtime.storage import uri_problem

    paths = [("storage_path", cfg.storage_path)]
    if cfg.get("tune") is not None:
        paths.append(("tune.registry", cfg.tune.registry))
    for key, value in paths:
        problem = uri_problem(value) if "://" in value else None
        if problem:
            raise ConfigError(f"{key}: {value!r}: {problem}")
        if "://" not in value and not Path(value).expanduser().is_absolute() and not value.startswith("~"):
            raise ConfigError(
                f"{key}: {value!r} is relative; on a cluster it would land in the job's temporary "
                f"working folder. Give a bucket URI or a shared folder every node mounts, e.g. "
                f"{key}=s3://my-bucket/trainyard or {key}=/mnt/shared/trainyard"
            )


def _check_local_data_paths(cfg: Any) -> None:
    """A data param naming a file or glob relative to this folder, which holds it, can never
    be read by the job: it runs in a temporary folder on the cluster. Refused here rather
    than after the job starts there."""
    import glob

    for key, value in (cfg.data.get("params") or {}).items():
        if not isinstance(value, str) or not value or "://" in value or Path(value).expanduser().is_absolute():
            continue
        # Only what reads as a path: a folder in it, a file's extension or a glob (a column
        # or format name that a folder here happens to share, such as 'images', is none).
        looks_like_path = "/" in value or os.sep in value or any(c in value for c in "*?[") or (
            Path(value).suffix and value not in (".", ".."))
        if not looks_like_path or value.startswith("~") or not glob.glob(value):
            continue
        raise ConfigError(
            f"data.params.{key}: {value!r} is a path on this machine, relative to this folder; the job "
            "runs on the cluster, in a folder of its own, where it is not. Give a path every node sees "
            f"(a shared folder, e.g. data.params.{key}=/mnt/shared/{Path(value).name}) or a bucket URI")


def _check_pip(requirements: tuple[str, ...]) -> None:
    """Each ``--pip`` requirement is one pip can read, checked here: Ray would find a bad one
    only after minutes of setting the job's environment up on the cluster."""
    from packaging.requirements import InvalidRequirement, Requirement

    local = ("a local path, which the cluster's nodes do not have; publish the package to an index, or "
             "use a URL they can reach")

    def shared(path: str) -> bool:  # an absolute path that exists here may be a folder every node mounts
        path = path.removeprefix("file://")
        return os.path.isabs(path) and os.path.exists(path)

    for req in requirements:
        # A requirements-file line: per-requirement options (--hash=...) and a comment may follow.
        line = req.split(" #", 1)[0].split(" --", 1)[0].strip()
        option = re.match(r"(-[rce]|--requirement|--constraint|--editable)[\s=]+(\S+)$", line)
        if option:  # a file or folder pip reads on the node, unless it is a URL
            if ("://" not in option.group(2) or option.group(2).startswith("file:")) and not shared(option.group(2)):
                raise ConfigError(f"--pip {req!r}: {option.group(2)!r} is {local}")
            continue
        if line.startswith("-") or line.startswith("git+") or ("://" in line and "@" not in line):
            continue  # another pip option, a VCS or archive URL: pip on the cluster reads those
        target = line.split("@", 1)[1].strip() if "@" in line and "://" not in line.split("@", 1)[0] else ""
        path = target or line
        if (target.startswith(("file:", ".", "/", "~")) or (line.endswith((".whl", ".tar.gz", ".zip"))
                                                             and "://" not in line)) and not shared(path):
            raise ConfigError(f"--pip {req!r}: {local}")
        try:
            Requirement(line)
        except InvalidRequirement as exc:
            if shared(line):
                continue
            looks_like_path = "/" in line or line.startswith((".", "~"))
            raise ConfigError(f"--pip {req!r}: " + (local if looks_like_path else f"not a pip requirement ({exc})")) from None


@dataclass
class StagedJob:
    mode: str  # train | tune
    entrypoint: str
    runtime_env: dict
    metadata: dict
    shipped: list[Shipped]
    folder: Path


def stage(cfg: Any, mode: str = "auto", deploy: bool = False, serve_port: int = 8000,
          pip: tuple[str, ...] = (), folder: Path | None = None, insecure: bool = False,
          resume: bool = False) -> StagedJob:
    """Validate ``cfg`` here and lay out what the job carries; nothing is sent. With
    ``deploy``, the winner is served on the cluster's every interface, so the head must have
    TRAINYARD_API_KEY (cluster.yaml sets it), unless ``insecure`` serves it without a key."""
    from omegaconf import OmegaConf

    from trainyard.config import resolve
    from trainyard.plugins import get_registry

    registry = get_registry()
    resolve(cfg, registry)  # every config error surfaces here, before anything is sent
    if mode == "auto":
        mode = "tune" if cfg.get("tune") is not None else "train"
    if mode == "tune" and cfg.get("tune") is None:
        raise ConfigError("tune: the config has no tune section, so it cannot be submitted as a search")
    if deploy and mode != "tune":
        raise ConfigError("--deploy deploys a search's winner; the job is a training run (no tune section)")
    if resume and mode != "tune":
        raise ConfigError("--resume resumes a search; a training run resumes when submitted again as it was")
    _check_storage(cfg)
    _check_local_data_paths(cfg)
    _check_pip(pip)
    if mode == "tune":
        from trainyard.tune.space import validate_space

        validate_space(cfg)

    folder = Path(folder or tempfile.mkdtemp(prefix="trainyard-job-"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    shipped = [_ship_distribution("trainyard", folder, extra=("trainyard",))]
    for dist in plugins_used(cfg, registry):
        shipped.append(_ship_distribution(dist, folder))
    # Ray runs the entrypoint through a shell on the head: every value in it is quoted.
    command = shlex.join(["python", "-m", "trainyard.cli", mode, "job.yaml", "--address", "auto",
                          *(["--resume", str(cfg.name)] if resume else [])])  # found under storage_path
    if deploy:
        registry_dir = f"{cfg.tune.registry.rstrip('/')}/{cfg.name}"
        command += " && " + shlex.join([
            "python", "-m", "trainyard.cli", "deploy", registry_dir, "--name", cfg.name,
            "--address", "auto", "--host", "0.0.0.0", "--port", str(serve_port), "--detach",
            *(["--insecure"] if insecure else [])])
    env = {k: os.environ[k] for k in CARRIED_ENV if os.environ.get(k)}
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "120"  # rich's tables in the job log
    runtime_env: dict = {"working_dir": str(folder), "env_vars": env}
    if pip:
        runtime_env["pip"] = list(pip)
    metadata = {"trainyard_mode": mode, "trainyard_job": str(cfg.name),
                "trainyard_plugins": ",".join(f"{s.distribution}=={s.version}" for s in shipped)}
    return StagedJob(mode, command, runtime_env, metadata, shipped, folder)
