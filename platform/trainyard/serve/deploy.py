"""Deploying serve configs on Ray Serve: one application per model, and the root."""

from __future__ import annotations

import os
import re
import time
from typing import Any

from trainyard.errors import TrainyardError
from trainyard.runtime.cluster import check_capacity, init_ray
from trainyard.serve.config import (
    API_KEY_MARK,
    ROOT_APP,
    ROOT_CPUS,
    application_specs,
    auth_options,
    check_exposure,
    read_key_file,
)

#: Key files this process wrote (key -> path): one per key, removed at exit.
_KEY_FILES: dict[str, str] = {}
_KEY_FOLDER: list[str] = []


def check_serve_fits(cfg: Any) -> None:
    """Fail at once when the cluster can never hold the replicas (Serve would wait forever)."""
    need = {"CPU": ROOT_CPUS, "GPU": 0.0}
    for m in cfg.models:
        replicas = m.min_replicas if m.max_replicas else m.num_replicas
        need["CPU"] += replicas * m.num_cpus
        need["GPU"] += replicas * m.num_gpus
    check_capacity(need, "the replicas", "Lower num_replicas/min_replicas or num_cpus/num_gpus per "
                   "replica (fractions are allowed)", error=TrainyardError)


def private_key_file(key: str) -> str:
    """``key`` in a file only this user can read (0600, in a 0700 folder made for this
    process and removed when it exits), for the replicas of an embedded Ray to read by path.
    Serve's deployment args, which its API and dashboard show, then carry only the path."""
    import atexit
    import shutil
    import tempfile

    path = _KEY_FILES.get(key)
    if path and os.path.exists(path):
        return path
    if not _KEY_FOLDER or not os.path.isdir(_KEY_FOLDER[0]):
        _KEY_FOLDER[:] = [tempfile.mkdtemp(prefix="trainyard-key-")]  # mode 0700
        atexit.register(shutil.rmtree, _KEY_FOLDER[0], True)
    path = os.path.join(_KEY_FOLDER[0], f"api_key_{len(_KEY_FILES) + 1}")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as f:
        f.write(key)
    _KEY_FILES[key] = path
    return path


def replica_auth(cfg: Any, address: str | None) -> dict[str, str]:
    """Where the replicas find their API key (``auth_options``). A key given directly goes to
    an embedded Ray's replicas in a private file. On a cluster (``address``) the replicas run
    on other nodes, where no file of this machine is: there it must come from the nodes'
    own variable (or a key file on every node)."""
    if not cfg.api_key or cfg.api_key_file:
        return auth_options(cfg)
    if not address:
        return auth_options(cfg, key_file=private_key_file(cfg.api_key))
    if os.environ.get(cfg.api_key_env, "").strip() == cfg.api_key.strip():
        return {"api_key_env": cfg.api_key_env}
    raise TrainyardError(
        f"--api-key with --address: replicas on the cluster's other nodes cannot receive a key "
        f"given here; set {cfg.api_key_env} to the key on every node (cluster.yaml does) and "
        "deploy without --api-key, or give --api-key-file FILE (a file on every node)")


def _ray_client() -> bool:
    """This process is connected to a remote cluster through Ray Client (ray://): its
    replicas run on that cluster's nodes, not here."""
    try:
        from ray.util.client import ray as client

        return bool(client.is_connected())
    except Exception:  # noqa: BLE001 - no client support: not connected through it
        return False


def check_key_file(path: str) -> None:
    """The key file the replicas on this machine will read: readable and not empty (the
    replicas' own check, which fails closed, would otherwise say so only once they start)."""
    try:
        read_key_file(path)
    except ValueError as why:
        raise TrainyardError(f"the API key file {path} {why}; nothing was deployed") from None


def failure_reason(text: str) -> str:
    """One line from Serve's report of an application that failed to deploy: a replica's
    missing API key if that is why, else the report's last line (the replica's error)."""
    found = re.search(re.escape(API_KEY_MARK) + r"[^\n]*", text)
    if found:
        return found.group(0).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "Serve gave no reason"


def check_serve_listens_as_asked(cfg: Any) -> None:
    """A Serve already running on the cluster keeps the host and port it started with (Ray
    ignores new ones with a warning): refuse, rather than print a URL nothing serves, or
    serve on every interface a model asked for loopback without a key."""
    from ray.serve.context import _get_global_client

    http = _get_global_client().http_config
    if (http.host, int(http.port)) != (cfg.host, int(cfg.port)):
        raise TrainyardError(
            f"Serve already runs on this cluster, on {http.host}:{http.port} (set when it started; "
            f"it cannot move to {cfg.host}:{cfg.port}); deploy with --host {http.host} --port "
            f"{http.port}, or stop it first (serve shutdown)")


