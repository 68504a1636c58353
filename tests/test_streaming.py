"""Streamed data (issue 10): the built-in ``files`` dataset (Parquet, CSV, JSON Lines, image
folders) and a third-party streaming plugin, read by Ray Data and streamed to the training
loop; exact validation over N workers; the processor fitted on a bounded sample and saved
in the checkpoint; bad data named in one line before any worker starts.

Everything runs on the real embedded Ray of the session (``ray_cluster``); the data is
written by the tests, small."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from tests.conftest import CONFIGS
from tests.test_training_essentials import LocalSession
from trainyard.config import load_config, resolve
from trainyard.errors import ConfigError
from trainyard.train.loop import run_loop
from trainyard.train.stream import VAL_BUCKETS, HashSplit, prepare_stream, row_buckets


def _breast_cancer_frame() -> pd.DataFrame:
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame.rename(columns={"target": "label"})
    frame.columns = [c.replace(" ", "_") for c in frame.columns]
    return frame


def _write_parquet(frame: pd.DataFrame, folder: Path, parts: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    n = len(frame)
    for i in range(parts):
        frame.iloc[i * n // parts:(i + 1) * n // parts].to_parquet(folder / f"part-{i}.parquet")
    return folder


def _files_cfg(tmp_path: Path, model: str, params: dict, *overrides: str):
    config = {"mlp": "mlp_breast_cancer", "cnn": "cnn_digits", "bert": "bert_sentiment"}[model]
    base = {"data": {"name": "files", "params": params}}
    return load_config(CONFIGS / f"{config}.yaml",
                       [f"storage_path={tmp_path / 'runs'}", "scaling.num_workers=1", *overrides], base=base)


def _run_in_process(cfg, folder: Path) -> LocalSession:
    """The loop in this process (the one-worker trial's path) on the driver's streams."""
    stream = prepare_stream(resolve(cfg))
    session = LocalSession(folder)
    folder.mkdir(parents=True, exist_ok=True)
    run_loop({"config": OmegaConf.to_container(cfg, resolve=True), "stream": stream.meta,
              "datasets": {"train": stream.train, "val": stream.val}}, session)
    return session


# --------------------------------------------------------------------------------------
# The hash split (no Ray)
# --------------------------------------------------------------------------------------


def test_the_hash_split_is_disjoint_complete_seeded_and_independent_of_batching():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(4000, 5)).astype(np.float32)
    batch = {"input": rows, "target": np.arange(4000)}
    train, val = HashSplit(7, 0.2, False)(batch), HashSplit(7, 0.2, True)(batch)
    assert sorted([*train["target"], *val["target"]]) == list(range(4000))
    assert 0.17 < len(val["target"]) / 4000 < 0.23
    # The same rows in other batches land on the same side.
    halves = [HashSplit(7, 0.2, True)({k: v[s] for k, v in batch.items()}) for s in (slice(0, 1234), slice(1234, None))]
    assert sorted(np.concatenate([h["target"] for h in halves])) == sorted(val["target"])
    # Another seed, another split; texts hash too.
    assert set(HashSplit(8, 0.2, True)(batch)["target"]) != set(val["target"])
    texts = np.array(["good", "bad", "fine"], dtype=object)
    assert list(row_buckets(texts, 1)) == list(row_buckets(texts.copy(), 1))
    assert all(0 <= b < VAL_BUCKETS for b in row_buckets(texts, 1))


class _Shard:
    """Stands in for a Ray Data iterator in the feed's unit tests: each ``iter_torch_batches``
    call is one epoch's pass, recorded with its options."""

    def __init__(self, rows: int, fail_at_epoch: int | None = None):
        self.rows, self.fail_at_epoch, self.calls = rows, fail_at_epoch, []

    def iter_torch_batches(self, batch_size, **options):
        import torch

        self.calls.append(dict(options, batch_size=batch_size))
        if self.fail_at_epoch is not None and len(self.calls) - 1 == self.fail_at_epoch:
            raise OSError("the bucket went away")
        for start in range(0, self.rows, batch_size):
            n = min(batch_size, self.rows - start)
            yield {"x": torch.arange(start, start + n).float()[:, None].repeat(1, 3),
                   "y": torch.arange(start, start + n)}


def _feed_cfg(**stream):
    return OmegaConf.create({"seed": 3, "train": {"batch_size": 32},
                             "data": {"stream": {"prefetch_batches": 2, "fetch_rows": 100, "block_mb": 32,
                                                 "shuffle": "local", "shuffle_buffer": 10, **stream}}})


def test_the_feed_cuts_fetches_into_steps_and_reads_the_next_epoch_ahead():
    from trainyard.train.stream import StreamMeta, TrainFeed, fetch_size

    meta = StreamMeta(info=None, processor=None, train_rows=250, keys=None, row_bytes=16)
    cfg = _feed_cfg()
    assert fetch_size(meta, cfg, 1) == 96  # a whole number of 32-row batches under fetch_rows
    assert fetch_size(meta, cfg, 2) == 96  # 16-row local batches
    assert fetch_size(StreamMeta(None, None, 250, None, row_bytes=2**20), _feed_cfg(block_mb=2), 1) == 32
    assert fetch_size(StreamMeta(None, None, 250, None, row_bytes=1024), _feed_cfg(block_mb=1), 1) == 96
    assert fetch_size(StreamMeta(None, None, 250, None, row_bytes=2048), _feed_cfg(block_mb=1), 1) == 64
    shard = _Shard(250)
    feed = TrainFeed(shard, meta, cfg, 1, first=0, last=2)
    orders = []
    for epoch in range(3):
        steps = list(feed.batches(epoch))
        # The steps of fetching one 32-row batch at a time: 7 full, then the 26 left.
        assert [len(y) for _, y in steps] == [32] * 7 + [26]
        order = np.concatenate([y.numpy() for _, y in steps])
        assert sorted(order) == list(range(250))  # every row once, shuffled
        assert all(np.array_equal(x[:, 0].long().numpy(), y.numpy()) for x, y in steps)  # rows stay whole
        orders.append(order)
    feed.thread.join(timeout=5)
    assert not feed.thread.is_alive()  # no pass past the last epoch
    assert len(shard.calls) == 3 and all(c["batch_size"] == 96 for c in shard.calls)
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[0], np.arange(250))
    again = TrainFeed(_Shard(250), meta, cfg, 1, first=1, last=1)  # a resumed run: epoch 1's order
    assert np.array_equal(np.concatenate([y.numpy() for _, y in again.batches(1)]), orders[1])
    plain = TrainFeed(_Shard(250), meta, _feed_cfg(shuffle="none"), 1, first=0, last=0)
    assert np.array_equal(np.concatenate([y.numpy() for _, y in plain.batches(0)]), np.arange(250))


