#!/usr/bin/env python3
"""A whole short training run, trainyard's against the same run with every actor Ray Train
starts by default, side by side in one run.

Each side is a fresh process that starts an embedded Ray and runs ``--runs`` two-worker
MLP runs (breast_cancer, ``--epochs`` epochs) one after the other; the sides alternate
``--pairs`` times, so the machine's drift falls on both. The runs are short: what is timed
is mostly start-up, which is what a run's actors cost.

- ``trainyard``: the run as trainyard starts it (no Ray Datasets manager when the workers
  load an in-memory dataset; no preemption watcher on an embedded Ray).
- ``ray-defaults``: the same run with Ray Train's default actors (the plain TorchTrainer's
  callbacks, the preemption watcher on).

    .venv/bin/python bench/train_startup.py [--pairs 3] [--runs 4] [--epochs 2]

Prints each process's run times, the mean of each side (first runs, on a cold Ray, apart)
and the ratio trainyard / ray-defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_side(arm: str, runs: int, epochs: int, storage: str) -> list[float]:
    """Run in a fresh process: ``runs`` training runs on a new embedded Ray; their seconds."""
    if arm == "ray-defaults":
        os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "1"
        from ray.train.torch import TorchTrainer

        from trainyard.train import trainer

        trainer.LeanTorchTrainer._create_default_callbacks = TorchTrainer._create_default_callbacks
    from trainyard.config import load_config
    from trainyard.runtime.cluster import init_ray
    from trainyard.train.driver import run_training

    init_ray()
    times = []
    for i in range(runs):
        cfg = load_config(ROOT / "configs" / "mlp_breast_cancer.yaml",
                          [f"name=startup_{i}", f"storage_path={storage}", "scaling.num_workers=2",
                           f"train.epochs={epochs}"])
        started = time.monotonic()
        run_training(cfg)
        times.append(time.monotonic() - started)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--side", choices=["trainyard", "ray-defaults"], help=argparse.SUPPRESS)
    parser.add_argument("--storage", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        print(json.dumps(one_side(args.side, args.runs, args.epochs, args.storage)))
        return

    times: dict[str, list[list[float]]] = {"trainyard": [], "ray-defaults": []}
    with tempfile.TemporaryDirectory(prefix="ty_startup_") as tmp:
        for pair in range(args.pairs):
            for side in ("ray-defaults", "trainyard") if pair % 2 else ("trainyard", "ray-defaults"):
                done = subprocess.run(
                    [sys.executable, __file__, "--side", side, "--runs", str(args.runs), "--epochs",
                     str(args.epochs), "--storage", str(Path(tmp) / f"{side}_{pair}")],
                    capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    sys.exit(f"{side} failed:\n{done.stderr[-3000:]}")
                runs = json.loads(done.stdout.strip().splitlines()[-1])
                times[side].append(runs)
                print(f"{side:>12}: " + " ".join(f"{t:5.1f}" for t in runs) + " s", flush=True)

    def mean(side: str, warm: bool) -> float:
        return statistics.mean(t for runs in times[side] for t in (runs[1:] if warm else runs[:1]))

    print(f"\n{'':>12}  first run (cold Ray)  later runs (warm)")
    for side in times:
        print(f"{side:>12}  {mean(side, False):17.1f} s  {mean(side, True):15.1f} s")
    print(f"{'ratio':>12}  {mean('trainyard', False) / mean('ray-defaults', False):17.2f}    "
          f"{mean('trainyard', True) / mean('ray-defaults', True):15.2f}   (trainyard / ray-defaults)")


if __name__ == "__main__":
    main()
