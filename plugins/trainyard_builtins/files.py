"""``files``: train on files without writing a plugin, streamed by Ray Data.

A local file, folder or glob, or an object-storage URI (``s3://bucket/table/*.parquet``,
``gs://...``), read through pyarrow's filesystems, in one of four formats:

- ``parquet``, ``csv``: one row per example; feature columns (or a ``text`` column) and a
  ``label`` column;
- ``jsonl``: JSON Lines, the same columns (typically ``text`` and ``label``);
- ``images``: a folder with one sub-folder per class (``root/cat/1.png``, ...).

Nothing is read in full on the driver: the schema and the class names (a streaming
``unique`` over the label column, unless ``classes`` names them) are checked before the
workers start, and the rows stream to each worker's shard.
"""

from __future__ import annotations

import fnmatch
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from trainyard import DataInfo, DatasetSpec, StreamingData, hookimpl
from trainyard.errors import reason_line

FORMATS = ("parquet", "csv", "jsonl", "images")
EXTENSIONS = {
    "parquet": (".parquet", ".pq"),
    "csv": (".csv", ".csv.gz", ".csv.bz2"),
    "jsonl": (".jsonl", ".json", ".jsonl.gz", ".ndjson"),
    "images": (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff"),
}


@dataclass
class FilesParams:
    #: A file, a folder (every file of the format under it) or a glob; local, or a URI
    #: such as s3://bucket/table/*.parquet.
    uri: str = ""
    #: parquet | csv | jsonl | images
    format: str = "parquet"
    #: classification or regression.
    task: str = "classification"
    #: The label (classification) or target (regression) column. Images: the class is
    #: the name of the image's folder.
    label: str = "label"
    #: Feature columns; empty: every numeric column but the label (features input).
    features: list[str] | None = None
    #: A text column: the examples are texts (for BERT) rather than feature rows.
    text: str = ""
    #: Files of the validation split (same format and columns); empty: trainyard holds out
    #: data.val_fraction of the rows.
    val_uri: str = ""
    #: Class names, in index order; empty: the sorted distinct labels (one streaming pass
    #: over the label column) or, for images, the sorted folder names.
    classes: list[str] | None = None
    #: Images: [height, width] every image is resized to; empty: the first image's size.
    image_size: list[int] | None = None
    #: Images: RGB (3 channels) or L (grayscale, 1 channel).
    image_mode: str = "RGB"

    def __post_init__(self):
        if not self.uri:
            raise ValueError("uri: give the files to read (a file, folder, glob or s3:// URI)")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)} (got {self.format!r})")
        if self.task not in ("classification", "regression"):
            raise ValueError("task must be classification or regression")
        if self.format == "images" and self.task != "classification":
            raise ValueError("format images: the task is classification (one folder per class)")
        if self.image_mode not in ("RGB", "L"):
            raise ValueError("image_mode must be RGB or L")
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ValueError("image_size must be [height, width]")


def input_kind(params: FilesParams) -> str:
    if params.format == "images":
        return "image"
    return "text" if params.text else "features"


# --------------------------------------------------------------------------------------
# Finding the files
# --------------------------------------------------------------------------------------


def _filesystem(uri: str):
    import pyarrow.fs

    if "://" not in uri:
        uri = str(Path(uri).expanduser().resolve())
    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{uri}: cannot open ({reason_line(exc)})") from None


