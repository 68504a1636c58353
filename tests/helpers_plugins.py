"""Helpers for tests that install plugins: real distributions on disk, and a snapshot of
the registry to check a test leaves it as it found it."""

from __future__ import annotations

import textwrap
import uuid
from contextlib import contextmanager
from pathlib import Path

from trainyard import plugins


def unique(prefix: str) -> str:
    """A module or plugin name no other test (or earlier run) has imported."""
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def make_distribution(
    root: Path,
    name: str,
    entry_points: dict[str, str],
    modules: dict[str, str],
    version: str = "1.0",
) -> Path:
    """Write an installed distribution into ``root``, as pip would leave it.

    ``root/<name>-<version>.dist-info`` gets ``METADATA`` and an ``entry_points.txt``
    declaring ``entry_points`` (plugin name -> module) in the ``trainyard`` group;
    ``modules`` (module name -> source) become ``root/<module>.py``. Put ``root`` on
    ``sys.path`` and ``importlib.metadata`` finds the distribution like any other.
    """
    dist_info = root / f"{name}-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    )
    lines = [f"[{plugins.ENTRY_POINT_GROUP}]"]
    lines += [f"{ep} = {target}" for ep, target in entry_points.items()]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    return dist_info


def registry_snapshot() -> dict:
    """What the registry holds, by name: compare before and after a test."""
    registry = plugins.get_registry()
    pm = plugins.get_plugin_manager()
    return {
        "plugins": sorted(name for name, _ in pm.list_name_plugin()),
        "models": sorted(registry.models),
        "datasets": sorted(registry.datasets),
        "metrics": sorted(registry.metrics),
        "problems": [str(p) for p in registry.problems],
    }


@contextmanager
def plugin_registered(obj, name: str):
    """Register ``obj`` on the real manager; remove it in ``finally`` and check the
    registry is back to what it was."""
    before = registry_snapshot()
    plugins.register_plugin(obj, name)
    try:
        yield
    finally:
        plugins.unregister_plugin(name)
        assert registry_snapshot() == before
