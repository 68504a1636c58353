#!/usr/bin/env python3
"""How long ``trainyard deploy`` takes to add one model to a running Serve, against a bare
Ray Serve deployment of the same checkpoint, side by side in one run.

One embedded Ray, started by trainyard (its HAProxy ingress), and one Serve on it. Serve and
trainyard's root application are started first by deploying a warm-up model, so what is
timed is what a user waits for when a server already runs: one more model. Then, in turn,
``--models`` times each:

- trainyard: ``trainyard.serve.deploy.deploy`` of one more model (its own application);
- bare Serve: ``serve.run`` of bench/serve_throughput.py's minimal deployment, loading the
  same checkpoint with the same ``load_predictor`` in its replica, with the same num_cpus.

Each deploy ends when Serve reports the application running; then the model's ready route
is asked over HTTP, and that answer is part of the time. The table gives each deploy's
seconds and, per model kind, the median ratio trainyard / bare.

    .venv/bin/python bench/deploy_time.py [--kinds mlp,cnn,bert] [--models 3]

Target: trainyard's deploy of one more model <= 1.2x the bare deployment's (trainyard adds a
root application for health routes, the model list and 404s, which must not be restarted on
every deploy: before it read the list from Serve, each deploy restarted it, ~4 s here).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import free_port, make_checkpoint, wait_ready  # noqa: E402
from serve_throughput import bare_app  # noqa: E402

NUM_CPUS = 0.1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default="mlp,cnn,bert", help="model kinds, comma-separated")
    parser.add_argument("--models", type=int, default=3, help="models of each kind deployed one after another")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if args.models < 1 or not kinds or any(k not in ("mlp", "cnn", "bert") for k in kinds):
        parser.error("--kinds: some of mlp,cnn,bert; --models: 1 or more")

    from ray import serve

    from trainyard.serve.config import load_serve_config
    from trainyard.serve.deploy import deploy

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="trainyard-bench-deploy-") as tmp:
        checkpoints = {k: str(make_checkpoint(Path(tmp) / k, k)[0]) for k in ["mlp", *kinds]}

        def trainyard(name: str, checkpoint: str) -> None:
            deploy(load_serve_config(base={"port": port, "models": [
                {"winner": checkpoint, "name": name, "num_cpus": NUM_CPUS}]}))
            wait_ready(f"{base}/v2/models/{name}/ready")

        def bare(name: str, checkpoint: str) -> None:
            options = {"ray_actor_options": {"num_cpus": NUM_CPUS}}
            serve.run(bare_app(checkpoint, options), name=name, route_prefix=f"/{name}", blocking=False)
            wait_ready(f"{base}/{name}/ready")

        started = time.perf_counter()
        trainyard("warmup", checkpoints["mlp"])  # Ray, Serve, the root app: not timed below
        print(f"embedded Ray, Serve and a first model: {time.perf_counter() - started:.1f} s")
        rows = []
        for kind in kinds:
            for i in range(args.models):
                timed = {}
                order = [("trainyard", trainyard), ("bare Serve", bare)]
                for label, run in order if i % 2 == 0 else order[::-1]:  # each goes first in turn
                    began = time.perf_counter()
                    run(f"{'ty' if label == 'trainyard' else 'bare'}_{kind}_{i}", checkpoints[kind])
                    timed[label] = time.perf_counter() - began
                rows.append((kind, i, timed["trainyard"], timed["bare Serve"]))
        listed = len(json.loads(urllib.request.urlopen(f"{base}/v2/models", timeout=30).read())["models"])
        serve.shutdown()

    print(f"\n{'model':<8} {'#':>2} {'trainyard s':>12} {'bare Serve s':>13} {'ratio':>7}")
    for kind, i, ty, bare_s in rows:
        print(f"{kind:<8} {i:>2} {ty:12.2f} {bare_s:13.2f} {ty / bare_s:6.2f}x")
    deployed = 1 + 2 * len(rows)
    print(f"\nGET /v2/models lists {listed} models; {deployed} were deployed (trainyard's and the bare ones)")
    failed = listed != deployed
    for kind in kinds:
        ratio = statistics.median(ty / b for k, _, ty, b in rows if k == kind)
        ok = ratio <= 1.2
        failed |= not ok
        print(f"{'PASS' if ok else 'FAIL'}  {kind}: one more model, trainyard / bare Serve (median) "
              f"{ratio:.2f}x <= 1.2x")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
