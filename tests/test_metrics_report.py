"""The scikit-learn metrics (roc_auc, log_loss, r2) against direct scikit-learn calls, and
the tuning report's confusion matrix of the winner, checked on a real checkpoint against
scikit-learn's confusion_matrix of the predictor's own predictions. No Ray."""

from __future__ import annotations

import json
import math
import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from trainyard import DataInfo
from trainyard.checkpoint import load_predictor, write_checkpoint
from trainyard.config import load_config, resolve
from trainyard.conformance import check_plugin
from trainyard.plugins import get_registry
from trainyard.train.data import prepare_data
from trainyard.ui.report import validation_split, write_report

# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def metric(name: str):
    return get_registry().get("metric", name).fn


def softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def multiclass():
    rng = np.random.default_rng(3)
    targets = np.arange(80) % 4
    outputs = (rng.normal(size=(80, 4)) + 1.5 * np.eye(4)[targets]).astype(np.float32)
    return outputs, targets, DataInfo("classification", "features", ["a", "b", "c", "d"], [4])


@pytest.fixture
def binary():
    rng = np.random.default_rng(5)
    targets = rng.integers(0, 2, 70)
    outputs = (rng.normal(size=(70, 2)) + np.eye(2)[targets]).astype(np.float32)
    return outputs, targets, DataInfo("classification", "features", ["neg", "pos"], [3])


def test_new_metrics_are_registered_opt_in_with_their_task_and_mode():
    registry = get_registry()
    for name, task, mode in [("roc_auc", "classification", "max"),
                             ("log_loss", "classification", "min"), ("r2", "regression", "max")]:
        spec = registry.get("metric", name)
        assert (spec.task, spec.mode, spec.default) == (task, mode, False)
        assert registry.owner("metric", name) == "metrics"
    defaults = {n for n, s in registry.metrics.items() if s.default}
    assert defaults == {"loss", "accuracy", "f1", "mse", "mae"}  # jobs' defaults unchanged


def test_roc_auc_binary_is_sklearn_on_the_positive_class_probability(binary):
    outputs, targets, info = binary
    expected = skm.roc_auc_score(targets, softmax(outputs)[:, 1])
    assert metric("roc_auc")(outputs, targets, info) == pytest.approx(expected, rel=1e-12)
    # the same ranking as the raw logit difference: AUC only sees the order
    assert expected == pytest.approx(skm.roc_auc_score(targets, outputs[:, 1] - outputs[:, 0]))


def test_roc_auc_multiclass_is_sklearn_ovr_macro(multiclass):
    outputs, targets, info = multiclass
    expected = skm.roc_auc_score(targets, softmax(outputs), multi_class="ovr", average="macro",
                                 labels=[0, 1, 2, 3])
    value = metric("roc_auc")(outputs, targets, info)
    assert isinstance(value, float) and value == pytest.approx(expected, rel=1e-12)
    assert 0.5 < value < 1.0


def test_roc_auc_is_nan_not_an_error_when_the_split_lacks_a_class(multiclass, binary):
    outputs, targets, info = multiclass
    keep = targets != 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning either
        assert math.isnan(metric("roc_auc")(outputs[keep], targets[keep], info))
        b_out, b_tgt, b_info = binary
        assert math.isnan(metric("roc_auc")(b_out[b_tgt == 1], b_tgt[b_tgt == 1], b_info))


def test_log_loss_is_sklearn_with_all_classes(multiclass):
    outputs, targets, info = multiclass
    expected = skm.log_loss(targets, softmax(outputs), labels=[0, 1, 2, 3])
    assert metric("log_loss")(outputs, targets, info) == pytest.approx(expected, rel=1e-12)
    # labels= all classes: a split without class 3 still scores (4 probability columns)
    keep = targets != 3
    expected = skm.log_loss(targets[keep], softmax(outputs[keep]), labels=[0, 1, 2, 3])
    assert metric("log_loss")(outputs[keep], targets[keep], info) == pytest.approx(expected)
    # and equals the cross-entropy loss where no probability is clipped
    assert metric("log_loss")(outputs, targets, info) == pytest.approx(
        metric("loss")(outputs, targets, info), rel=1e-9)


