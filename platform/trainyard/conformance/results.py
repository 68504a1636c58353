"""What the checks give back: one :class:`CheckResult` per check, and the two exceptions a
check step raises for a verdict of its own: :class:`CheckFailed` (what is wrong, in the
author's terms) and :class:`Skip` (it cannot run without params the user has to give)."""

from __future__ import annotations

from dataclasses import dataclass

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


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


class Skip(Exception):
    """A check that cannot run without something the user has to give."""
