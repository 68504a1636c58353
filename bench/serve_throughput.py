#!/usr/bin/env python3
"""trainyard's Ray Serve endpoint against a plain FastAPI + uvicorn app, in one run.

Both serve the same MLP checkpoint (breast_cancer, 30 features) through the same
trainyard Predictor and the same JSON contract (POST {"inputs": [row]}); the same asyncio
load generator drives each at concurrency 1, 16 and 64. Prints req/s, p50 and p99 for each
and the ratios; trainyard is measured with Serve's batching on and off.

    .venv/bin/python bench/serve_throughput.py [--seconds 5] [--ingress proxy,haproxy]
        [--batching both|on|off] [--replicas N] [--first-endpoint]

Each trainyard ingress mode runs in its own child process with its own embedded Ray (the
mode is fixed when Ray starts). --first-endpoint also times `trainyard up
configs/tune_mlp.yaml --exit-after-first` to its first answered request (target <= 60 s).

Target: trainyard >= 0.8x the plain app's req/s at concurrency 16 and 64, p99 <= 2x.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

PLAIN_APP = textwrap.dedent('''
    import json, os
    import numpy as np
    from fastapi import FastAPI, Request
    from trainyard.checkpoint import load_predictor
    import torch
    torch.set_num_threads(1)
    predictor = load_predictor(os.environ["CHECKPOINT"])
    app = FastAPI()

    @app.post("/predict")
    async def predict(request: Request):
        body = json.loads(await request.body())
        x = np.asarray(body["inputs"], dtype=np.float32)
        return {"predictions": predictor.predict(x)}
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_checkpoint(folder: Path) -> tuple[Path, list]:
    import torch

    from trainyard.checkpoint import write_checkpoint
    from trainyard.config import load_config, resolve
    from trainyard.train.data import prepare_data

    cfg = load_config(ROOT / "configs/mlp_breast_cancer.yaml", ["name=bench_mlp"])
    job = resolve(cfg)
    data = prepare_data(job)
    torch.manual_seed(0)
    model = job.model.build(job.model_params, data.info, data.processor)
    write_checkpoint(folder, job=job, model=model, processor=data.processor, info=data.info,
                     epoch=0, metrics={}, plugin="mlp")
    raw = job.dataset.load(job.data_params, 0).train.inputs
    return folder, np.asarray(raw[0]).tolist()


async def drive(url: str, row: list, concurrency: int, seconds: float) -> dict:
    import aiohttp

    body = json.dumps({"inputs": [row]}).encode()
    headers = {"Content-Type": "application/json"}
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(session):
        nonlocal errors
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(3):  # warm-up
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    lat = np.asarray(latencies) * 1000
    return {"rps": len(lat) / elapsed, "p50": float(np.percentile(lat, 50)),
            "p99": float(np.percentile(lat, 99)), "errors": errors}


def wait_ready(url: str, timeout: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:  # not up yet
            time.sleep(0.3)
    sys.exit(f"{url} did not come up")


def serve_child(args) -> None:
    """One trainyard ingress mode in this process (its own embedded Ray): print JSON."""
    from ray import serve

    from trainyard.serve.deploy import deploy
    from trainyard.serve.config import load_serve_config

    levels = [int(c) for c in args.concurrency.split(",")]
    row = json.loads(args.row)
    results = {}
    port = free_port()
    for label, batch in (("batching", args.max_batch_size), ("no batching", 1)):
        if args.batching != "both" and (args.batching == "on") != (batch > 1):
            continue
        model = {"winner": args.checkpoint, "name": "mlp", "max_batch_size": batch,
                 "num_cpus": round(1 / args.replicas, 2),  # one CPU's worth, shared
                 "num_replicas": args.replicas}
        if args.batch_wait_ms is not None:
            model["batch_wait_ms"] = args.batch_wait_ms
        cfg = load_serve_config(base={"port": port, "ingress": args.child, "models": [model]})
        url = deploy(cfg)["mlp"]
        wait_ready(url)
        results[label] = {c: asyncio.run(drive(url + "/predict", row, c, args.seconds)) for c in levels}
    serve.shutdown()
    print("RESULTS " + json.dumps(results), flush=True)


def first_endpoint(seconds_limit: float = 600) -> float | None:
    """`trainyard up configs/tune_mlp.yaml --exit-after-first`: its own time to first answer."""
    work = Path(tempfile.mkdtemp(prefix="trainyard-up-bench-"))
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "trainyard.cli", "up", str(ROOT / "configs/tune_mlp.yaml"),
         f"storage_path={work / 'runs'}", f"tune.registry={work / 'winners'}",
         "--port", str(free_port()), "--exit-after-first"],
        check=False, capture_output=True, text=True, timeout=seconds_limit, env={**os.environ, "COLUMNS": "200"})
    wall = time.perf_counter() - started
    if out.returncode != 0:
        print(out.stdout[-2000:] + out.stderr[-2000:])
        return None
    for line in out.stdout.splitlines():
        if "time to first answered request" in line:
            print(f"trainyard up configs/tune_mlp.yaml: {line.strip()} (wall, with interpreter start: {wall:.1f} s)")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--ingress", default="proxy,haproxy",
                        help="trainyard ingress modes to measure, each on its own embedded Ray "
                             "(proxy: Serve's own proxy; haproxy: HAProxy in front of replicas that "
                             "serve HTTP themselves; auto: what trainyard picks)")
    parser.add_argument("--batching", choices=("both", "on", "off"), default="both")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=None,
                        help="Serve's batch wait (default: trainyard's default)")
    parser.add_argument("--first-endpoint", action="store_true",
                        help="also time `trainyard up configs/tune_mlp.yaml --exit-after-first`")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        serve_child(args)
        return
    levels = [int(c) for c in args.concurrency.split(",")]

    work = Path(tempfile.mkdtemp(prefix="trainyard-serve-bench-"))
    checkpoint, row = make_checkpoint(work / "mlp")

    plain_port = free_port()
    (work / "plain_app.py").write_text(PLAIN_APP)
    plain = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "plain_app:app", "--port", str(plain_port), "--log-level", "warning"],
        cwd=work, env={**os.environ, "CHECKPOINT": str(checkpoint)},
    )
    results: dict[str, dict[int, dict]] = {}
    try:
        wait_ready(f"http://127.0.0.1:{plain_port}/docs")
        results["plain FastAPI+uvicorn"] = {
            c: asyncio.run(drive(f"http://127.0.0.1:{plain_port}/predict", row, c, args.seconds)) for c in levels}
    finally:
        plain.terminate()
        plain.wait()

    for mode in args.ingress.split(","):
        child = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--checkpoint", str(checkpoint),
             "--row", json.dumps(row), "--seconds", str(args.seconds), "--concurrency", args.concurrency,
             "--batching", args.batching, "--replicas", str(args.replicas),
             "--max-batch-size", str(args.max_batch_size),
             *(["--batch-wait-ms", str(args.batch_wait_ms)] if args.batch_wait_ms is not None else [])],
            check=False, capture_output=True, text=True)
        lines = [x for x in child.stdout.splitlines() if x.startswith("RESULTS ")]
        if child.returncode != 0 or not lines:
            print(f"ingress {mode}: failed\n{child.stdout[-2000:]}{child.stderr[-3000:]}")
            continue
        for label, by_level in json.loads(lines[-1][8:]).items():
            results[f"trainyard {mode}, {label}"] = {int(c): r for c, r in by_level.items()}

    base = results["plain FastAPI+uvicorn"]
    print(f"MLP (breast_cancer) one row per request; {args.seconds:g} s per level; same load generator; "
          f"{args.replicas} replica(s)")
    for label, by_level in results.items():
        for c, r in by_level.items():
            ratio = ""
            if label != "plain FastAPI+uvicorn":
                ratio = (f"  ratio req/s {r['rps'] / base[c]['rps']:.2f}x, "
                         f"p99 {r['p99'] / base[c]['p99']:.2f}x")
            print(f"{label:34} c={c:<3} {r['rps']:8.0f} req/s  p50 {r['p50']:7.1f} ms  "
                  f"p99 {r['p99']:7.1f} ms  errors {r['errors']}{ratio}")
    print("target: >= 0.8x the plain app's req/s at c=16 and c=64, with p99 <= 2x")
    if args.first_endpoint:
        first_endpoint()


if __name__ == "__main__":
    main()
