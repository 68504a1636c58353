#!/usr/bin/env python3
"""Ray Tune efficiency of trainyard's search methods for a fixed wall-clock budget.

For each task and seed, four searches run with the same ``tune.time_budget_s`` and the same
``tune.max_concurrent_trials`` (ending by the budget: ``tune.num_samples`` is set high):

- random: seeded random search, no early stopping (``scheduler: none``);
- ASHA: the same random search with ASHA (``scheduler: asha``; grace period 1 epoch,
  reduction factor 4, Ray Tune's default and the ASHA paper's), trainyard's, which compares
  a trial only with the trials on the same learning-rate schedule (``tune.asha_per_schedule``;
  Ray Tune's own stopped every one-cycle trial of the sched task at its first epoch);
- TPE+ASHA: Optuna's TPE sampler with ASHA (``search: optuna, scheduler: asha``);
- PBT: population based training, a population of ``--concurrency`` trials (PBT trains its
  whole population at once, so the population is the concurrency), search random. Its
  trials may train 100x the task's epochs (a population member is one long run whose values
  change as it goes), so that it uses the budget like the others: the budget ends it.

Tasks:

- cnn: the CNN on digits (configs/tune_cnn.yaml) for 12 epochs, lr x batch size, val accuracy
  (max).
- sched: the MLP on breast_cancer (configs/tune_mlp.yaml) for 16 epochs, with a wide lr range
  (1e-5 .. 0.3) and the lr schedule (``train.scheduler``: none | cosine | step | onecycle)
  in the space, scored by val loss (min; accuracy on its ~110 validation rows ties too
  often to rank methods). Chosen because it is cheap (an epoch takes well under a second)
  and the lr's course over the epochs matters there: a large lr needs to decay to settle,
  a small one gains nothing from decaying. PBT changes the lr mid-trial, which is a
  schedule of its own.

Printed per task: method, seed, the best validation metric reached within the budget, the
configurations evaluated (trials that trained at least one epoch; PBT: its population plus
its exploits, each a new configuration), the trials that ran all their epochs, the wall time,
and the lines saying whether the targets are met:

- ASHA evaluates at least 3x the configurations of plain random search (every seed);
- the best of ASHA, TPE+ASHA and PBT is at least as good as random search on every seed.

Tune overhead (target <= 1.15): for each plain random search, the time from the search's
start to its last trial result, divided by the ideal, the sum of its trials' own times over
the concurrency. A trial's own time is what it spent training, evaluating and writing its
checkpoints, without waiting on Tune: the sum of its epochs' ``trial_own_s`` (each from the
return of the trial's last report, or from its start, to its next report), which a
one-worker trainyard trial reports. (Tune's ``time_total_s`` measured the same while a
trial waited for the driver after every report; it does not now that trials train on while
the driver handles their last result.) The time after the last result (the budget's cut of
epochs in flight, collecting and exporting) is not counted.

All searches run in this process on one embedded Ray. The machine may be shared: figures
from a loaded machine are noisy (fewer epochs fit the budget).

    .venv/bin/python bench/tune_efficiency.py [--budget 40] [--seeds 0,1,2] [--tasks cnn,sched]
    .venv/bin/python bench/tune_efficiency.py --quick     # 1 seed, the cnn task
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: PBT's trials may train this many times the task's epochs: the budget ends them.
PBT_EPOCHS = 100

METHODS = {  # label: (tune.search, tune.scheduler)
    "random": ("random", "none"),
    "ASHA": ("random", "asha"),
    "TPE+ASHA": ("optuna", "asha"),
    "PBT": ("random", "pbt"),
}

TASKS = {
    "cnn": {
        "title": "CNN on digits, lr x batch size, val accuracy",
        "yaml": "configs/tune_cnn.yaml",
        "metric": "accuracy",
        "base": {
            "train": {"epochs": 12, "metrics": ["accuracy", "loss"]},
            "tune": {"grace_period": 1, "reduction_factor": 4, "space": {
                "train.lr": {"type": "loguniform", "low": 1e-5, "high": 3e-2},
                "train.batch_size": {"type": "choice", "values": [32, 64, 128], "mutable": False},
            }},
        },
    },
    "sched": {
        "title": "MLP on breast_cancer, wide lr x lr schedule x batch size x dropout, val loss",
        "yaml": "configs/tune_mlp.yaml",
        "metric": "loss",
        "base": {
            "train": {"epochs": 16, "metrics": ["accuracy", "loss"]},
            "tune": {"grace_period": 1, "reduction_factor": 4, "space": {
                "train.lr": {"type": "loguniform", "low": 1e-5, "high": 0.3},
                "train.scheduler": {"type": "choice", "values": ["none", "cosine", "step", "onecycle"],
                                    "mutable": False},
                "train.batch_size": {"type": "choice", "values": [16, 32, 64], "mutable": False},
                "model.params.dropout": {"type": "uniform", "low": 0.0, "high": 0.3},
            }},
        },
    },
}


def make_config(args, work: Path, task: str, method: str, seed: int):
    from omegaconf import OmegaConf

    from trainyard.config import load_config

    search, scheduler = METHODS[method]
    spec = TASKS[task]
    name = f"bench_{task}_{method.replace('+', '_').lower()}_{seed}"
    tune = {
        "metric": spec["metric"], "mode": "", "search": search, "scheduler": scheduler,
        "num_samples": 1000, "max_concurrent_trials": args.concurrency,
        "time_budget_s": args.budget, "top_k": 1, "stopper": "none",
        "registry": str(work / "winners"),
    }
    extra = {}
    if scheduler == "pbt":
        # The whole population trains at once: population = concurrency. With a population
        # of 2, a quantile of 0.5 makes the weaker trial copy the stronger one.
        tune.update(num_samples=args.concurrency, pbt={
            "perturbation_interval": 2, "quantile_fraction": 0.5, "resample_probability": 0.25,
            "synch": False})
        extra = {"train": {"epochs": spec["base"]["train"]["epochs"] * PBT_EPOCHS}}
    if args.grace:
        extra = OmegaConf.merge(extra, {"tune": {"grace_period": args.grace}})
    if args.reduction_factor:
        extra = OmegaConf.merge(extra, {"tune": {"reduction_factor": args.reduction_factor}})
    base = OmegaConf.merge(spec["base"], extra, {
        "name": name, "seed": seed, "storage_path": str(work / "runs"),
        "scaling": {"num_workers": 1}, "checkpoint": {"num_to_keep": 1},
        "tracking": {"backend": "none"}, "tune": tune,
    })
    return load_config(ROOT / spec["yaml"], base=OmegaConf.to_container(base))


def search(args, work: Path, task: str, method: str, seed: int) -> dict:
    from ray.tune import Callback

    from trainyard.tune.driver import run_tuning
    from trainyard.tune.trial import OWN_TIME

    class Clock(Callback):
        """When, after the search started, the first and the last result came; each trial's
        own time and first epoch."""

        def __init__(self):
            self.start = time.perf_counter()
            self.first = self.last = 0.0
            self.trial_seconds: dict[str, float] = {}
            self.first_epochs: list[float] = []  # each trial's first epoch, setup included
            self.seen: set[str] = set()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.last = time.perf_counter() - self.start
            self.first = self.first or self.last
            # The trial's own time for the epoch (trainyard's trial_own_s), else Tune's.
            own = result.get(OWN_TIME, result["time_this_iter_s"])
            self.trial_seconds[trial.trial_id] = self.trial_seconds.get(trial.trial_id, 0.0) + own
            if trial.trial_id not in self.seen:
                self.first_epochs.append(own)
                self.seen.add(trial.trial_id)

        def __getstate__(self):
            return {}

    clock = Clock()
    cfg = make_config(args, work, task, method, seed)
    clock.start = time.perf_counter()
    outcome = run_tuning(cfg, callbacks=[clock])
    wall = time.perf_counter() - clock.start
    bests = [t["best"] for t in outcome.trials if t["best"] is not None and not math.isnan(t["best"])]
    pick = max if outcome.mode == "max" else min
    evaluated = sum(t["iterations"] >= 1 for t in outcome.trials)
    if METHODS[method][1] == "pbt":
        evaluated += len(outcome.exploits)
    return {
        "mode": outcome.mode,
        "best": pick(bests) if bests else None,
        "evaluated": evaluated,
        "completed": sum(t["state"] == "TERMINATED" for t in outcome.trials),
        "epochs": sum(t["iterations"] for t in outcome.trials),
        "stopped_by": outcome.stopped_by,
        "wall": wall,
        "first_result": clock.first,
        "last_result": clock.last,
        "trial_seconds": sum(clock.trial_seconds.values()),
        # The first epochs of the first trials, one per concurrent slot: they hold the
        # trial processes' start-up (imports: torch, its compiler, the dataset's library).
        "startup_epochs": sum(clock.first_epochs[:args.concurrency]),
    }


def better_or_equal(a, b, mode: str) -> bool:
    if a is None:
        return False
    if b is None:
        return True
    return a >= b if mode == "max" else a <= b


def fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=40.0, help="seconds per search (tune.time_budget_s)")
    parser.add_argument("--concurrency", type=int, default=2, help="tune.max_concurrent_trials")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tasks", default="cnn,sched", help=f"comma-separated, of {sorted(TASKS)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {list(METHODS)}")
    parser.add_argument("--grace", type=int, default=0,
                        help="ASHA's grace period in epochs (default: the task's, 1)")
    parser.add_argument("--reduction-factor", type=int, default=0,
                        help="ASHA's reduction factor (default: the task's, 4)")
    parser.add_argument("--quick", action="store_true", help="1 seed (the first), 1 task (the first)")
    args = parser.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    tasks = args.tasks.split(",")
    methods = args.methods.split(",")
    for t in tasks:
        if t not in TASKS:
            parser.error(f"--tasks: unknown task {t!r}; expected one of {sorted(TASKS)}")
    for m in methods:
        if m not in METHODS:
            parser.error(f"--methods: unknown method {m!r}; expected one of {list(METHODS)}")
    if args.budget <= 0 or args.concurrency < (2 if "PBT" in methods else 1):
        parser.error("--budget must be positive and --concurrency at least 2 with PBT (its population), "
                     "else at least 1")
    if args.quick:
        seeds, tasks = seeds[:1], tasks[:1]

    from trainyard.runtime.cluster import init_ray

    init_ray()
    work = Path(tempfile.mkdtemp(prefix="trainyard-tune-bench-"))
    print(f"budget {args.budget:g} s per search, {args.concurrency} trials at a time; "
          f"seeds {seeds}; tasks {tasks}; methods {methods}")
    overheads = []
    bench_start = time.perf_counter()
    for task in tasks:
        spec = TASKS[task]
        results: dict[tuple[str, int], dict] = {}
        for seed in seeds:
            for method in methods:
                r = results[(method, seed)] = search(args, work, task, method, seed)
                if method == "random" and r["trial_seconds"] > 0:
                    ideal = r["trial_seconds"] / args.concurrency
                    steady_ideal = (r["trial_seconds"] - r["startup_epochs"]) / args.concurrency
                    steady = r["last_result"] - r["first_result"]
                    overheads.append((task, seed, r["last_result"], ideal, r["last_result"] / ideal,
                                      r["first_result"], steady / steady_ideal))
        mode = next(iter(results.values()))["mode"]
        print(f"\n== {task}: {spec['title']} ({mode}) ==")
        print(f"{'method':9} {'seed':>4} {'best val ' + spec['metric']:>17} {'configs':>8} "
              f"{'completed':>9} {'epochs':>6} {'wall s':>7}  ended by")
        for seed in seeds:
            for method in methods:
                r = results[(method, seed)]
                best = fmt(r["best"])
                print(f"{method:9} {seed:>4} {best:>17} {r['evaluated']:>8} {r['completed']:>9} "
                      f"{r['epochs']:>6} {r['wall']:>7.1f}  {r['stopped_by'] or 'all trials done'}")
        if "random" in methods and "ASHA" in methods:
            ratios = [results[("ASHA", s)]["evaluated"] / max(1, results[("random", s)]["evaluated"])
                      for s in seeds]
            met = all(x >= 3 for x in ratios)
            print(f"ASHA / random configurations: {', '.join(f'{x:.2f}x' for x in ratios)} "
                  f"(target >= 3x on every seed): {'MET' if met else 'NOT MET'}")
        others = [m for m in ("ASHA", "TPE+ASHA", "PBT") if m in methods]
        if "random" in methods and others:
            lines, met = [], True
            for seed in seeds:
                candidates = [(results[(m, seed)]["best"], m) for m in others
                              if results[(m, seed)]["best"] is not None]
                if candidates:
                    best, who = (max if mode == "max" else min)(candidates)
                else:
                    best, who = None, "-"
                ok = better_or_equal(best, results[("random", seed)]["best"], mode)
                met &= ok
                base = results[("random", seed)]["best"]
                lines.append(f"seed {seed}: {who} {fmt(best)} vs random {fmt(base)}" + ("" if ok else " (worse)"))
            print(f"best of {'/'.join(others)} at least as good as random on every seed: "
                  f"{'MET' if met else 'NOT MET'}  ({'; '.join(lines)})")
    if overheads:
        for task, seed, wall, ideal, ratio, first, steady in overheads:
            print(f"Tune overhead {task} seed {seed}: {wall:.1f} s to the last result / ideal {ideal:.1f} s "
                  f"(sum of trial times / {args.concurrency}) = {ratio:.2f}; start-up {first:.1f} s to the "
                  f"first result; after it: {steady:.2f}")
        print(f"Tune overhead after start-up (first result to last / trial time less the first "
              f"{args.concurrency} trials' first epochs, over {args.concurrency}): "
              f"{sum(o[-1] for o in overheads) / len(overheads):.2f} on average")
        mean = sum(o[4] for o in overheads) / len(overheads)
        print(f"Tune overhead: {mean:.2f} on average (target <= 1.15): {'MET' if mean <= 1.15 else 'NOT MET'}")
    print(f"bench wall time: {time.perf_counter() - bench_start:.0f} s")


if __name__ == "__main__":
    main()