def test_a_read_error_in_the_feed_reaches_the_training_thread_and_close_stops_it():
    from trainyard.train.stream import StreamMeta, TrainFeed

    meta = StreamMeta(None, None, 250, None, row_bytes=16)
    feed = TrainFeed(_Shard(250, fail_at_epoch=1), meta, _feed_cfg(shuffle="none"), 1, first=0, last=3)
    assert sum(len(y) for _, y in feed.batches(0)) == 250
    with pytest.raises(OSError, match="the bucket went away"):
        list(feed.batches(1))
    # Closed while it waits on a full queue (the consumer left): the thread ends.
    feed = TrainFeed(_Shard(5000), meta, _feed_cfg(shuffle="none", prefetch_batches=1), 1, first=0, last=5)
    next(iter(feed.batches(0)))
    feed.close()
    feed.thread.join(timeout=5)
    assert not feed.thread.is_alive()


def test_numeric_rows_hash_in_one_pass_uniformly_and_the_same_in_any_batch():
    rows = np.random.default_rng(1).normal(size=(20_000, 7)).astype(np.float32)
    buckets = row_buckets(rows, 5)
    assert buckets.min() >= 0 and buckets.max() < VAL_BUCKETS
    assert np.array_equal(row_buckets(rows[5000:6000], 5), buckets[5000:6000])
    assert 0.18 < (buckets < 0.2 * VAL_BUCKETS).mean() < 0.22
    assert (row_buckets(rows, 6) == buckets).mean() < 0.01
    images = np.random.default_rng(2).random(size=(50, 1, 3, 3)).astype(np.float64)  # any shape and dtype
    assert np.array_equal(row_buckets(images[10:20], 5), row_buckets(images, 5)[10:20])


