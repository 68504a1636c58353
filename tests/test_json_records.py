"""The JSON trainyard writes for people and their tools (metrics.jsonl, a search's history,
--json) is strict JSON: a NaN or infinite metric is null, which jq, JSON.parse and every
other parser read, not Python's bare NaN. trainyard reads its own rows back as NaN, as it
held them. No Ray: the writers and readers themselves."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np


def strict(text: str):
    """Parse as a strict parser does: NaN, Infinity and -Infinity are refused."""
    def refuse(word: str):
        raise ValueError(f"not JSON: {word}")

    return json.loads(text, parse_constant=refuse)


def test_dumps_writes_every_non_finite_float_as_null_and_leaves_the_rest():
    from trainyard.jsontext import dumps

    value = {"a": math.nan, "b": [1, math.inf, (-math.inf, 2.5)], "c": np.float32("nan"), "d": np.float64(0.25),
             "e": True, "f": 7, "g": "NaN", "h": None, "nested": {"x": [{"y": float("nan")}]}}
    assert strict(dumps(value)) == {"a": None, "b": [1, None, [None, 2.5]], "c": None, "d": 0.25, "e": True,
                                    "f": 7, "g": "NaN", "h": None, "nested": {"x": [{"y": None}]}}
    assert "NaN" not in dumps([math.nan]) and "Infinity" not in dumps([math.inf])


def test_a_runs_metrics_file_holds_null_for_a_nan_metric_and_the_run_reads_it_back_as_nan(tmp_path):
    from trainyard.train.driver import _MetricsLog

    path = tmp_path / "metrics.jsonl"
    log = _MetricsLog(path)
    log.add({"epoch": 0, "train_loss": 0.5, "val_loss": 0.4, "val_r2": math.nan, "lr": 0.01})
    log.add({"epoch": 1, "train_loss": math.inf, "val_loss": 0.3, "val_r2": 0.1, "lr": 0.01})
    rows = [strict(line) for line in path.read_text().splitlines()]
    assert rows[0]["val_r2"] is None and rows[1]["train_loss"] is None
    assert rows[0]["val_loss"] == 0.4 and rows[1]["epoch"] == 1

    again = _MetricsLog(path)  # as a resumed run reads it
    assert again.skipped == 0
    assert math.isnan(again.history[0]["val_r2"]) and math.isnan(again.history[1]["train_loss"])
    assert again.history[1]["val_r2"] == 0.1 and again.history[0]["epoch"] == 0


def test_a_searchs_history_holds_null_for_a_nan_metric_and_reads_back_nan_keeping_its_config(tmp_path):
    from trainyard.tune.pbt import HistoryRecorder
    from trainyard.tune.records import HISTORY, read_history

    recorder = HistoryRecorder(tmp_path, keys=["train.lr", "model.params.dropout"])
    trial = SimpleNamespace(trial_id="t1", config={"train.lr": 0.01, "model.params.dropout": None})
    for i, loss in enumerate([math.nan, 0.2]):
        recorder.on_trial_result(i, [trial], trial, {"training_iteration": i + 1, "epoch": i, "val_loss": loss,
                                                     "train_loss": -math.inf, "ignored": 1})
    rows = [strict(line) for line in (tmp_path / HISTORY).read_text().splitlines()]
    assert [r["val_loss"] for r in rows] == [None, 0.2] and rows[0]["train_loss"] is None
    assert "ignored" not in rows[0]

    (first, second) = read_history(tmp_path)["t1"]
    assert math.isnan(first["val_loss"]) and math.isnan(first["train_loss"]) and second["val_loss"] == 0.2
    assert first["config"] == {"train.lr": 0.01, "model.params.dropout": None}  # a param's null stays None
    assert first["trial"] == "t1"


def test_the_cli_json_document_is_strict_json(capsys):
    from trainyard.cli import _print_json

    _print_json({"trials": [{"best": math.nan, "final": math.inf, "iterations": 3}], "winners": []})
    assert strict(capsys.readouterr().out) == {"trials": [{"best": None, "final": None, "iterations": 3}],
                                               "winners": []}
