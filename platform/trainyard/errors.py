"""User-facing errors. The CLI prints their message, never a traceback."""


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
