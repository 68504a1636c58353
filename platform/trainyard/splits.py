"""What is wrong with a split of data given its DataInfo: shared by the conformance check
(a plugin's ``load``) and the stream's check before workers start (a streamed dataset's
rows), without either importing the other."""

from __future__ import annotations

from typing import Any

from trainyard import hookspecs


def split_problem(split: Any, info: hookspecs.DataInfo) -> str | None:
    """What is wrong with a split given the DataInfo, or None."""
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
    inputs_problem = _text_problem if info.inputs == "text" else _array_problem
    return inputs_problem(split.inputs, info) or _targets_problem(targets, info)


def _text_problem(inputs: Any, info: hookspecs.DataInfo) -> str | None:
    """What is wrong with text inputs, or None."""
    import numpy as np

    ok = isinstance(inputs, (list, tuple)) or (isinstance(inputs, np.ndarray) and inputs.ndim == 1)
    if not ok or not all(isinstance(t, str) for t in inputs):
        return "text inputs must be a list of strings"
    if info.input_shape:
        return f"DataInfo.input_shape must be [] for text (got {info.input_shape})"
    return None


def _array_problem(inputs: Any, info: hookspecs.DataInfo) -> str | None:
    """What is wrong with array inputs (features, images), or None."""
    import numpy as np

    x = np.asarray(inputs)
    shape = list(info.input_shape)
    rows = [list(x.shape[1:])]
    if info.inputs == "image" and len(shape) == 3 and shape[0] == 1:
        rows.append([1, *x.shape[1:]])  # H x W arrays for one channel
    if shape not in rows:
        return (f"inputs of shape {list(x.shape)} do not match DataInfo.input_shape "
                f"{shape} (expected [N, {', '.join(map(str, shape))}])")
    if not np.issubdtype(x.dtype, np.number):
        return f"inputs must be numeric (got dtype {x.dtype})"
    return None


def _targets_problem(targets: Any, info: hookspecs.DataInfo) -> str | None:
    """What is wrong with a split's targets (an array) for the task, or None."""
    import numpy as np

    if info.task == "classification":
        whole = np.issubdtype(targets.dtype, np.integer) or targets.dtype == np.bool_ or (
            np.issubdtype(targets.dtype, np.floating) and np.isfinite(targets).all()
            and bool((targets == np.round(targets)).all()))  # 0.0/1.0 from a table: cast to int64 as before
        if not whole:
            return f"classification targets must be class indices (integers), got dtype {targets.dtype}"
        targets = targets.astype(np.int64)
        if targets.min() < 0 or targets.max() >= len(info.classes):
            return (f"targets run from {targets.min()} to {targets.max()}, outside the "
                    f"{len(info.classes)} classes of DataInfo.classes")
        return None
    if not np.issubdtype(targets.dtype, np.number) or not np.isfinite(targets).all():
        return "regression targets must be finite numbers"
    width = targets.shape[1] if targets.ndim == 2 else 1
    if targets.ndim > 2 or width != info.num_outputs:
        return (f"targets of shape {list(targets.shape)} do not match the "
                f"{info.num_outputs} target(s) of DataInfo.target_names")
    return None
