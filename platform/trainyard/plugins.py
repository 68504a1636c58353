"""Plugin loading and the registry of models, datasets and metrics.

Plugins are found through the entry-point group ``trainyard``, the built-ins included,
loaded lazily and exactly once per process. Loading is wrapped per plugin: one plugin
that fails to import, targets another contract version, or implements a hook that does
not exist is dropped and reported, and the others still load. A plugin calling
``sys.exit`` while it is imported, registered or its hooks run is reported the same way
("called sys.exit(...)"), instead of ending the process silently.

Environment:

``TRAINYARD_DISABLE_EXTERNAL_PLUGINS=1``
    load only the plugins shipped with trainyard.
``TRAINYARD_PLUGINS=name,name``
    allow-list of external plugins (entry-point names) to load.
``TRAINYARD_DISABLE_PLUGINS=name,name``
    never load these plugins (built-in or external).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import functools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from trainyard import hookspecs
from trainyard.errors import PluginError
from trainyard.markers import PROJECT

ENTRY_POINT_GROUP = "trainyard"
#: The environment switches that decide which plugins load (module docstring), with the
#: CLI's debug switch: what a job or an embedded Ray carries to its workers so that every
#: process loads the same plugins.
SWITCHES = ("TRAINYARD_PLUGINS", "TRAINYARD_DISABLE_PLUGINS", "TRAINYARD_DISABLE_EXTERNAL_PLUGINS",
            "TRAINYARD_DEBUG")
BUILTIN_DISTRIBUTION = "trainyard"

KINDS = {
    "model": ("register_models", hookspecs.ModelSpec),
    "dataset": ("register_datasets", hookspecs.DatasetSpec),
    "metric": ("register_metrics", hookspecs.MetricSpec),
}


@dataclass
class PluginInfo:
    """One loaded plugin, as ``trainyard plugins`` shows it."""

    name: str
    distribution: str
    version: str
    module: str
    location: str
    builtin: bool
    provides: dict[str, list[str]] = field(
        default_factory=lambda: {"model": [], "dataset": [], "metric": []}
    )


@dataclass
class PluginProblem:
    """A plugin that could not be used, and why."""

    plugin: str
    message: str

    def __str__(self) -> str:
        return f'plugin "{self.plugin}": {self.message}'


@dataclass
class Registry:
    """Everything the loaded plugins registered, by kind and name."""

    models: dict[str, hookspecs.ModelSpec] = field(default_factory=dict)
    datasets: dict[str, hookspecs.DatasetSpec] = field(default_factory=dict)
    metrics: dict[str, hookspecs.MetricSpec] = field(default_factory=dict)
    owners: dict[tuple[str, str], str] = field(default_factory=dict)
    plugins: list[PluginInfo] = field(default_factory=list)
    problems: list[PluginProblem] = field(default_factory=list)
    #: Names two third-party plugins both register (kind, name) -> (kept, dropped): which one
    #: a job means cannot be told, so asking for one is an error naming both. (A built-in's
    #: name stays the built-in's: the clashing plugin is dropped.)
    contested: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)

    def table(self, kind: str) -> dict[str, Any]:
        return {"model": self.models, "dataset": self.datasets, "metric": self.metrics}[kind]

    def get(self, kind: str, name: str) -> Any:
        """The spec registered as ``name``, or a PluginError listing what exists."""
        table = self.table(kind)
        if (kind, name) in self.contested:
            kept, dropped = self.contested[(kind, name)]
            raise PluginError(f"plugins \"{kept}\" and \"{dropped}\" both register a {kind} named {name!r}, so "
                              f"which one is meant cannot be told; disable one with TRAINYARD_DISABLE_PLUGINS="
                              f"{dropped} (or ={kept}), or uninstall it")
        if name in table:
            return table[name]
        known = ", ".join(sorted(table)) or "none"
        msg = f"no {kind} named {name!r} is installed (known {kind}s: {known})"
        if self.problems:
            msg += "; plugins that failed to load: " + "; ".join(map(str, self.problems))
        raise PluginError(msg)

    def owner(self, kind: str, name: str) -> str:
        return self.owners[(kind, name)]

    def version(self, plugin: str) -> str:
        """The distribution version of a loaded plugin; "" when it has none (a plugin
        registered in-process) or is not loaded."""
        info = next((p for p in self.plugins if p.name == plugin), None)
        return "" if info is None or info.version in ("", "?") else info.version


_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None
_infos: dict[str, PluginInfo] = {}
_load_problems: list[PluginProblem] = []
_registry: Registry | None = None
_registry_key: tuple | None = None


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _contract_problem(module: Any) -> str | None:
    declared = getattr(module, "TRAINYARD_HOOK_CONTRACT", None)
    if declared is None:
        return None
    if not isinstance(declared, int) or isinstance(declared, bool):
        return (f"TRAINYARD_HOOK_CONTRACT must be an int (this trainyard provides "
                f"{hookspecs.HOOK_CONTRACT_VERSION}), got {declared!r}")
    if declared == hookspecs.HOOK_CONTRACT_VERSION:
        return None
    return (
        f"written for hook contract version {declared}, but this trainyard "
        f"provides version {hookspecs.HOOK_CONTRACT_VERSION}"
    )


def _exit_text(exc: SystemExit) -> str:
    """How a plugin's ``sys.exit`` is reported: ``called sys.exit(3)``."""
    return f"called sys.exit({'' if exc.code is None else repr(exc.code)})"


