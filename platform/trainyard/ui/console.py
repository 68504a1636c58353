"""The rich Console every command prints through: fitted to a terminal, whole in a log."""

from __future__ import annotations

from typing import IO

from rich.console import Console

#: The width a console that is not a terminal renders at: wide enough that no table cell is
#: cut short with '…' and no line is wrapped. Tables still take only the width they need.
LOG_WIDTH = 100_000


def make_console(stderr: bool = False, file: IO[str] | None = None) -> Console:
    """A Console on stdout (or stderr, or ``file``). On a terminal it fits the terminal's
    width; when the stream is a pipe or a file (a CI log, ``| tee``), it renders every id,
    name and value whole, without colour, and callers print one plain line per event
    instead of redrawing live progress (see :func:`is_live`)."""
    console = Console(stderr=stderr, file=file, highlight=False)
    if not console.is_terminal:
        console.width = LOG_WIDTH
    return console


def is_live(console: Console | None) -> bool:
    """Whether ``console`` can redraw in place (a live table, a progress bar)."""
    return console is not None and console.is_interactive