def test_files_params_are_checked_before_ray_starts(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.params\.format: must be one of parquet, csv, jsonl, images"):
        resolve(_files_cfg(tmp_path, "mlp", {"uri": str(tmp_path), "format": "xml"}))
    with pytest.raises(ConfigError, match=r"data\.params.*uri: give the files"):
        resolve(_files_cfg(tmp_path, "mlp", {"format": "parquet"}))
    # Text files need a text model: the kind of input follows the params.
    with pytest.raises(ConfigError, match="takes features inputs, but dataset 'files' gives text inputs"):
        resolve(_files_cfg(tmp_path, "mlp", {"uri": str(tmp_path), "format": "jsonl", "text": "text"}))
    # ... and a BERT on JSON Lines without data.params.text is told which params there are.
    with pytest.raises(ConfigError, match=r"takes text inputs, but dataset 'files' gives features inputs with "
                                          r"these data.params.*\(its params: uri, format, .*, text, "):
        resolve(_files_cfg(tmp_path, "bert", {"uri": str(tmp_path), "format": "jsonl"}))


# --------------------------------------------------------------------------------------
# Bad data: one line naming the URI or the column, before any worker starts
# --------------------------------------------------------------------------------------


def _image_folder(root: Path, classes=("zero", "one"), count: int = 4) -> Path:
    from PIL import Image

    for i, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for j in range(count):
            Image.fromarray(np.full((6, 6), 40 + 150 * i + j, np.uint8), mode="L").save(root / cls / f"{j}.png")
    return root


@pytest.mark.parametrize("case", ["missing_column", "empty_glob", "no_such_folder", "wrong_extension", "not_parquet",
                                  "one_class", "label_not_classes", "malformed_csv", "empty_csv",
                                  "classes_miss_a_label", "missing_labels", "missing_features", "image_beside_classes",
                                  "corrupt_image", "columns_differ", "malformed_jsonl"])
def test_bad_data_is_one_line_naming_the_uri_or_column(ray_cluster, tmp_path, case, capfd):
    frame = _breast_cancer_frame()
    folder = _write_parquet(frame, tmp_path / "table", parts=2)
    gaps = frame.astype({"label": float})
    gaps.loc[[3, 300], "label"] = np.nan
    _write_parquet(gaps, tmp_path / "gaps", parts=2)
    holes = frame.copy()
    holes.loc[::10, "mean_radius"] = np.nan
    _write_parquet(holes, tmp_path / "holes", parts=2)
    images = _image_folder(tmp_path / "images")
    (tmp_path / "mixed").mkdir()
    frame.iloc[:300].to_parquet(tmp_path / "mixed" / "a.parquet")
    frame.iloc[300:].drop(columns=["mean_radius"]).to_parquet(tmp_path / "mixed" / "b.parquet")
    if case == "image_beside_classes":
        (images / "zero" / "0.png").rename(images / "cover.png")
    if case == "corrupt_image":
        (images / "one" / "broken.png").write_text("not a png")
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    (tmp_path / "fake.parquet").write_text("a,b\n1,2\n")
    (tmp_path / "quote.csv").write_text('a,b,target\n1,2,0\n3,"4,1\n5,6,0\n')  # a quote left open
    (tmp_path / "empty.csv").write_text("")
    lines = [f'{{"x": {i}, "label": {i % 2}}}' for i in range(6)]
    lines[4] = '{"x": 4, label: 0}'  # a key without quotes, on the file's fifth line
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    many = pd.DataFrame({"x": np.arange(10_050, dtype=np.float32), "label": np.arange(10_050) * 0.5})
    _write_parquet(many, tmp_path / "measurements", parts=2)
    params = {"uri": str(folder), "format": "parquet"}
    expected = {
        "missing_column": (dict(params, features=["mean_radius", "colour"]), r"no column 'colour' \(features\)"),
        "empty_glob": (dict(params, uri=str(folder / "*.csv.gz")), r"\*\.csv\.gz: matches no file"),
        "no_such_folder": (dict(params, uri=str(tmp_path / "nowhere")), "nowhere: no such file or folder"),
        "wrong_extension": (dict(params, uri=str(tmp_path / "notes.csv")),
                            r"notes.csv: not a parquet file \(.parquet, .pq\); is data.params.format right"),
        "not_parquet": (dict(params, uri=str(tmp_path / "fake.parquet")), "fake.parquet: cannot read"),
        "one_class": (dict(params, classes=["only"]), "fewer than two classes"),
        "label_not_classes": (dict(params, uri=str(tmp_path / "measurements")),
                              r"column 'label' holds more than 10,000 distinct values; is data.params.task"),
        "malformed_csv": ({"uri": str(tmp_path / "quote.csv"), "format": "csv", "label": "target"},
                          r"quote.csv: cannot read \(Failed to read CSV file"),
        "empty_csv": ({"uri": str(tmp_path / "empty.csv"), "format": "csv", "label": "target"},
                      r"empty.csv: cannot read \(Failed to read CSV file"),
        # Raised inside Ray Data's tasks: their own line, not Ray's advice on retries.
        "classes_miss_a_label": (dict(params, classes=["0", "2"]),
                                 r"label '1' in column 'label' is not one of the classes \['0', '2'\]"),
        "missing_labels": (dict(params, uri=str(tmp_path / "gaps")),
                           r"column 'label' has 2 row\(s\) without a label \(empty, null or NaN\)"),
        "missing_features": (dict(params, uri=str(tmp_path / "holes")),
                             r"feature 'mean_radius' has missing \(NaN\) or infinite values"),
        "image_beside_classes": ({"uri": str(images), "format": "images", "image_mode": "L"},
                                 r"1 image\(s\) lie beside the class folders, not in one \(e.g. .*cover.png\)"),
        "corrupt_image": ({"uri": str(images), "format": "images", "image_mode": "L", "image_size": [6, 6]},
                          r"couldn't load image file at path '.*broken.png'"),
        "columns_differ": (dict(params, uri=str(tmp_path / "mixed")),
                           r"mixed: .*b.parquet has no column 'mean_radius', which the job uses \(the files' "
                           r"columns differ\)"),
        "malformed_jsonl": ({"uri": str(tmp_path / "rows.jsonl"), "format": "jsonl"},
                            r"rows.jsonl line 5 \(column 10\): not valid JSON \(Expecting property name"),
    }[case]
    cfg = _files_cfg(tmp_path, "cnn" if "image" in case else "mlp", expected[0])
    capfd.readouterr()
    with pytest.raises(ConfigError, match=expected[1]) as err:
        prepare_stream(resolve(cfg))
    message = str(err.value)
    assert "\n" not in message and message.startswith("data (files): ")
    assert "ray::" not in message and "retry" not in message
    printed = capfd.readouterr()
    assert "Traceback" not in printed.err + printed.out  # Ray Data's traces go to its log file only


def test_a_label_column_of_whole_floats_names_the_classes_of_the_int_column(ray_cluster, tmp_path):
    """pandas turns an int column with a gap into floats: 0.0 and 1.0 are classes '0' and '1',
    in the class list and in each row's target alike."""
    frame = _breast_cancer_frame()
    _write_parquet(frame.astype({"label": float}), tmp_path / "floats", parts=2)
    _write_parquet(frame, tmp_path / "ints", parts=2)
    from trainyard.train.stream import load_stream

    jobs = [resolve(_files_cfg(tmp_path, "mlp", {"uri": str(tmp_path / name)})) for name in ("floats", "ints")]
    assert [prepare_stream(job).meta.info.classes for job in jobs] == [["0", "1"], ["0", "1"]]
    targets = [np.sort(load_stream(job).train.take_batch(600, batch_format="numpy")["target"]) for job in jobs]
    assert len(targets[0]) == len(frame) and np.array_equal(targets[0], targets[1])
    # Classes the user names as "0.0" and "1.0" keep their names, and the labels still match.
    named = resolve(_files_cfg(tmp_path, "mlp", {"uri": str(tmp_path / "floats"), "classes": ["0.0", "1.0"]}))
    assert prepare_stream(named).meta.info.classes == ["0.0", "1.0"]
    assert np.array_equal(np.sort(load_stream(named).train.take_batch(600, batch_format="numpy")["target"]),
                          targets[0])


def test_a_hive_partition_column_is_a_column_though_no_file_holds_it(ray_cluster, tmp_path):
    """label=0/part.parquet: Ray Data adds the label from the path; the footers' column check
    must not refuse it."""
    frame = _breast_cancer_frame()
    for label, rows in frame.groupby("label"):
        _write_parquet(rows.drop(columns=["label"]), tmp_path / "hive" / f"label={label}", parts=1)
    stream = prepare_stream(resolve(_files_cfg(tmp_path, "mlp", {"uri": str(tmp_path / "hive")})))
    assert stream.meta.info.classes == ["0", "1"] and stream.meta.train_rows > 300


def test_a_block_the_split_leaves_no_row_of_encodes_to_no_rows_not_an_error():
    """A tokenizer fails on an empty list: a tiny file's block with no validation row made
    the run fail with IndexError."""
    from trainyard.hookspecs import DataInfo
    from trainyard.train.stream import Encode, HashSplit

    class Strict:
        def encode(self, inputs):
            assert len(inputs) > 0, "encode called with no rows"
            return np.asarray(inputs, dtype=np.float32) * 2

    info = DataInfo(task="classification", inputs="features", classes=["a", "b"], input_shape=[2])
    batch = {"input": np.ones((3, 2), np.float32), "target": np.array([0, 1, 0])}
    none_held = Encode(Strict(), info, "classification", HashSplit(0, 0.0, val=True))(batch)
    assert none_held["x"].shape == (0, 2) and none_held["x"].dtype == np.float32 and none_held["y"].shape == (0,)
    all_kept = Encode(Strict(), info, "classification", HashSplit(0, 0.0, val=False))(batch)
    assert all_kept["x"].shape == (3, 2) and float(all_kept["x"][0, 0]) == 2.0


def test_a_streams_rows_are_checked_against_its_data_info_before_workers_start():
    """A third-party stream's rows: the two columns, the declared shape (no Ray needed)."""
    from types import SimpleNamespace

    from trainyard.hookspecs import DataInfo
    from trainyard.train.stream import _check_rows

    job = SimpleNamespace(dataset=SimpleNamespace(name="waves"))
    info = DataInfo(task="classification", inputs="features", classes=["a", "b"], input_shape=[3],
                    feature_names=["x", "y", "z"])
    rows = np.zeros((4, 3), np.float32)
    _check_rows({"input": rows, "target": np.array([0, 1, 0, 1])}, info, job)  # as declared: no error
    with pytest.raises(ConfigError, match=r"^data \(waves\): the stream's rows have no 'target' column "
                                          r"\(columns: input\)"):
        _check_rows({"input": rows}, info, job)
    with pytest.raises(ConfigError, match=r"^data \(waves\): the stream's rows: inputs of shape \[4, 8\] do not "
                                          r"match DataInfo.input_shape"):
        _check_rows({"input": np.zeros((4, 8), np.float32), "target": np.array([0, 1, 0, 1])}, info, job)
    rows[2, 1] = np.inf
    with pytest.raises(ConfigError, match=r"feature 'y' has missing \(NaN\) or infinite values"):
        _check_rows({"input": rows, "target": np.array([0, 1, 0, 1])}, info, job)


# --------------------------------------------------------------------------------------
# Formats through the loop (in this process: the one-worker trial's path)
# --------------------------------------------------------------------------------------


def test_csv_regression_streams_and_the_checkpoint_serves_unchanged(ray_cluster, tmp_path):
    from trainyard.checkpoint import load_predictor

    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 4))
    frame = pd.DataFrame(x, columns=list("abcd")).assign(y=x @ [1.0, -2.0, 0.5, 0.0] + 0.1)
    (tmp_path / "csv").mkdir()
    frame.iloc[:300].to_csv(tmp_path / "csv" / "one.csv", index=False)
    frame.iloc[300:].to_csv(tmp_path / "csv" / "two.csv", index=False)
    cfg = _files_cfg(tmp_path, "mlp", {"uri": str(tmp_path / "csv" / "*.csv"), "format": "csv",
                                       "task": "regression", "label": "y"},
                     "train.epochs=4", "train.metrics=[mse,r2]", "train.lr=0.01", "data.stream.fit_sample=200")
    session = _run_in_process(cfg, tmp_path / "ckpt")
    assert [r["epoch"] for r in session.reports] == [0, 1, 2, 3]
    assert session.reports[-1]["val_r2"] > 0.8
    # The processor's state was fitted on 200 sampled rows and saved with the checkpoint.
    predictor = load_predictor(session.checkpoints[-1])
    mean = np.asarray(predictor.processor.state["mean"])
    assert np.all(np.abs(mean - x.mean(axis=0)) < 0.3) and not np.allclose(mean, x.mean(axis=0))
    # A sample request (what `trainyard up` sends) is one row of the stream.
    from trainyard.train.data import sample_input

    sample = sample_input(session.checkpoints[-1])
    assert len(sample) == 4 and any(np.allclose(sample, row, atol=1e-6) for row in x)
    got = predictor.predict(x[:50].astype(np.float32))
    truth = x[:50] @ [1.0, -2.0, 0.5, 0.0] + 0.1
    assert np.mean((np.array([g["value"] for g in got]) - truth) ** 2) < 0.5


