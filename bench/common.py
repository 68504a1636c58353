"""What the serving benches share: a real checkpoint of a built-in model, a free port, and
one asyncio load generator (the same for every server it measures)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The tests' ports, from below the kernel's ephemeral range: a port bind(0) found free can be
# taken by an outgoing connection (Ray opens hundreds) before the server binds it.
from tests.ports import free_port  # noqa: E402,F401

#: The built-in job config behind each model kind a bench can serve.
MODEL_CONFIGS = {"mlp": "mlp_breast_cancer", "cnn": "cnn_digits", "bert": "bert_sentiment"}


def make_checkpoint(folder: Path, kind: str, overrides: list[str] | tuple = ()) -> tuple[Path, list]:
    """A checkpoint of the built-in ``kind`` model (really built, untrained weights: serving
    cost does not depend on them), and a few validation inputs as JSON-ready rows. BERT is
    configs/bert_sentiment.yaml's small BERT built from scratch, unless ``overrides`` (config
    key=value) say otherwise, e.g. a pretrained checkpoint."""
    import torch

    from trainyard.checkpoint import write_checkpoint
    from trainyard.config import load_config, resolve
    from trainyard.train.data import prepare_data

    cfg = load_config(ROOT / f"configs/{MODEL_CONFIGS[kind]}.yaml", [f"name=bench_{kind}", *overrides])
    job = resolve(cfg)
    data = prepare_data(job)
    torch.manual_seed(0)
    model = job.model.build(job.model_params, data.info, data.processor)
    write_checkpoint(folder, job=job, model=model, processor=data.processor, info=data.info,
                     epoch=0, metrics={}, plugin=job.model.name)
    raw = job.dataset.load(job.data_params, 0).train.inputs
    rows = [raw[i] if isinstance(raw[i], str) else np.asarray(raw[i]).tolist() for i in range(8)]
    return folder, rows


def wait_ready(url: str, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:  # not up yet
            time.sleep(0.3)
    sys.exit(f"{url} did not come up")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q)) if values else float("nan")


async def drive(url: str, body: dict, concurrency: int, seconds: float, warmup: int = 3,
                honour_retry_after: bool = False) -> dict:
    """``concurrency`` clients, each sending ``body`` again as soon as it is answered (or,
    ``honour_retry_after``, after the Retry-After of a refusal), for ``seconds``. Returns
    req/s of 200s, p50/p99 of the 200s (ms), per other status its count and p99 (ms), and
    the CPU seconds this load generator itself used (it shares the machine's cores)."""
    import aiohttp

    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    by_status: dict[int, list[float]] = {}
    failed = 0
    deadline = time.perf_counter() + seconds

    async def worker(session):
        nonlocal failed
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                async with session.post(url, data=data, headers=headers) as response:
                    await response.read()
                    status = response.status
                    retry_after = response.headers.get("Retry-After")
            except aiohttp.ClientError:
                failed += 1
                continue
            by_status.setdefault(status, []).append(time.perf_counter() - start)
            if honour_retry_after and retry_after and status in (429, 503):
                await asyncio.sleep(min(float(retry_after), max(0.0, deadline - time.perf_counter())))

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for _ in range(warmup):
            async with session.post(url, data=data, headers=headers) as response:
                await response.read()
        started = time.perf_counter()
        cpu = time.process_time()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
    ok = by_status.get(200, [])
    return {"rps": len(ok) / elapsed, "p50": percentile(ok, 50), "p99": percentile(ok, 99),
            "other": {s: {"count": len(v), "p99": percentile(v, 99)} for s, v in by_status.items() if s != 200},
            "connection_errors": failed, "client_cpu_s": cpu, "seconds": elapsed}
