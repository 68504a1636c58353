#!/usr/bin/env python3
"""A search whose driver is killed several times and resumed each time, against the same
search run through once, in one run.

Both run `trainyard tune configs/tune_cnn.yaml` (by default: seeded random search over lr and
batch size, no early stopping, so the winner does not depend on timing) as a real subprocess with its own embedded Ray. The
interrupted one is killed --kills times at random moments with SIGKILL to its whole process
group (the driver and the Ray it started: what a lost machine or `kill -9` of a job does),
then continued with `trainyard tune --resume RUN` until it finishes. Prints both wall
times (the interrupted one's summed over its attempts), their ratio, and both winners.

    .venv/bin/python bench/tune_resume.py [--kills 3] [--seed 0] [--samples 250] [--epochs 8]
        [--config configs/tune_cnn.yaml] [--startup 20]

Each kill lands past the attempt's start-up (--startup), in the middle half of the work still
left (the uninterrupted search's time, less its start-up and what the killed attempts did past
theirs), so that every planned kill lands before the search finishes.

Each attempt starts its own Ray and Tune (about 20 s here before the first epoch), and a kill
loses the epochs in flight and those since Tune's last experiment snapshot: about 33 s a kill
in all on 2 cores. The ratio is therefore that cost over the search's length: the default
search takes about 4 minutes uninterrupted here (3 kills: 1.43x); 150 trials took 2.3 minutes
(1.70x), 100 trials 1.7 minutes (2 kills landed: 1.45x).

Targets (issue 13): the same winner; interrupted wall time <= 1.5x the uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "trainyard.cli"]
NAME = "resume_bench"


def overrides(work: Path, args) -> list[str]:
    return [f"storage_path={work / 'runs'}", f"tune.registry={work / 'winners'}", f"name={NAME}",
            "tune.search=random", "tune.scheduler=none", "tune.metric=loss", f"tune.num_samples={args.samples}",
            f"train.epochs={args.epochs}", f"seed={args.seed}"]


def run(cmd: list[str], kill_after: float | None = None) -> tuple[int | None, float, str]:
    """Run ``cmd`` in its own process group; SIGKILL the group after ``kill_after`` s.
    Returns (exit code, None when killed; wall seconds; stdout)."""
    started = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, cwd=ROOT)
    try:
        out, err = child.communicate(timeout=kill_after)
        if child.returncode != 0:
            print(err[-3000:], file=sys.stderr)
        return child.returncode, time.perf_counter() - started, out
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return None, time.perf_counter() - started, ""


def winner(stdout: str) -> dict:
    outcome = json.loads(stdout)
    best = outcome["winners"][0]
    # A trial id is the search's own prefix and the trial's number: compare the number.
    return {"trial": best["trial_id"].rsplit("_", 1)[-1], "value": best["value"], "params": best["params"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="the search's seed and the kills' moments")
    parser.add_argument("--samples", type=int, default=250)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--config", default="configs/tune_cnn.yaml")
    parser.add_argument("--startup", type=float, default=20.0,
                        help="an attempt's start-up (Ray, Tune, the trial processes) in seconds: "
                             "kills land past it, inside the work that is left")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    base = Path(tempfile.mkdtemp(prefix="trainyard-resume-bench-"))

    config = str(ROOT / args.config)
    code, whole, out = run([*CLI, "tune", config, *overrides(base / "whole", args), "--json"])
    if code != 0:
        sys.exit(f"the uninterrupted search failed (exit {code})")
    reference = winner(out)
    print(f"uninterrupted: {whole:.1f} s, winner {reference}")

    work = base / "killed"
    attempts = []
    cmd = [*CLI, "tune", config, *overrides(work, args), "--json"]
    done = 0.0  # seconds of the search's own work the killed attempts did (past start-up)
    for i in range(args.kills):
        # Past this attempt's start-up, somewhere in the middle half of the work that is left
        # (the uninterrupted search's work less what the killed attempts did), so that every
        # planned kill lands before the search could finish.
        left = max(whole - args.startup - done, 0.0)
        when = args.startup + rng.uniform(0.25, 0.75) * left
        code, wall, out = run(cmd, kill_after=when)
        attempts.append(wall)
        done += max(wall - args.startup, 0.0)
        print(f"attempt {i + 1}: {'killed (SIGKILL to its process group)' if code is None else f'exit {code}'} "
              f"after {wall:.1f} s")
        if code is not None:
            break
        run_dir = work / "runs" / NAME
        if not run_dir.exists():  # killed before the run folder was written: start over
            continue
        cmd = [*CLI, "tune", "--resume", str(run_dir), "--json"]
    if code is None:
        code, wall, out = run(cmd)
        attempts.append(wall)
        print(f"attempt {len(attempts)}: exit {code} after {wall:.1f} s")
    if code != 0:
        sys.exit(f"the resumed search failed (exit {code})")
    resumed = winner(out)
    total = sum(attempts)
    same = resumed == reference  # the same trial number, values and score
    print(f"interrupted {len(attempts) - 1} times: {total:.1f} s over {len(attempts)} attempts, winner {resumed}")
    print(f"wall time, interrupted / uninterrupted: {total / whole:.2f}x (target <= 1.5x); "
          f"same winner: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
