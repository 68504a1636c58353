"""The example plugin's own tests, as a plugin author writes them: the conformance check
on the installed plugin, plus a test of each thing it provides. The conformance check reads
a few rows of the streaming dataset, which starts an embedded Ray (or uses the one running)."""

from __future__ import annotations

import numpy as np
import pytest
from trainyard.conformance import assert_conforms, check_plugin
from trainyard.plugins import get_registry
from trainyard_example.plugin import balanced_accuracy

PLUGIN = "example"  # the entry-point name in pyproject.toml


def test_the_example_plugin_conforms_to_the_trainyard_contract():
    results = assert_conforms(PLUGIN)
    checked = {(r.kind, r.entry) for r in results if r.status == "passed"}
    assert {("model", "resmlp"), ("dataset", "wine"), ("dataset", "spirals"),
            ("metric", "balanced_accuracy")} <= checked
    assert all(r.status == "passed" for r in results)


def test_it_is_found_through_its_entry_point_with_its_distribution():
    registry = get_registry()
    info = next(p for p in registry.plugins if p.name == PLUGIN)
    assert (info.distribution, info.version, info.module) == (
        "trainyard-example-plugin", "0.1.0", "trainyard_example.plugin")
    assert registry.owner("model", "resmlp") == PLUGIN
    assert registry.owner("dataset", "wine") == PLUGIN
    assert registry.owner("metric", "balanced_accuracy") == PLUGIN


def test_wine_has_178_rows_of_13_features_in_3_classes():
    data = get_registry().get("dataset", "wine").load(None, 0)
    assert data.train.inputs.shape == (178, 13)
    assert data.info.classes == ["class_0", "class_1", "class_2"]
    assert np.bincount(data.train.targets).tolist() == [59, 71, 48]


def test_balanced_accuracy_is_the_mean_per_class_recall():
    targets = np.array([0, 0, 0, 0, 1, 1])
    predicted = np.array([0, 0, 0, 0, 0, 1])  # recall 1.0 and 0.5; accuracy would be 5/6
    outputs = np.eye(2)[predicted]
    assert balanced_accuracy(outputs, targets, None) == pytest.approx(0.75)


def test_resmlp_width_and_blocks_are_honoured():
    check = check_plugin(PLUGIN, model_params={"resmlp": {"width": 8, "blocks": 0}})
    assert not [r for r in check if r.failed]
    assert any(r.check == "params" and "width=8, blocks=0" in r.detail for r in check)
