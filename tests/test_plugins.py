"""The plugin contract and every load-time error, on the real plugin manager.

Plugins are registered with ``register_plugin`` (and removed in ``finally``) or installed
as real distributions on disk that ``importlib.metadata`` finds through ``sys.path``.
None of this starts Ray.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import trainyard
from trainyard import (
    DataInfo,
    DatasetSpec,
    LoadedData,
    MetricSpec,
    ModelSpec,
    Split,
    hookimpl,
    plugins,
)
from trainyard.config import load_config, resolve
from trainyard.errors import PluginError

from tests.helpers_plugins import make_distribution, plugin_registered, registry_snapshot, unique

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
MLP_CONFIG = ROOT / "configs" / "mlp_breast_cancer.yaml"

BUILTIN_MODELS = {"mlp", "cnn", "bert"}
BUILTIN_DATASETS = {
    "breast_cancer",
    "digits",
    "sentiment",
    "table",
    "text_file",
    "mnist",
    "fashion_mnist",
    "cifar10",
}
BUILTIN_METRICS = {"accuracy", "precision", "recall", "f1", "loss", "mse", "mae"}


def _build_linear(params, info, processor):
    from torch import nn

    return nn.Linear(info.input_shape[0], info.num_outputs)


def _problems_of(name: str) -> list[str]:
    return [p.message for p in plugins.get_registry().problems if p.plugin == name]


def _assert_not_registered(name: str, before: dict) -> None:
    assert plugins.get_plugin_manager().get_plugin(name) is None
    assert registry_snapshot() == before


# --------------------------------------------------------------------------------------
# Built-ins are plugins
# --------------------------------------------------------------------------------------


def test_builtin_plugins_are_found_through_the_trainyard_entry_points():
    declared = {
        ep.name: ep.value
        for ep in importlib.metadata.entry_points(group=plugins.ENTRY_POINT_GROUP)
        if ep.dist is not None and ep.dist.metadata["Name"] == "trainyard"
    }
    assert set(declared) == {"mlp", "cnn", "bert", "tabular", "images", "text", "metrics", "files"}

    registry = plugins.get_registry()
    assert BUILTIN_MODELS <= set(registry.models)
    assert BUILTIN_DATASETS <= set(registry.datasets)
    assert BUILTIN_METRICS <= set(registry.metrics)
    assert registry.problems == []

    infos = {info.name: info for info in registry.plugins}
    for name, module in declared.items():
        assert infos[name].builtin
        assert infos[name].distribution == "trainyard"
        assert infos[name].version == trainyard.__version__ == "0.1.0"
        assert infos[name].module == module
    assert registry.owner("model", "mlp") == "mlp"
    assert registry.owner("dataset", "digits") == "images"
    assert registry.owner("metric", "f1") == "metrics"
    assert set(infos["tabular"].provides["dataset"]) == {"breast_cancer", "table"}


def test_core_package_never_imports_a_plugin_by_name():
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "platform" / "trainyard").rglob("*.py")
        if "trainyard_builtins" in path.read_text()
    ]
    assert offenders == []


def test_hookimpl_import_does_not_pull_in_torch_or_ray():
    code = (
        "import trainyard, sys\n"
        "from trainyard import hookimpl, ModelSpec, DatasetSpec, MetricSpec\n"
        "heavy = [m for m in ('torch', 'ray') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_plugins_load_lazily_on_first_use_and_only_once():
    code = (
        "import sys, trainyard.plugins as p\n"
        "assert not [m for m in sys.modules if m.startswith('trainyard_builtins')]\n"
        "pm = p.get_plugin_manager()\n"
        "assert 'trainyard_builtins.mlp' in sys.modules\n"
        "assert p.get_plugin_manager() is pm\n"
        "assert p.get_registry() is p.get_registry()\n"
        "assert 'ray' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_hookspec_docstrings_document_each_hook_argument():
    for name, spec in plugins.describe_hooks().items():
        doc = inspect.getdoc(spec) or ""
        for arg in inspect.signature(spec).parameters:
            assert f":param {arg}:" in doc, f"{name} does not document {arg!r}"
        assert ":return:" in doc


# --------------------------------------------------------------------------------------
# One test per hook (enforced below), each with a third-party-style plugin
# --------------------------------------------------------------------------------------


class LinearProbePlugin:
    @hookimpl
    def register_models(self, register):
        register(
            ModelSpec(
                "linear_probe",
                build=_build_linear,
                inputs=["features"],
                processor=_features_processor(),
                description="one linear layer",
            )
        )


def _features_processor():
    from trainyard_builtins.mlp import FeatureProcessor  # a third party may reuse it

    return FeatureProcessor


def test_register_models_makes_a_third_party_model_usable_in_a_config():
    with plugin_registered(LinearProbePlugin(), "probe_models"):
        registry = plugins.get_registry()
        assert registry.owner("model", "linear_probe") == "probe_models"
        info = next(i for i in registry.plugins if i.name == "probe_models")
        assert info.provides["model"] == ["linear_probe"] and not info.builtin

        job = resolve(
            load_config(
                base={
                    "name": "probe",
                    "model": {"name": "linear_probe"},
                    "data": {"name": "breast_cancer"},
                }
            )
        )
        assert job.model.name == "linear_probe" and job.model_params is None
        data = job.dataset.load(job.data_params, 0)
        processor = job.model.processor(job.model_params, data.info)
        processor.fit(data.train.inputs)
        model = job.model.build(job.model_params, data.info, processor)
        assert tuple(model(processor.encode(data.train.inputs[:3])).shape) == (3, 2)
    assert "linear_probe" not in plugins.get_registry().models


@dataclass
class ToyParams:
    rows: int = 40


def _load_toy(params: ToyParams, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(params.rows, 3)).astype(np.float32)
    info = DataInfo("regression", "features", input_shape=[3], target_names=["y"])
    return LoadedData(info, Split(x, x.sum(axis=1)))


class ToyDatasetPlugin:
    @hookimpl
    def register_datasets(self, register):
        register(DatasetSpec("toy_regression", _load_toy, "features", "regression", ToyParams))


def test_register_datasets_makes_a_third_party_dataset_usable_in_a_config():
    with plugin_registered(ToyDatasetPlugin(), "toy_data"):
        assert plugins.get_registry().owner("dataset", "toy_regression") == "toy_data"
        job = resolve(
            load_config(
                MLP_CONFIG, ["data.name=toy_regression", "data.params.rows=25", "train.metrics=[]"]
            )
        )
        assert job.task == "regression"
        assert job.config.train.metrics == ["loss", "mse", "mae"]
        assert job.data_params == ToyParams(rows=25)
        assert len(job.dataset.load(job.data_params, 0).train) == 25
    assert "toy_regression" not in plugins.get_registry().datasets


def _max_error(outputs, targets, info):
    return float(np.abs(np.asarray(outputs).reshape(-1) - np.asarray(targets)).max())


class MaxErrorPlugin:
    @hookimpl
    def register_metrics(self, register):
        register(MetricSpec("max_error", _max_error, "regression", "min", "largest error"))


def test_register_metrics_makes_a_third_party_metric_usable_in_a_config():
    with (
        plugin_registered(MaxErrorPlugin(), "max_error_metric"),
        plugin_registered(ToyDatasetPlugin(), "toy_data"),
    ):
        job = resolve(
            load_config(
                MLP_CONFIG,
                [
                    "data.name=toy_regression",
                    "train.metrics=[mse,max_error]",
                    "train.monitor=max_error",
                ],
            )
        )
        assert [m.name for m in job.metrics] == ["mse", "max_error"]
        assert job.monitor == "max_error" and job.monitor_mode == "min"
        outputs, targets = np.array([[1.0], [2.0], [4.0]]), np.array([1.0, 2.5, 3.0])
        assert job.metrics[1].fn(outputs, targets, None) == pytest.approx(1.0)
    assert "max_error" not in plugins.get_registry().metrics


def _test_function_names() -> set[str]:
    names = set()
    for path in TESTS.glob("test_*.py"):
        names |= set(re.findall(r"^\s*(?:async\s+)?def (test_\w+)", path.read_text(), re.MULTILINE))
    return names


@pytest.mark.parametrize("hook", plugins.hook_names())
def test_every_hook_has_a_test_of_its_own(hook):
    assert any(name.startswith(f"test_{hook}_") for name in _test_function_names()), (
        f"no test named test_{hook}_... in tests/"
    )


# --------------------------------------------------------------------------------------
# Contract violations when registering
# --------------------------------------------------------------------------------------


class MisspelledHookPlugin:
    @hookimpl
    def register_model(self, register):  # the hook is register_models
        register(ModelSpec("never", build=_build_linear, inputs=["features"]))


def test_misspelled_hook_is_rejected_naming_the_plugin_and_the_hook():
    before = registry_snapshot()
    try:
        with pytest.raises(PluginError) as err:
            plugins.register_plugin(MisspelledHookPlugin(), "typo_plugin")
        assert '"typo_plugin"' in str(err.value)
        assert "register_model" in str(err.value)
        assert "register_models" in str(err.value)  # the known hooks, to spot the typo
    finally:
        plugins.unregister_plugin("typo_plugin")
    _assert_not_registered("typo_plugin", before)


class ExtraArgumentPlugin:
    @hookimpl
    def register_datasets(self, register, cluster):
        pass


def test_hookimpl_taking_an_argument_the_spec_lacks_is_rejected_naming_plugin_and_hook():
    before = registry_snapshot()
    try:
        with pytest.raises(PluginError) as err:
            plugins.register_plugin(ExtraArgumentPlugin(), "greedy_plugin")
        assert '"greedy_plugin"' in str(err.value)
        assert "register_datasets" in str(err.value)
    finally:
        plugins.unregister_plugin("greedy_plugin")
    _assert_not_registered("greedy_plugin", before)


def _plugin_module(contract: int) -> types.ModuleType:
    module = types.ModuleType("contract_plugin")
    module.TRAINYARD_HOOK_CONTRACT = contract

    @hookimpl
    def register_metrics(register):
        register(MetricSpec("always_one", lambda o, t, i: 1.0))

    module.register_metrics = register_metrics
    return module


def test_plugin_written_for_another_hook_contract_is_refused():
    before = registry_snapshot()
    try:
        with pytest.raises(PluginError) as err:
            plugins.register_plugin(_plugin_module(99), "future_plugin")
        message = str(err.value)
        assert '"future_plugin"' in message and "99" in message
        assert str(trainyard.HOOK_CONTRACT_VERSION) in message
    finally:
        plugins.unregister_plugin("future_plugin")
    _assert_not_registered("future_plugin", before)


def test_a_hook_contract_given_as_a_string_is_refused_saying_it_must_be_an_int():
    before = registry_snapshot()
    try:
        with pytest.raises(PluginError) as err:
            plugins.register_plugin(_plugin_module(str(trainyard.HOOK_CONTRACT_VERSION)), "quoted_plugin")
        assert str(err.value) == (f'plugin "quoted_plugin": TRAINYARD_HOOK_CONTRACT must be an int (this '
                                  f"trainyard provides {trainyard.HOOK_CONTRACT_VERSION}), got "
                                  f"'{trainyard.HOOK_CONTRACT_VERSION}'")
    finally:
        plugins.unregister_plugin("quoted_plugin")
    _assert_not_registered("quoted_plugin", before)


def test_plugin_declaring_the_current_hook_contract_is_accepted():
    module = _plugin_module(trainyard.HOOK_CONTRACT_VERSION)
    with plugin_registered(module, "current_plugin"):
        assert plugins.get_registry().owner("metric", "always_one") == "current_plugin"


def test_plugin_name_already_in_use_is_rejected_and_the_first_plugin_kept():
    before = registry_snapshot()
    builtin_mlp = plugins.get_plugin_manager().get_plugin("mlp")
    with pytest.raises(PluginError, match='"mlp"'):
        plugins.register_plugin(LinearProbePlugin(), "mlp")
    assert plugins.get_plugin_manager().get_plugin("mlp") is builtin_mlp
    assert registry_snapshot() == before


def test_plugin_registered_again_under_a_reused_name_is_seen_afresh():
    before = registry_snapshot()
    try:
        plugins.register_plugin(LinearProbePlugin(), "reused_name")
        assert "linear_probe" in plugins.get_registry().models
        plugins.unregister_plugin("reused_name")
        plugins.register_plugin(ToyDatasetPlugin(), "reused_name")
        registry = plugins.get_registry()
        assert "linear_probe" not in registry.models
        assert registry.owner("dataset", "toy_regression") == "reused_name"
    finally:
        plugins.unregister_plugin("reused_name")
    assert registry_snapshot() == before


# --------------------------------------------------------------------------------------
# Problems found when calling the hooks: the plugin is dropped, the others still work
# --------------------------------------------------------------------------------------


class RaisingPlugin:
    @hookimpl
    def register_datasets(self, register):
        register(DatasetSpec("half_registered", _load_toy, "features", "regression"))

    @hookimpl
    def register_models(self, register):
        raise RuntimeError("cannot find libfoo")


def test_plugin_raising_inside_a_hook_is_dropped_and_reported_while_others_still_work():
    with plugin_registered(RaisingPlugin(), "raising_plugin"):
        registry = plugins.get_registry()
        (message,) = _problems_of("raising_plugin")
        assert "register_models" in message and "cannot find libfoo" in message
        assert "raising_plugin" in str(registry.problems[-1])
        # dropped whole: not even what it registered before raising
        assert "half_registered" not in registry.datasets
        assert "raising_plugin" not in {info.name for info in registry.plugins}
        assert BUILTIN_MODELS <= set(registry.models)
        assert resolve(load_config(MLP_CONFIG)).model.name == "mlp"


class ReturningListPlugin:
    @hookimpl
    def register_metrics(self, register):
        return [MetricSpec("returned_metric", lambda o, t, i: 0.0)]


def test_hook_returning_a_list_instead_of_calling_register_is_reported():
    with plugin_registered(ReturningListPlugin(), "returning_plugin"):
        registry = plugins.get_registry()
        (message,) = _problems_of("returning_plugin")
        assert "register_metrics returned list" in message
        assert "register(MetricSpec(...))" in message
        assert "returned_metric" not in registry.metrics


def _registering(hook: str, thing):
    """A plugin object whose ``hook`` registers ``thing``."""

    class Plugin:
        @hookimpl(specname=hook)
        def impl(self, register):
            register(thing)

    return Plugin()


def test_registering_an_object_that_is_not_a_spec_is_reported():
    plugin = _registering("register_models", {"name": "dict_model", "build": _build_linear})
    with plugin_registered(plugin, "dict_plugin"):
        (message,) = _problems_of("dict_plugin")
        assert "register_models" in message
        assert "registered a dict, expected a trainyard.ModelSpec" in message
        assert "dict_model" not in plugins.get_registry().models


def test_registering_a_spec_of_the_wrong_kind_is_reported():
    plugin = _registering("register_datasets", MetricSpec("wrong_kind", _max_error))
    with plugin_registered(plugin, "wrong_kind_plugin"):
        (message,) = _problems_of("wrong_kind_plugin")
        assert "expected a trainyard.DatasetSpec" in message
        assert "wrong_kind" not in plugins.get_registry().metrics


@dataclass
class _Params:
    size: int = 1


BAD_SPECS = {
    "model without a name": (
        "register_models",
        ModelSpec("", _build_linear, ["features"]),
        "without a name",
    ),
    "model build not callable": (
        "register_models",
        ModelSpec("m", "nn.Linear", ["features"]),
        "build must be callable",
    ),
    "model processor not callable": (
        "register_models",
        ModelSpec("m", _build_linear, ["features"], processor=3),
        "processor must be callable",
    ),
    "model unknown input kind": (
        "register_models",
        ModelSpec("m", _build_linear, ["audio"]),
        "inputs must be",
    ),
    "model no input kinds": (
        "register_models",
        ModelSpec("m", _build_linear, []),
        "inputs must be",
    ),
    "model params not a dataclass": (
        "register_models",
        ModelSpec("m", _build_linear, ["features"], params=dict),
        "params must be a dataclass type",
    ),
    "model params an instance": (
        "register_models",
        ModelSpec("m", _build_linear, ["features"], params=_Params()),
        "params must be a dataclass type",
    ),
    "dataset load not callable": (
        "register_datasets",
        DatasetSpec("d", None, "features"),
        "load must be callable",
    ),
    "dataset unknown input kind": (
        "register_datasets",
        DatasetSpec("d", _load_toy, "video"),
        "inputs must be one of",
    ),
    "dataset unknown task": (
        "register_datasets",
        DatasetSpec("d", _load_toy, "features", "clustering"),
        "task must be one of",
    ),
    "metric fn not callable": ("register_metrics", MetricSpec("x", 0.5), "fn must be callable"),
    "metric unknown task": (
        "register_metrics",
        MetricSpec("x", _max_error, "ranking"),
        "task must be",
    ),
    "metric unknown mode": (
        "register_metrics",
        MetricSpec("x", _max_error, "any", "up"),
        "mode must be",
    ),
}


@pytest.mark.parametrize("hook, spec, expected", BAD_SPECS.values(), ids=list(BAD_SPECS))
def test_registering_a_spec_with_bad_fields_is_reported_naming_the_plugin(hook, spec, expected):
    with plugin_registered(_registering(hook, spec), "bad_fields_plugin"):
        registry = plugins.get_registry()
        (message,) = _problems_of("bad_fields_plugin")
        assert hook in message and expected in message
        assert 'plugin "bad_fields_plugin"' in str(registry.problems[-1])
        assert spec.name not in registry.table(
            {
                "register_models": "model",
                "register_datasets": "dataset",
                "register_metrics": "metric",
            }[hook]
        )


def test_a_plugin_registering_a_name_another_has_is_dropped_naming_both_and_the_rest_load():
    before = registry_snapshot()
    first = _registering("register_metrics", MetricSpec("shared_metric", _max_error))

    class Second:  # the clash, and a name of its own that must not half-load
        @hookimpl
        def register_metrics(self, register):
            register(MetricSpec("second_own_metric", _max_error))
            register(MetricSpec("shared_metric", _max_error))

    plugins.register_plugin(first, "first_plugin")
    try:
        plugins.register_plugin(Second(), "second_plugin")
        try:
            registry = plugins.get_registry()  # every other plugin still loads
            assert registry.owner("metric", "shared_metric") == "first_plugin"
            assert "second_own_metric" not in registry.table("metric")
            assert "second_plugin" not in [p.name for p in registry.plugins]
            (problem,) = [p for p in registry.problems if p.plugin == "second_plugin"]
            assert str(problem) == ('plugin "second_plugin": registers a metric named \'shared_metric\', which '
                                    'plugin "first_plugin" already registers; rename yours, or disable the '
                                    "other with TRAINYARD_DISABLE_PLUGINS=first_plugin")
            assert "mlp" in registry.table("model")  # built-ins untouched
            with pytest.raises(PluginError, match='plugin "second_plugin": registers a metric'):
                registry.get("metric", "second_own_metric")  # asked for: told why it is missing
            # Which of two third-party plugins a job means by the shared name cannot be told.
            with pytest.raises(PluginError) as err:
                registry.get("metric", "shared_metric")
            assert str(err.value) == ('plugins "first_plugin" and "second_plugin" both register a metric named '
                                      "'shared_metric', so which one is meant cannot be told; disable one with "
                                      "TRAINYARD_DISABLE_PLUGINS=second_plugin (or =first_plugin), or uninstall it")
        finally:
            plugins.unregister_plugin("second_plugin")
        assert plugins.get_registry().owner("metric", "shared_metric") == "first_plugin"
    finally:
        plugins.unregister_plugin("first_plugin")
    assert registry_snapshot() == before


def test_a_plugin_registering_a_builtin_name_or_one_name_twice_is_dropped_and_builtins_keep_theirs():
    before = registry_snapshot()
    plugins.register_plugin(
        _registering("register_datasets", DatasetSpec("digits", _load_toy, "image")), "my_digits"
    )

    class Twice:
        @hookimpl
        def register_metrics(self, register):
            register(MetricSpec("twice_metric", _max_error))
            register(MetricSpec("twice_metric", _max_error))

    plugins.register_plugin(Twice(), "twice_plugin")
    try:
        registry = plugins.get_registry()
        assert registry.owner("dataset", "digits") == "images"
        assert registry.get("dataset", "digits") is registry.datasets["digits"]  # a built-in's name stays its own
        problems = {p.plugin: p.message for p in registry.problems}
        assert problems["my_digits"].startswith("registers a dataset named 'digits', which plugin \"images\"")
        assert problems["twice_plugin"] == "registers the metric 'twice_metric' twice"
        assert "twice_metric" not in registry.table("metric")
    finally:
        plugins.unregister_plugin("my_digits")
        plugins.unregister_plugin("twice_plugin")
    assert registry_snapshot() == before


# --------------------------------------------------------------------------------------
# External plugins installed as real distributions, and the environment switches
# --------------------------------------------------------------------------------------

GOOD_PLUGIN = """
    import numpy as np
    from trainyard import MetricSpec, hookimpl

    @hookimpl
    def register_metrics(register):
        register(MetricSpec({metric!r}, lambda o, t, i: 0.0, "any", "max"))
