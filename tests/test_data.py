"""Data loading for the experiments: IDX and CIFAR readers, errors, seeded splits."""
import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from marthe_experiments.data import (
    FASHION_MNIST_DIR, DataError, load_cifar10, load_idx_dataset, load_raw, load_splits, make_splits,
    read_idx, write_idx)


def _mnist_dir(tmp_path: Path, n_train=50, n_test=20, size=6, gz=True, dotted=False) -> Path:
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    sep = "." if dotted else "-"
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(tmp_path / f"{split}-images{sep}idx3-ubyte{ext}", rng.integers(0, 256, (n, size, size), dtype=np.uint8))
        write_idx(tmp_path / f"{split}-labels{sep}idx1-ubyte{ext}", rng.integers(0, 10, n, dtype=np.uint8))
    return tmp_path


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, name, dtype):
    array = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    if dtype == np.uint8:
        array = np.arange(30, dtype=np.uint8).reshape(2, 3, 5)
    write_idx(tmp_path / name, array)
    back = read_idx(tmp_path / name)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_idx_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match="not found.*nothere"):
        read_idx(tmp_path / "nothere")


def test_idx_bad_magic(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04" + bytes(20))
    with pytest.raises(DataError, match="bad.*not an IDX file"):
        read_idx(tmp_path / "bad")


def test_idx_truncated_data(tmp_path):
    write_idx(tmp_path / "x", np.zeros((4, 3, 3), dtype=np.uint8))
    raw = (tmp_path / "x").read_bytes()
    (tmp_path / "x").write_bytes(raw[:-5])
    with pytest.raises(DataError, match=r"x: IDX header says shape \(4, 3, 3\).*holds 31 bytes"):
        read_idx(tmp_path / "x")


def test_idx_corrupt_gzip(tmp_path):
    good = gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x04abcd")
    (tmp_path / "c.gz").write_bytes(good[:-6])
    with pytest.raises(DataError, match="cannot read IDX file .*c.gz"):
        read_idx(tmp_path / "c.gz")


@pytest.mark.parametrize("gz,dotted", [(True, False), (False, False), (False, True)])
def test_load_idx_dataset(tmp_path, gz, dotted):
    data = load_idx_dataset(_mnist_dir(tmp_path, gz=gz, dotted=dotted), "mnist")
    x, y = data["train"]
    assert x.shape == (50, 1, 6, 6) and x.dtype == torch.float32 and y.shape == (50,) and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert data["test"][0].shape == (20, 1, 6, 6)


def test_missing_idx_file_says_how_to_get_the_data(tmp_path):
    _mnist_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*apt-get install dataset-fashion-mnist"):
        load_idx_dataset(tmp_path, "fashion-mnist")


def test_missing_directory_and_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'none'} does not exist.*--data-dir"):
        load_idx_dataset(tmp_path / "none", "mnist")
    with pytest.raises(DataError, match="mnist: no data directory given"):
        load_raw("mnist")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_raw("imagenet")


def test_images_labels_mismatch(tmp_path):
    _mnist_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(7, dtype=np.uint8))
    with pytest.raises(DataError, match="do not match"):
        load_idx_dataset(tmp_path, "mnist")


def _cifar_dir(root: Path, n=4) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f)
    return d


def test_cifar10_from_parent_or_batches_dir(tmp_path):
    d = _cifar_dir(tmp_path)
    for where in (tmp_path, d):
        data = load_cifar10(where)
        assert data["train"][0].shape == (20, 3, 32, 32) and data["test"][0].shape == (4, 3, 32, 32)
    (d / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch not found.*cifar-10-python"):
        load_cifar10(d)
    (d / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read .*data_batch_3"):
        load_cifar10(tmp_path)


def test_digits_splits_are_seeded_disjoint_and_standardised():
    a = load_splits("digits", 1000, 300, seed=3)
    b = load_splits("digits", 1000, 300, seed=3)
    c = load_splits("digits", 1000, 300, seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert not torch.equal(a.x_train, c.x_train)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert len(a.x_train) == 1000 and len(a.x_val) == 300 and len(a.x_test) == 1797 - 1300
    assert abs(float(a.x_train.mean())) < 1e-4
    rows = {tuple(r.tolist()) for r in torch.cat([a.x_train, a.x_val, a.x_test]).flatten(1)}
    assert len(rows) > 1700  # no example reused across splits (digits has a handful of duplicates)


def test_split_sizes_are_checked(tmp_path):
    raw = load_idx_dataset(_mnist_dir(tmp_path), "mnist")
    s = make_splits(raw, 30, 10, n_test=5, seed=0)
    assert (len(s.x_train), len(s.x_val), len(s.x_test)) == (30, 10, 5)
    assert len(make_splits(raw, None, 10).x_train) == 40
    with pytest.raises(ValueError, match="cannot take 45 training and 10 validation"):
        make_splits(raw, 45, 10)


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_package():
    s = load_splits("fashion-mnist", 700, 70, n_test=100)
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10 and len(s.x_test) == 100
