"""Datasets for the experiments; nothing is downloaded at run time.

* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images): always there, the default
  for the demo and for tests.
* ``fashion-mnist``: IDX files, by default from Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist``); the default 28x28 data.
* ``mnist``: IDX files in a directory the user points at (``--data-dir``).
* ``cifar10``: the "python version" batches (``cifar-10-batches-py``) in a local directory.

Every loader returns uint8/float images as a float32 tensor ``(N, C, H, W)`` scaled to
[0, 1] and int64 labels. ``make_splits`` turns that into seeded, reproducible
train/validation/test tensors, standardised with the training split's statistics.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10")

_HOW_TO_GET = {
    "fashion-mnist": ("install Debian's package (apt-get install dataset-fashion-mnist, which puts the "
                      f"files in {FASHION_MNIST_DIR}) or pass --data-dir to a directory holding "
                      "train-images-idx3-ubyte[.gz] and the three other IDX files"),
    "mnist": ("download the four MNIST IDX files (train-images-idx3-ubyte.gz, "
              "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) "
              "into one directory and pass it with --data-dir"),
    "cifar10": ("download and unpack CIFAR-10's python version (cifar-10-python.tar.gz) and pass "
                "--data-dir to the cifar-10-batches-py directory (or its parent)"),
}

# IDX type codes (the third byte of the magic number) -> numpy big-endian dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(RuntimeError):
    """A data file is missing or unreadable; the message names the path and the remedy."""


def read_idx(path: os.PathLike) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzip-compressed or not, into a numpy array."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file not found: {path}")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc} (corrupt or truncated download?)") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX header says shape {shape} ({expected} bytes of data) but the "
                        f"file holds {len(raw) - header} bytes (corrupt or truncated download?)")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: os.PathLike, array: np.ndarray) -> None:
    """Write an array as an IDX file (gzip when the name ends in .gz); used to make test data."""
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    array = np.ascontiguousarray(array)
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    body = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body += array.astype(array.dtype.newbyteorder(">")).tobytes()
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(body)


def _find_idx(directory: Path, split: str, kind: str, dataset: str) -> Path:
    """The IDX file for split ("train"/"t10k") and kind ("images"/"labels") in directory."""
    ndim = 3 if kind == "images" else 1
    stems = (f"{split}-{kind}-idx{ndim}-ubyte", f"{split}-{kind}.idx{ndim}-ubyte")
    for stem in stems:
        for name in (stem, stem + ".gz"):
            if (directory / name).is_file():
                return directory / name
    raise DataError(f"{dataset}: no {stems[0]}[.gz] in {directory}; to get the data, "
                    f"{_HOW_TO_GET[dataset]}")


def load_idx_dataset(directory: os.PathLike, dataset: str = "fashion-mnist") -> dict[str, tuple[Tensor, Tensor]]:
    """Train and test images/labels from the four IDX files of an MNIST-format directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{dataset}: data directory {directory} does not exist; to get the data, "
                        f"{_HOW_TO_GET[dataset]}")
    out = {}
    for split, name in (("train", "train"), ("t10k", "test")):
        images = read_idx(_find_idx(directory, split, "images", dataset))
        labels = read_idx(_find_idx(directory, split, "labels", dataset))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{dataset} in {directory}: {split} images {images.shape} and labels "
                            f"{labels.shape} do not match (expected (N, H, W) and (N,))")
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        out[name] = (x, torch.from_numpy(labels.astype(np.int64)))
    return out


def load_cifar10(directory: os.PathLike) -> dict[str, tuple[Tensor, Tensor]]:
    """CIFAR-10's python-version batches from a local directory."""
    directory = Path(directory)
    if (directory / "cifar-10-batches-py").is_dir():
        directory = directory / "cifar-10-batches-py"
    files = {"train": [directory / f"data_batch_{i}" for i in range(1, 6)], "test": [directory / "test_batch"]}
    out = {}
    for split, paths in files.items():
        xs, ys = [], []
        for path in paths:
            if not path.is_file():
                raise DataError(f"cifar10: {path} not found; to get the data, {_HOW_TO_GET['cifar10']}")
            try:
                with open(path, "rb") as f:
                    batch = pickle.load(f, encoding="bytes")
                data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                labels = np.asarray(batch[b"labels"], dtype=np.int64)
            except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as exc:
                raise DataError(f"cifar10: cannot read {path}: {exc!r} (corrupt file?)") from exc
            if len(data) != len(labels):
                raise DataError(f"cifar10: {path} holds {len(data)} images and {len(labels)} labels")
            xs.append(data)
            ys.append(labels)
        out[split] = (torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0),
                      torch.from_numpy(np.concatenate(ys)))
    return out


