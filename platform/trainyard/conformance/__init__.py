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

import dataclasses
import json
import math
import numbers
import sysconfig
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainyard import hookspecs
from trainyard.errors import ConfigError, PluginError

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"

#: Examples used to fit a processor, and the batch sent forward.
FIT_EXAMPLES = 32
BATCH = 8

_CORE = Path(__file__).resolve().parent


@dataclass
class CheckResult:
    """The outcome of one check of one entry of a plugin."""

    plugin: str
    #: ``plugin``, ``model``, ``dataset`` or ``metric``.
    kind: str
    #: The model, dataset or metric name (the plugin's name for ``plugin`` checks).
    entry: str
    check: str
    #: ``passed``, ``failed`` or ``skipped``.
    status: str
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status == FAILED

    def __str__(self) -> str:
        where = f'plugin "{self.plugin}"'
        if self.kind != "plugin":
            where += f", {self.kind} {self.entry!r}"
        return f"{where}, check {self.check!r}: {self.status}" + (f": {self.detail}" if self.detail else "")


class CheckFailed(Exception):
    """A check's own verdict: the message says what is wrong, in the author's terms."""


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


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
    for kind, given in (("model", model_params), ("dataset", dataset_params)):
        unknown = sorted(set(given or {}) - set(info.provides[kind]))
        if unknown:
            raise ConfigError(
                f"params given for {kind}(s) {', '.join(unknown)}, which plugin {name!r} does "
                f"not provide (its {kind}s: {', '.join(info.provides[kind]) or 'none'})"
            )
    if not any(info.provides.values()):
        results.append(CheckResult(name, "plugin", name, "registers", FAILED,
                                   "the plugin registers no model, dataset or metric"))
        return results
    results.append(CheckResult(name, "plugin", name, "load", PASSED, _provides(info)))
    checker = _Checker(name, info, registry)
    for model in info.provides["model"]:
        results += checker.model(registry.models[model], (model_params or {}).get(model, {}))
    for dataset in info.provides["dataset"]:
        results += checker.dataset(registry.datasets[dataset], (dataset_params or {}).get(dataset, {}))
    for metric in info.provides["metric"]:
        results += checker.metric(registry.metrics[metric])
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


def parse_param_overrides(items: list[str] | tuple[str, ...]) -> tuple[dict, dict]:
    """``["model.bert.hidden_size=32", "dataset.table.path=x.csv"]`` to
    ``(model_params, dataset_params)``. Raises ConfigError."""
    from omegaconf import OmegaConf

    from trainyard.config import parse_overrides

    parsed = OmegaConf.to_container(parse_overrides(list(items))) if items else {}
    unknown = sorted(set(parsed) - {"model", "dataset"})
    bad = [k for k in ("model", "dataset") if k in parsed and not all(
        isinstance(v, dict) for v in (parsed[k] or {}).values())] if isinstance(parsed, dict) else []
    if unknown or bad:
        raise ConfigError(
            "check params are model.NAME.KEY=VALUE or dataset.NAME.KEY=VALUE "
            f"(got {', '.join(unknown + bad)})"
        )
    return parsed.get("model") or {}, parsed.get("dataset") or {}


# --------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------


def _provides(info: Any) -> str:
    parts = [f"{kind}s: {', '.join(names)}" for kind, names in info.provides.items() if names]
    version = f" {info.version}" if info.version else ""
    return f"{info.distribution}{version}; " + "; ".join(parts)


@dataclass
class _Sample:
    """Raw examples to fit a processor on and send forward."""

    info: hookspecs.DataInfo
    inputs: Any
    targets: Any
    dataset: hookspecs.DatasetSpec
    source: str


