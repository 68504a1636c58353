"""The conformance check a plugin author runs: it passes on every built-in plugin and
fails, naming the plugin, the entry and what is wrong, on plugins broken on purpose
(registered on the real plugin manager and removed afterwards). No Ray is started."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from trainyard import (
    DataInfo,
    DatasetSpec,
    LoadedData,
    MetricSpec,
    ModelSpec,
    Processor,
    Split,
    hookimpl,
)
from trainyard.conformance import assert_conforms, check_plugin
from trainyard.errors import ConfigError, PluginError

from tests.helpers_plugins import plugin_registered, unique

BUILTINS = ["mlp", "cnn", "bert", "tabular", "images", "text", "metrics"]
SMALL_BERT = {"max_length": 16, "hidden_size": 32, "num_layers": 1, "num_heads": 2,
              "intermediate_size": 64}
# Built-in datasets that read the user's own files: skipped, with the reason, not failed.
NEED_A_PATH = {"table", "text_file", "mnist", "fashion_mnist", "cifar10"}


@pytest.mark.parametrize("plugin", BUILTINS)
def test_every_builtin_plugin_passes_the_conformance_check(plugin):
    results = assert_conforms(plugin, model_params={"bert": SMALL_BERT} if plugin == "bert" else None)

    assert not [r for r in results if r.failed]
    for r in results:
        if r.status == "skipped":
            assert r.kind == "dataset" and r.entry in NEED_A_PATH, r
            assert "needs params" in r.detail and "path" in r.detail
    passed = {(r.kind, r.entry, r.check) for r in results if r.status == "passed"}
    if plugin in ("mlp", "cnn", "bert"):  # every model step ran, up to the checkpoint
        assert {c for k, e, c in passed if k == "model"} == {
            "params", "build", "forward", "backward", "decode", "checkpoint", "pickle"}
    if plugin == "metrics":
        assert ("metric", "loss", "value (regression)") in passed
        assert ("metric", "f1", "direction") in passed


def test_dataset_needing_a_path_passes_when_the_path_is_given(tmp_path):
    import pandas as pd

    path = tmp_path / "rows.csv"
    pd.DataFrame({"a": [1.0, 2, 3, 4], "b": [0.5, 1, 1, 2], "y": ["x", "y", "x", "y"]}).to_csv(path)
    results = check_plugin("tabular", dataset_params={"table": {"path": str(path), "label": "y"}})
    table = {r.check: r for r in results if r.entry == "table"}
    assert [r.status for r in table.values()] == ["passed"] * 3
    assert "2 classes" in table["contents"].detail


def test_params_for_an_entry_the_plugin_does_not_provide_are_rejected():
    with pytest.raises(ConfigError, match="'mlp' does not provide.*its models: mlp"):
        check_plugin("mlp", model_params={"cnn": {"channels": [2]}})


def test_unknown_plugin_is_an_error_listing_the_loaded_ones():
    with pytest.raises(PluginError, match="no plugin named 'nope' is loaded.*mlp"):
        check_plugin("nope")


# --------------------------------------------------------------------------------------
# Broken plugins
# --------------------------------------------------------------------------------------


class Rows(Processor):
    """Feature rows to a float tensor, shifted by the training mean kept in ``state``."""

    def fit(self, inputs):
        self.state = {"mean": np.asarray(inputs, dtype=np.float64).mean(axis=0).tolist()}

    def encode(self, inputs):
        import torch

        return torch.as_tensor(np.asarray(inputs, np.float32) - np.float32(self.state["mean"]))


class ForgetfulRows(Rows):
    """Learns its shift in fit() but keeps it outside ``state``: lost in a checkpoint."""

    def fit(self, inputs):
        self.shift = np.asarray(inputs, dtype=np.float32).mean(axis=0) + 5.0

    def encode(self, inputs):
        import torch

        return torch.as_tensor(np.asarray(inputs, np.float32) - getattr(self, "shift", 0.0))


class LockedRows(Rows):
    """Keeps a live generator (say, a stream of its cache) on itself: it cannot be pickled, so
    Ray cannot ship it to the data workers of a streamed dataset. (A threading.Lock was the
    first choice; in the whole suite's process something makes Ray's cloudpickle take one.)"""

    def fit(self, inputs):
        super().fit(inputs)
        self.stream = (row for row in range(3))


class ListScores(Rows):
    """Decodes with ``scores`` as a list, not a mapping from class name to score."""

    def decode(self, outputs):
        return [{**a, "scores": list(a["scores"].values())} for a in super().decode(outputs)]


class MissingScore(Rows):
    """Decodes with the score of the last class left out."""

    def decode(self, outputs):
        return [{**a, "scores": dict(list(a["scores"].items())[:-1])} for a in super().decode(outputs)]


class NoScores(Rows):
    """Decodes with a label only: serving's OIP route needs each class's score."""

    def decode(self, outputs):
        return [{k: v for k, v in a.items() if k != "scores"} for a in super().decode(outputs)]


class NanScores(Rows):
    """Decodes with scores that are not finite numbers (NaN, a string)."""

    def decode(self, outputs):
        answers = super().decode(outputs)
        for a in answers:
            first, *rest = a["scores"]
            a["scores"] = {first: float("nan"), **{c: "0.5" for c in rest}}
        return answers


def build_linear(params, info, processor):
    from torch import nn

    return nn.Linear(info.input_shape[0], info.num_outputs)


def build_too_wide(params, info, processor):
    from torch import nn

    return nn.Linear(info.input_shape[0], info.num_outputs + 2)


def build_detached(params, info, processor):
    from torch import nn

    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(info.input_shape[0], info.num_outputs)

        def forward(self, x):
            return self.linear(x).detach()

    return Detached()


def build_raising(params, info, processor):
    raise RuntimeError("no GPU kernel for this layer")


def load_misdeclared(params, seed):
    x = np.zeros((10, 3), np.float32)
    info = DataInfo("classification", "features", ["a", "b"], [3])
    return LoadedData(info, Split(x, np.array([0, 1, 2, 0, 1, 0, 1, 0, 1, 0])))


def load_wrong_width(params, seed):
    info = DataInfo("classification", "features", ["a", "b"], [4])
    return LoadedData(info, Split(np.zeros((6, 3), np.float32), np.array([0, 1] * 3)))


class Broken:
    """A plugin registering the given specs, each through its own hook."""

    def __init__(self, *specs):
        self.specs = specs

    def _register(self, register, kind):
        for spec in self.specs:
            if isinstance(spec, kind):
                register(spec)

    @hookimpl
    def register_models(self, register):
        self._register(register, ModelSpec)

    @hookimpl
    def register_datasets(self, register):
        self._register(register, DatasetSpec)

    @hookimpl
    def register_metrics(self, register):
        self._register(register, MetricSpec)


def failures_of(*specs) -> tuple[str, list]:
    """Register a plugin with ``specs``, check it, and return its name and failures."""
    name = unique("broken")
    with plugin_registered(Broken(*specs), name):
        results = check_plugin(name)
        with pytest.raises(AssertionError, match=f'plugin "{name}" does not conform'):
            assert_conforms(name)
    return name, [r for r in results if r.failed]


def model(build, processor=Rows):
    return ModelSpec(unique("model"), build, ["features"], processor)


def test_model_returning_the_wrong_shape_fails_naming_plugin_model_and_shapes():
    spec = model(build_too_wide)
    plugin, (failure,) = failures_of(spec)
    assert (failure.kind, failure.entry, failure.check) == ("model", spec.name, "forward")
    text = str(failure)
    assert f'plugin "{plugin}"' in text and f"model {spec.name!r}" in text
    assert "forward returned shape [8, 4]" in text and "expected [8, 2]" in text
    assert "Traceback" not in text


def test_processor_that_does_not_round_trip_through_a_checkpoint_fails():
    spec = model(build_linear, ForgetfulRows)
    _, (failure,) = failures_of(spec)
    assert (failure.entry, failure.check) == (spec.name, "checkpoint")
    assert "answers the same raw inputs differently" in failure.detail
    assert "save() must keep everything fit() learnt" in failure.detail


def test_the_same_model_with_a_processor_that_keeps_its_state_passes():
    spec = model(build_linear, Rows)
    name = unique("sound")
    with plugin_registered(Broken(spec), name):
        results = assert_conforms(name)
    assert [r.check for r in results if r.kind == "model"][-2:] == ["checkpoint", "pickle"]


def test_processor_that_cannot_be_pickled_fails_naming_its_class_and_why():
    spec = model(build_linear, LockedRows)
    _, (failure,) = failures_of(spec)
    assert (failure.entry, failure.check) == (spec.name, "pickle")
    assert "the fitted processor LockedRows cannot be pickled" in failure.detail
    assert "cannot pickle 'generator' object" in failure.detail
    assert "Ray pickles it to ship it to the data workers of a streamed dataset" in failure.detail
    assert "\n" not in failure.detail and "Traceback" not in failure.detail


@pytest.mark.parametrize(
    ("processor", "expected"),
    [
        (ListScores, "gave scores of type list ["),
        (MissingScore, "gave scores without the classes ['benign']"),
        (NanScores, "gave scores that are not finite numbers: 'malignant': nan, 'benign': '0.5'"),
        (NoScores, "gave an answer without scores"),
    ],
    ids=["list", "missing", "not-finite", "absent"],
)
def test_decode_whose_scores_are_not_a_number_per_class_fails_naming_what_it_gave(processor, expected):
    spec = model(build_linear, processor)
    _, (failure,) = failures_of(spec)
    assert (failure.entry, failure.check) == (spec.name, "decode")
    assert expected in failure.detail
    assert "scores must map each class name in info.classes" in failure.detail
    assert "\n" not in failure.detail


def test_model_whose_output_is_detached_fails_at_backward():
    spec = model(build_detached)
    _, (failure,) = failures_of(spec)
    assert failure.check == "backward" and "no parameter received a gradient" in failure.detail


def test_model_whose_build_raises_fails_with_the_error_and_where_not_a_traceback():
    spec = model(build_raising)
    _, (failure,) = failures_of(spec)
    assert failure.check == "build"
    assert failure.detail.startswith("RuntimeError: no GPU kernel for this layer")
    assert "test_conformance.py:" in failure.detail and "in build_raising" in failure.detail
    assert "\n" not in failure.detail


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (lambda o, t, i: float("nan"), "returned nan; a metric must return a finite float"),
        (lambda o, t, i: [0.5], "returned list [0.5]; a metric must return one float"),
        (lambda o, t, i: "0.5", "returned str '0.5'"),
        (lambda o, t, i: None, "returned NoneType"),
    ],
    ids=["nan", "list", "str", "none"],
)
def test_metric_not_returning_a_finite_float_fails_naming_the_metric(fn, expected):
    spec = MetricSpec(unique("metric"), fn, "classification", "max")
    plugin, (failure,) = failures_of(spec)
    assert (failure.kind, failure.entry, failure.check) == ("metric", spec.name, "value")
    assert expected in failure.detail
    assert f'plugin "{plugin}", metric {spec.name!r}' in str(failure)


def test_metric_whose_mode_is_the_wrong_way_round_fails():
    def error_rate(outputs, targets, info):
        return float((np.asarray(outputs).argmax(1) != np.asarray(targets)).mean())

    spec = MetricSpec(unique("metric"), error_rate, "classification", "max")  # should be min
    _, (failure,) = failures_of(spec)
    assert failure.check == "direction"
    assert "declared mode 'max'" in failure.detail and "perfect predictions score 0" in failure.detail


def test_metric_for_any_task_is_checked_on_both_tasks():
    spec = MetricSpec(unique("metric"), lambda o, t, i: float(np.asarray(o).ravel()[0] > 9), "any")
    name = unique("any_task")
    with plugin_registered(Broken(spec), name):
        results = check_plugin(name)
    assert {r.check for r in results if r.kind == "metric"} == {
        "value (classification)", "direction (classification)",
        "value (regression)", "direction (regression)"}


@pytest.mark.parametrize(
    ("load", "expected"),
    [
        (load_misdeclared, "the train split: targets run from 0 to 2, outside the 2 classes"),
        (load_wrong_width, "inputs of shape [6, 3] do not match DataInfo.input_shape [4]"),
    ],
    ids=["targets", "shape"],
)
def test_dataset_yielding_what_its_info_does_not_declare_fails(load, expected):
    spec = DatasetSpec(unique("data"), load, "features")
    _, (failure,) = failures_of(spec)
    assert (failure.kind, failure.entry, failure.check) == ("dataset", spec.name, "contents")
    assert expected in failure.detail


def test_dataset_declaring_another_input_kind_than_it_loads_fails():
    spec = DatasetSpec(unique("data"), load_wrong_width, "image")
    _, (failure,) = failures_of(spec)
    assert "declares inputs 'image' but the loaded DataInfo says 'features'" in failure.detail


def test_plugin_that_fails_to_load_is_reported_by_the_check_with_the_load_problem():
    class Raising:
        @hookimpl
        def register_metrics(self, register):
            raise KeyError("metric table")

    name = unique("raising")
    with plugin_registered(Raising(), name):
        (failure,) = check_plugin(name)
    assert (failure.kind, failure.check, failure.status) == ("plugin", "load", "failed")
    assert "register_metrics raised KeyError" in failure.detail


def test_plugin_registering_nothing_fails():
    class Empty:
        @hookimpl
        def register_models(self, register):
            pass

    name = unique("empty")
    with plugin_registered(Empty(), name):
        (failure,) = check_plugin(name)
    assert "registers no model, dataset or metric" in failure.detail


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------


def _cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "trainyard.cli", "plugins", "check", *args],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "COLUMNS": "200", **env})


def test_plugins_check_command_passes_the_mlp_plugin():
    out = _cli("mlp")
    assert out.returncode == 0, out.stdout + out.stderr
    assert 'plugin "mlp" conforms to the plugin contract: 8 passed, 0 failed, 0 skipped' in out.stdout
    assert "checkpoint" in out.stdout and "FAILED" not in out.stdout


def test_plugins_check_command_on_an_unknown_plugin_exits_non_zero_with_a_clear_error():
    out = _cli("no_such_plugin")
    assert out.returncode != 0
    assert "error: no plugin named 'no_such_plugin' is loaded" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


WIDE_PLUGIN = """
from torch import nn
from trainyard import ModelSpec, hookimpl
from trainyard.hookspecs import Processor

