"""Conformance checks a plugin author runs on their own plugin.

``check_plugin(name)`` takes the entries the named plugin registered (as the plugin
manager loaded them: through its entry point, or ``register_plugin``) and exercises each
the way trainyard will, on tiny inputs and without Ray:

- each **model**, for each input kind it declares: its processor is fitted on a few
  examples (the plugin's own dataset of that kind if it loads with default params, else
  another installed dataset that needs no params, else a synthetic batch), the model is
  built, one batch goes forward (float tensor ``[N, num_outputs]``, finite), backward and
  through an optimizer step; ``decode`` gives one JSON-able answer per example; and a
  checkpoint written with :func:`trainyard.checkpoint.write_checkpoint` and read back with
  :func:`~trainyard.checkpoint.load_predictor` answers raw inputs exactly as the model in
  memory does (so the processor saves what ``fit`` learnt);
- each **dataset** loads with its default params (one that needs a param, such as a file
  path, is *skipped* with the reason unless the params are given) and yields what its
  spec and :class:`~trainyard.hookspecs.DataInfo` declare;
- each **metric** returns a finite float on synthetic outputs and targets of each task
  it serves, and scores perfect predictions at least as well as random ones in the
  direction its ``mode`` declares.

Load-time problems (import errors, unknown hooks, a wrong contract version, a hook that
raises or registers a bad spec) are found by :mod:`trainyard.plugins` and reported here
as failures of the plugin's ``load`` check.

In a plugin's own tests::

    from trainyard.conformance import assert_conforms

    def test_my_plugin_conforms():
        assert_conforms("my_plugin")

On the command line: ``trainyard plugins check my_plugin``.
"""

from __future__ import annotations

from typing import Any

from trainyard.conformance.datasets import check_dataset
from trainyard.conformance.metrics import check_metric
from trainyard.conformance.models import check_model
from trainyard.conformance.params import parse_param_overrides
from trainyard.conformance.results import FAILED, PASSED, SKIPPED, CheckFailed, CheckResult
from trainyard.conformance.runner import Plugin
from trainyard.conformance.samples import BATCH, FIT_EXAMPLES
from trainyard.errors import ConfigError, PluginError

__all__ = [
    "BATCH",
    "FAILED",
    "FIT_EXAMPLES",
    "PASSED",
    "SKIPPED",
    "CheckFailed",
    "CheckResult",
    "assert_conforms",
    "check_plugin",
    "parse_param_overrides",
    "results_table",
    "summary_line",
]


def check_plugin(
    name: str,
    *,
    model_params: dict[str, dict] | None = None,
    dataset_params: dict[str, dict] | None = None,
    registry: Any = None,
) -> list[CheckResult]:
    """Run every check on the plugin ``name`` (its entry-point name); return the results.

    :param model_params: params per model name, e.g. ``{"bert": {"hidden_size": 32}}``;
        a model not named gets its params' defaults.
    :param dataset_params: params per dataset name, e.g. ``{"table": {"path": "x.csv"}}``;
        a dataset not named gets its defaults, or is skipped if it needs a value.
    :raises PluginError: no plugin of that name is installed or registered.
    :raises ConfigError: params given for an entry the plugin does not provide.
    """
    from trainyard.plugins import get_registry

    registry = registry if registry is not None else get_registry()
    info = next((p for p in registry.plugins if p.name == name), None)
    problems = [p for p in registry.problems if p.plugin == name]
    if info is None and not problems:
        loaded = ", ".join(p.name for p in registry.plugins) or "none"
        raise PluginError(
            f"no plugin named {name!r} is loaded (loaded plugins: {loaded}). A plugin's name "
            f"is its entry-point name in the 'trainyard' group; is its package installed?"
        )
    results = [CheckResult(name, "plugin", name, "load", FAILED, p.message) for p in problems]
    if info is None:
        return results
    _refuse_unknown_params(name, info, model_params, dataset_params)
    if not any(info.provides.values()):
        results.append(CheckResult(name, "plugin", name, "registers", FAILED,
                                   "the plugin registers no model, dataset or metric"))
        return results
    results.append(CheckResult(name, "plugin", name, "load", PASSED, _provides(info)))
    return results + _check_entries(Plugin.of(name, info, registry), model_params or {},
                                    dataset_params or {})


def _refuse_unknown_params(name: str, info: Any, model_params: dict[str, dict] | None,
                           dataset_params: dict[str, dict] | None) -> None:
    """ConfigError if params are given for a model or dataset the plugin does not provide."""
    for kind, given in (("model", model_params), ("dataset", dataset_params)):
        unknown = sorted(set(given or {}) - set(info.provides[kind]))
        if unknown:
            raise ConfigError(
                f"params given for {kind}(s) {', '.join(unknown)}, which plugin {name!r} does "
                f"not provide (its {kind}s: {', '.join(info.provides[kind]) or 'none'})"
            )


def _provides(info: Any) -> str:
    """The plugin's distribution and what it registers, in one line."""
    parts = [f"{kind}s: {', '.join(names)}" for kind, names in info.provides.items() if names]
    version = f" {info.version}" if info.version else ""
    return f"{info.distribution}{version}; " + "; ".join(parts)


def _check_entries(plugin: Plugin, model_params: dict, dataset_params: dict) -> list[CheckResult]:
    """The checks of each model, then each dataset, then each metric the plugin provides."""
    registry, provides = plugin.registry, plugin.info.provides
    results: list[CheckResult] = []
    for model in provides["model"]:
        results += check_model(plugin, registry.models[model], model_params.get(model, {}))
    for dataset in provides["dataset"]:
        results += check_dataset(plugin, registry.datasets[dataset], dataset_params.get(dataset, {}))
    for metric in provides["metric"]:
        results += check_metric(plugin, registry.metrics[metric])
    return results


def assert_conforms(name: str, **kwargs: Any) -> list[CheckResult]:
    """``check_plugin(name, **kwargs)`` for tests: an AssertionError listing every failure.

    Skipped checks (a dataset that needs a path) do not fail; the results are returned so
    a test can look at them.
    """
    __tracebackhide__ = True
    results = check_plugin(name, **kwargs)
    failures = [r for r in results if r.failed]
    if failures:
        raise AssertionError(
            f'plugin "{name}" does not conform ({len(failures)} failed):\n'
            + "\n".join(f"  - {r}" for r in failures)
        )
    return results


def summary_line(name: str, results: list[CheckResult]) -> str:
    """One line: whether the plugin conforms, and how many checks passed, failed, skipped."""
    counts = {s: sum(r.status == s for r in results) for s in (PASSED, FAILED, SKIPPED)}
    verdict = "FAILS the plugin contract" if counts[FAILED] else "conforms to the plugin contract"
    return (f'plugin "{name}" {verdict}: {counts[PASSED]} passed, {counts[FAILED]} failed, '
            f"{counts[SKIPPED]} skipped")


def results_table(name: str, results: list[CheckResult]) -> Any:
    """A rich table of the results, one row per check."""
    from rich.table import Table
    from rich.text import Text

    style = {PASSED: "green", FAILED: "bold red", SKIPPED: "yellow"}
    table = Table(title=f'trainyard plugins check "{name}"')
    for column in ("kind", "entry", "check", "result", "detail"):
        table.add_column(column, overflow="fold")
    for r in results:
        # Text, not markup: a plugin's error message may hold brackets.
        table.add_row(r.kind, r.entry, r.check, Text(r.status, style[r.status]), Text(r.detail))
    return table
