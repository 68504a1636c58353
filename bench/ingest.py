#!/usr/bin/env python3
"""Streamed data against in-memory data and a hand-written DataLoader (issue 10), in one run.

The bench writes a Parquet table of --rows rows x --features float32 features and an int
label (several files, plus the same rows as one file, a validation split in its own file, and
a table 4x as long), then trains the same MLP (same batch size, optimizer, torch threads) on
the same rows, side by side:

1. trainyard, in-memory: the ``table`` dataset on the one-file copy (each worker loads it whole);
2. trainyard, streamed: the ``files`` dataset on the Parquet folder (Ray Data reads, encodes in
   ``map_batches`` and streams each worker its shard), with data.stream's defaults;
3. a hand-written baseline: a ``torch.utils.data.DataLoader`` (num_workers=0, one process)
   over an IterableDataset reading the same files' row groups with pyarrow, rows shuffled
   within each row group, standardised with the same processor, in a child process of its own
   (so its ru_maxrss is its own), run before and after the trainyard runs.

trainyard runs go through its Python API (``run_training`` on configs/mlp_breast_cancer.yaml
plus overrides), all in one embedded Ray, with 1 and 2 workers; both data paths are given the
validation file, so every side trains on exactly --rows rows. The streamed path also runs on
the 4x table (1 worker) for the memory target.

Reported per run: training samples/s, the MEDIAN OVER EPOCHS 2.. (the first epoch is not
counted: start-up), from trainyard's metrics.jsonl ``train_samples_per_s`` (the baseline: the
same definition, its rows over the time of its training loop); the peak RSS of rank 0 in MB,
trainyard's ``rss_peak_mb`` metric (should a loop not report it, the worker's VmHWM read from
/proc at each epoch end, marked *), the baseline's own ru_maxrss; and each run's start-up (run
start to its first epoch) and wall time. Each row prints as it finishes, then the ratios
against the targets.

    .venv/bin/python bench/ingest.py [--quick] [--rows 100000] [--epochs 5] [--features 32]
                                     [--batch-size 256] [--hidden [256,256]] [--workers 1,2]
                                     [--extra] [--parquet-reader ray-default|v1] [--read-blocks N]

--quick: 40000 rows, 5 epochs. Most of the time is each trainyard run's start-up (7 runs with
--quick); sized for about 5-8 minutes (default) and 2-3 (--quick) when a run starts in about
15 s. On a shared 2-core machine under load 10-15, --quick took 7 minutes with the fix below
and 13 as trainyard is. --extra adds,
with 1 worker: the streamed path without a validation file (trainyard's hash split of the
rows), with data.stream.shuffle=none, and the in-memory path on the 4x table (how its RSS grows);
and, with each worker count and on the 4x table, the streamed path with data.stream.cache=false.
Data this size fits in the object store, so the default (cache: auto) reads and encodes the
files once and streams the encoded blocks from the store each epoch; cache=false reads the
files every epoch, as trainyard does for data too large to keep.

--parquet-reader v1 and --read-blocks N set Ray Data's DataContext in this driver, where the
``files`` dataset plans its reads, to try the proposed fix without editing the plugin: Ray 2.60's
default Parquet reader (DataSourceV2) starts a pool of footer-reading actors (32 by default,
RAY_DATA_PARQUET_FOOTER_NUM_ACTORS) at every execution, i.e. every epoch of every stream, and
packs small files into one block; the V1 reader with one block per file streams.

Targets (issue 10): streamed >= 0.9x in-memory samples/s with 1 and 2 workers; streamed
(1 worker) >= 1.0x the DataLoader baseline; the streamed path's peak RSS per worker at 4x the
rows <= 1.2x its RSS at 1x.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = ROOT / "configs/mlp_breast_cancer.yaml"


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def make_rows(rows: int, features: int, seed: int):
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype(np.float32)
    w = np.random.default_rng(1234).normal(size=features)  # one rule for every table
    y = (x @ w + 0.5 * rng.normal(size=rows) > 0).astype(np.int64)
    columns = {f"f{i}": x[:, i] for i in range(features)}
    columns["label"] = y
    return pa.table(columns)


def write_folder(table, folder: Path, files: int, row_group: int) -> Path:
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    n = table.num_rows
    for i in range(files):
        lo, hi = i * n // files, (i + 1) * n // files
        pq.write_table(table.slice(lo, hi - lo), folder / f"part-{i:03d}.parquet", row_group_size=row_group)
    return folder


def write_data(work: Path, args) -> dict:
    import pyarrow.parquet as pq

    train = make_rows(args.rows, args.features, seed=0)
    val = make_rows(max(1000, args.rows // 5), args.features, seed=1)
    big = make_rows(4 * args.rows, args.features, seed=2)
    paths = {
        "folder": write_folder(train, work / "train", args.files, args.row_group),
        "folder_4x": write_folder(big, work / "train_4x", 4 * args.files, args.row_group),
        "one_file": work / "train.parquet",
        "one_file_4x": work / "train_4x.parquet",
        "val": work / "val.parquet",
    }
    pq.write_table(train, paths["one_file"], row_group_size=args.row_group)
    if args.extra:
        pq.write_table(big, paths["one_file_4x"], row_group_size=args.row_group)
    pq.write_table(val, paths["val"], row_group_size=args.row_group)
    return paths


# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------


def common_overrides(args, storage: Path, name: str, workers: int) -> list[str]:
    return [
        f"name={name}",
        f"storage_path={storage}",
        f"model.params.hidden={args.hidden}",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch_size}",
        "train.lr=0.001",
        "train.metrics=[loss,accuracy]",
        f"train.torch_threads={args.threads}",
        f"scaling.num_workers={workers}",
        # Ray Data needs a CPU beside the workers (trainyard checks it); the in-memory runs
        # get the same so that both sides hold the same logical resources.
        f"scaling.cpus_per_worker={args.cpus_per_worker}",
        # CPU training on every side, on a GPU machine too (the baseline trains on the CPU).
        "scaling.use_gpu=false",
        "checkpoint.max_failures=0",
        "checkpoint.num_to_keep=1",
    ]


def memory_config(args, paths: dict, storage: Path, name: str, workers: int):
    from trainyard.config import load_config

    base = {"data": {"name": "table", "params": {"path": str(paths["one_file"]),
                                                  "val_path": str(paths["val"])}}}
    return load_config(BASE_CONFIG, common_overrides(args, storage, name, workers), base=base)


def stream_config(args, paths: dict, storage: Path, name: str, workers: int, folder: str = "folder",
                  val_file: bool = True, extra: tuple = ()):
    from trainyard.config import load_config

    params: dict = {"uri": str(paths[folder]), "format": "parquet"}
    if val_file:
        params["val_uri"] = str(paths["val"])
    base = {"data": {"name": "files", "params": params}}
    return load_config(BASE_CONFIG, [*common_overrides(args, storage, name, workers), *extra], base=base)


# --------------------------------------------------------------------------------------
# A trainyard run
# --------------------------------------------------------------------------------------


def vm_hwm_mb(pid: int) -> float | None:
    """A live process's peak resident memory (VmHWM, what ru_maxrss reports), in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


