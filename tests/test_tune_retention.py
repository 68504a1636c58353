"""Which trial checkpoints a search keeps (checkpoint.num_to_keep), without Ray running:
the order, the choice, and the deletion two experiment snapshots after a checkpoint drops
out. The search-level checks are in tests/test_tuning.py."""

from __future__ import annotations

import math
import pickle
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


def test_with_a_bucket_a_dropped_checkpoint_waits_for_three_uploads_of_the_state_not_snapshots(tmp_path):
    """Tune skips uploading a snapshot while the last upload runs, so with a bucket the
    state there may be many snapshots old: deletion counts replacements of the state's
    object (here a local folder read through the same pyarrow calls), not snapshots."""
    import pyarrow.fs

    state = tmp_path / "bucket" / "search"
    state.mkdir(parents=True)
    (state / "experiment_state-2026.json").write_text("{}")
    (state / "basic-variant-state-2026.json").write_text("{}")  # not the experiment state
    retention = CheckpointRetention(keep=1, metric="val_accuracy", mode="max", state_uri=str(state))
    fs, inner = pyarrow.fs.FileSystem.from_uri(str(state))
    retention._bucket.poll(fs, inner)  # the first look: what is there now
    uploads = 0

    def upload():
        nonlocal uploads
        uploads += 1
        (state / "experiment_state-2026.json").write_text("{" + " " * uploads + "}")
        retention._bucket.poll(fs, inner)

    folders = []
    for epoch, accuracy in enumerate([0.80, 0.95]):  # epoch 0 drops out
        folder = tmp_path / "t1" / f"checkpoint_{epoch:06d}"
        folder.mkdir(parents=True)
        folders.append(folder)
        retention.on_checkpoint(0, [], SimpleNamespace(trial_id="t1", last_result={"val_accuracy": accuracy}),
                                Checkpoint.from_directory(str(folder)))
    for _ in range(5):  # snapshots whose uploads were skipped: nothing goes
        retention.get_state()
    assert folders[0].exists()
    (state / "basic-variant-state-2026.json").write_text("{ }")  # another object changing
    retention._bucket.poll(fs, inner)
    retention._bucket.poll(fs, inner)  # looking again at an unchanged state is no upload
    retention.get_state()
    assert folders[0].exists() and retention._bucket.changes == 0
    for expected in (1, 2):
        upload()  # the first two may carry snapshots taken before the drop
        retention.get_state()
        assert retention._bucket.changes == expected and folders[0].exists()
    upload()  # begun after the second ended: a snapshot from after the drop
    retention.get_state()
    assert not folders[0].exists() and folders[1].exists()


def test_the_bucket_watch_counts_uploads_from_its_own_thread_and_stops(tmp_path):
    state = tmp_path / "search"
    state.mkdir()
    (state / "experiment_state-1.json").write_text("{}")
    retention = CheckpointRetention(keep=1, metric="m", mode="max", state_uri=str(state))
    retention._bucket.every_s = 0.05
    retention.setup(stop=None, num_samples=1, total_num_samples=1)
    import time

    deadline = time.monotonic() + 10
    while retention._bucket._seen is None and time.monotonic() < deadline:
        time.sleep(0.02)
    (state / "experiment_state-1.json").write_text("{ }")
    while retention._bucket.changes < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert retention._bucket.changes == 1
    retention.on_experiment_end(trials=[])
    retention._bucket._thread.join(timeout=5)
    assert not retention._bucket._thread.is_alive()
    retention.setup(stop=None, num_samples=1, total_num_samples=1)  # a second fit, after a resume
    (state / "experiment_state-1.json").write_text("{  }")
    while retention._bucket.changes < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert retention._bucket.changes == 2 and retention._bucket._thread.is_alive()
    retention.on_experiment_end(trials=[])
    restored = pickle.loads(pickle.dumps(retention))  # as Tune pickles its callbacks
    assert restored.state_uri == str(state) and restored._bucket.changes == 0
