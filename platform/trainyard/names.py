"""The one rule for names that become folders, routes, Serve applications and job
arguments: job and run names, served model and application names, names read back from a
checkpoint's manifest. Such a name never reaches a shell or a router unchecked."""

from __future__ import annotations

import re

from trainyard.errors import ConfigError

NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: Names trainyard keeps for itself: the root Serve application (health routes, 404s).
RESERVED = frozenset({"trainyard"})
RULE_TEXT = ("1-64 characters: letters, digits, '.', '_' or '-', starting with a letter or "
             "digit")


def name_problem(name: object, reserved: bool = False) -> str | None:
    """Why ``name`` breaks the rule, or None when it is fine."""
    if not isinstance(name, str) or not NAME_RULE.fullmatch(name):
        return f"{name!r} is not a valid name ({RULE_TEXT})"
    if reserved and name in RESERVED:
        return f"{name!r} is reserved by trainyard; choose another name"
    return None


def check_name(name: object, where: str, reserved: bool = False, error: type = ConfigError) -> str:
    """``name`` itself if it follows the rule; else ``error`` naming ``where`` it came from.
    ``reserved``: also refuse trainyard's own names (for served models)."""
    problem = name_problem(name, reserved)
    if problem:
        raise error(f"{where}: {problem}")
    return name  # type: ignore[return-value]