SEEN_PIDS: set[int] = set()


def trainyard_run(cfg, rows: int) -> dict:
    from trainyard.train.driver import run_training

    pids: dict[int, int] = {}
    hwm: dict[int, float] = {}
    first: list[float] = []

    def on_event(event: dict) -> None:
        if event["type"] == "worker":
            pids[event["rank"]] = event["pid"]
        if event["type"] == "epoch_start" and not first:
            first.append(time.perf_counter() - started)
        if event["type"] == "epoch_end":
            for rank, pid in pids.items():
                value = vm_hwm_mb(pid)
                if value is not None:
                    hwm[rank] = max(hwm.get(rank, 0.0), value)

    started = time.perf_counter()
    result = run_training(cfg, on_event=on_event)
    wall = time.perf_counter() - started
    rates = [row["train_samples_per_s"] for row in result.history]
    metric = [row["rss_peak_mb"] for row in result.history if "rss_peak_mb" in row]
    reused = sorted(set(pids.values()) & SEEN_PIDS)
    SEEN_PIDS.update(pids.values())
    return {"rates": rates, "rate": steady(rates), "rss": max(metric) if metric else hwm.get(0),
            "rss_source": "metric" if metric else "VmHWM", "rss_hwm": hwm.get(0), "wall": wall,
            "startup": first[0] if first else float("nan"),
            "rows": rows, "workers": cfg.scaling.num_workers, "reused_pids": reused,
            "val_accuracy": result.history[-1].get("val_accuracy")}