def find_files(uri: str, fmt: str):
    """``(filesystem, paths)`` of the files ``uri`` names: a file, the files of the format
    under a folder, or the matches of a glob (``*``, ``?``, ``[``)."""
    import pyarrow.fs

    glob = any(c in uri for c in "*?[")
    base = uri
    if glob:
        head = uri.split("://", 1)[-1]
        cut = min(head.find(c) for c in "*?[" if c in head)
        base = uri[: len(uri) - len(head) + head.rfind("/", 0, cut) + 1] or "."
    if "://" in base:
        # The bucket, credentials and endpoint, asked with bounded retries: one line now,
        # not a client retrying for minutes (or waiting on a cloud's metadata server).
        from trainyard.runtime.storage import access_problem

        problem = access_problem(base)
        if problem:
            raise ValueError(f"{uri}: {problem}")
    fs, inner = _filesystem(base)
    try:
        info = fs.get_file_info(inner)
        if info.type == pyarrow.fs.FileType.NotFound:
            raise ValueError(f"{uri}: no such file or folder")
        if info.type == pyarrow.fs.FileType.File and not glob:
            if not inner.lower().endswith(EXTENSIONS[fmt]):
                raise ValueError(f"{uri}: not a {fmt} file ({', '.join(EXTENSIONS[fmt])}); is "
                                 f"data.params.format right?")
            return fs, [inner]
        listing = fs.get_file_info(pyarrow.fs.FileSelector(inner, recursive=True))
    except OSError as exc:
        raise ValueError(f"{uri}: cannot read ({reason_line(exc)})") from None
    files = sorted(i.path for i in listing if i.type == pyarrow.fs.FileType.File
                   and not i.base_name.startswith((".", "_")))
    if glob:
        _, pattern = _filesystem(uri) if "://" in uri else (None, str(Path(uri).expanduser().resolve()))
        files = [f for f in files if fnmatch.fnmatchcase(f, pattern)]
    else:
        files = [f for f in files if f.lower().endswith(EXTENSIONS[fmt])]
    if not files:
        what = "matches no file" if glob else f"holds no {fmt} file ({', '.join(EXTENSIONS[fmt])})"
        raise ValueError(f"{uri}: {what}")
    return fs, files


def files_bytes(fs, files: list[str]) -> int | None:
    """The files' total size on storage (one listing, no read)."""
    try:
        return sum(info.size or 0 for info in fs.get_file_info(files))
    except OSError:
        return None


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def _read(params: FilesParams, uri: str, columns: list[str] | None = None, found: tuple | None = None):
    """``(dataset, filesystem, files)`` of ``uri``; ``found``: its files, already listed."""
    fs, files = found or find_files(uri, params.format)
    try:
        return _reader(params, fs, files, columns)
    except Exception as exc:  # pyarrow's and Ray Data's errors: name the URI
        raise ValueError(f"{uri}: cannot read ({reason_line(exc)})") from None


def _reader(params: FilesParams, fs, files: list[str], columns: list[str] | None):
    import ray.data

    if params.format == "parquet":
        # Ray 2.60's default Parquet datasource (V2) starts a pool of footer-reading actors
        # at every execution, that is every epoch, and packs the files into few blocks:
        # measured here, 6-10 s a pass against 2 s with the V1 reader, one block per file.
        from ray.data import DataContext

        ctx = DataContext.get_current()
        saved = ctx.use_datasource_v2
        ctx.use_datasource_v2 = False
        try:
            return ray.data.read_parquet(files, filesystem=fs, columns=columns,
                                         override_num_blocks=len(files)), fs, files
        finally:
            ctx.use_datasource_v2 = saved
    if params.format == "csv":
        return ray.data.read_csv(files, filesystem=fs), fs, files
    if params.format == "jsonl":
        return ray.data.read_json(files, filesystem=fs), fs, files  # JSON Lines: pyarrow's reader
    size = tuple(params.image_size) if params.image_size else _first_image_size(fs, files[0])
    return ray.data.read_images(files, filesystem=fs, size=size, mode=params.image_mode,
                                include_paths=True), fs, files


def _first_image_size(fs, path: str) -> tuple[int, int]:
    from PIL import Image

    with fs.open_input_file(path) as f:
        width, height = Image.open(f).size
    return height, width


#: A classification label column with more distinct values than this is refused.
MAX_CLASSES = 10_000


