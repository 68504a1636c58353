"""Image datasets: scikit-learn's digits; MNIST, Fashion-MNIST and CIFAR-10 from the
standard files in a local folder.

MNIST and Fashion-MNIST are read from the IDX files (``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``,
each optionally ``.gz``); CIFAR-10 from the python pickles (``data_batch_1`` ...
``data_batch_5``, ``test_batch``, ``batches.meta``, optionally inside
``cifar-10-batches-py/``). Images are yielded as float32 ``[N, C, H, W]`` in [0, 1].

The CIFAR pickles are read with a restricted unpickler (:func:`load_cifar_pickle`): it
builds numpy arrays and plain containers and refuses every other global, so a crafted
``data_batch_1`` cannot run code when loaded.
"""

from __future__ import annotations

import builtins
import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from trainyard import DataInfo, DatasetSpec, LoadedData, Split, hookimpl

MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class FolderParams:
    #: Folder holding the dataset's standard files.
    path: str = ""
    #: Use at most this many training examples (0: all).
    limit: int = 0

    def __post_init__(self):
        if not self.path:
            raise ValueError("path: give the folder holding the dataset's files")
        if self.limit < 0:
            raise ValueError("limit must not be negative")


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The numpy globals a pickled array (or numpy scalar) refers to, under the module
    names numpy 1.x (``numpy.core``) and 2.x (``numpy._core``) write."""
    core = np._core if hasattr(np, "_core") else np.core
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = core.multiarray.scalar
        # pickle protocol 5 writes arrays as _frombuffer(buffer, dtype, shape, order)
        allowed[(f"{package}.numeric", "_frombuffer")] = core.numeric._frombuffer
    return allowed


#: Plain data types a pickled dict of arrays, lists and bytes may name; never functions.
SAFE_BUILTINS = frozenset({"dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray",
                           "str", "int", "float", "complex", "bool"})


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle naming a global that a dataset file has no business naming."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that admits only numpy's array reconstruction and plain builtin types:
    enough for a CIFAR batch, nothing that runs code (no ``os.system``, no ``eval``)."""

    def __init__(self, file, path: Path | str, **kwargs):
        super().__init__(file, **kwargs)
        self.path = path
        self.allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        if module == "__builtin__":  # the Python 2 name, which protocols 0-2 write
            module = "builtins"
        if module == "builtins" and name in SAFE_BUILTINS:
            return getattr(builtins, name)
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        if (module, name) == ("_codecs", "encode"):
            # Python 3 writes bytes at pickle protocol 2 as _codecs.encode(text, "latin1").
            return self._latin1_encode
        raise UnsafePickleError(
            f"{self.path}: refusing to unpickle the global {module}.{name}: a CIFAR-10 batch "
            "holds only numpy arrays, lists and bytes (is this file what it claims to be?)"
        )

    def _latin1_encode(self, text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
            raise UnsafePickleError(
                f"{self.path}: refusing to unpickle _codecs.encode with the codec {encoding!r}: "
                "pickled bytes use only 'latin1'"
            )
        return text.encode("latin1", errors)


def load_cifar_pickle(path: Path) -> dict:
    """Read one CIFAR-10 python pickle (``data_batch_N``, ``test_batch``, ``batches.meta``)
    with :class:`RestrictedUnpickler`; a dict, its keys as bytes (as CIFAR writes them)."""
    with open(path, "rb") as f:
        try:
            entry = RestrictedUnpickler(f, path, encoding="bytes").load()
        except UnsafePickleError:
            raise
        except Exception as exc:
            raise ValueError(f"{path}: not a CIFAR-10 python pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: not a CIFAR-10 python pickle (holds a {type(entry).__name__}, not a dict)")
    # Python 3 writers may use str keys; CIFAR's own files use bytes.
    return {k.encode() if isinstance(k, str) else k: v for k, v in entry.items()}


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format): magic, dims (big-endian), then data."""
    with _open(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=IDX_DTYPES[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise ValueError(f"{path}: holds {array.size} values, header says {dims}")
    return array.reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        for candidate in (folder / name, folder / "raw" / name):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"{folder}: no {stem}[.gz] found")


def _limit(split: Split, limit: int) -> Split:
    return Split(split.inputs[:limit], split.targets[:limit]) if limit else split


def _idx_loader(classes):
    def load(params: FolderParams, seed):
        folder = Path(params.path).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"dataset folder {str(folder)!r} does not exist")

        def split(prefix):
            images = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
            labels = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"))
            if len(images) != len(labels):
                raise ValueError(f"{folder}: {len(images)} {prefix} images but {len(labels)} labels")
            x = images.astype(np.float32)[:, None, :, :] / 255.0
            return Split(x, labels.astype(np.int64))

        train = _limit(split("train"), params.limit)
        val = split("t10k")
        h, w = train.inputs.shape[2:]
        info = DataInfo("classification", "image", list(classes), [1, int(h), int(w)])
        return LoadedData(info, train, val)

    return load


def load_cifar10(params: FolderParams, seed):
    folder = Path(params.path).expanduser()
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    if not (folder / "data_batch_1").is_file():
        raise FileNotFoundError(f"{folder}: no CIFAR-10 batches (data_batch_1 ...) found")

    def batch(path):
        entry = load_cifar_pickle(path)
        missing = [k.decode() for k in (b"data", b"labels") if k not in entry]
        if missing:
            raise ValueError(f"{path}: a CIFAR-10 batch needs the keys 'data' and 'labels'; missing {missing}")
        x = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return x.astype(np.float32) / 255.0, np.asarray(entry[b"labels"], dtype=np.int64)

    parts = [batch(p) for p in sorted(folder.glob("data_batch_*"))]
    train = Split(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    val = Split(*batch(folder / "test_batch")) if (folder / "test_batch").is_file() else None
    classes = [f"class_{i}" for i in range(10)]
    if (folder / "batches.meta").is_file():
        meta = load_cifar_pickle(folder / "batches.meta")
        if b"label_names" not in meta:
            raise ValueError(f"{folder / 'batches.meta'}: has no 'label_names'")
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"]]
    info = DataInfo("classification", "image", classes, [3, 32, 32])
    return LoadedData(info, _limit(train, params.limit), val)


def load_digits(params, seed):
    from sklearn.datasets import load_digits as sk_load

    bunch = sk_load()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    info = DataInfo("classification", "image", [str(c) for c in bunch.target_names], [1, 8, 8])
    return LoadedData(info, Split(x, bunch.target.astype(np.int64)))


@hookimpl
def register_datasets(register):
    register(DatasetSpec("digits", load_digits, "image",
                         description="scikit-learn's 8x8 handwritten digits (1,797 images)"))
    register(DatasetSpec("mnist", _idx_loader(MNIST_CLASSES), "image", params=FolderParams,
                         description="MNIST from its IDX files in a local folder"))
    register(DatasetSpec("fashion_mnist", _idx_loader(FASHION_CLASSES), "image", params=FolderParams,
                         description="Fashion-MNIST from its IDX files in a local folder"))
    register(DatasetSpec("cifar10", load_cifar10, "image", params=FolderParams,
                         description="CIFAR-10 from its python pickle batches in a local folder"))
