"""Storage paths and URIs: local folders made absolute; object storage (s3://, gs://, ...)
through pyarrow's filesystems, so every node reaches the same place.

Writes here never leave a half-written file where a reader looks: a local file is written
to a temporary file in the same folder and renamed over its name (``os.replace``, atomic
on POSIX), a local folder is filled under a temporary name and renamed into place, and an
object store's single PUT is all-or-nothing already. A process killed mid-write leaves
only a hidden ``.<name>.tmp-*`` sibling, never a truncated file under the real name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import uuid
from pathlib import Path


def storage_root(storage_path: str) -> str:
    """A storage path as Ray wants it: a URI as is, a local folder made absolute."""
    if "://" in storage_path:
        return storage_path
    return str(Path(storage_path).expanduser().resolve())


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def tmp_name(name: str) -> str:
    """A hidden sibling name for ``name`` unique to this process: ``.<name>.tmp-<host>-<pid>-<hex>``.
    :func:`remove_stale_tmp` recognises the ones a killed process left."""
    return f".{name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a local file so that readers see the old content or the new, never a part:
    a temporary file in the same folder, flushed to disk, renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / tmp_name(path.name)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text(path: str, text: str) -> None:
    """Write a text file at a local path or a URI, making its folder; atomically (see the
    module docstring)."""
    if not is_uri(path):
        atomic_write_text(path, text)
        return
    import pyarrow.fs

    fs, inner = pyarrow.fs.FileSystem.from_uri(path)
    parent = inner.rsplit("/", 1)[0] if "/" in inner else ""
    if fs.type_name != "local":  # one PUT: the object appears whole or not at all
        with fs.open_output_stream(inner) as f:
            f.write(text.encode())
        return
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/{tmp_name(inner.rsplit('/', 1)[-1])}"
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode())
    fs.move(tmp, inner)  # a rename on a local filesystem


def read_text(path: str) -> str | None:
    """A text file at a local path or a URI; None if there is none."""
    if not is_uri(path):
        try:
            return Path(path).read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None
    import pyarrow.fs

    fs, inner = pyarrow.fs.FileSystem.from_uri(path)
    if fs.get_file_info(inner).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(inner) as f:
        return f.read().decode()


def list_names(path: str) -> list[str]:
    """The names directly in a local folder or under a URI prefix; [] if there is none."""
    if not is_uri(path):
        try:
            return sorted(os.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return []
    import pyarrow.fs

    fs, inner = pyarrow.fs.FileSystem.from_uri(path)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(inner, allow_not_found=True))
    return sorted(info.base_name for info in infos)


def copy_into(source: str, dest: str) -> None:
    """Copy a folder (local or URI) to ``dest`` (local or URI), which must not exist yet."""
    if not is_uri(source) and not is_uri(dest):
        shutil.copytree(source, dest, symlinks=False)
        return
    import pyarrow.fs

    pyarrow.fs.copy_files(source, dest)


def copy_tree(source: str, dest: str) -> None:
    """Copy a folder to a folder or URI, replacing what ``dest`` held.

    Locally the copy is made under a temporary name next to ``dest`` and renamed into
    place, so ``dest`` never holds a part-copied folder or a mix of old and new files (an
    existing ``dest`` is moved aside first: for that instant ``dest`` is absent). To a URI
    the files are uploaded in place; prefer a fresh versioned prefix there (as the winners
    registry does) and point readers at it last.
    """
    if is_uri(dest):
        copy_into(source, dest)
        return
    target = Path(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / tmp_name(target.name)
    try:
        copy_into(source, str(tmp))
        if target.exists() or target.is_symlink():
            old = target.parent / tmp_name(target.name + ".old")
            os.replace(target, old)
            os.replace(tmp, target)
            remove_tree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        remove_tree(tmp)
        raise


def replace_dir(source: Path, dest: Path) -> None:
    """Rename the local folder ``source`` to ``dest``, which is absent or an empty folder
    (one made to reserve the name): one atomic rename."""
    try:
        os.replace(source, dest)
    except OSError:
        # A filesystem that will not rename over an empty folder: free the name first.
        with contextlib.suppress(OSError):
            os.rmdir(dest)
        os.replace(source, dest)


def replace_symlink(link: Path, target: str) -> None:
    """Point the symlink ``link`` at ``target`` (relative to its folder) atomically: a new
    link under a temporary name renamed over the old one."""
    tmp = link.parent / tmp_name(link.name)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def remove_tree(path: str | Path) -> None:
    """Remove a local file, symlink or folder if it is there."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_tmp(folder: str | Path) -> list[Path]:
    """Remove the temporary siblings (see :func:`tmp_name`) in a local ``folder`` that a
    process of this host left when it was killed; those of live processes, or of other
    hosts sharing the folder, stay. Returns what was removed."""
    host = socket.gethostname()
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        name = entry.name
        if not name.startswith(".") or ".tmp-" not in name:
            continue
        parts = name.rsplit(".tmp-", 1)[1].rsplit("-", 2)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        if _alive(int(parts[1])):
            continue
        remove_tree(entry)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
