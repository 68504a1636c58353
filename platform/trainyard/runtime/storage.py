"""Storage paths and URIs: local folders made absolute; object storage (s3://, gs://, ...)
through pyarrow's filesystems, so every node reaches the same place."""

from __future__ import annotations

import shutil
from pathlib import Path


def storage_root(storage_path: str) -> str:
    """A storage path as Ray wants it: a URI as is, a local folder made absolute."""
    if "://" in storage_path:
        return storage_path
    return str(Path(storage_path).expanduser().resolve())


def copy_tree(source: str, dest: str) -> None:
    """Copy a folder to a folder or URI, replacing what ``dest`` held."""
    if "://" not in source and "://" not in dest:
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(source, dest)
        return
    import pyarrow.fs

    pyarrow.fs.copy_files(source, dest)


def write_text(path: str, text: str) -> None:
    """Write a text file at a local path or a URI, making its folder."""
    if "://" not in path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        return
    import pyarrow.fs

    fs, inner = pyarrow.fs.FileSystem.from_uri(path)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode())