def load_digits() -> dict[str, tuple[Tensor, Tensor]]:
    """scikit-learn's bundled 8x8 digits as one "train" pool (no official test split)."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    return {"train": (x, torch.from_numpy(bunch.target.astype(np.int64)))}


def load_raw(dataset: str, data_dir: Optional[os.PathLike] = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Images in [0, 1] as (N, C, H, W) float32 and int64 labels, keyed "train" (and "test")."""
    if dataset == "digits":
        return load_digits()
    if dataset == "fashion-mnist":
        return load_idx_dataset(data_dir or FASHION_MNIST_DIR, dataset)
    if dataset == "mnist":
        if data_dir is None:
            raise DataError(f"mnist: no data directory given; {_HOW_TO_GET['mnist']}")
        return load_idx_dataset(data_dir, dataset)
    if dataset == "cifar10":
        if data_dir is None:
            raise DataError(f"cifar10: no data directory given; {_HOW_TO_GET['cifar10']}")
        return load_cifar10(data_dir)
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")


@dataclass
class Splits:
    """Standardised train/validation/test tensors on one device."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    name: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device) -> "Splits":
        moved = {k: getattr(self, k).to(device) for k in
                 ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}
        return Splits(**moved, num_classes=self.num_classes, name=self.name)


def make_splits(raw: dict[str, tuple[Tensor, Tensor]], n_train: Optional[int], n_val: int,
                n_test: Optional[int] = None, seed: int = 0, name: str = "") -> Splits:
    """Seeded train/validation(/test) split of the training pool.

    Validation comes from the training pool; the test set is the official one when there
    is one (subsampled to ``n_test`` if given), otherwise the part of the pool left after
    train and validation. ``n_train=None`` takes everything not used for validation (or
    test). The same seed gives the same split on every machine (torch's CPU generator).
    """
    x, y = raw["train"]
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    has_test = "test" in raw
    pool_for_train = len(x) - n_val - (0 if has_test else (n_test or 0))
    n_train = pool_for_train if n_train is None else n_train
    if n_train <= 0 or n_val <= 0 or n_train > pool_for_train:
        raise ValueError(f"{name or 'dataset'}: cannot take {n_train} training and {n_val} validation "
                         f"examples from a pool of {len(x)}")
    tr, va = perm[:n_train], perm[n_train:n_train + n_val]
    if has_test:
        x_test, y_test = raw["test"]
        if n_test is not None and n_test < len(x_test):
            pick = torch.randperm(len(x_test), generator=gen)[:n_test]
            x_test, y_test = x_test[pick], y_test[pick]
    else:
        rest = perm[n_train + n_val:]
        rest = rest if n_test is None else rest[:n_test]
        if len(rest) == 0:
            raise ValueError(f"{name or 'dataset'}: nothing left for a test set")
        x_test, y_test = x[rest], y[rest]
    mean = x[tr].mean(dim=(0, 2, 3), keepdim=True)
    std = x[tr].std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)

    def norm(t: Tensor) -> Tensor:
        return ((t - mean) / std).contiguous()

    num_classes = int(torch.cat([y, raw["test"][1]]).max()) + 1 if has_test else int(y.max()) + 1
    return Splits(norm(x[tr]), y[tr].clone(), norm(x[va]), y[va].clone(), norm(x_test), y_test.clone(),
                  num_classes=num_classes, name=name)


def load_splits(dataset: str, n_train: Optional[int], n_val: int, n_test: Optional[int] = None,
                seed: int = 0, data_dir: Optional[os.PathLike] = None) -> Splits:
    """``load_raw`` + ``make_splits`` in one call."""
    return make_splits(load_raw(dataset, data_dir), n_train, n_val, n_test, seed=seed, name=dataset)