"""

BROKEN_PLUGIN = """
    raise ImportError("No module named 'libfoo'")
"""

FUTURE_PLUGIN = """
    from trainyard import hookimpl
    TRAINYARD_HOOK_CONTRACT = 99

    @hookimpl
    def register_models(register):
        pass
"""

TYPO_PLUGIN = """
    from trainyard import hookimpl

    @hookimpl
    def register_dataset(register):
        pass
"""


@dataclass
class Installed:
    """An external distribution on sys.path: its plugin names and what they provide."""

    mp: pytest.MonkeyPatch
    dist: str
    modules: dict[str, str]


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """Install a distribution with two working plugins (``ext_a``, ``ext_b``) and one that
    fails to import (``ext_broken``); reload plugins; undo it all afterwards."""
    dist = unique("trainyard_ext")
    modules = {
        "ext_a": unique("ext_a_mod"),
        "ext_b": unique("ext_b_mod"),
        "ext_broken": unique("ext_broken_mod"),
    }
    make_distribution(
        tmp_path,
        dist,
        entry_points=modules,
        version="2.3.4",
        modules={
            modules["ext_a"]: GOOD_PLUGIN.format(metric="ext_a_metric"),
            modules["ext_b"]: GOOD_PLUGIN.format(metric="ext_b_metric"),
            modules["ext_broken"]: BROKEN_PLUGIN,
        },
    )
    before = registry_snapshot()
    with monkeypatch.context() as mp:
        mp.syspath_prepend(str(tmp_path))
        plugins.reset()
        try:
            yield Installed(mp, dist, modules)
        finally:
            plugins.reset()
    assert registry_snapshot() == before


def _reload(mp: pytest.MonkeyPatch, **env: str) -> plugins.Registry:
    for name, value in env.items():
        mp.setenv(name, value)
    plugins.reset()
    return plugins.get_registry()


def test_external_plugin_failing_to_import_is_reported_and_builtins_still_load(installed):
    registry = plugins.get_registry()
    (message,) = _problems_of("ext_broken")
    assert "error importing" in message and installed.modules["ext_broken"] in message
    assert "ImportError" in message and "libfoo" in message
    assert {p.plugin for p in plugins.load_problems()} == {"ext_broken"}
    assert BUILTIN_MODELS <= set(registry.models)
    assert BUILTIN_DATASETS <= set(registry.datasets)
    assert {"ext_a_metric", "ext_b_metric"} <= set(registry.metrics)


def test_external_plugin_is_listed_with_its_distribution_and_version(installed):
    infos = {info.name: info for info in plugins.get_registry().plugins}
    ext = infos["ext_a"]
    assert not ext.builtin
    assert (ext.distribution, ext.version) == (installed.dist, "2.3.4")
    assert ext.module == installed.modules["ext_a"]
    assert ext.provides["metric"] == ["ext_a_metric"]
    assert "ext_broken" not in infos
    builtin_flags = [info.builtin for info in plugins.get_registry().plugins]
    assert builtin_flags == sorted(builtin_flags, reverse=True)  # built-ins listed first


def test_disable_external_plugins_loads_only_the_builtins(installed):
    registry = _reload(installed.mp, TRAINYARD_DISABLE_EXTERNAL_PLUGINS="1")
    assert not {"ext_a_metric", "ext_b_metric"} & set(registry.metrics)
    assert registry.problems == []  # the broken one is not even imported
    assert all(info.builtin for info in registry.plugins)
    assert BUILTIN_MODELS <= set(registry.models) and BUILTIN_METRICS <= set(registry.metrics)


def test_disable_external_plugins_set_to_0_keeps_them(installed):
    registry = _reload(installed.mp, TRAINYARD_DISABLE_EXTERNAL_PLUGINS="0")
    assert {"ext_a_metric", "ext_b_metric"} <= set(registry.metrics)


def test_plugins_allow_list_loads_only_the_named_external_plugins(installed):
    registry = _reload(installed.mp, TRAINYARD_PLUGINS="ext_b, not_installed")
    assert "ext_b_metric" in registry.metrics
    assert "ext_a_metric" not in registry.metrics
    assert registry.problems == []
    # the allow-list is for external plugins; built-ins still load
    assert BUILTIN_MODELS <= set(registry.models) and BUILTIN_DATASETS <= set(registry.datasets)


def test_disable_plugins_skips_the_named_plugins_builtin_or_external(installed):
    registry = _reload(installed.mp, TRAINYARD_DISABLE_PLUGINS="ext_a,ext_broken,cnn")
    assert "ext_a_metric" not in registry.metrics
    assert "ext_b_metric" in registry.metrics
    assert "cnn" not in registry.models
    assert {"mlp", "bert"} <= set(registry.models)
    assert registry.problems == []
    assert "cnn" not in {info.name for info in registry.plugins}


def test_external_plugins_breaking_the_contract_are_reported_at_load_time(tmp_path, monkeypatch):
    future, typo = unique("future_mod"), unique("typo_mod")
    make_distribution(
        tmp_path,
        unique("trainyard_bad"),
        entry_points={"future": future, "typo": typo},
        modules={future: FUTURE_PLUGIN, typo: TYPO_PLUGIN},
    )
    before = registry_snapshot()
    with monkeypatch.context() as mp:
        mp.syspath_prepend(str(tmp_path))
        plugins.reset()
        try:
            problems = {p.plugin: p.message for p in plugins.get_registry().problems}
            assert set(problems) == {"future", "typo"}
            assert "hook contract version 99" in problems["future"]
            assert "register_dataset" in problems["typo"] and "do not exist" in problems["typo"]
            pm = plugins.get_plugin_manager()
            assert pm.get_plugin("future") is None and pm.get_plugin("typo") is None
            assert BUILTIN_MODELS <= set(plugins.get_registry().models)
        finally:
            plugins.reset()
    assert registry_snapshot() == before


def test_external_plugin_reusing_a_builtin_plugin_name_is_reported_not_swapped_in(
    tmp_path, monkeypatch
):
    impostor = unique("impostor_mod")
    dist = unique("trainyard_impostor")
    make_distribution(
        tmp_path,
        dist,
        entry_points={"mlp": impostor},
        modules={impostor: GOOD_PLUGIN.format(metric="impostor_metric")},
    )
    before = registry_snapshot()
    with monkeypatch.context() as mp:
        mp.syspath_prepend(str(tmp_path))
        plugins.reset()
        try:
            registry = plugins.get_registry()
            assert "mlp" in registry.models and "impostor_metric" not in registry.metrics
            assert next(i for i in registry.plugins if i.name == "mlp").builtin
            (message,) = _problems_of("mlp")
            assert dist in message and "trainyard" in message
        finally:
            plugins.reset()
    assert registry_snapshot() == before


@dataclass
class UnhashablePlugin:  # a dataclass with eq=True has no __hash__
    metric: str = "unhashable_metric"

    @hookimpl
    def register_metrics(self, register):
        register(MetricSpec(self.metric, _max_error))


def test_unhashable_plugin_object_is_rejected_naming_it_and_others_still_work():
    before = registry_snapshot()
    try:
        with pytest.raises(PluginError, match='"unhashable_plugin"'):
            plugins.register_plugin(UnhashablePlugin(), "unhashable_plugin")
    finally:
        plugins.unregister_plugin("unhashable_plugin")
    _assert_not_registered("unhashable_plugin", before)
    assert BUILTIN_METRICS <= set(plugins.get_registry().metrics)