def test_jsonl_text_trains_a_bert_whose_vocabulary_comes_from_the_sample(ray_cluster, tmp_path):
    rng = np.random.default_rng(2)
    good, bad = ["great", "lovely", "superb", "fine"], ["awful", "poor", "dire", "bad"]
    lines = []
    for i in range(400):
        label = "pos" if i % 2 else "neg"
        words = rng.choice(good if label == "pos" else bad, size=3)
        lines.append(json.dumps({"review": f"it was {' '.join(words)} number {i}", "label": label}))
    (tmp_path / "reviews.jsonl").write_text("\n".join(lines) + "\n")
    cfg = _files_cfg(tmp_path, "bert", {"uri": str(tmp_path / "reviews.jsonl"), "format": "jsonl",
                                        "text": "review"},
                     "train.epochs=3", "train.lr=0.003", "train.metrics=[accuracy]")
    session = _run_in_process(cfg, tmp_path / "ckpt")
    assert session.reports[-1]["val_accuracy"] >= 0.9
    saved = json.loads((session.checkpoints[-1] / "processor" / "tokenizer" / "tokenizer.json").read_text())
    assert {"great", "awful", "superb", "dire"} <= set(saved["model"]["vocab"])


def test_an_image_folder_with_one_sub_folder_per_class_trains_a_cnn(ray_cluster, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    for cls, bright in (("dark", 40), ("light", 210)):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(40):
            pixels = np.clip(rng.normal(bright, 25, size=(10, 12)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(tmp_path / "images" / cls / f"{i}.png")
    cfg = _files_cfg(tmp_path, "cnn", {"uri": str(tmp_path / "images"), "format": "images",
                                       "image_mode": "L", "image_size": [8, 8]},
                     "train.epochs=3", "train.metrics=[accuracy]", "train.batch_size=16")
    job = resolve(cfg)
    stream = prepare_stream(job)
    assert stream.meta.info.classes == ["dark", "light"] and stream.meta.info.input_shape == [1, 8, 8]
    session = _run_in_process(cfg, tmp_path / "ckpt")
    assert session.reports[-1]["val_accuracy"] >= 0.9


# --------------------------------------------------------------------------------------
# Ray Train: each worker its own shard; validation exact for any number of workers
# --------------------------------------------------------------------------------------


def test_two_workers_stream_their_shards_and_report_the_one_process_metrics(ray_cluster, tmp_path):
    import torch
    import torch.nn.functional as F

    from trainyard.checkpoint import load_predictor
    from trainyard.train.driver import run_training

    frame = _breast_cancer_frame()
    folder = _write_parquet(frame, tmp_path / "table")
    cfg = _files_cfg(tmp_path, "mlp", {"uri": str(folder), "format": "parquet"}, "name=streamed",
                     "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "train.epochs=2",
                     "train.metrics=[loss,accuracy]")
    result = run_training(cfg)
    workers = json.loads((result.run_dir / "workers.json").read_text())
    assert sorted(w["rank"] for w in workers) == [0, 1]
    last = result.history[-1]

    # One process, from the checkpoint, on the same hash-split validation rows.
    x = frame.drop(columns="label").to_numpy(np.float32)
    held = row_buckets(x, cfg.seed) < round(cfg.data.val_fraction * VAL_BUCKETS)
    predictor = load_predictor(result.checkpoint)
    with torch.no_grad():
        out = predictor.forward(x[held]).float()
    y = torch.as_tensor(frame["label"].to_numpy()[held])
    assert last["val_loss"] == pytest.approx(float(F.cross_entropy(out, y)), abs=1e-5)
    assert last["val_accuracy"] == pytest.approx(float((out.argmax(1) == y).double().mean()), abs=1e-9)
    assert last["rss_peak_mb"] > 0


# --------------------------------------------------------------------------------------
# A third-party streaming dataset (the example plugin's): rows made by Ray Data tasks
# --------------------------------------------------------------------------------------


def test_a_third_party_streaming_dataset_trains_through_a_search(ray_cluster, tmp_path):
    from trainyard.tune.driver import run_tuning

    # The example plugin (examples/trainyard-example-plugin), installed like any package,
    # registers "spirals": a Ray Dataset made by Ray Data tasks.
    cfg = load_config(CONFIGS / "tune_mlp.yaml", [
        f"storage_path={tmp_path / 'runs'}", "data.name=spirals", "data.params={rows: 2000}",
        "tune.num_samples=2", "tune.scheduler=none", "train.epochs=2", "tune.max_concurrent_trials=1",
        "tune.space={train.lr: {type: choice, values: [0.01, 0.03]}}", "train.metrics=[accuracy]",
        f"tune.registry={tmp_path / 'registry'}", "data.stream.cache=true"])
    outcome = run_tuning(cfg)
    assert [t["state"] for t in outcome.trials] == ["TERMINATED", "TERMINATED"], outcome.trials
    assert outcome.winners and max(t["best"] for t in outcome.trials) > 0.7


# --------------------------------------------------------------------------------------
# Object storage: the files dataset reads a bucket through the same client code
# --------------------------------------------------------------------------------------


def test_parquet_in_a_bucket_streams_and_bad_credentials_are_one_line(ray_cluster, s3_bucket, s3_server,
                                                                      tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = _breast_cancer_frame()
    fs = s3_server.filesystem()
    bucket = s3_bucket.removeprefix("s3://")
    for i in range(2):
        part = frame.iloc[i * len(frame) // 2:(i + 1) * len(frame) // 2]
        with fs.open_output_stream(f"{bucket}/table/part-{i}.parquet") as f:
            pq.write_table(pa.Table.from_pandas(part, preserve_index=False), f)
    uri = f"{s3_bucket}/table/*.parquet"
    cfg = _files_cfg(tmp_path, "mlp", {"uri": uri, "format": "parquet"}, "train.epochs=2",
                     "train.metrics=[accuracy]")
    session = _run_in_process(cfg, tmp_path / "ckpt")
    assert session.reports[-1]["val_accuracy"] > 0.85

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-key")  # this process only
    with pytest.raises(ConfigError) as err:
        prepare_stream(resolve(cfg))
    message = str(err.value)
    assert "\n" not in message and message.startswith("data (files): ") and "table" in message, message


def test_a_search_too_wide_for_its_streams_names_its_concurrent_trials(ray_cluster):
    """The CPUs a search's trials hold leave none for Ray Data: the line names the setting
    that made them many, tune.max_concurrent_trials, not only the workers."""
    from trainyard.train.stream import check_data_cpus

    cfg = load_config(CONFIGS / "tune_mlp.yaml", ["scaling.cpus_per_worker=1"])
    with pytest.raises(ConfigError, match=r"cannot hold 64 trial\(s\) at once \(tune.max_concurrent_trials\) of 1 "
                                          r"worker\(s\) of 1 CPU plus one CPU for Ray Data's read .* lower "
                                          r"tune.max_concurrent_trials, scaling.cpus_per_worker"):
        check_data_cpus(cfg, trials=64)
    with pytest.raises(ConfigError, match=r"cannot hold 64 worker\(s\) of 1 CPU plus .* lower "
                                          r"scaling.cpus_per_worker \(e.g. 0.5\) or scaling.num_workers"):
        check_data_cpus(load_config(CONFIGS / "tune_mlp.yaml", ["scaling.cpus_per_worker=1", "scaling.num_workers=64",
                                                            "train.batch_size=64"]))
