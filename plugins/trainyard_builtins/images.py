"""Image datasets: scikit-learn's digits; MNIST, Fashion-MNIST and CIFAR-10 from the
standard files in a local folder.

MNIST and Fashion-MNIST are read from the IDX files (``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``,
each optionally ``.gz``); CIFAR-10 from the python pickles (``data_batch_1`` ...
``data_batch_5``, ``test_batch``, ``batches.meta``, optionally inside
``cifar-10-batches-py/``). Images are yielded as float32 ``[N, C, H, W]`` in [0, 1].
"""

from __future__ import annotations

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
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        x = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return x.astype(np.float32) / 255.0, np.asarray(entry[b"labels"], dtype=np.int64)

    parts = [batch(p) for p in sorted(folder.glob("data_batch_*"))]
    train = Split(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    val = Split(*batch(folder / "test_batch")) if (folder / "test_batch").is_file() else None
    classes = [f"class_{i}" for i in range(10)]
    if (folder / "batches.meta").is_file():
        with open(folder / "batches.meta", "rb") as f:
            meta = pickle.load(f, encoding="bytes")
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