class Rows(Processor):
    def encode(self, inputs):
        import torch
        return torch.as_tensor(inputs, dtype=torch.float32)

def build(params, info, processor):
    return nn.Linear(info.input_shape[0], info.num_outputs + 1)

@hookimpl
def register_models(register):
    register(ModelSpec("{model}", build, ["features"], Rows))
"""


def test_plugins_check_command_on_an_installed_broken_plugin_exits_1_naming_what_fails(tmp_path):
    from tests.helpers_plugins import make_distribution

    plugin, module, model_name = unique("wide"), unique("wide_mod"), unique("wide_model")
    make_distribution(tmp_path, unique("trainyard_wide"), {plugin: module},
                      {module: WIDE_PLUGIN.format(model=model_name)})
    out = _cli(plugin, PYTHONPATH=str(tmp_path))
    assert out.returncode == 1, out.stdout + out.stderr
    assert (f'FAILED plugin "{plugin}", model {model_name!r}, check \'forward\': failed: '
            "forward returned shape [8, 3]") in out.stdout
    assert f'plugin "{plugin}" FAILS the plugin contract: 3 passed, 1 failed, 0 skipped' in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


def test_plugins_check_of_a_streaming_dataset_shows_its_table_not_ray_datas_logs(tmp_path):
    import pandas as pd

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 2))
    pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "label": (x[:, 0] > 0).astype(int)}).to_parquet(tmp_path / "t.parquet")
    out = _cli("files", f"dataset.files.uri={tmp_path / 't.parquet'}", "dataset.files.label=label")
    assert out.returncode == 0, out.stdout + out.stderr
    assert 'plugin "files" conforms to the plugin contract: 4 passed, 0 failed, 0 skipped' in out.stdout
    both = out.stdout + out.stderr
    # Ray Data's progress bars, execution plans and notices stay in the session's log.
    for noise in (" INFO ", "Parquet dataset sampling", "Progress bars disabled", "Running Dataset"):
        assert noise not in both, both