class _Checker:
    def __init__(self, plugin: str, info: Any, registry: Any):
        self.plugin = plugin
        self.info = info
        self.registry = registry
        self.plugin_dir = Path(info.location).resolve().parent if info.location else None

    # -- running steps ------------------------------------------------------------------

    def _steps(self, kind: str, entry: str, steps: list[tuple[str, Callable[[], str]]]) -> list[CheckResult]:
        """Run steps in order, up to the first that does not pass (the later ones need
        what it makes)."""
        results: list[CheckResult] = []
        for check, step in steps:
            try:
                detail = step() or ""
                results.append(CheckResult(self.plugin, kind, entry, check, PASSED, detail))
            except _Skip as skip:
                results.append(CheckResult(self.plugin, kind, entry, check, SKIPPED, str(skip)))
            except CheckFailed as exc:
                results.append(CheckResult(self.plugin, kind, entry, check, FAILED, str(exc)))
            except Exception as exc:  # noqa: BLE001 - the plugin's own error, reported
                results.append(CheckResult(self.plugin, kind, entry, check, FAILED, self._describe(exc)))
            if results[-1].status != PASSED:
                break
        return results

    def _describe(self, exc: BaseException) -> str:
        """An exception as one line, with where in the plugin's code it was raised."""
        message = str(exc).strip().splitlines()
        text = f"{type(exc).__name__}: {message[0] if message else ''}".rstrip(": ")
        where = self._plugin_frame(exc)
        return f"{text} (raised at {where})" if where else text

    def _plugin_frame(self, exc: BaseException) -> str:
        frames = traceback.extract_tb(exc.__traceback__)
        libraries = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib", "stdlib")}

        def in_plugin(filename: str) -> bool:
            path = Path(filename).resolve()
            if self.plugin_dir is not None:
                return path.is_relative_to(self.plugin_dir)
            return not path.is_relative_to(_CORE) and not any(path.is_relative_to(d) for d in libraries)

        for frame in reversed(frames):
            if in_plugin(frame.filename):
                return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"
        return ""

    # -- models -------------------------------------------------------------------------

    def model(self, spec: hookspecs.ModelSpec, overrides: dict) -> list[CheckResult]:
        results: list[CheckResult] = []
        for kind in spec.inputs:
            state: dict = {}  # what each step makes for the next
            label = "" if len(spec.inputs) == 1 else f" ({kind})"
            results += self._steps("model", spec.name, [
                ("params" + label, lambda s=state: self._model_params(spec, overrides, s)),
                ("build" + label, lambda s=state, k=kind: self._build(spec, k, s)),
                ("forward" + label, lambda s=state: self._forward(spec, s)),
                ("backward" + label, lambda s=state: self._backward(s)),
                ("decode" + label, lambda s=state: self._decode(s)),
                ("checkpoint" + label, lambda s=state: self._checkpoint(spec, overrides, s)),
            ])
        return results

    def _model_params(self, spec: hookspecs.ModelSpec, overrides: dict, state: dict) -> str:
        state["params"] = _typed(spec.params, overrides, "model", spec.name, self.plugin)
        return _params_detail(state["params"])

    def _build(self, spec: hookspecs.ModelSpec, kind: str, state: dict) -> str:
        import torch

        sample = self._sample(kind)
        state["sample"] = sample
        processor = spec.processor(state["params"], sample.info)
        missing = [m for m in ("fit", "encode", "decode", "save", "load") if not callable(getattr(processor, m, None))]
        if missing:
            raise CheckFailed(f"processor(params, info) gave a {type(processor).__name__} without "
                              f"{', '.join(missing)}; subclass trainyard.Processor")
        processor.fit(sample.inputs)
        torch.manual_seed(0)
        model = spec.build(state["params"], sample.info, processor)
        if not isinstance(model, torch.nn.Module):
            raise CheckFailed(f"build returned a {type(model).__name__}, expected a torch.nn.Module")
        if not any(p.requires_grad for p in model.parameters()):
            raise CheckFailed("the built model has no trainable parameters")
        state.update(processor=processor, model=model)
        return f"fitted on {len(sample.targets)} examples of {sample.source}"

    def _forward(self, spec: hookspecs.ModelSpec, state: dict) -> str:
        import torch

        sample, model = state["sample"], state["model"]
        raw = _take(sample.inputs, range(BATCH))
        batch = state["processor"].encode(raw)
        if isinstance(batch, dict):
            bad = [k for k, v in batch.items() if not isinstance(v, torch.Tensor)]
            if bad:
                raise CheckFailed(f"processor.encode gave a dict whose {', '.join(bad)} "
                                  "is not a tensor")
        elif not isinstance(batch, torch.Tensor):
            raise CheckFailed(f"processor.encode gave a {type(batch).__name__}; it must give "
                              "a tensor or a dict of tensors")
        model.train()
        out = _call(model, batch)
        want = [BATCH, sample.info.num_outputs]
        if not isinstance(out, torch.Tensor):
            raise CheckFailed(f"forward returned a {type(out).__name__}; it must return a float "
                              f"tensor of shape {want} ([batch, info.num_outputs])")
        if list(out.shape) != want:
            raise CheckFailed(f"forward returned shape {list(out.shape)} for a batch of {BATCH} "
                              f"with {sample.info.num_outputs} outputs; expected {want} "
                              "([batch, info.num_outputs])")
        if not out.is_floating_point():
            raise CheckFailed(f"forward returned a {out.dtype} tensor; it must be floating point")
        if not torch.isfinite(out).all():
            raise CheckFailed("forward returned NaN or infinite values")
        state.update(batch=batch, out=out, raw=raw)
        return f"[{BATCH}, {sample.info.num_outputs}] {str(out.dtype).replace('torch.', '')}"

    def _backward(self, state: dict) -> str:
        import torch
        import torch.nn.functional as F

        model, out, sample = state["model"], state["out"], state["sample"]
        targets = torch.as_tensor(_take_targets(sample.targets, range(BATCH)))
        if sample.info.task == "classification":
            loss = F.cross_entropy(out.float(), targets.long())
        else:
            loss = F.mse_loss(out.float().reshape(len(targets), -1), targets.float().reshape(len(targets), -1))
        if not loss.requires_grad:
            raise CheckFailed("no parameter received a gradient: the output does not depend on "
                              "the model's parameters (is it detached, or made under no_grad?)")
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        optimizer.zero_grad()
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        if not grads:
            raise CheckFailed("no parameter received a gradient: is the output detached from "
                              "the model's parameters?")
        if not all(torch.isfinite(g).all() for g in grads):
            raise CheckFailed("the loss gave NaN or infinite gradients")
        optimizer.step()
        return f"loss {float(loss.detach()):.4g}"

    def _decode(self, state: dict) -> str:
        answers = state["processor"].decode(state["out"].detach())
        if not isinstance(answers, list) or len(answers) != BATCH or not all(isinstance(a, dict) for a in answers):
            got = f"{len(answers)} items" if isinstance(answers, list) else type(answers).__name__
            raise CheckFailed(f"processor.decode must give a list of one dict per example "
                              f"({BATCH}); got {got}")
        try:
            json.dumps(answers)
        except (TypeError, ValueError) as exc:
            raise CheckFailed(f"processor.decode gave answers that are not JSON-able, so they "
                              f"cannot be served: {exc}") from None
        classes = state["sample"].info.classes
        labels = [a.get("label") for a in answers]
        if classes and "label" in answers[0] and not set(labels) <= set(classes):
            raise CheckFailed(f"processor.decode gave labels {sorted(set(labels) - set(classes))} "
                              f"that are not among info.classes {classes}")
        return f"{BATCH} answers"

    def _checkpoint(self, spec: hookspecs.ModelSpec, overrides: dict, state: dict) -> str:
        import torch

        from trainyard.checkpoint import load_predictor, write_checkpoint
        from trainyard.config import ResolvedJob, load_config

        sample, model, processor = state["sample"], state["model"], state["processor"]
        cfg = load_config(base={
            "name": f"conformance_{spec.name}",
            "model": {"name": spec.name, "params": overrides},
            "data": {"name": sample.dataset.name},
        })
        job = ResolvedJob(cfg, spec, sample.dataset, [], state["params"], None, sample.info.task)
        raw = state["raw"]
        model.eval()
        with torch.inference_mode():
            expected = _call(model, processor.encode(raw)).float()
        answers = processor.decode(expected)
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(tmp, job=job, model=model, processor=processor, info=sample.info,
                             epoch=0, metrics={}, plugin=self.plugin)
            predictor = load_predictor(tmp, registry=self.registry)
            got = predictor.forward(raw).float()
            reloaded_answers = predictor.predict(raw)
        if list(got.shape) != list(expected.shape):
            raise CheckFailed(f"the model rebuilt from the checkpoint gives shape {list(got.shape)}, "
                              f"the one in memory {list(expected.shape)}")
        diff = float((got - expected).abs().max())
        if not diff <= 1e-4 * (1 + float(expected.abs().max())):
            raise CheckFailed(
                f"the model rebuilt from a checkpoint answers the same raw inputs differently "
                f"from the model in memory (largest difference {diff:.3g}): the processor's save() "
                "must keep everything fit() learnt (the default saves self.state), and build() "
                "must give the same architecture for the same params and processor"
            )
        if [a.get("label") for a in reloaded_answers] != [a.get("label") for a in answers]:
            raise CheckFailed("the model rebuilt from a checkpoint gives other labels than the "
                              "model in memory")
        return "write_checkpoint, load_predictor, predict: same outputs"

    def _sample(self, kind: str) -> _Sample:
        """A few raw examples of ``kind``: the plugin's own data, else an installed
        dataset that needs no params, else synthetic."""
        own = [self.registry.datasets[n] for n in self.info.provides["dataset"]]
        others = [d for n, d in self.registry.datasets.items()
                  if n not in self.info.provides["dataset"] and d.params is None]
        for spec in [*own, *others]:
            if spec.inputs != kind:
                continue
            try:
                params = _typed(spec.params, {}, "dataset", spec.name, self.plugin)
                data = spec.load(params, 0)
                train = data.train
                if len(train) < BATCH:
                    continue
            except Exception:  # noqa: BLE001, S112 - its own check reports it; use other data
                continue
            import numpy as np

            index = np.random.default_rng(0).permutation(len(train))[:FIT_EXAMPLES]
            owner = self.registry.owners.get(("dataset", spec.name), "?")
            return _Sample(data.info, _take(train.inputs, index), _take_targets(train.targets, index),
                           spec, f"dataset {spec.name!r} (plugin {owner!r})")
        info, inputs, targets = _synthetic(kind)
        spec = hookspecs.DatasetSpec(f"conformance_synthetic_{kind}", lambda p, s: None, kind)
        return _Sample(info, inputs, targets, spec, f"synthetic {kind}")

    # -- datasets -----------------------------------------------------------------------

    def dataset(self, spec: hookspecs.DatasetSpec, overrides: dict) -> list[CheckResult]:
        state: dict = {}
        return self._steps("dataset", spec.name, [
            ("params", lambda: self._dataset_params(spec, overrides, state)),
            ("load", lambda: self._load(spec, state)),
            ("contents", lambda: self._contents(spec, state)),
        ])

    def _dataset_params(self, spec: hookspecs.DatasetSpec, overrides: dict, state: dict) -> str:
        state["params"] = _typed(spec.params, overrides, "dataset", spec.name, self.plugin)
        task = spec.task(state["params"]) if callable(spec.task) else spec.task
        if task not in hookspecs.TASKS:
            raise CheckFailed(f"task(params) gave {task!r}; expected one of {hookspecs.TASKS}")
        state["task"] = task
        return _params_detail(state["params"])

    def _load(self, spec: hookspecs.DatasetSpec, state: dict) -> str:
        data = spec.load(state["params"], 0)
        if not isinstance(data, hookspecs.LoadedData):
            raise CheckFailed(f"load returned a {type(data).__name__}, expected a trainyard.LoadedData")
        state["data"] = data
        val = f", {len(data.val)} validation" if data.val is not None else ""
        return f"{len(data.train)} training examples{val}"

    def _contents(self, spec: hookspecs.DatasetSpec, state: dict) -> str:
        data, task = state["data"], state["task"]
        info = data.info
        if not isinstance(info, hookspecs.DataInfo):
            raise CheckFailed(f"LoadedData.info is a {type(info).__name__}, expected a trainyard.DataInfo")
        if info.inputs != spec.inputs:
            raise CheckFailed(f"the spec declares inputs {spec.inputs!r} but the loaded "
                              f"DataInfo says {info.inputs!r}")
        if info.task != task:
            raise CheckFailed(f"the spec declares task {task!r} but the loaded DataInfo says {info.task!r}")
        if task == "classification" and len(info.classes) < 2:
            raise CheckFailed(f"a classification set needs at least two classes in "
                              f"DataInfo.classes (got {info.classes})")
        for split_name, split in (("train", data.train), ("val", data.val)):
            if split is None:
                continue
            problem = _split_problem(split, info)
            if problem:
                raise CheckFailed(f"the {split_name} split: {problem}")
        shape = f", input_shape {info.input_shape}" if info.input_shape else ""
        classes = f", {len(info.classes)} classes" if info.classes else ""
        return f"{info.task}, {info.inputs}{shape}{classes}"

    # -- metrics ------------------------------------------------------------------------

    def metric(self, spec: hookspecs.MetricSpec) -> list[CheckResult]:
        results: list[CheckResult] = []
        tasks = hookspecs.TASKS if spec.task == "any" else (spec.task,)
        for task in tasks:
            label = "" if len(tasks) == 1 else f" ({task})"
            state: dict = {}
            results += self._steps("metric", spec.name, [
                ("value" + label, lambda s=state, t=task: self._metric_value(spec, t, s)),
                ("direction" + label, lambda s=state: self._metric_direction(spec, s)),
            ])
        return results

    def _metric_value(self, spec: hookspecs.MetricSpec, task: str, state: dict) -> str:
        info, outputs, targets, perfect = _metric_inputs(task)
        value = _as_metric_value(spec.fn(outputs, targets, info))
        state.update(info=info, targets=targets, perfect=perfect, random=value)
        return f"{value:.4g} on random outputs"

    def _metric_direction(self, spec: hookspecs.MetricSpec, state: dict) -> str:
        best = _as_metric_value(spec.fn(state["perfect"], state["targets"], state["info"]))
        worse = best < state["random"] - 1e-9 if spec.mode == "max" else best > state["random"] + 1e-9
        if worse:
            direction = "higher" if spec.mode == "max" else "lower"
            raise CheckFailed(
                f"declared mode {spec.mode!r} ({direction} is better), but perfect predictions "
                f"score {best:.4g} and random ones {state['random']:.4g}: is mode the right "
                "way round?"
            )
        return f"{best:.4g} on perfect outputs (mode {spec.mode})"


