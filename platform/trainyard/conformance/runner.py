"""Running a check's steps: in order, each step's outcome one :class:`CheckResult`, up to
the first that does not pass; an exception from the plugin's code reported as one line
that names where in the plugin it was raised."""

from __future__ import annotations

import sysconfig
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainyard.conformance.results import FAILED, PASSED, SKIPPED, CheckFailed, CheckResult, Skip

#: The trainyard core package (platform/trainyard): frames in it are not the plugin's.
_CORE = Path(__file__).resolve().parent.parent

#: A check's name and the step that runs it, giving the result's detail.
Step = tuple[str, Callable[[], str]]


@dataclass
class Plugin:
    """The plugin under check: its name, what the registry knows of it, and the registry."""

    name: str
    #: The registry's PluginInfo of it.
    info: Any
    registry: Any
    #: The folder of the plugin's module, to find its frames in a traceback; None if unknown.
    folder: Path | None = None

    @classmethod
    def of(cls, name: str, info: Any, registry: Any) -> Plugin:
        folder = Path(info.location).resolve().parent if info.location else None
        return cls(name, info, registry, folder)


def run_steps(plugin: Plugin, kind: str, entry: str, steps: list[Step]) -> list[CheckResult]:
    """Run steps in order, up to the first that does not pass (the later ones need
    what it makes)."""
    results: list[CheckResult] = []
    for check, step in steps:
        status, detail = _outcome(step, plugin.folder)
        results.append(CheckResult(plugin.name, kind, entry, check, status, detail))
        if status != PASSED:
            break
    return results


def _outcome(step: Callable[[], str], plugin_dir: Path | None) -> tuple[str, str]:
    """A step's status and detail."""
    try:
        return PASSED, step() or ""
    except Skip as skip:
        return SKIPPED, str(skip)
    except CheckFailed as exc:
        return FAILED, str(exc)
    except Exception as exc:  # noqa: BLE001 - the plugin's own error, reported
        return FAILED, describe(exc, plugin_dir)


def describe(exc: BaseException, plugin_dir: Path | None) -> str:
    """An exception as one line, with where in the plugin's code it was raised."""
    message = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {message[0] if message else ''}".rstrip(": ")
    where = plugin_frame(exc, plugin_dir)
    return f"{text} (raised at {where})" if where else text


def plugin_frame(exc: BaseException, plugin_dir: Path | None) -> str:
    """``file.py:LINE in function`` of the innermost frame of the plugin's own code in the
    exception's traceback: under ``plugin_dir`` if known, else outside trainyard's core and
    the Python libraries. Empty if there is none."""
    libraries = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib", "stdlib")}
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        path = Path(frame.filename).resolve()
        if plugin_dir is not None:
            mine = path.is_relative_to(plugin_dir)
        else:
            mine = not path.is_relative_to(_CORE) and not any(path.is_relative_to(d) for d in libraries)
        if mine:
            return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"
    return ""