def test_r2_is_sklearn_for_one_and_several_targets():
    rng = np.random.default_rng(11)
    one = DataInfo("regression", "features", input_shape=[2], target_names=["y"])
    targets = rng.normal(size=50)
    outputs = (targets + 0.3 * rng.normal(size=50)).reshape(-1, 1).astype(np.float32)
    assert metric("r2")(outputs, targets, one) == pytest.approx(
        skm.r2_score(targets, outputs[:, 0]), rel=1e-6)
    two = DataInfo("regression", "features", input_shape=[2], target_names=["y", "z"])
    targets2 = rng.normal(size=(50, 2)) * [1.0, 10.0]
    outputs2 = targets2 + rng.normal(size=(50, 2))
    assert metric("r2")(outputs2, targets2, two) == pytest.approx(skm.r2_score(targets2, outputs2))


def test_new_metrics_pass_the_conformance_check():
    results = check_plugin("metrics")
    passed = {(r.entry, r.check) for r in results if r.status == "passed"}
    assert not [r for r in results if r.failed]
    for name in ("roc_auc", "log_loss", "r2"):
        assert {(name, "value"), (name, "direction")} <= passed


# --------------------------------------------------------------------------------------
# The report's confusion matrix
# --------------------------------------------------------------------------------------

HOSTILE = "<img src=x onerror=alert(1)>"
CLASSES = [HOSTILE, "bird & co", "cat"]


def write_table(path: Path, task: str = "classification") -> Path:
    rng = np.random.default_rng(0)
    n = 150
    y = np.arange(n) % 3
    x = rng.normal(size=(n, 3)) + 1.2 * np.eye(3)[y]
    with path.open("w") as f:
        f.write("f0,f1,f2,label\n")
        for row, label in zip(x, y):
            target = CLASSES[label] if task == "classification" else f"{row.sum():.4f}"
            f.write(",".join(f"{v:.5f}" for v in row) + f",{target}\n")
    return path


def make_winner(folder: Path, table: Path, task: str = "classification") -> Path:
    """A real checkpoint of a briefly trained MLP on the table, as a tune trial writes it."""
    job = resolve(load_config(base={
        "name": "cm_run", "seed": 0,
        "model": {"name": "mlp", "params": {"hidden": [8]}},
        "data": {"name": "table", "params": {"path": str(table), "task": task},
                 "val_fraction": 0.3},
        "train": {"metrics": ["accuracy" if task == "classification" else "mse"]},
    }))
    data = prepare_data(job)
    torch.manual_seed(0)
    model = job.model.build(job.model_params, data.info, data.processor)
    if task == "classification":  # a few steps, so the matrix is neither empty nor diagonal
        from trainyard.batches import call_model

        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(call_model(model, data.x_train), data.y_train).backward()
            opt.step()
    model.eval()
    write_checkpoint(folder, job=job, model=model, processor=data.processor, info=data.info,
                     epoch=4, metrics={}, plugin="mlp")
    return folder


def make_run(tmp_path: Path, winner: Path | None, metric: str = "val_accuracy",
             history: list[float] | None = None) -> Path:
    """A run folder laid out as ``trainyard tune`` leaves it (trainyard_trials.json)."""
    run = tmp_path / "run"
    run.mkdir()
    values = history or [0.6, 0.8]
    trial = {
        "trial_id": "trial_0", "params": {"train.lr": 0.01}, "state": "TERMINATED", "error": "",
        "iterations": len(values), "final": values[-1], "best": max(values),
        "history": [{"iteration": i + 1, metric: v} for i, v in enumerate(values)],
        "checkpoint": str(winner), "path": str(tmp_path / "trial_0"),
    }
    winners = [] if winner is None else [
        {"rank": 1, "trial_id": "trial_0", "metric": metric, "mode": "max",
         "value": max(values), "path": str(winner)}]
    (run / "trainyard_trials.json").write_text(json.dumps(
        {"metric": metric, "mode": "max", "max_t": 2, "trials": [trial], "winners": winners}))
    return run


