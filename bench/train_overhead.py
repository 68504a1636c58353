#!/usr/bin/env python3
"""trainyard with one Ray Train worker against a plain one-process PyTorch loop.

Same model (an MLP), same data (a synthetic CSV), same epochs, batch size, optimizer
and torch threads, in one run. Prints samples/s of each (training steps only, median
over the epochs after the first, the same definition on both sides), their ratio, and trainyard's fixed
start-up: from launching ``trainyard train`` to its first training step.

    .venv/bin/python bench/train_overhead.py [--rows 100000] [--epochs 4] [--device cpu|cuda]

Targets on a 2-core machine: ratio >= 0.95, start-up <= 15 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def write_data(folder: Path, rows: int, features: int, seed: int = 0) -> Path:
    import pandas as pd

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    w = rng.normal(size=features)
    y = (x @ w + 0.5 * rng.normal(size=rows) > 0).astype(int)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(features)])
    frame["label"] = y
    path = folder / "synthetic.csv"
    frame.to_csv(path, index=False)
    return path


def job_overrides(args, data: Path, storage: Path) -> list[str]:
    return [
        "name=bench_overhead",
        f"storage_path={storage}",
        "data.name=table",
        f"data.params.path={data}",
        "model.name=mlp",
        f"model.params.hidden={args.hidden}",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch_size}",
        "train.lr=0.001",
        "train.metrics=[loss,accuracy]",
        "scaling.num_workers=1",
        f"scaling.cpus_per_worker={args.threads}",
        f"train.torch_threads={args.threads}",
        f"scaling.use_gpu={'true' if args.device == 'cuda' else 'false'}",
        "checkpoint.max_failures=0",
    ]


def plain_loop(args, data: Path) -> list[float]:
    """The baseline: what a person writes by hand, sharing trainyard's data and model code."""
    import torch

    from trainyard.config import load_config, resolve
    from trainyard.train.loop import loss_fn, make_optimizer
    from trainyard.train.data import prepare_data

    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / "configs/mlp_breast_cancer.yaml", job_overrides(args, data, Path("/tmp")))
    job = resolve(cfg)
    prepared = prepare_data(job)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = job.model.build(job.model_params, prepared.info, prepared.processor).to(device)
    optimizer = make_optimizer(cfg, model)
    criterion = loss_fn(job.task)
    x, y = prepared.x_train, prepared.y_train
    rates = []
    for epoch in range(args.epochs):
        g = torch.Generator().manual_seed(epoch)
        perm = torch.randperm(len(y), generator=g)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for idx in torch.split(perm, args.batch_size):
            xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
            loss = criterion(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(len(y) / (time.perf_counter() - start))
    return rates


def trainyard_run(args, data: Path, storage: Path) -> tuple[list[float], float, float]:
    trainyard = Path(sys.executable).with_name("trainyard")
    cmd = [str(trainyard), "train", str(ROOT / "configs/mlp_breast_cancer.yaml"),
           *job_overrides(args, data, storage)]
    launched = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    total = time.perf_counter() - launched
    if out.returncode != 0:
        sys.exit(f"trainyard failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    match = re.search(r"start-up \(command start to first training step\): ([\d.]+) s", out.stdout)
    startup = float(match.group(1)) if match else float("nan")
    rows = [json.loads(line) for line in (storage / "bench_overhead" / "metrics.jsonl").read_text().splitlines()]
    return [r["train_samples_per_s"] for r in rows], startup, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--hidden", default="[256,256]")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="trainyard-bench-"))
    try:
        data = write_data(work, args.rows, args.features)
        # The baseline runs before and after trainyard, so drift on a shared machine
        # falls on both sides.
        plain = plain_loop(args, data)
        ours, startup, total = trainyard_run(args, data, work / "runs")
        plain += plain_loop(args, data)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # Steady state: every epoch but the first of each run, median against noise.
    steady_ours = float(np.median(ours[1:] or ours))
    half = len(plain) // 2
    steady_plain = float(np.median((plain[1:half] + plain[half + 1:]) or plain))
    print(f"data: {args.rows} rows x {args.features} features; MLP {args.hidden}; "
          f"{args.epochs} epochs; batch {args.batch_size}; {args.threads} thread(s); {args.device}")
    print(f"plain PyTorch loop      : {steady_plain:10.0f} samples/s  (per epoch: {', '.join(f'{r:.0f}' for r in plain)})")
    print(f"trainyard, 1 Ray worker : {steady_ours:10.0f} samples/s  (per epoch: {', '.join(f'{r:.0f}' for r in ours)})")
    print(f"ratio trainyard / plain : {steady_ours / steady_plain:.3f}   (target >= 0.95)")
    print(f"trainyard start-up (command start to first training step): {startup:.1f} s   (target <= 15 s)")
    print(f"trainyard whole command: {total:.1f} s")


if __name__ == "__main__":
    main()
