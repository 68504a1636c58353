#!/usr/bin/env python3
"""Ray Tune efficiency of trainyard's search, in one run, on the CNN/digits task.

1. Random search without early stopping against the same search with ASHA: the same
   trials (same seeded sample of the space), the same concurrency. Prints the time each
   takes to reach a target validation accuracy, the best accuracy each reaches, and the
   ratio (target: ASHA reaches the target at least 3x sooner).
2. Tune overhead: the no-early-stopping search's wall time divided by the ideal, the sum
   of its trials' own training times divided by the concurrency (target: at most 1.2).

    .venv/bin/python bench/tune_efficiency.py [--trials 12] [--epochs 10] [--target 0.95]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_config(args, work: Path, scheduler: str, seed: int):
    from trainyard.config import load_config

    base = {
        "name": f"bench_{scheduler}_{seed}",
        "seed": seed,
        "storage_path": str(work / "runs"),
        "model": {"name": "cnn", "params": {"channels": [64, 128], "hidden": 256}},
        "data": {"name": "digits"},
        "train": {"epochs": args.epochs, "metrics": ["accuracy", "loss"]},
        "checkpoint": {"num_to_keep": 1},
        "tune": {
            "metric": "accuracy", "search": "random", "scheduler": scheduler,
            "num_samples": args.trials, "max_concurrent_trials": args.concurrency,
            "grace_period": 1, "reduction_factor": 3, "registry": str(work / "winners"),
            "space": {
                "train.lr": {"type": "loguniform", "low": 1e-6, "high": 1e-2},
                "train.batch_size": {"type": "choice", "values": [32, 64, 128]},
            },
        },
    }
    return load_config(ROOT / "configs/tune_cnn.yaml", base=base)


def search(args, work: Path, scheduler: str, seed: int) -> dict:
    from ray.tune import Callback

    from trainyard.tune.driver import run_tuning

    class Clock(Callback):
        """When, after the search started, each trial reported what."""

        def __init__(self):
            self.start = time.perf_counter()
            self.results: list[tuple[float, float]] = []
            self.trial_seconds: dict[str, float] = {}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.results.append((time.perf_counter() - self.start, result["val_accuracy"]))
            self.trial_seconds[trial.trial_id] = result["time_total_s"]

        def __getstate__(self):
            return {}

    clock = Clock()
    cfg = make_config(args, work, scheduler, seed)
    clock.start = time.perf_counter()
    outcome = run_tuning(cfg, callbacks=[clock])
    wall = time.perf_counter() - clock.start
    reached = next((t for t, acc in clock.results if acc >= args.target), None)
    return {
        "wall": wall,
        "reached": reached,
        "best": max(acc for _, acc in clock.results),
        "trial_seconds": sum(clock.trial_seconds.values()),
        "stopped": sum(t["state"] == "STOPPED" for t in outcome.trials),
        "epochs_run": sum(t["iterations"] for t in outcome.trials),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--target", type=float, default=0.98)
    parser.add_argument("--seeds", default="0,1,2", help="search seeds; each gives one pair of runs")
    args = parser.parse_args()

    from trainyard.runtime.cluster import init_ray

    init_ray()
    work = Path(tempfile.mkdtemp(prefix="trainyard-tune-bench-"))
    print(f"CNN on digits: {args.trials} trials (seeded random lr x batch size), {args.epochs} epochs max, "
          f"{args.concurrency} at a time; target val_accuracy {args.target}")
    ratios, overheads = [], []
    for seed in [int(s) for s in args.seeds.split(",")]:
        plain = search(args, work, "none", seed)
        asha = search(args, work, "asha", seed)
        for label, r in (("no early stopping", plain), ("ASHA", asha)):
            reached = f"{r['reached']:.1f} s" if r["reached"] is not None else "never"
            print(f"seed {seed} {label:18}: target reached after {reached:>8}; best {r['best']:.4f}; "
                  f"wall {r['wall']:.1f} s; {r['epochs_run']} epochs; {r['stopped']} stopped early")
        if plain["reached"] is not None and asha["reached"] is not None:
            ratios.append(plain["reached"] / asha["reached"])
            print(f"seed {seed}: ASHA reaches the target {ratios[-1]:.2f}x sooner; "
                  f"finishes the search {plain['wall'] / asha['wall']:.2f}x sooner")
        ideal = plain["trial_seconds"] / args.concurrency
        overheads.append(plain["wall"] / ideal)
        print(f"seed {seed}: Tune overhead: wall {plain['wall']:.1f} s / ideal {ideal:.1f} s "
              f"(sum of trial times / {args.concurrency}) = {overheads[-1]:.2f}")
    if ratios:
        print(f"ASHA reaches the target {sum(ratios) / len(ratios):.2f}x sooner on average "
              f"({', '.join(f'{r:.2f}' for r in ratios)})   (target >= 3x)")
    print(f"Tune overhead: {sum(overheads) / len(overheads):.2f} on average   (target <= 1.2)")


if __name__ == "__main__":
    main()
