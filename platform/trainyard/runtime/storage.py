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


def storage_root(storage_path: str, key: str = "storage_path") -> str:
    """A storage path as Ray wants it: a URI as is, a local folder made absolute. A URI is
    checked first (:func:`check_uri`, once per process): a bucket that does not exist,
    credentials missing or refused, or an endpoint that does not answer is one
    ConfigError naming ``key`` and the URI, before any worker starts."""
    if "://" in storage_path:
        check_uri(storage_path, key, write=True)
        return storage_path
    return str(Path(storage_path).expanduser().resolve())


# ---------------------------------------------------------------------------------------
# Object storage: checking a URI before anything is written to it
# ---------------------------------------------------------------------------------------

#: URIs :func:`check_uri` found usable in this process (uri, write).
_CHECKED: set[tuple[str, bool]] = set()

#: Where an AWS client finds credentials without asking the network (besides the instance
#: profile of an EC2 node, which only a request can tell).
_CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                         "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")


def uri_problem(uri: str) -> str | None:
    """What is wrong with a storage URI's form, without contacting anything (None if
    nothing): a scheme pyarrow has no filesystem for, or no bucket."""
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        return None
    if scheme not in ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss"):
        return f"the scheme {scheme + '://'!r} is not one trainyard stores to (s3://, gs://, hdfs://, abfs://, file://)"
    if not parsed.netloc:
        return "it names no bucket (s3://BUCKET/PREFIX)"
    return None


def s3_endpoint(uri: str = "") -> str:
    """The S3 endpoint a URI goes to: its ``endpoint_override`` query, else
    AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (which pyarrow and boto honour), else AWS's."""
    from urllib.parse import parse_qs, urlparse

    query = parse_qs(urlparse(uri).query)
    if query.get("endpoint_override"):
        return query["endpoint_override"][0]
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return f"{os.environ[name]} ({name})"
    return "AWS's S3 endpoint"


def gcs_endpoint() -> str:
    """The endpoint a gs:// URI goes to: CLOUD_STORAGE_EMULATOR_ENDPOINT (which Google's
    C++ client, and so pyarrow's GCS filesystem, honours), else Google's."""
    endpoint = os.environ.get("CLOUD_STORAGE_EMULATOR_ENDPOINT")
    return f"{endpoint} (CLOUD_STORAGE_EMULATOR_ENDPOINT)" if endpoint else "Google Cloud Storage"


def endpoint_of(uri: str) -> str:
    """The endpoint of an object-storage URI, as an error message names it."""
    return gcs_endpoint() if _is_gcs(uri) else s3_endpoint(uri)


def _is_gcs(uri: str) -> bool:
    return uri.lower().startswith(("gs://", "gcs://"))


def gcs_credentials_source() -> str | None:
    """Where Google's application default credentials come from, as far as can be told
    without a request: GOOGLE_APPLICATION_CREDENTIALS, gcloud's ADC file, or a Google
    Compute Engine / GKE node's metadata server. None when there are none (a GCS client
    would then wait on a metadata server that is not there)."""
    if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return "GOOGLE_APPLICATION_CREDENTIALS"
    gcloud = Path(os.environ.get("CLOUDSDK_CONFIG") or "~/.config/gcloud").expanduser()
    if (gcloud / "application_default_credentials.json").is_file():
        return str(gcloud / "application_default_credentials.json")
    if os.environ.get("GCE_METADATA_HOST") or os.environ.get("GCE_METADATA_ROOT"):
        return "the metadata server at GCE_METADATA_HOST"
    try:  # how Google's libraries tell a Compute Engine (or GKE) node on Linux
        if "Google" in Path("/sys/class/dmi/id/product_name").read_text():
            return "this Google Compute Engine node's metadata server"
    except OSError:
        pass
    return None


def gcs_credentials_problem(uri: str) -> str | None:
    """Why a gs:// URI cannot be used, known before any request (None if nothing, or not a
    gs:// URI): no credentials anywhere, or a credentials file that is not there."""
    if not _is_gcs(uri):
        return None
    named = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if named and not Path(named).expanduser().is_file():
        return f"GOOGLE_APPLICATION_CREDENTIALS names {named}, which is not a file"
    if gcs_credentials_source() is None:
        return ("no Google Cloud credentials found (set GOOGLE_APPLICATION_CREDENTIALS to a service "
                "account key file, run `gcloud auth application-default login`, or run on a GCE or "
                "GKE node)")
    return None


