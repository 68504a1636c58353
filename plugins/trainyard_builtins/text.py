"""Text datasets: a small labelled sentiment set shipped with trainyard, and any CSV or
JSONL file with text and label columns."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from trainyard import DataInfo, DatasetSpec, LoadedData, Split, hookimpl


@dataclass
class TextFileParams:
    #: A .csv or .jsonl file (one JSON object per line).
    path: str = ""
    text_column: str = "text"
    label_column: str = "label"
    #: Optional file of the same kind used as the validation split.
    val_path: str = ""

    def __post_init__(self):
        if not self.path:
            raise ValueError("path: give the CSV or JSONL file to read")


def read_records(path: str | Path, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    import pandas as pd

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"data file {str(p)!r} does not exist")
    if p.suffix in (".jsonl", ".ndjson") or p.name.endswith(".jsonl.gz"):
        frame = pd.read_json(p, lines=True, dtype=False)
    else:
        frame = pd.read_csv(p, dtype=str, keep_default_na=False)
    for column in (text_column, label_column):
        if column not in frame.columns:
            raise ValueError(f"{p}: no column {column!r} (columns: {', '.join(map(str, frame.columns))})")
    return [str(t) for t in frame[text_column]], [str(v) for v in frame[label_column]]


def _load(train_file, val_file, text_column, label_column) -> LoadedData:
    parts = [read_records(train_file, text_column, label_column)]
    if val_file:
        parts.append(read_records(val_file, text_column, label_column))
    classes = sorted({label for _, labels in parts for label in labels})
    index = {c: i for i, c in enumerate(classes)}

    def split(texts, labels):
        return Split(list(texts), np.array([index[v] for v in labels], dtype=np.int64))

    info = DataInfo("classification", "text", classes, [])
    return LoadedData(info, split(*parts[0]), split(*parts[1]) if val_file else None)


def load_text_file(params: TextFileParams, seed):
    return _load(params.path, params.val_path, params.text_column, params.label_column)


def load_sentiment(params, seed):
    folder = resources.files("trainyard_builtins") / "data"
    with resources.as_file(folder / "sentiment_train.jsonl") as train, resources.as_file(
        folder / "sentiment_val.jsonl"
    ) as val:
        return _load(train, val, "text", "label")


@hookimpl
def register_datasets(register):
    register(DatasetSpec("sentiment", load_sentiment, "text",
                         description="Small labelled sentiment set shipped with trainyard (positive/negative)"))
    register(DatasetSpec("text_file", load_text_file, "text", params=TextFileParams,
                         description="A CSV or JSONL file with text and label columns"))
