"""Load shedding in HAProxy, for an embedded Ray that serves behind it.

trainyard's HAProxy wrapper (runtime/ingress.py) runs this file, with only the standard
library (``python -S``), on each config Ray Serve writes, before HAProxy starts on it:

    python -S haproxy_shed.py HAPROXY_CFG LIMITS_JSON

``LIMITS_JSON`` (written by ``trainyard deploy``, see ``write_limits``) maps a Serve
backend (``http-<app>``) to its model's ``max_ongoing``, ``max_queued`` and
``retry_after_s``. For each such backend HAProxy itself then holds the queue: each replica
gets at most ``max_ongoing`` requests at once (``maxconn``), the rest wait in HAProxy, and
once ``max_queued`` per usable replica wait, a new request is answered at once, 503 with
Retry-After and a JSON reason, by HAProxy (C, no Python on the path). Shedding in the
replica (Serve's ``max_queued_requests``) costs the replica's own CPU for each refusal,
which under a flood of retries takes it from the admitted requests.

Every Serve backend also turns a replica's own load-shedding 503 (plain text, with
Retry-After) into the same JSON reason.

And for every request (``defaults``): its headers, and its body up to HAProxy's buffer, must
arrive within ``REQUEST_TIMEOUT_S``, or HAProxy answers 408 itself; and HAProxy's own 5xx
answers are JSON with a reason (``OWN_ERRORS``), not its HTML pages. Serve's config waits for
a client for up to an hour (``timeout client 3600s``, no ``timeout http-request``): a few
thousand connections that never finish their request held every one of HAProxy's
connections, health checks included, and an unfinished body held a replica's request slot.
The body is read before a replica is chosen, so a slow client holds no replica.
"""

from __future__ import annotations

import json
import os
import sys

#: Marks the lines this file adds (and a config it has already rewritten).
MARK = "# trainyard: load shedding (runtime/haproxy_shed.py)"
#: How long a request may wait in HAProxy's queue (its default would be the connect timeout).
QUEUE_TIMEOUT_S = 120
#: Marks the lines this file adds to ``defaults``.
DEFAULTS_MARK = "# trainyard: a deadline for each request (runtime/haproxy_shed.py)"
#: How long a client may take to send a request's headers and the body's first buffer.
REQUEST_TIMEOUT_S = 10


#: HAProxy's own answers once it has a request (no replica can take it, a replica's answer
#: is broken or late), as JSON with a reason like every other refusal; its default is HTML.
#: (A request HAProxy cannot read at all, or whose headers or body come too slowly, is
#: answered by its HTTP/1 layer before this applies: that 400 or 408 stays HAProxy's HTML.)
OWN_ERRORS = {
    500: "internal error in the HTTP ingress",
    502: "bad gateway: the model's replica gave no valid answer",
    503: "service unavailable: no replica of this model can take requests now",
    504: "gateway timeout: the model's replica did not answer in time",
}


def defaults_rules(request_timeout_s: float = REQUEST_TIMEOUT_S) -> list[str]:
    """The lines that go after ``defaults``: a deadline for each request's headers and body,
    and HAProxy's own error answers as JSON."""
    lines = [f"    {DEFAULTS_MARK}", f"    timeout http-request {max(1, int(request_timeout_s))}s",
             "    option http-buffer-request"]
    for status, reason in OWN_ERRORS.items():
        body = json.dumps({"error": reason}).replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'    http-error status {status} content-type "application/json" string "{body}"')
    return lines


def backend_rules(limits: dict | None) -> list[str]:
    """The lines that go after ``http-reuse always`` in one backend."""
    lines = [
        f"    {MARK}",
        # A replica's own shedding (Serve's max_queued_requests): text + Retry-After -> JSON.
        "    http-response set-var(txn.ty_retry_after) res.hdr(retry-after) if { status 503 }",
        '    http-response return status 503 content-type "application/json" lf-string '
        '"{\\"error\\":\\"overloaded: this model\'s queue is full; retry after '
        '%[var(txn.ty_retry_after)] s\\",\\"retry_after_s\\":%[var(txn.ty_retry_after)]}" '
        'hdr Retry-After "%[var(txn.ty_retry_after)]" if { status 503 } '
        "{ var(txn.ty_retry_after) -m found } { res.hdr(content-type) -m beg text/plain }",
    ]
    if not limits or int(limits.get("max_queued", -1)) < 1:
        return lines
    queued = int(limits["max_queued"])
    retry = int(max(0, -(-float(limits.get("retry_after_s", 1)) // 1)))  # whole seconds, rounded up
    body = json.dumps({"error": f"overloaded: {queued} requests per replica already wait for this "
                                f"model; retry after {retry} s", "retry_after_s": retry})
    body = body.replace("\\", "\\\\").replace('"', '\\"')
    return lines + [
        f"    timeout queue {QUEUE_TIMEOUT_S}s",
        f"    http-request set-var(txn.ty_cap) nbsrv,mul({queued})",
        f'    http-request return status 503 content-type "application/json" string "{body}" '
        f'hdr Retry-After "{retry}" if {{ queue,sub(txn.ty_cap) ge 0 }}',
    ]


def rewrite(text: str, limits: dict[str, dict], request_timeout_s: float = REQUEST_TIMEOUT_S) -> str:
    """The HAProxy config ``text`` with trainyard's request deadline added to its defaults and
    its load shedding to Serve's backends."""
    if MARK in text or DEFAULTS_MARK in text:
        return text
    out: list[str] = []
    backend = None
    for line in text.splitlines():
        if line.strip() == "defaults":
            out += [line, *defaults_rules(request_timeout_s)]
            continue
        if line.startswith("backend "):
            backend = line.split()[1]
        own = limits.get(backend or "")
        if (own and int(own.get("max_queued", -1)) >= 1 and line.strip().startswith("default-server ")
                and " maxconn " not in line):
            line += f" maxconn {int(own['max_ongoing'])}"
        out.append(line)
        if line.strip() == "http-reuse always":
            out += backend_rules(own)
    return "\n".join(out) + "\n"


def backend_name(app: str) -> str:
    """The HAProxy backend Ray Serve (2.60) writes for application ``app``."""
    return f"http-{app}"


def write_limits(folder: str, app: str, max_ongoing: int, max_queued: int, retry_after_s: float) -> None:
    """Record ``app``'s limits in ``folder``'s limits file, for the next config Serve writes."""
    path = os.path.join(folder, "limits.json")
    try:
        with open(path) as f:
            limits = json.load(f)
    except (OSError, ValueError):
        limits = {}
    limits[backend_name(app)] = {"max_ongoing": int(max_ongoing), "max_queued": int(max_queued),
                                 "retry_after_s": float(retry_after_s)}
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(limits, f)
    os.replace(temporary, path)


def main(argv: list[str]) -> int:
    cfg, limits_path = argv[1], argv[2]
    try:
        with open(limits_path) as f:
            limits = json.load(f)
    except (OSError, ValueError):
        limits = {}
    with open(cfg) as f:
        text = f.read()
    rewritten = rewrite(text, limits)
    if rewritten != text:
        temporary = f"{cfg}.ty.tmp"
        with open(temporary, "w") as f:
            f.write(rewritten)
        os.replace(temporary, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