def aws_credentials_source() -> str | None:
    """Where credentials an AWS client would use come from, as far as can be told without
    a request (an EC2 instance profile cannot be): None when there are none."""
    for name in _CREDENTIAL_VARIABLES:
        if os.environ.get(name):
            return name
    for variable, default in (("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
                              ("AWS_CONFIG_FILE", "~/.aws/config")):
        path = Path(os.environ.get(variable) or default).expanduser()
        if path.is_file():
            return str(path)
    return None


def _short(exc: BaseException) -> str:
    text = str(exc)
    if "google::cloud::Status(" in text:  # Google's client: its code and last message, no metadata
        import re

        code = re.search(r"Status\((\w+):", text)
        last = (re.search(r"original-message=([^,}]+)", text)
                or re.search(r"Status\(\w+: ([^{]+?)\s*(?:error_info|$)", text))
        if code and last:
            return f"{code.group(1)}: {last.group(1).strip()}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _access_problem(uri: str, exc: BaseException) -> str:
    """One line saying why a request to object storage failed."""
    text = str(exc)
    upper = text.upper()
    if "NETWORK_CONNECTION" in upper or "CURLCODE" in upper or "COULD NOT CONNECT" in upper \
            or "COULD NOT RESOLVE" in upper or "TIMED OUT" in upper:
        return f"cannot reach the storage endpoint {endpoint_of(uri)}: {_short(exc)}"
    if "NO_SUCH_BUCKET" in upper or ("BUCKET" in upper and "NOT FOUND" in upper):
        return f"the bucket does not exist at {endpoint_of(uri)}; create it first"
    if uri.lower().startswith("s3://"):
        source = aws_credentials_source()
        if source is None:
            return ("no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                    f"or AWS_PROFILE, or give the node an instance profile), and the store refused the "
                    f"request: {_short(exc)}")
        if any(code in upper for code in ("ACCESS_DENIED", "INVALID_ACCESS_KEY", "SIGNATURE_DOES_NOT_MATCH",
                                          "EXPIRED", "HTTP STATUS 403", "FORBIDDEN")):
            return f"the store refused the credentials from {source}: {_short(exc)}"
    return _short(exc)


#: How long checking a gs:// URI may retry before it says the endpoint does not answer
#: (Google's client otherwise retries for minutes).
GCS_CHECK_RETRY_S = 10.0


def _checking_filesystem(uri: str):
    """``(filesystem, path)`` for checking ``uri``: pyarrow's, as Ray Train builds it from
    the URI; for gs://, the same client with its retries bounded by GCS_CHECK_RETRY_S."""
    import pyarrow.fs

    fs, inner = pyarrow.fs.FileSystem.from_uri(uri)
    if fs.type_name == "gcs":
        from datetime import timedelta
        from urllib.parse import parse_qs, urlparse

        query = {k: v[-1] for k, v in parse_qs(urlparse(uri).query).items()}
        fs = pyarrow.fs.GcsFileSystem(scheme=query.get("scheme"),
                                      endpoint_override=query.get("endpoint_override"),
                                      retry_time_limit=timedelta(seconds=GCS_CHECK_RETRY_S))
    return fs, inner


def access_problem(uri: str, write: bool = False) -> str | None:
    """Why object storage at ``uri`` cannot be used, in one line (None if it can), asked
    through the same pyarrow client Ray Train uses: a URI of an unknown form, a bucket that
    does not exist, missing or refused credentials, an endpoint that does not answer.
    ``write``: also write and delete a small object under it."""
    problem = uri_problem(uri) or gcs_credentials_problem(uri)
    if problem:
        return problem
    import pyarrow.fs

    try:
        fs, inner = _checking_filesystem(uri)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ValueError
        return _access_problem(uri, exc)
    inner = inner.rstrip("/")
    if fs.type_name == "local":
        return None
    bucket = inner.split("/", 1)[0]
    try:
        found = fs.get_file_info(bucket)
    except Exception as exc:
        return _access_problem(uri, exc)
    if found.type == pyarrow.fs.FileType.NotFound:
        at = f" at {endpoint_of(uri)}" if fs.type_name in ("s3", "gcs") else ""
        return f"the bucket {bucket!r} does not exist{at}; create it first"
    if write:
        probe = f"{inner}/.trainyard-write-check-{uuid.uuid4().hex[:12]}"
        try:
            with fs.open_output_stream(probe) as f:
                f.write(b"trainyard checks it can write here\n")
            fs.delete_file(probe)
        except Exception as exc:
            return f"cannot write there: {_access_problem(uri, exc)}"
    return None


def check_uri(uri: str, key: str, write: bool = False) -> None:
    """Raise one ConfigError naming ``key`` and the URI when object storage at ``uri``
    cannot be used (:func:`access_problem`). A URI found usable is not checked again in
    this process."""
    from trainyard.errors import ConfigError

    if (uri, write) in _CHECKED or (uri, True) in _CHECKED:
        return
    problem = access_problem(uri, write)
    if problem:
        raise ConfigError(f"{key}: {uri!r}: {problem}")
    _CHECKED.add((uri, write))


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
        with open(tmp, "w", encoding="utf-8") as f:
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
    inner = inner.rstrip("/")
    if fs.type_name == "gcs":
        # pyarrow lists a GCS "folder" from its objects, not from the prefixes GCS returns
        # beside them: a sub-folder nothing made a marker object for (Ray Train's uploads
        # make none) is missing from a listing of one level. Every object under the prefix
        # is listed, and the sub-folders are the first parts of their names.
        infos = fs.get_file_info(pyarrow.fs.FileSelector(inner, recursive=True, allow_not_found=True))
        return sorted({info.path[len(inner) + 1:].split("/", 1)[0] for info in infos} - {""})
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


def file_size(uri: str) -> int | None:
    """The size of the object (or local file) at ``uri``; None when there is none."""
    if not is_uri(uri):
        try:
            return Path(uri).stat().st_size
        except OSError:
            return None
    import pyarrow.fs

    fs, inner = pyarrow.fs.FileSystem.from_uri(uri)
    info = fs.get_file_info(inner)
    return info.size if info.type == pyarrow.fs.FileType.File else None


def join(base: str | Path, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI (whose ``//`` a Path would collapse)."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))