class _Skip(Exception):
    """A check that cannot run without something the user has to give."""


def _typed(schema: type | None, values: dict, kind: str, name: str, plugin: str) -> Any:
    from trainyard.config import typed_params

    try:
        return typed_params(schema, values, f"{'model' if kind == 'model' else 'data'}.params")
    except ConfigError as exc:
        if values:
            raise CheckFailed(f"the params given are rejected: {exc}") from None
        raise _Skip(
            f"needs params ({exc}); check it with `trainyard plugins check {plugin} "
            f"{kind}.{name}.KEY=VALUE`"
        ) from None


def _params_detail(params: Any) -> str:
    if params is None:
        return "no params"
    if dataclasses.is_dataclass(params):
        text = ", ".join(f"{f.name}={getattr(params, f.name)!r}" for f in dataclasses.fields(params))
        return text if len(text) <= 80 else text[:77] + "..."
    return repr(params)


def _call(model: Any, batch: Any) -> Any:
    return model(**batch) if isinstance(batch, dict) else model(batch)


def _take(inputs: Any, index: Any) -> Any:
    index = list(index)
    if isinstance(inputs, list):
        return [inputs[i] for i in index]
    import numpy as np

    return np.asarray(inputs)[index]


def _take_targets(targets: Any, index: Any) -> Any:
    import numpy as np

    return np.asarray(targets)[list(index)]