def steady(rates: list[float]) -> float:
    """The median over the epochs after the first (all of them when there is one)."""
    return float(np.median(rates[1:] or rates))


# --------------------------------------------------------------------------------------
# The hand-written baseline (a child process: its ru_maxrss is its own)
# --------------------------------------------------------------------------------------


def baseline(args, folder: Path) -> dict:
    """What a person writes by hand: a DataLoader over an IterableDataset of the Parquet
    files' row groups, the same MLP, optimizer, batch size and threads, in one process."""
    import resource

    import pyarrow.parquet as pq
    import torch

    from trainyard.config import resolve
    from trainyard.train.loop import loss_fn, make_optimizer

    torch.set_num_threads(args.threads)
    files = sorted(folder.glob("*.parquet"))
    columns = [f"f{i}" for i in range(args.features)]
    cfg = stream_config(args, {"folder": folder, "val": folder}, Path(tempfile.gettempdir()), "baseline", 1)
    job = resolve(cfg)

    def read(path: Path, group: int):
        part = pq.ParquetFile(path).read_row_group(group, columns=[*columns, "label"])
        x = np.stack([part.column(c).to_numpy() for c in columns], axis=1)
        return x, part.column("label").to_numpy().astype(np.int64)

    # The processor (the MLP's standardisation) fitted on the first rows, as trainyard's
    # data.stream.fit_sample does on a sample.
    first = read(files[0], 0)[0][: cfg.data.stream.fit_sample]
    data_info = _info(args)
    processor = job.model.processor(job.model_params, data_info)
    processor.fit(first)

    class RowGroups(torch.utils.data.IterableDataset):
        def __init__(self):
            self.epoch = 0

        def __iter__(self):
            rng = np.random.default_rng(self.epoch)
            self.epoch += 1
            units = [(f, g) for f in files for g in range(pq.ParquetFile(f).num_row_groups)]
            carry_x, carry_y = None, None
            for i in rng.permutation(len(units)):
                x, y = read(*units[i])
                order = rng.permutation(len(y))
                x, y = x[order], y[order]
                if carry_x is not None:
                    x, y = np.concatenate([carry_x, x]), np.concatenate([carry_y, y])
                full = len(y) - len(y) % args.batch_size
                for lo in range(0, full, args.batch_size):
                    yield processor.encode(x[lo:lo + args.batch_size]), torch.from_numpy(y[lo:lo + args.batch_size])
                carry_x, carry_y = x[full:], y[full:]
            if carry_y is not None and len(carry_y):
                yield processor.encode(carry_x), torch.from_numpy(carry_y)

    loader = torch.utils.data.DataLoader(RowGroups(), batch_size=None, num_workers=0)
    torch.manual_seed(cfg.seed)
    model = job.model.build(job.model_params, data_info, processor)
    optimizer = make_optimizer(cfg, model)
    criterion = loss_fn(job.task)
    rates = []
    for _epoch in range(args.epochs):
        model.train()
        seen, started = 0, time.perf_counter()
        for x, y in loader:
            loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(y)
        rates.append(seen / (time.perf_counter() - started))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rates": rates, "rate": steady(rates), "rss": rss, "rows": seen}


def _info(args):
    from trainyard import DataInfo

    return DataInfo(task="classification", inputs="features", classes=["0", "1"],
                    input_shape=[args.features], feature_names=[f"f{i}" for i in range(args.features)])


def ray_version() -> str:
    import ray

    return ray.__version__


