"""User-facing errors. The CLI prints their message, never a traceback."""

import re


class TrainyardError(Exception):
    """An error whose message is meant for the person running trainyard."""

    #: The CLI's exit status for it.
    exit_code = 1


class ConfigError(TrainyardError):
    """A job config, override or plugin parameter is invalid. Names the key's full path."""

    exit_code = 2


class PluginError(TrainyardError):
    """A plugin failed to load, broke the hook contract, or clashed with another plugin."""


class TrainingError(TrainyardError):
    """A training run failed; the message carries the root cause from the worker."""


#: Lines Ray adds to a task's error that say nothing of its cause.
_RAY_NOISE = ("ray::", "\x1b[36mray::", "To change retry attempts", "Failed to apply UDF", "Failed to read stream",
              "UDF failed to process", "The above exception was the direct cause", "Traceback (most recent")
#: An error line in a traceback's text: ``ValueError: d/x.parquet: no column 'a'``.
_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception|Invalid)): (.+)$")
#: Errors whose message says it all; others keep their type's name (``KeyError: 'target'``).
_SELF_EXPLAINED = ("ValueError", "OSError", "FileNotFoundError", "ConfigError", "TrainingError", "PluginError",
                   "TrainyardError", "RuntimeError", "ArrowInvalid", "ArrowIOError")


def reason_line(exc: BaseException) -> str:
    """What ``exc`` says went wrong, in one line, through Ray's wrapping: a task's error
    (``RayTaskError``) wraps its cause, and Ray Data's wraps a failing function's error in a
    ``UserCodeException`` whose own text is only Ray's retry advice; the cause is then
    the last error line of the traceback Ray put in the outer error's text."""
    chain, seen = [exc], {id(exc)}
    while True:
        inner = getattr(chain[-1], "cause", None) or chain[-1].__cause__
        if not isinstance(inner, BaseException) or id(inner) in seen:
            break
        chain.append(inner)
        seen.add(id(inner))
    for error in reversed(chain):
        if type(error).__name__ == "UserCodeException":
            continue  # Ray Data's wrapper: its text is advice on retries
        lines = [line.strip() for line in str(error).splitlines()
                 if line.strip() and not line.strip().startswith(_RAY_NOISE)]
        if any(line.startswith('File "') for line in lines):  # a traceback: its last error line
            found = [m for m in map(_ERROR_LINE.match, lines) if m and not m.group(0).startswith("ray.")]
            if found:
                name, message = found[-1].groups()
                return message if name in _SELF_EXPLAINED else f"{name}: {message}"
            continue
        if lines:
            return lines[0]
    return type(exc).__name__