class _Confusion(HTMLParser):
    """The counts and the header names of the page's table#confusion."""

    def __init__(self):
        super().__init__()
        self.inside = False
        self.cell = None
        self.rows: list[list[int]] = []
        self.pred: list[str] = []
        self.true: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id") == "confusion":
            self.inside = True
        if not self.inside:
            return
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self.cell = (tag, attrs.get("class"), [])

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[2].append(data)

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = False
        if tag in ("td", "th") and self.cell is not None:
            kind, cls, text = self.cell
            text = "".join(text)
            if kind == "td" and cls == "cm":
                self.rows[-1].append(int(text))
            elif cls == "pred":
                self.pred.append(text)
            elif cls == "true":
                self.true.append(text)
            self.cell = None


def parse(page: str) -> _Confusion:
    parser = _Confusion()
    parser.feed(page)
    parser.rows = [r for r in parser.rows if r]  # the header row has no counts
    return parser


def test_report_shows_the_winners_confusion_matrix_equal_to_sklearn(tmp_path):
    table = write_table(tmp_path / "data.csv")
    winner = make_winner(tmp_path / "winner", table)
    page = write_report(make_run(tmp_path, winner)).read_text(encoding="utf-8")

    # the expected matrix, computed independently: the predictor on the validation split
    predictor = load_predictor(winner)
    val = validation_split(winner)
    predicted = predictor.forward(val.inputs).numpy().argmax(axis=1)
    expected = skm.confusion_matrix(val.targets, predicted, labels=[0, 1, 2])
    assert predictor.info.classes == sorted(CLASSES)
    assert len(val) == 45 and np.bincount(val.targets).tolist() == [15, 15, 15]
    # the split the report uses is the one training validated on
    trained = prepare_data(resolve(load_config(winner / "job.yaml")))
    assert np.array_equal(val.targets, trained.y_val.numpy())

    got = parse(page)
    assert np.array_equal(np.array(got.rows), expected), (got.rows, expected)
    assert got.pred == got.true == predictor.info.classes  # class names, in index order
    assert np.count_nonzero(expected) > 3  # neither empty nor a bare diagonal
    correct = int(np.trace(expected))
    assert f"45 examples, {correct} correct" in page
    # the class names are text: the hostile label never becomes an element
    assert "img" not in got.tags and "<img" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "bird &amp; co" in page


def test_report_says_why_there_is_no_matrix_in_one_line(tmp_path):
    # no winner
    (tmp_path / "a").mkdir()
    page = write_report(make_run(tmp_path / "a", None)).read_text()
    assert "No confusion matrix: no trial finished, so there is no winner." in page

    # a regression task
    (tmp_path / "b").mkdir()
    reg = make_winner(tmp_path / "b" / "winner", write_table(tmp_path / "b.csv", "regression"),
                      "regression")
    page = write_report(make_run(tmp_path / "b", reg, "val_mse")).read_text()
    assert "No confusion matrix: the task is regression, not classification." in page

    # the dataset is not loadable here (its file is gone): the report is still written
    (tmp_path / "c").mkdir()
    table = write_table(tmp_path / "c.csv")
    winner = make_winner(tmp_path / "c" / "winner", table)
    table.unlink()
    page = write_report(make_run(tmp_path / "c", winner)).read_text()
    (line,) = [ln for ln in page.splitlines() if "No confusion matrix" in ln]
    assert "the validation data could not be loaded here" in line and "does not exist" in line
    assert 'id="confusion"' not in page and "Trials</h2>" in page

    # a winner path that is not a checkpoint
    (tmp_path / "d").mkdir()
    page = write_report(make_run(tmp_path / "d", tmp_path / "nowhere")).read_text()
    assert "is not a folder on this machine" in page


def test_report_draws_curves_when_the_metric_is_nan_at_some_or_every_epoch(tmp_path):
    (tmp_path / "a").mkdir()
    run = make_run(tmp_path / "a", None, "val_roc_auc", [float("nan"), 0.7, 0.8])
    page = write_report(run).read_text()
    assert "learning curves" in page and "nan," not in page
    (tmp_path / "b").mkdir()
    run = make_run(tmp_path / "b", None, "val_roc_auc", [float("nan"), float("nan")])
    page = write_report(run).read_text()  # was: ValueError, min() of an empty list
    assert "Trials</h2>" in page
