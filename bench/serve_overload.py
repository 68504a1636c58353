#!/usr/bin/env python3
"""trainyard's load shedding at 10x the sustainable concurrency, against the same model
served with no queue limit, in one run on one embedded Ray.

For each of "shedding" (trainyard's defaults: max_ongoing_requests, max_queued_requests=64,
Retry-After 1 s) and "no limit" (max_queued_requests=-1, every request waits its turn): the
model is deployed, driven at the sustainable concurrency C (the unloaded figures), then at
10 x C by the same asyncio load generator: clients that send again at once after a
503 (as `hey` does), then clients that wait the Retry-After first. Prints req/s and p99 of the admitted (200)
requests, how many were shed (503) and how fast, replica restarts and replica RSS.

    .venv/bin/python bench/serve_overload.py [--model mlp|cnn|bert] [--concurrency 16]
        [--seconds 10] [--max-queued 64] [--max-ongoing 0]

Targets (issue 11): with shedding, admitted p99 at 10 x C <= 3x the unloaded p99; shed
requests answered 503 within 100 ms (p99); no replica restarts; replica RSS flat.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import drive, free_port, make_checkpoint, wait_ready  # noqa: E402


def replicas(app: str) -> dict[str, float]:
    """Serve's name -> RSS (MB) of each live replica of ``app``, asked of the replicas."""
    import ray

    def rss(_self) -> float:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss / 2**20

    found = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith(f"SERVE_REPLICA::{app}#model#"):
            try:
                replica = ray.get_actor(entry["name"], namespace=entry["namespace"])
                found[entry["name"]] = ray.get(replica.__ray_call__.remote(rss), timeout=30)
            except Exception:  # gone since it was listed
                continue
    return found


def measure(label: str, checkpoint: Path, row, args, max_queued: int) -> dict:
    from ray import serve

    from trainyard.serve.config import load_serve_config
    from trainyard.serve.deploy import deploy

    name = f"overload_{label.replace(' ', '_')}"
    port = args.port
    cfg = load_serve_config(base={"port": port, "models": [
        {"winner": str(checkpoint), "name": name, "num_cpus": 0.5, "max_queued_requests": max_queued,
         "max_ongoing_requests": args.max_ongoing}]})
    url = deploy(cfg)[name]
    wait_ready(f"http://127.0.0.1:{port}/v2/health/ready")
    body = {"inputs": [row]}
    before = replicas(name)
    unloaded = asyncio.run(drive(url + "/predict", body, args.concurrency, args.seconds))
    overloaded = asyncio.run(drive(url + "/predict", body, 10 * args.concurrency, args.seconds))
    polite = asyncio.run(drive(url + "/predict", body, 10 * args.concurrency, args.seconds,
                               honour_retry_after=True)) if max_queued > 0 else None
    after = replicas(name)
    serve.delete(name)
    return {"unloaded": unloaded, "overloaded": overloaded, "polite": polite,
            "restarts": len(set(before) ^ set(after)) // 2 + abs(len(before) - len(after)),
            "rss_before": sum(before.values()), "rss_after": sum(after.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("mlp", "cnn", "bert"), default="mlp")
    parser.add_argument("--concurrency", type=int, default=16, help="the sustainable concurrency C")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--max-queued", type=int, default=None,
                        help="the shedding run's max_queued_requests (default: trainyard's)")
    parser.add_argument("--max-ongoing", type=int, default=0,
                        help="both runs' max_ongoing_requests (default 0: trainyard's)")
    args = parser.parse_args()
    args.port = free_port()

    from trainyard.serve.config import DEFAULT_MAX_QUEUED

    work = Path(tempfile.mkdtemp(prefix="trainyard-overload-bench-"))
    checkpoint, rows = make_checkpoint(work / args.model, args.model)
    queued = args.max_queued or DEFAULT_MAX_QUEUED
    results = {"shedding": measure("shedding", checkpoint, rows[0], args, queued),
               "no limit": measure("no limit", checkpoint, rows[0], args, -1)}

    c = args.concurrency
    print(f"{args.model}: one example per request, {args.seconds:g} s per level, C = {c}, "
          f"10 x C = {10 * c}; shedding: max_queued_requests={queued}; "
          f"max_ongoing_requests={args.max_ongoing or 'default'}")
    for label, r in results.items():
        for level, key in ((c, "unloaded"), (10 * c, "overloaded"), (10 * c, "polite")):
            m = r[key]
            if m is None:
                continue
            shed = m["other"].get(503, {"count": 0, "p99": float("nan")})
            others = {s: o["count"] for s, o in m["other"].items() if s != 503}
            how = {"unloaded": "", "overloaded": " retry at once", "polite": " honour Retry-After"}[key]
            print(f"{label + how:28} c={level:<4} admitted {m['rps']:7.0f} req/s  p50 {m['p50']:7.1f} ms  "
                  f"p99 {m['p99']:7.1f} ms   shed(503) {shed['count']:6}  shed p99 {shed['p99']:6.1f} ms"
                  f"  other {others or '-'}  conn errors {m['connection_errors']}"
                  f"  client CPU {m['client_cpu_s'] / m['seconds']:.2f} cores")
        print(f"{label:9} replica restarts {r['restarts']}, replica RSS {r['rss_before']:.0f} MB -> "
              f"{r['rss_after']:.0f} MB")
    s = results["shedding"]
    o = results["no limit"]
    print(f"admitted p99 at 10 x C / unloaded p99: shedding, clients retrying at once "
          f"{s['overloaded']['p99'] / s['unloaded']['p99']:.2f}x, clients honouring Retry-After "
          f"{s['polite']['p99'] / s['unloaded']['p99']:.2f}x (target <= 3x); no limit "
          f"{o['overloaded']['p99'] / o['unloaded']['p99']:.2f}x")
    print(f"admitted req/s at 10 x C, shedding / no limit: {s['overloaded']['rps'] / o['overloaded']['rps']:.2f}x")


if __name__ == "__main__":
    main()
