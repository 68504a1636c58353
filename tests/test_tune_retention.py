"""Which trial checkpoints a search keeps (checkpoint.num_to_keep), without Ray running:
the order, the choice, and the deletion two experiment snapshots after a checkpoint drops
out. The search-level checks are in tests/test_tuning.py."""

from __future__ import annotations

import math
from types import SimpleNamespace

from ray.tune import Checkpoint

from trainyard.tune.retention import CheckpointRetention, rank, to_drop


def test_rank_puts_the_best_score_first_then_the_earlier_epoch_and_missing_scores_last():
    scores = [(0.5, 1), (0.9, 3), (math.nan, 2), (0.9, 2), (None, 4), (0.7, 5)]

    def key(mode):
        return lambda s: rank({"m": s[0], "training_iteration": s[1]}, "m", mode)

    best_max = sorted(scores, key=key("max"))
    assert best_max[:4] == [(0.9, 2), (0.9, 3), (0.7, 5), (0.5, 1)]
    assert {s[1] for s in best_max[4:]} == {2, 4}  # NaN and None last
    best_min = sorted(scores, key=key("min"))
    assert best_min[:4] == [(0.5, 1), (0.7, 5), (0.9, 2), (0.9, 3)]


def test_to_drop_keeps_the_best_and_the_latest():
    saved = [(SimpleNamespace(path=name), {"m": score, "training_iteration": i})
             for i, (name, score) in enumerate([("a", 0.2), ("b", 0.9), ("c", 0.5), ("d", 0.1)])]
    checkpoints = [c for c, _ in saved]

    def names(dropped):
        return [c.path for c in dropped]

    assert names(to_drop(saved, checkpoints[-1], 1, "m", "max")) == ["a", "c"]
    assert names(to_drop(saved, checkpoints[-1], 2, "m", "max")) == ["a"]
    assert to_drop(saved, checkpoints[1], 1, "m", "max") == [checkpoints[0], checkpoints[2], checkpoints[3]]


def test_a_dropped_checkpoint_is_deleted_two_snapshots_later_and_the_kept_ones_stay(tmp_path):
    retention = CheckpointRetention(keep=1, metric="val_accuracy", mode="max")
    folders = []

    def checkpoint(trial, epoch, accuracy):
        folder = tmp_path / trial / f"checkpoint_{epoch:06d}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"weights")
        folders.append(folder)
        result = {"val_accuracy": accuracy, "training_iteration": epoch + 1}
        retention.on_checkpoint(0, [], SimpleNamespace(trial_id=trial, last_result=result),
                                Checkpoint.from_directory(str(folder)))

    checkpoint("t1", 0, 0.80)
    checkpoint("t1", 1, 0.95)  # epoch 0 drops out: neither the best nor the latest
    checkpoint("t2", 0, 0.70)
    checkpoint("t1", 2, 0.90)  # the best (epoch 1) and the latest (epoch 2) stay
    assert all(f.exists() for f in folders)  # nothing goes before the snapshots
    retention.get_state()
    assert all(f.exists() for f in folders)  # one snapshot: the one before may name it
    retention.get_state()
    assert not folders[0].exists()
    assert all(f.exists() for f in folders[1:])
    checkpoint("t1", 3, 0.85)  # epoch 2 drops out now
    retention.get_state()
    assert folders[3].exists()
    retention.get_state()
    assert not folders[3].exists()
    assert folders[1].exists() and (tmp_path / "t1" / "checkpoint_000003").exists()
    assert folders[2].exists()  # t2's only checkpoint


def test_a_checkpoint_already_gone_is_no_error(tmp_path):
    retention = CheckpointRetention(keep=1, metric="val_loss", mode="min")
    made = []
    for epoch, loss in enumerate([0.5, 0.4, 0.3]):
        folder = tmp_path / f"checkpoint_{epoch:06d}"
        folder.mkdir()
        made.append(folder)
        retention.on_checkpoint(0, [], SimpleNamespace(trial_id="t", last_result={"val_loss": loss}),
                                Checkpoint.from_directory(str(folder)))
    made[0].rmdir()  # removed by hand meanwhile
    for _ in range(3):
        retention.get_state()
    assert not made[1].exists() and made[2].exists()