class _Distinct:
    """``map_batches`` stage: a block's distinct label values, as strings."""

    def __init__(self, label: str):
        self.label = label

    def __call__(self, table):
        import pyarrow as pa
        import pyarrow.compute as pc

        column = table.column(self.label)
        missing = column.null_count
        if pa.types.is_floating(column.type):
            missing += int(pc.sum(pc.is_nan(column)).as_py() or 0)
        names = [label_name(v) for v in pc.unique(column).to_pylist() if not _is_missing(v)]
        return pa.table({"value": pa.array(names, pa.string()),
                         "missing": pa.array([missing] * len(names), pa.int64())} if names else
                        {"value": pa.array([None], pa.string()), "missing": pa.array([missing], pa.int64())})


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _number_name(text: str) -> str:
    """A class name written as a whole number (``"1.0"``) as :func:`label_name` names it."""
    try:
        number = float(text)
    except (TypeError, ValueError):
        return text
    return label_name(number) if number == number and abs(number) != float("inf") else text


def label_name(value) -> str:
    """A class label as a class name: ``1``, ``1.0`` and ``np.float64(1.0)`` are all ``"1"``
    (a label column of whole numbers read as floats, as pandas makes of an int column
    with a gap, names the same classes as the int column)."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, np.generic):
        value = value.item()
    return str(value)


def _label_values(ds, label: str, uri: str, json_files: tuple | None = None) -> list[str]:
    """The label column's distinct values, sorted: one streaming pass over that column
    (each read task keeps its block's distinct values; Ray Data's ``unique`` runs a hash
    aggregation with actors, seconds slower per call)."""
    found: set[str] = set()
    missing = 0
    try:
        distinct = ds.select_columns([label]).map_batches(_Distinct(label), batch_format="pyarrow", batch_size=None)
        for batch in distinct.iter_batches(batch_size=None, batch_format="pyarrow"):
            found.update(v for v in batch.column("value").to_pylist() if v is not None)
            missing += max(batch.column("missing").to_pylist() or [0])
            if len(found) > MAX_CLASSES:
                break
    except Exception as exc:
        raise ValueError(_bad_json_line(json_files, exc) or f"{uri}: cannot read column {label!r} "
                         f"({reason_line(exc)})") from None
    if missing:
        raise ValueError(f"{uri}: column {label!r} has {missing:,} row(s) without a label (empty, null "
                         "or NaN); drop or fill them")
    if len(found) > MAX_CLASSES:
        raise ValueError(f"{uri}: column {label!r} holds more than {MAX_CLASSES:,} distinct values; "
                         "is data.params.task (classification) right? Or name data.params.classes")
    return sorted(found)


def _schema_names(ds, uri: str, json_files: tuple | None = None) -> list[str]:
    try:
        schema = ds.schema()
    except Exception as exc:
        raise ValueError(_bad_json_line(json_files, exc) or f"{uri}: cannot read ({reason_line(exc)})") from None
    if schema is None:
        raise ValueError(f"{uri}: the files hold no rows")
    return list(schema.names), schema


#: What the JSON readers' errors say when a file does not parse (pyarrow's, then Python's).
_JSON_PARSE_ERRORS = ("JSON parse error", "Expecting", "Extra data", "Unterminated", "Invalid control",
                      "Invalid \\escape", "JSONDecodeError")


def _bad_json_line(json_files: tuple | None, exc: BaseException | None = None) -> str | None:
    """``FILE line N: REASON`` for the first line of JSON Lines ``(fs, files)`` that is not a
    JSON object, read as text line by line; only when the read failed to parse (``exc``
    says so): the readers' own messages give a position in a block, not the file's line."""
    import json

    if json_files is None or (exc is not None and not any(m in str(exc) for m in _JSON_PARSE_ERRORS)):
        return None
    fs, files = json_files
    scheme = {"s3": "s3://", "gcs": "gs://"}.get(getattr(fs, "type_name", ""), "")
    for inner in files:
        path = scheme + inner  # as the user names it
        try:
            with fs.open_input_stream(inner, compression="detect") as raw:
                for number, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8-sig"), start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError as exc:
                        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                        column = f" (column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
                        return f"{path} line {number}{column}: not valid JSON ({reason})"
                    if not isinstance(row, dict):
                        return f"{path} line {number}: a JSON {type(row).__name__}, not an object of columns"
        except (OSError, UnicodeDecodeError) as exc:
            return f"{path}: cannot read ({reason_line(exc)})"
    return None


class ToRows:
    """Rows of the files to trainyard's ``input`` and ``target`` columns."""

    def __init__(self, params: FilesParams, features: list[str], classes: list[str], uri: str):
        self.p, self.features, self.uri = params, features, uri
        self.index = {c: i for i, c in enumerate(classes)}
        for i, c in enumerate(classes):  # classes given as "1.0" name the labels 1 and 1.0 too
            self.index.setdefault(_number_name(c), i)

    def _targets(self, values) -> np.ndarray:
        values = np.asarray(values)
        if self.p.task == "regression":
            return values.astype(np.float32)
        if values.dtype.kind == "f" and np.isnan(values).any():  # nulls: see __call__
            raise ValueError(f"{self.uri}: column {self.p.label!r} has row(s) without a label (empty, "
                             "null or NaN); drop or fill them")
        uniques, inverse = np.unique(values if values.dtype != object else values.astype(str),
                                     return_inverse=True)  # one lookup per distinct label
        names = [label_name(v) for v in uniques]
        try:
            codes = np.array([self.index[n] for n in names], dtype=np.int64)
        except KeyError as exc:
            raise ValueError(f"{self.uri}: label {exc.args[0]!r} in column {self.p.label!r} is not one "
                             f"of the classes {list(self.index)}") from None
        return codes[inverse.reshape(-1)] if len(names) else np.zeros(0, np.int64)

    def __call__(self, batch) -> dict:
        if self.p.format == "images":
            images = np.asarray(batch["image"], dtype=np.float32)
            images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
            labels = [Path(p).parent.name for p in batch["path"]]
            return {"input": np.ascontiguousarray(images), "target": self._targets(labels)}
        # a pyarrow table: columns straight to numpy, no pandas frame in between
        column = batch.column(self.p.label)
        if column.null_count:
            raise ValueError(f"{self.uri}: column {self.p.label!r} has row(s) without a label (empty, "
                             "null or NaN); drop or fill them")
        labels = column.to_numpy(zero_copy_only=False)
        if self.p.text:
            texts = batch.column(self.p.text).to_numpy(zero_copy_only=False)
            return {"input": np.array([str(t) for t in texts], dtype=object), "target": self._targets(labels)}
        x = np.empty((batch.num_rows, len(self.features)), dtype=np.float32)
        for i, name in enumerate(self.features):
            x[:, i] = batch.column(name).to_numpy(zero_copy_only=False)
        return {"input": x, "target": self._targets(labels)}