def _start_serve(http_options: dict, wait_s: float = 60.0) -> None:
    """serve.start, once more should it meet a Serve still shutting down: right after
    ``serve.shutdown`` (another deploy's, a test's), the old controller may still be
    stopping its proxies, and a start that finds it waits on a proxy being killed.

    A start whose HTTP ingress cannot listen is undone: Serve's controller would otherwise
    stay, keeping the host and port nothing serves on, and refuse every later deploy."""
    import ray
    from ray import serve
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        _start_or_undo(http_options)
        return
    except ray.exceptions.ActorDiedError:
        pass
    serve.shutdown()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        except ValueError:  # gone
            break
        time.sleep(0.5)
    _start_or_undo(http_options)


def _start_or_undo(http_options: dict) -> None:
    import ray
    from ray import serve

    try:
        serve.start(http_options=http_options)
    except ray.exceptions.ActorDiedError:
        raise
    except Exception as exc:  # serve.start raises only when it started Serve here: undo it
        serve.shutdown()
        raise ingress_failure(str(exc), http_options["host"], http_options["port"]) from None


#: How each ingress reports a port it cannot bind: HAProxy's alert, Serve's own proxy.
_PORT_TAKEN = ("Address already in use", "EADDRINUSE", "Failed to bind to address")


def port_taken(host: str, port: int) -> TrainyardError:
    return TrainyardError(f"port {port} on {host} is already in use (another server listens there); "
                          "stop it, or serve on another --port")


def ingress_failure(text: str, host: str, port: int) -> TrainyardError:
    """The one line for Serve's HTTP ingress failing to start, from the error it raised."""
    if any(sign in text for sign in _PORT_TAKEN):
        return port_taken(host, port)
    lines = [line.strip() for line in text.splitlines() if "ALERT" in line or "Error" in line]
    return TrainyardError(f"Serve's HTTP ingress did not start on {host}:{port}: "
                          f"{lines[-1] if lines else 'Serve gave no reason'}")


def deploy(cfg: Any, address: str | None = None) -> dict[str, str]:
    """Serve each model of a serve config as its own application; return name -> URL.

    Deploying a name that is already served replaces it with Serve's rolling update, so
    requests in flight are answered by the old replicas. Waits until every model is
    running; a model whose replicas cannot start (a missing API key, a broken checkpoint) is
    one TrainyardError naming the reason, and a new one is removed again.
    """
    import ray
    from ray import serve

    from trainyard.serve.app import model_app, root_app

    application_specs(cfg, auth={})  # errors in the winners surface before Ray starts
    check_exposure(cfg, cfg.host)
    if address is None and not ray.is_initialized():  # nothing of this process holds it yet
        check_port_free(cfg.host, int(cfg.port))
    auth = replica_auth(cfg, address)
    if address is None and not os.environ.get("RAY_ADDRESS") and "api_key_file" in auth and not _ray_client():
        check_key_file(auth["api_key_file"])  # this machine's replicas read it: say so before Ray starts
    init_ray(address, ingress=ingress_for_host(cfg.host, cfg.ingress) if address is None else None)
    check_serve_fits(cfg)
    _start_serve({"host": cfg.host, "port": int(cfg.port)})
    check_serve_listens_as_asked(cfg)
    apps = serve.status().applications
    existing = [a for a in apps if a != ROOT_APP]
    specs = application_specs(cfg, auth)
    endpoints, targets = {}, []
    for spec in specs:
        args = dict(spec["args"])
        if spec["name"] == ROOT_APP:
            if ROOT_APP in apps and apps[ROOT_APP].status == "RUNNING":
                continue  # it reads the served models from Serve: left running, not restarted
            app = root_app(args)
        else:
            _shed_in_haproxy(spec)
            app = model_app(args)
            endpoints[spec["name"]] = f"http://{url_host(cfg.host)}:{cfg.port}{spec['route_prefix']}"
        targets.append(serve.RunTarget(target=app, name=spec["name"], route_prefix=spec["route_prefix"]))
    try:  # all at once: their replicas start together (3 models: 28-31 s one by one, 18-21 s here)
        serve.run_many(targets)
    except RuntimeError as exc:
        raise _failed([t.name for t in targets], existing, str(exc)) from None
    return endpoints


def _failed(names: list[str], existing: list[str], raised: str) -> TrainyardError:
    """The error of a deploy in which an application failed to start, once each of ``names``
    has started or failed: the first failed model named with its reason (and how many more
    failed). A failed model that was not served before is removed (a served one keeps its old
    replicas); the others stay deployed."""
    from ray import serve

    unsettled = ("NOT_STARTED", "DEPLOYING")
    while True:
        apps = serve.status().applications
        if not any(n in apps and apps[n].status in unsettled for n in names):
            break
        time.sleep(0.5)
    failed = [n for n in names if n in apps and apps[n].status not in ("RUNNING", *unsettled)]
    for name in failed:
        if name not in existing and name != ROOT_APP:
            try:  # nothing half-deployed stays behind
                serve.delete(name)
            except Exception:
                pass
    if not failed:  # none failed by the time they settled (one was deleted meanwhile): Serve's words
        return TrainyardError(f"the deploy did not finish: {failure_reason(raised)}")
    # Serve's report: the application's message, then each deployment's (a replica's error).
    status = apps[failed[0]]
    reason = failure_reason("\n".join([status.message, *(d.message for d in status.deployments.values())]))
    more = f" (and {len(failed) - 1} more: {', '.join(failed[1:])})" if len(failed) > 1 else ""
    what = "the root application" if failed[0] == ROOT_APP else f"model {failed[0]!r}"
    return TrainyardError(f"{what} did not start: {reason}{more}")


