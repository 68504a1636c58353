#!/usr/bin/env python3
"""trainyard's Ray Serve endpoint against a plain FastAPI + uvicorn app, in one run.

Both serve the same MLP checkpoint (breast_cancer, 30 features) through the same
trainyard Predictor and the same JSON contract (POST {"inputs": [row]}); the same asyncio
load generator drives each at concurrency 1, 16 and 64. Prints req/s, p50 and p99 for each
and the ratios; trainyard is measured with Serve's batching on and off.

    .venv/bin/python bench/serve_throughput.py [--seconds 5]

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
    from trainyard.training import prepare_data

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,16,64")
    args = parser.parse_args()
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

    from ray import serve

    from trainyard.serving import deploy, load_serve_config

    port = free_port()
    for label, batch in (("trainyard, batching", 32), ("trainyard, no batching", 1)):
        cfg = load_serve_config(base={"port": port, "models": [
            {"winner": str(checkpoint), "name": "mlp", "max_batch_size": batch, "num_cpus": 1}]})
        url = deploy(cfg)["mlp"]
        wait_ready(url)
        results[label] = {c: asyncio.run(drive(url + "/predict", row, c, args.seconds)) for c in levels}
    serve.shutdown()

    base = results["plain FastAPI+uvicorn"]
    print(f"MLP (breast_cancer) one row per request; {args.seconds:g} s per level; same load generator")
    for label, by_level in results.items():
        for c, r in by_level.items():
            ratio = ""
            if label != "plain FastAPI+uvicorn":
                ratio = (f"  ratio req/s {r['rps'] / base[c]['rps']:.2f}x, "
                         f"p99 {r['p99'] / base[c]['p99']:.2f}x")
            print(f"{label:24} c={c:<3} {r['rps']:8.0f} req/s  p50 {r['p50']:7.1f} ms  "
                  f"p99 {r['p99']:7.1f} ms  errors {r['errors']}{ratio}")
    print("target: >= 0.8x the plain app's req/s at c=16 and c=64, with p99 <= 2x")


if __name__ == "__main__":
    main()