def _register_checked(pm: pluggy.PluginManager, obj: Any, name: str) -> str | None:
    """Register ``obj``; on any contract violation unregister it and return why."""
    try:
        return _register_checked_inner(pm, obj, name)
    except SystemExit as exc:  # plugin code run while reading its attributes
        if pm.get_plugin(name) is obj:
            pm.unregister(name=name)
        return f"{_exit_text(exc)} while being registered"


def _register_checked_inner(pm: pluggy.PluginManager, obj: Any, name: str) -> str | None:
    problem = _contract_problem(obj)
    if problem:
        return problem
    try:
        hash(obj)
    except TypeError:  # pluggy keeps plugins in sets; one would break every later call
        return (
            f"the plugin object ({type(obj).__name__}) is not hashable; register a module, "
            "a class, or an instance of a class with __hash__"
        )
    try:
        pm.register(obj, name=name)
    except pluggy.PluginValidationError as exc:
        # Raised for a hook implementation whose arguments the spec lacks.
        return _describe_validation_error(exc, name)
    except ValueError as exc:
        return str(exc)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError:
        pm.unregister(name=name)
        unknown = [a for a in dir(obj) if _is_hookimpl(obj, a) and a not in _spec_names()]
        return (
            f"implements hook(s) that do not exist: {', '.join(sorted(unknown)) or '?'} "
            f"(known hooks: {', '.join(_spec_names())})"
        )
    return None


def _is_hookimpl(obj: Any, attr: str) -> bool:
    try:
        return hasattr(getattr(obj, attr), f"{PROJECT}_impl")
    except Exception:
        return False


def _spec_names() -> list[str]:
    """The hooks of the contract, as pluggy reads them from the hookspecs module."""
    return sorted(name for name, caller in vars(_spec_manager().hook).items()
                  if getattr(caller, "spec", None) is not None)