def _synthetic(kind: str) -> tuple[hookspecs.DataInfo, Any, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    classes = ["a", "b", "c"]
    targets = (np.arange(FIT_EXAMPLES) % len(classes)).astype(np.int64)
    if kind == "features":
        info = hookspecs.DataInfo("classification", "features", classes, [6],
                                  feature_names=[f"f{i}" for i in range(6)])
        inputs = rng.normal(size=(FIT_EXAMPLES, 6)).astype(np.float32) + targets[:, None]
    elif kind == "image":
        info = hookspecs.DataInfo("classification", "image", classes, [3, 16, 16])
        inputs = rng.random((FIT_EXAMPLES, 3, 16, 16), dtype=np.float32)
    else:
        words = [["good", "great", "lovely"], ["bad", "awful", "poor"], ["plain", "usual", "fine"]]
        info = hookspecs.DataInfo("classification", "text", classes, [])
        inputs = [f"the film was {words[t][i % 3]} and the food {words[t][(i + 1) % 3]}"
                  for i, t in enumerate(targets)]
    return info, inputs, targets


def _split_problem(split: Any, info: hookspecs.DataInfo) -> str | None:
    import numpy as np

    if not isinstance(split, hookspecs.Split):
        return f"is a {type(split).__name__}, expected a trainyard.Split"
    try:
        n_inputs = len(split.inputs)
    except TypeError:
        return f"inputs is a {type(split.inputs).__name__}, which has no length"
    targets = np.asarray(split.targets)
    if n_inputs != len(targets):
        return f"{n_inputs} inputs but {len(targets)} targets"
    if n_inputs == 0:
        return "is empty"
    if info.inputs == "text":
        if not isinstance(split.inputs, list) or not all(isinstance(t, str) for t in split.inputs):
            return "text inputs must be a list of strings"
        if info.input_shape:
            return f"DataInfo.input_shape must be [] for text (got {info.input_shape})"
    else:
        x = np.asarray(split.inputs)
        shape = list(info.input_shape)
        rows = [list(x.shape[1:])]
        if info.inputs == "image" and len(shape) == 3 and shape[0] == 1:
            rows.append([1, *x.shape[1:]])  # H x W arrays for one channel
        if shape not in rows:
            return (f"inputs of shape {list(x.shape)} do not match DataInfo.input_shape "
                    f"{shape} (expected [N, {', '.join(map(str, shape))}])")
        if not np.issubdtype(x.dtype, np.number):
            return f"inputs must be numeric (got dtype {x.dtype})"
    if info.task == "classification":
        if not np.issubdtype(targets.dtype, np.integer):
            return f"classification targets must be class indices (integers), got dtype {targets.dtype}"
        if targets.min() < 0 or targets.max() >= len(info.classes):
            return (f"targets run from {targets.min()} to {targets.max()}, outside the "
                    f"{len(info.classes)} classes of DataInfo.classes")
    else:
        if not np.issubdtype(targets.dtype, np.number) or not np.isfinite(targets).all():
            return "regression targets must be finite numbers"
        width = targets.shape[1] if targets.ndim == 2 else 1
        if targets.ndim > 2 or width != info.num_outputs:
            return (f"targets of shape {list(targets.shape)} do not match the "
                    f"{info.num_outputs} target(s) of DataInfo.target_names")
    return None


def _metric_inputs(task: str) -> tuple[hookspecs.DataInfo, Any, Any, Any]:
    """Synthetic validation outputs and targets, shaped as trainyard passes them."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = 60
    if task == "classification":
        info = hookspecs.DataInfo("classification", "features", ["a", "b", "c"], [4])
        targets = (np.arange(n) % 3).astype(np.int64)
        outputs = rng.normal(size=(n, 3)).astype(np.float32)
        perfect = (np.eye(3, dtype=np.float32)[targets] * 10.0).astype(np.float32)
    else:
        info = hookspecs.DataInfo("regression", "features", [], [4], target_names=["y"])
        targets = rng.normal(size=(n, 1)).astype(np.float32)  # [N, T], as in training
        outputs = rng.normal(size=(n, 1)).astype(np.float32)
        perfect = targets.copy()
    return info, outputs, targets, perfect


def _as_metric_value(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CheckFailed(f"fn returned {type(value).__name__} {value!r:.60}; a metric must "
                          "return one float")
    value = float(value)
    if not math.isfinite(value):
        raise CheckFailed(f"fn returned {value}; a metric must return a finite float")
    return value