def load_files(params: FilesParams, seed):
    import pyarrow as pa

    kind = input_kind(params)
    label = params.label
    train, fs, files = _read(params, params.uri)
    features: list[str] = []
    if params.format == "images":
        _check_class_folders(files, params.uri)
        classes = params.classes or sorted({Path(f).parent.name for f in files})
        first = train.take_batch(1, batch_format="numpy")["image"][0]
        shape = [1, *first.shape] if first.ndim == 2 else [first.shape[2], first.shape[0], first.shape[1]]
    else:
        json_files = (fs, files) if params.format == "jsonl" else None
        names, schema = _schema_names(train, params.uri, json_files)
        if label not in names:
            raise ValueError(f"{params.uri}: no column {label!r} (label); columns: {', '.join(names)}")
        if kind == "text":
            if params.text not in names:
                raise ValueError(f"{params.uri}: no column {params.text!r} (text); columns: {', '.join(names)}")
        else:
            if params.features:
                missing = [c for c in params.features if c not in names]
                if missing:
                    raise ValueError(f"{params.uri}: no column {missing[0]!r} (features); "
                                     f"columns: {', '.join(names)}")
                features = list(params.features)
            else:
                features = [n for n, t in zip(schema.names, schema.types) if n != label
                            and isinstance(t, pa.DataType) and (pa.types.is_integer(t) or pa.types.is_floating(t))]
                if not features:
                    raise ValueError(f"{params.uri}: no numeric feature columns besides {label!r}")
        count = None
        if params.format == "parquet":  # read only the columns used, which every file must have
            used = [*features, label] if kind != "text" else [params.text, label]
            count = _parquet_rows(fs, files, used, params.uri)
            train, _, _ = _read(params, params.uri, used, found=(fs, files))
        classes = []
        if params.task == "classification":
            if params.classes:
                classes = list(params.classes)
            else:
                classes = _label_values(train, label, params.uri, json_files)
            if len(classes) < 2:
                raise ValueError(f"{params.uri}: column {label!r} holds fewer than two classes ({classes})")
        shape = [len(features)] if kind == "features" else []
    info = DataInfo(
        task=params.task, inputs=kind, classes=[str(c) for c in classes], input_shape=shape,
        feature_names=features, target_names=[label] if params.task == "regression" else [],
    )
    fmt = "numpy" if params.format == "images" else "pyarrow"
    rows = ToRows(params, features, info.classes, params.uri)
    val = None
    if params.val_uri:
        val_ds, val_fs, val_files = _read(params, params.val_uri)
        if params.format != "images":
            names, _schema = _schema_names(val_ds, params.val_uri,
                                           (val_fs, val_files) if params.format == "jsonl" else None)
            needed = [params.text] if kind == "text" else features
            missing = [c for c in [*needed, label] if c not in names]
            if missing:
                raise ValueError(f"{params.val_uri}: no column {missing[0]!r}; columns: {', '.join(names)}")
        val = val_ds.map_batches(ToRows(params, features, info.classes, params.val_uri), batch_format=fmt)
    if params.format != "parquet":
        count = None
    size = files_bytes(fs, files)
    if size is not None and params.format in ("parquet", "images"):
        size *= 4  # compressed on storage: several times larger in memory
    return StreamingData(info, train.map_batches(rows, batch_format=fmt), val, count, size)