@functools.cache
def _spec_manager() -> pluggy.PluginManager:
    # A manager holding only the specs: the names exist before any plugin loads.
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _describe_validation_error(exc: pluggy.PluginValidationError, name: str) -> str:
    text = str(exc)
    for hook in _spec_names():
        if hook in text:
            return (
                f"its {hook} takes arguments the hook spec does not provide "
                f"(the spec passes only 'register'): {text.splitlines()[0]}"
            )
    return text.splitlines()[0]


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with entry-point plugins loaded (once)."""
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager(PROJECT)
            pm.add_hookspecs(hookspecs)
            _load_entry_points(pm)
            _pm = pm
        return _pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    external_off = os.environ.get("TRAINYARD_DISABLE_EXTERNAL_PLUGINS", "") not in ("", "0")
    allow = _env_list("TRAINYARD_PLUGINS")
    block = _env_list("TRAINYARD_DISABLE_PLUGINS") or set()
    seen: dict[str, str] = {}  # plugin (entry-point) name -> distribution that has it

    def dist_name_of(ep: importlib.metadata.EntryPoint) -> str:
        return ep.dist.metadata["Name"] if ep.dist is not None else "?"

    # Built-ins first, so an external plugin reusing a built-in's name cannot replace it.
    eps = sorted(
        importlib.metadata.entry_points(group=ENTRY_POINT_GROUP),
        key=lambda ep: (dist_name_of(ep) != BUILTIN_DISTRIBUTION, ep.name),
    )
    for ep in eps:
        dist = ep.dist
        dist_name = dist_name_of(ep)
        builtin = dist_name == BUILTIN_DISTRIBUTION
        if ep.name in block:
            continue
        if not builtin and (external_off or (allow is not None and ep.name not in allow)):
            continue
        if ep.name in seen:
            if seen[ep.name] != dist_name:  # else: the same distribution twice on sys.path
                _load_problems.append(PluginProblem(
                    ep.name,
                    f"distribution {dist_name!r} declares a plugin named {ep.name!r}, which "
                    f"distribution {seen[ep.name]!r} already provides; rename its entry point",
                ))
            continue
        seen[ep.name] = dist_name
        try:
            module = ep.load()
        except BaseException as exc:  # a plugin's import may raise anything, even SystemExit
            if isinstance(exc, KeyboardInterrupt):
                raise
            why = _exit_text(exc) if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
            _load_problems.append(PluginProblem(ep.name, f"error importing {ep.value}: {why}"))
            continue
        problem = _register_checked(pm, module, ep.name)
        if problem:
            _load_problems.append(PluginProblem(ep.name, problem))
            continue
        _infos[ep.name] = PluginInfo(
            name=ep.name,
            distribution=dist_name,
            version=dist.version if dist is not None else "?",
            module=ep.value,
            location=str(getattr(module, "__file__", "") or ""),
            builtin=builtin,
        )


def register_plugin(obj: Any, name: str) -> None:
    """Register a plugin object directly (tests, notebooks). Raises PluginError."""
    pm = get_plugin_manager()
    with _lock:
        problem = _register_checked(pm, obj, name)
        if problem:
            raise PluginError(str(PluginProblem(name, problem)))
        _infos[name] = PluginInfo(
            name=name,
            distribution="(registered in process)",
            version="",
            module=getattr(obj, "__name__", type(obj).__name__),
            location="",
            builtin=False,
        )


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered with :func:`register_plugin`."""
    pm = get_plugin_manager()
    with _lock:
        if pm.get_plugin(name) is not None:
            pm.unregister(name=name)
        _infos.pop(name, None)


def reset() -> None:
    """Forget every loaded plugin; the next use loads entry points again (tests)."""
    global _pm, _registry, _registry_key
    with _lock:
        _pm = None
        _infos.clear()
        _load_problems.clear()
        _registry = None
        _registry_key = None


def get_registry() -> Registry:
    """Collect the registrations of every loaded plugin (cached until plugins change).

    A plugin whose hook raises or registers something of the wrong type is dropped
    whole and reported in ``problems``; so is one that registers a name a plugin loaded
    before it (built-ins first, then by name) already has, or one name twice.
    """
    global _registry, _registry_key
    pm = get_plugin_manager()
    with _lock:
        # The plugin objects themselves, not only their names: a name unregistered and
        # registered again for another object must not reuse the old registry.
        key = tuple(pm.list_name_plugin())
        if _registry is not None and _registry_key == key:
            return _registry
        registry = Registry(problems=list(_load_problems))
        for plugin_name in _ordered_plugin_names(pm):
            info = _infos.get(plugin_name) or PluginInfo(
                plugin_name, "?", "", "", "", builtin=False
            )
            info = dataclasses.replace(info, provides={k: [] for k in KINDS})
            collected, problem = _collect_from(pm, plugin_name)
            if problem:
                registry.problems.append(PluginProblem(plugin_name, problem))
                continue
            problem = _name_clash(registry, plugin_name, collected)
            if problem:  # dropped whole, as any other broken plugin: the rest still load
                registry.problems.append(PluginProblem(plugin_name, problem))
                for kind, spec in collected:
                    other = registry.owners.get((kind, spec.name))
                    if other is not None and other != plugin_name and not _is_builtin(other):
                        registry.contested[(kind, spec.name)] = (other, plugin_name)
                continue
            for kind, spec in collected:
                table = registry.table(kind)
                table[spec.name] = spec
                registry.owners[(kind, spec.name)] = plugin_name
                info.provides[kind].append(spec.name)
            registry.plugins.append(info)
        _registry, _registry_key = registry, key
        return registry


def _is_builtin(plugin_name: str) -> bool:
    info = _infos.get(plugin_name)
    return bool(info is not None and info.builtin)


def _name_clash(registry: Registry, plugin_name: str, collected: list) -> str | None:
    """Why ``plugin_name`` cannot be loaded beside the plugins already in ``registry``: the
    first name it registers twice or that another plugin already has; None when none."""
    seen: set[tuple[str, str]] = set()
    for kind, spec in collected:
        if (kind, spec.name) in seen:
            return f"registers the {kind} {spec.name!r} twice"
        seen.add((kind, spec.name))
        other = registry.owners.get((kind, spec.name))
        if other is not None:
            return (f"registers a {kind} named {spec.name!r}, which plugin \"{other}\" already "
                    f"registers; rename yours, or disable the other with "
                    f"TRAINYARD_DISABLE_PLUGINS={other}")
    return None