#: The hosts Serve's HAProxy ingress serves on: it reaches its replicas at 127.0.0.1, while
#: they listen on the host given (seen with Ray 2.60: on ::1 or 127.0.0.2 every request went
#: to whatever listened on those ports of 127.0.0.1).
HAPROXY_HOSTS = ("127.0.0.1", "0.0.0.0")


def ingress_for_host(host: str, ingress: str) -> str | None:
    """The ingress an embedded Ray serving on ``host`` starts with (None: ``auto``'s
    choice): Serve's own proxy on a host HAProxy cannot serve (``HAPROXY_HOSTS``), where
    ``auto`` would pick HAProxy; an explicit ``haproxy`` there is refused."""
    if host in HAPROXY_HOSTS or ingress == "proxy":
        return None if ingress == "auto" else ingress
    if ingress == "haproxy":
        raise TrainyardError(f"host {host}: the haproxy ingress serves on 127.0.0.1 or 0.0.0.0 only (Ray "
                             "Serve's HAProxy reaches its replicas at 127.0.0.1); serve on 0.0.0.0 (every "
                             "interface) or with the proxy ingress (--ingress proxy)")
    return "proxy"


def url_host(host: str) -> str:
    """``host`` as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def check_port_free(host: str, port: int) -> None:
    """Refuse, before Ray starts, a port another server listens on (Serve would find out
    only when its HTTP ingress fails to bind, in a stack trace)."""
    import errno
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise TrainyardError(f"--host {host!r}: cannot be resolved ({exc.strerror})") from None
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise port_taken(host, port) from None
            raise TrainyardError(f"cannot serve on {host}:{port}: {exc.strerror}") from None


def _shed_in_haproxy(spec: dict) -> None:
    """Behind an embedded Ray's HAProxy, HAProxy holds a model's queue and sheds past it (see
    runtime/haproxy_shed.py); its limits are written before Serve writes the config."""
    from trainyard.runtime.cluster import SERVE_ENV
    from trainyard.runtime.haproxy_shed import write_limits
    from trainyard.runtime.ingress import haproxy_folder

    folder = haproxy_folder(SERVE_ENV)
    if folder:
        deployment = spec["args"]["deployment"]
        write_limits(folder, spec["name"], deployment["max_ongoing_requests"],
                     deployment["max_queued_requests"], deployment["backpressure_config"]["retry_after_s"])


class _without_ray_shutdown_notice:
    """Standard output without Ray's notice that Serve's controller task "failed" as Serve
    shut it down ("(raylet) Task ServeController.graceful_shutdown failed. There are infinite
    retries remaining ..."): Ray's driver prints it from a thread of its own, while and after
    ``serve.shutdown()`` ends the controller as it should. Every other line passes."""

    NOTICE = "ServeController.graceful_shutdown failed"

    def __enter__(self):
        import sys

        self._stdout, self._line = sys.stdout, ""
        sys.stdout = self
        return self

    def write(self, text: str) -> int:
        self._line += text
        while "\n" in self._line:
            line, self._line = self._line.split("\n", 1)
            if self.NOTICE not in line:
                self._stdout.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self._stdout.flush()

    def __getattr__(self, name):
        return getattr(self._stdout, name)

    def __exit__(self, *exc) -> None:
        import sys

        sys.stdout = self._stdout
        if self._line and self.NOTICE not in self._line:
            self._stdout.write(self._line)


def serve_until_stopped(embedded: bool) -> str:
    """Block until SIGTERM or SIGINT (Ctrl-C), then stop gracefully: Serve drains the
    requests in flight and shuts its applications down, and the embedded Ray stops with
    them (``embedded``); on a cluster the applications keep serving and this process only
    disconnects. Returns the signal's name."""
    import signal
    import threading

    import ray
    from ray import serve

    stop = threading.Event()
    received: list[str] = []

    def handler(signum, frame):  # noqa: ARG001 - signal's signature
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(3600):
            pass
        # A second signal while draining must not kill the drain half-way.
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        with _without_ray_shutdown_notice():
            if embedded:
                from trainyard.runtime.cluster import SERVE_ENV
                from trainyard.runtime.ingress import drain_haproxy, haproxy_folder

                # HAProxy first: it takes no new request and answers those it has, then
                # Serve stops the replicas (it would kill HAProxy with requests on their way).
                folder = haproxy_folder(SERVE_ENV)
                if folder:
                    drain_haproxy(folder)
                serve.shutdown()
            ray.shutdown()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return received[0]