def _check_class_folders(files: list[str], uri: str) -> None:
    """An image's class is its folder's name: an image in a folder that also holds class
    folders (the root, or a class with sub-folders) would make a class of that folder."""
    folders = {str(Path(f).parent) for f in files}
    nested = {f for f in folders if any(g.startswith(f.rstrip("/") + "/") for g in folders)}
    stray = [f for f in files if str(Path(f).parent) in nested]
    if stray:
        raise ValueError(f"{uri}: {len(stray)} image(s) lie beside the class folders, not in one "
                         f"(e.g. {stray[0]}); put each image in the folder of its class")


def _parquet_rows(fs, files: list[str], used: list[str], uri: str) -> int | None:
    """The training rows from the Parquet footers (no row is read); a file without one of
    the ``used`` columns is named (Ray Data's error named neither it nor the column)."""
    import pyarrow.parquet as pq

    total = 0
    try:
        for path in files:
            with fs.open_input_file(path) as f:
                footer = pq.ParquetFile(f)
                # Hive partitions (folder=value/) are columns Ray Data adds from the path.
                parts = {seg.split("=", 1)[0] for seg in Path(path).parent.parts if "=" in seg}
                missing = [c for c in used if c not in footer.schema_arrow.names and c not in parts]
                if missing:
                    raise KeyError(path, missing[0])
                total += footer.metadata.num_rows
    except KeyError as exc:
        raise ValueError(f"{uri}: {exc.args[0]} has no column {exc.args[1]!r}, which the job uses (the files' "
                         "columns differ)") from None
    except (OSError, ValueError):
        return None
    return total


@hookimpl
def register_datasets(register):
    register(DatasetSpec(
        "files", load_files, input_kind, lambda p: p.task, FilesParams, streaming=True,
        description="Parquet, CSV, JSON Lines or an image folder, local or s3://, streamed by Ray Data",
    ))