def _ordered_plugin_names(pm: pluggy.PluginManager) -> list[str]:
    """Plugin names in a stable order: built-ins first, then by name."""
    names = [name for name, _ in pm.list_name_plugin()]
    return sorted(names, key=lambda n: (not _is_builtin(n), n))


def _collect_from(pm: pluggy.PluginManager, plugin_name: str) -> tuple[list, str | None]:
    """Call each registration hook of one plugin; return its specs or the problem."""
    others = [plugin for name, plugin in pm.list_name_plugin() if name != plugin_name]
    collected: list[tuple[str, Any]] = []
    for kind, (hook_name, spec_type) in KINDS.items():
        # subset_hook_caller keeps pluggy's own call loop while letting each error be
        # attributed to the plugin that caused it.
        caller = pm.subset_hook_caller(hook_name, remove_plugins=others)
        if not caller.get_hookimpls():
            continue
        problem = _check_and_call(caller, kind, hook_name, spec_type, collected)
        if problem:
            return [], problem
    return collected, None


def _check_and_call(
    caller: Any, kind: str, hook_name: str, spec_type: type, out: list
) -> str | None:
    problems: list[str] = []

    def register(spec: Any) -> None:
        problem = _validate_spec(kind, spec_type, spec)
        if problem:
            problems.append(problem)
        else:
            out.append((kind, spec))

    try:
        results = caller(register=register)
    except Exception as exc:
        return f"{hook_name} raised {type(exc).__name__}: {exc}"
    except SystemExit as exc:  # not KeyboardInterrupt: Ctrl-C still stops trainyard
        return f"{hook_name} {_exit_text(exc)}; a plugin's hooks must not end the process"
    if problems:
        return f"{hook_name}: {problems[0]}"
    returned = [r for r in results if r is not None]
    if returned:
        return (
            f"{hook_name} returned {type(returned[0]).__name__}; hooks return nothing and "
            f"call register({spec_type.__name__}(...)) for each {kind}"
        )
    return None


def _validate_spec(kind: str, spec_type: type, spec: Any) -> str | None:
    if not isinstance(spec, spec_type):
        return f"registered a {type(spec).__name__}, expected a trainyard.{spec_type.__name__}"
    if not isinstance(spec.name, str) or not spec.name.strip():
        return f"registered a {kind} without a name"
    checks: list[tuple[bool, str]] = []
    if kind == "model":
        checks = [
            (callable(spec.build), "build must be callable"),
            (callable(spec.processor), "processor must be callable"),
            (
                bool(spec.inputs) and all(i in hookspecs.INPUT_KINDS for i in spec.inputs),
                f"inputs must be a non-empty subset of {hookspecs.INPUT_KINDS}",
            ),
        ]
    elif kind == "dataset":
        checks = [
            (callable(spec.load), "load must be callable"),
            (
                callable(spec.inputs) or spec.inputs in hookspecs.INPUT_KINDS,
                f"inputs must be one of {hookspecs.INPUT_KINDS} or a callable",
            ),
            (isinstance(spec.streaming, bool), "streaming must be True or False"),
            (
                callable(spec.task) or spec.task in hookspecs.TASKS,
                f"task must be one of {hookspecs.TASKS} or a callable",
            ),
        ]
    elif kind == "metric":
        checks = [
            (callable(spec.fn), "fn must be callable"),
            (spec.task in (*hookspecs.TASKS, "any"), "task must be classification, regression or any"),
            (spec.mode in ("max", "min"), "mode must be 'max' or 'min'"),
        ]
    params = getattr(spec, "params", None)
    if params is not None:
        checks.append((dataclasses.is_dataclass(params) and isinstance(params, type),
                       "params must be a dataclass type"))
    for ok, message in checks:
        if not ok:
            return f"{kind} {spec.name!r}: {message}"
    return None


def hook_names() -> list[str]:
    """Every hook in the contract."""
    return list(_spec_names())


def load_problems() -> list[PluginProblem]:
    """Plugins that failed to load in this process."""
    get_plugin_manager()
    return list(_load_problems)


def describe_hooks() -> dict[str, Callable]:
    """Hook name to its spec function (for docs and tests)."""
    return {name: getattr(hookspecs, name) for name in _spec_names()}
