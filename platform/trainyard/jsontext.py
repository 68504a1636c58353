"""JSON every parser reads (RFC 8259), for the records trainyard writes and its ``--json``.

Python's ``json`` writes a NaN or infinite float as the bare words ``NaN`` and
``Infinity``, which jq, JavaScript's ``JSON.parse``, Go, pandas' ``read_json`` with a
strict engine and most other parsers refuse. A metric can be NaN (a loss that diverged,
R² of a constant target, a metric plugin's own), so ``dumps`` writes each such number as
``null``, and trainyard's readers of its own rows read it back as NaN (``nan_for_null``).
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any


def finite(value: Any) -> Any:
    """``value`` with every float that is not finite (in dicts, lists and tuples, at any
    depth) replaced by None. Integers, strings and other objects pass as they are."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and not math.isfinite(value):
        return None
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps(value, **kwargs)`` with NaN and the infinities written as null."""
    return json.dumps(finite(value), **kwargs)


def nan_for_null(row: dict, keep: tuple[str, ...] = ()) -> dict:
    """A row of numbers read back from a file ``dumps`` wrote: each null value as NaN,
    except under the keys ``keep`` (those that are not numbers)."""
    return {k: (math.nan if v is None and k not in keep else v) for k, v in row.items()}
