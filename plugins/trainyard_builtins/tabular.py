"""Tabular datasets: scikit-learn's breast_cancer, and any CSV or Parquet file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from trainyard import DataInfo, DatasetSpec, LoadedData, Split, hookimpl


def load_breast_cancer(params, seed):
    from sklearn.datasets import load_breast_cancer as sk_load

    bunch = sk_load()
    info = DataInfo(
        task="classification",
        inputs="features",
        classes=[str(c) for c in bunch.target_names],
        input_shape=[bunch.data.shape[1]],
        feature_names=[str(f) for f in bunch.feature_names],
    )
    return LoadedData(info, Split(bunch.data.astype(np.float32), bunch.target.astype(np.int64)))


@dataclass
class TableParams:
    #: A .csv, .csv.gz or .parquet file with one row per example.
    path: str = ""
    #: Column holding the label (classification) or target (regression).
    label: str = "label"
    #: classification or regression.
    task: str = "classification"
    #: Feature columns; empty means every numeric column but the label.
    features: list[str] | None = None
    #: Optional file with the same columns used as the validation split.
    val_path: str = ""

    def __post_init__(self):
        if not self.path:
            raise ValueError("path: give the CSV or Parquet file to read")
        if self.task not in ("classification", "regression"):
            raise ValueError("task must be classification or regression")


def read_table(path: str):
    import pandas as pd

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"data file {str(p)!r} does not exist")
    try:
        if p.suffix == ".parquet" or p.name.endswith(".pq"):
            frame = pd.read_parquet(p)
        else:
            try:
                frame = pd.read_csv(p, engine="pyarrow")  # several times faster on large files
            except (ImportError, ValueError):
                frame = pd.read_csv(p)
    except Exception as exc:  # pandas' and pyarrow's parse errors: name the file
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ValueError(f"data file {str(p)!r}: cannot read it ({reason})") from None
    if frame.empty:
        raise ValueError(f"data file {str(p)!r} holds no rows")
    return frame


def _check_values(frame, features: list[str], label: str, path: str) -> None:
    """Missing labels and missing or infinite feature values, named by column: they would
    otherwise train to a NaN loss (or a class named 'nan')."""
    missing = int(frame[label].isna().sum())
    if missing:
        raise ValueError(f"{path}: column {label!r} has {missing:,} row(s) without a label (empty or NaN); "
                         "drop or fill them")
    try:
        values = frame[features].to_numpy(dtype=np.float64, na_value=np.nan)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: the feature columns must hold numbers ({exc})") from None
    finite = np.isfinite(values).all(axis=0)
    if not finite.all():
        column = features[int(np.flatnonzero(~finite)[0])]
        count = int((~np.isfinite(values[:, list(features).index(column)])).sum())
        raise ValueError(f"{path}: column {column!r} has {count:,} missing (NaN) or infinite value(s); "
                         "drop or fill them")


def load_table(params: TableParams, seed):
    import pandas as pd

    frame = read_table(params.path)
    if params.label not in frame.columns:
        columns = list(map(str, frame.columns))
        other = next((sep for sep in (";", "\t", "|") if len(columns) == 1 and sep in columns[0]), None)
        hint = f"; the file looks {other!r}-separated, and CSV files are read comma-separated" if other else ""
        raise ValueError(f"{params.path}: no label column {params.label!r} (columns: {', '.join(columns)}){hint}")
    features = params.features or [
        c for c in frame.columns if c != params.label and pd.api.types.is_numeric_dtype(frame[c])
    ]
    missing = [c for c in features if c not in frame.columns]
    if missing or not features:
        raise ValueError(f"{params.path}: feature columns not found: {missing or 'no numeric columns'}")
    frames = [frame] + ([read_table(params.val_path)] if params.val_path else [])
    if params.val_path:
        absent = [c for c in [*features, params.label] if c not in frames[1].columns]
        if absent:
            raise ValueError(f"{params.val_path}: no column(s) {', '.join(map(repr, absent))}, which the "
                             f"training file {params.path} has")
    for path, f in zip([params.path, params.val_path], frames):
        _check_values(f, features, params.label, path)
    classes: list[str] = []
    if params.task == "classification":
        classes = sorted({str(v) for f in frames for v in f[params.label]})
        if len(classes) < 2:
            raise ValueError(f"{params.path}: column {params.label!r} holds fewer than two classes ({classes}); "
                             "a classifier needs at least two (or is data.params.task regression?)")
    index = {c: i for i, c in enumerate(classes)}

    def split(f) -> Split:
        x = f[features].to_numpy(dtype=np.float32)
        if params.task == "classification":
            y = np.array([index[str(v)] for v in f[params.label]], dtype=np.int64)
        else:
            y = f[params.label].to_numpy(dtype=np.float32)
        return Split(x, y)

    info = DataInfo(
        task=params.task,
        inputs="features",
        classes=classes,
        input_shape=[len(features)],
        feature_names=[str(c) for c in features],
        target_names=[params.label] if params.task == "regression" else [],
    )
    return LoadedData(info, split(frames[0]), split(frames[1]) if params.val_path else None)


@hookimpl
def register_datasets(register):
    register(DatasetSpec("breast_cancer", load_breast_cancer, "features", "classification",
                         description="scikit-learn's breast cancer set (569 rows, 30 features)"))
    register(DatasetSpec("table", load_table, "features", lambda p: p.task, TableParams,
                         description="A CSV or Parquet file with a label column"))