def baseline_in_child(args, folder: Path) -> dict:
    cmd = [sys.executable, __file__, "--baseline-only", str(folder), *passthrough(args)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(f"the DataLoader baseline failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def passthrough(args) -> list[str]:
    return ["--rows", str(args.rows), "--features", str(args.features), "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--hidden", args.hidden, "--threads", str(args.threads)]


# --------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------

HEADER = (f"{'path':<44} {'W':>2} {'rows':>8} {'samples/s':>10}  {'per epoch':<34} "
          f"{'RSS MB':>8} {'start s':>7} {'wall s':>7}")


def print_row(label: str, r: dict) -> None:
    epochs = ", ".join(f"{v:.0f}" for v in r["rates"])
    rss = f"{r['rss']:.0f}" if r.get("rss") is not None else "n/a"
    mark = {"metric": "", "VmHWM": "*"}.get(r.get("rss_source", ""), "")
    wall = f"{r['wall']:.1f}" if "wall" in r else ""
    start = f"{r['startup']:.1f}" if "startup" in r else ""
    note = f"  (worker pid reused: {r['reused_pids']})" if r.get("reused_pids") else ""
    print(f"{label:<44} {r.get('workers', 1):>2} {r['rows']:>8} {r['rate']:>10.0f}  {epochs:<34} "
          f"{rss + mark:>8} {start:>7} {wall:>7}{note}", flush=True)


def verdict(name: str, value: float, target: float, above: bool) -> str:
    met = value >= target if above else value <= target
    sign = ">=" if above else "<="
    return f"{name:<52} {value:6.2f}x   (target {sign} {target}x)  {'met' if met else 'NOT met'}"


# --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="40000 rows, 5 epochs")
    parser.add_argument("--rows", type=int, default=None, help="training rows (default 100000; --quick 40000)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default 5)")
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--files", type=int, default=8, help="Parquet files of the training folder")
    parser.add_argument("--row-group", type=int, default=10_000, help="rows per Parquet row group")
    parser.add_argument("--hidden", default="[256,256]")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every trainer")
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)
    parser.add_argument("--workers", default="1,2", help="worker counts of the trainyard runs")
    parser.add_argument("--extra", action="store_true",
                        help="also (1 worker) the streamed path with the hash split (no validation file) and "
                             "with shuffle=none, and the in-memory path on the 4x table")
    parser.add_argument("--parquet-reader", default="ray-default", choices=["ray-default", "v1"],
                        help="v1: plan the streamed runs' Parquet reads with Ray Data's V1 datasource "
                             "(DataContext.use_datasource_v2=False in this driver, where trainyard's files "
                             "dataset calls read_parquet): the fix proposed for the V2 reader's per-epoch "
                             "start-up (see the module docstring)")
    parser.add_argument("--read-blocks", type=int, default=0,
                        help="DataContext.read_op_min_num_blocks for the streamed runs (0: Ray's default, "
                             "200); at most the file count, Ray Data reads one block per file and fuses "
                             "the encode stage into the read tasks (the second part of the proposed fix)")
    parser.add_argument("--baseline-only", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.rows = args.rows or (40_000 if args.quick else 100_000)
    args.epochs = args.epochs or 5
    if args.epochs < 2:
        parser.error("--epochs: at least 2 (the first epoch is not counted)")
    try:
        workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        parser.error(f"--workers: comma-separated worker counts, got {args.workers!r}")

    if args.baseline_only:
        print(json.dumps(baseline(args, Path(args.baseline_only))))
        return

    work = Path(tempfile.mkdtemp(prefix="trainyard-ingest-"))
    try:
        paths = write_data(work, args)
        storage = work / "runs"
        print(f"data: {args.rows} training rows x {args.features} float32 features + label, {args.files} "
              f"Parquet files (row groups of {args.row_group}); validation {max(1000, args.rows // 5)} rows; "
              f"4x table {4 * args.rows} rows")
        print(f"Ray {ray_version()}; streamed runs' Parquet reader: {args.parquet_reader}, read_op_min_num_blocks: "
              f"{args.read_blocks or 'Ray default'}")
        print(f"MLP {args.hidden}; batch {args.batch_size} (global); {args.epochs} epochs; {args.threads} torch "
              f"thread(s) per trainer; scaling.cpus_per_worker={args.cpus_per_worker}; {os.cpu_count()} cores")
        print("samples/s: training rows / training time, median of epochs 2.. (epoch 1 not counted); RSS: peak "
              "resident MB of rank 0 (trainyard's rss_peak_mb; the baseline's ru_maxrss); start s: run start "
              "to first epoch")
        print(HEADER)
        base = [baseline_in_child(args, paths["folder"])]
        print_row("DataLoader baseline (before)", base[0])

        from trainyard.runtime.cluster import init_ray

        init_ray()
        from ray.data import DataContext

        if args.parquet_reader == "v1":
            DataContext.get_current().use_datasource_v2 = False
        if args.read_blocks:
            DataContext.get_current().read_op_min_num_blocks = args.read_blocks
        results: dict = {}
        for w in workers:
            for kind in ("memory", "stream"):
                name = f"{kind}_{w}w"
                make = memory_config if kind == "memory" else stream_config
                results[(kind, w)] = trainyard_run(make(args, paths, storage, name, w), args.rows)
                label = "trainyard in-memory (table)" if kind == "memory" else "trainyard streamed (files)"
                print_row(label, results[(kind, w)])
        four = stream_config(args, paths, storage, "stream_4x", 1, folder="folder_4x")
        four.train.epochs = 2  # the peak RSS is reached in the first epoch; 2 to measure a rate
        results["stream_4x"] = trainyard_run(four, 4 * args.rows)
        print_row("trainyard streamed (files), 4x rows", results["stream_4x"])
        if args.extra:  # what streaming saves: the in-memory path's RSS grows with the rows
            four = memory_config(args, {**paths, "one_file": paths["one_file_4x"]}, storage, "memory_4x", 1)
            four.train.epochs = 2
            results["memory_4x"] = trainyard_run(four, 4 * args.rows)
            print_row("trainyard in-memory (table), 4x rows", results["memory_4x"])
        if args.extra:
            cfg = stream_config(args, paths, storage, "stream_hash", 1, val_file=False)
            results["hash"] = trainyard_run(cfg, int(round(args.rows * 0.8)))
            print_row("trainyard streamed, hash-split validation", results["hash"])
            cfg = stream_config(args, paths, storage, "stream_noshuffle", 1, extra=("data.stream.shuffle=none",))
            results["noshuffle"] = trainyard_run(cfg, args.rows)
            print_row("trainyard streamed, shuffle=none", results["noshuffle"])
            # data that fits is kept in the object store (cache: auto); here the files are
            # read and encoded again every epoch, as for data that does not fit
            for w in workers:
                cfg = stream_config(args, paths, storage, f"stream_nocache_{w}w", w, extra=("data.stream.cache=false",))
                results[("nocache", w)] = trainyard_run(cfg, args.rows)
                print_row("trainyard streamed, cache=false", results[("nocache", w)])
            cfg = stream_config(args, paths, storage, "stream_nocache_4x", 1, folder="folder_4x",
                                extra=("data.stream.cache=false",))
            cfg.train.epochs = 2
            results["nocache_4x"] = trainyard_run(cfg, 4 * args.rows)
            print_row("trainyard streamed, cache=false, 4x rows", results["nocache_4x"])
        base.append(baseline_in_child(args, paths["folder"]))
        print_row("DataLoader baseline (after)", base[1])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base_rate = float(np.mean([b["rate"] for b in base]))
    print()
    print(f"DataLoader baseline, mean of before and after: {base_rate:.0f} samples/s")
    for w in workers:
        if ("memory", w) in results and ("stream", w) in results:
            print(verdict(f"streamed / in-memory samples/s, {w} worker(s)",
                          results[("stream", w)]["rate"] / results[("memory", w)]["rate"], 0.9, True))
    if ("stream", 1) in results:
        print(verdict("streamed (1 worker) / DataLoader samples/s", results[("stream", 1)]["rate"] / base_rate,
                      1.0, True))
    for w in workers:
        if w != 1 and ("stream", w) in results:
            print(f"{'  (for reference) streamed, ' + str(w) + ' workers / DataLoader':<52} "
                  f"{results[('stream', w)]['rate'] / base_rate:6.2f}x")
    if ("stream", 1) in results and results["stream_4x"]["rss"] and results[("stream", 1)]["rss"]:
        print(verdict("streamed peak RSS per worker, 4x rows / 1x rows",
                      results["stream_4x"]["rss"] / results[("stream", 1)]["rss"], 1.2, False))
    for w in workers:
        if ("nocache", w) in results and ("memory", w) in results:
            print(f"{'  (for reference) cache=false / in-memory, ' + str(w) + ' worker(s)':<52} "
                  f"{results[('nocache', w)]['rate'] / results[('memory', w)]['rate']:6.2f}x")
    if "nocache_4x" in results and ("nocache", 1) in results and results[("nocache", 1)]["rss"]:
        print(f"{'  (for reference) cache=false RSS, 4x rows / 1x':<52} "
              f"{results['nocache_4x']['rss'] / results[('nocache', 1)]['rss']:6.2f}x")
    if "memory_4x" in results and ("memory", 1) in results and results[("memory", 1)]["rss"]:
        print(f"{'  (for reference) in-memory RSS, 4x rows / 1x rows':<52} "
              f"{results['memory_4x']['rss'] / results[('memory', 1)]['rss']:6.2f}x")


if __name__ == "__main__":
    main()
