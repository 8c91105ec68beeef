"""Dataset loading: real shared files where they exist, small hand-written IDX files elsewhere."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nkat_search.config import ConfigError
from nkat_search.train.data import DeviceData, load_dataset
from nkat_search.train.datasets import dataset_info
from nkat_search.train.sources import DataError, load_split, resolve_data_dir

_CANDIDATES = [Path(p) for p in (os.environ.get("NKAT_DATA_DIR"), "/work/shared/datasets") if p]
SHARED = next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0])


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """Every test writes its caches under pytest's tmp dir, never the home dir."""
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("nkat-cache")
    mp.setenv("NKAT_CACHE_DIR", str(cache))
    yield cache
    mp.undo()


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("NKAT_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="session")
def shared():
    if not SHARED.is_dir():
        from conftest import missing_data

        missing_data(f"shared datasets not found at {', '.join(map(str, _CANDIDATES))} "
                     "(set NKAT_DATA_DIR)")
    return SHARED


# ---- helpers: EMNIST-format IDX files ---------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x0800 | array.ndim
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_emnist(root: Path, split_name: str, upright: np.ndarray, labels: np.ndarray,
                  train: bool, gz: bool) -> None:
    """Write images the way EMNIST stores them: transposed."""
    raw = root / "EMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    prefix = f"emnist-{split_name}-{'train' if train else 'test'}"
    for kind, array in (("images-idx3", upright.transpose(0, 2, 1)), ("labels-idx1", labels)):
        data = _idx_bytes(array)
        path = raw / f"{prefix}-{kind}-ubyte"
        if gz:
            with gzip.open(f"{path}.gz", "wb") as f:
                f.write(data)
        else:
            path.write_bytes(data)


def _bar_images(n: int) -> np.ndarray:
    """Upright images: a bar across the top 4 rows, a column down the left edge only in row 10+,
    and the sample index coded in two pixels so that samples can be told apart."""
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    images[:, 0:4, :] = 200
    images[:, 10:, 0] = 100
    images[:, 27, 26] = np.arange(n) % 256
    images[:, 27, 27] = np.arange(n) // 256
    return images


def _sample_ids(images: torch.Tensor) -> torch.Tensor:
    """Decode the index written by _bar_images from padded (N, 1, 32, 32) images."""
    return images[:, 0, 29, 28].long() + 256 * images[:, 0, 29, 29].long()


@pytest.fixture
def emnist_root(tmp_path, fresh_cache):
    root = tmp_path / "data"
    labels = np.arange(300) % 26 + 1
    _write_emnist(root, "letters", _bar_images(300), labels, train=True, gz=True)
    _write_emnist(root, "letters", _bar_images(52), np.arange(52) % 26 + 1, train=False, gz=True)
    return root


# ---- shared data ------------------------------------------------------------------------------


@pytest.mark.parametrize("name,first_count", [("mnist", 5923), ("fashion_mnist", 6000)])
def test_mnist_like_shapes_and_labels(shared, session_cache, name, first_count):
    images, labels = load_split(name, "train", shared, download=False)
    assert images.shape == (60000, 1, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert labels.bincount().tolist()[0] == first_count
    assert images[:, :, :2].max() == 0 and images[:, :, :, -2:].max() == 0  # zero padding
    test_images, test_labels = load_split(name, "test", shared, download=False)
    assert test_images.shape == (10000, 1, 32, 32) and test_labels.shape == (10000,)
    assert any((session_cache / "tensors").glob(f"{name}-train-*.pt"))
    again, _ = load_split(name, "train", shared, download=False)
    assert torch.equal(again, images)


def test_mnist_counts_and_stats(shared):
    _, labels = load_split("mnist", "train", shared, download=False)
    assert labels.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    data = load_dataset("mnist", shared, "cpu", download=False)
    # Stats cover the 32x32 frame: the README's 28x28 mean 0.1307 scaled by 784 / 1024.
    assert data.mean.item() == pytest.approx(0.1307 * 784 / 1024, abs=1e-3)
    assert data.eval_split == "test" and len(data.eval_labels) == 10000


def test_cifar10_shapes_balance_and_stats(shared):
    images, labels = load_split("cifar10", "train", shared, download=False)
    assert images.shape == (50000, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.bincount().tolist() == [5000] * 10
    test_images, test_labels = load_split("cifar10", "test", shared, download=False)
    assert test_images.shape == (10000, 3, 32, 32)
    assert test_labels.bincount().tolist() == [1000] * 10
    data = load_dataset("cifar10", shared, "cpu", download=False)
    assert data.mean.tolist() == pytest.approx([0.4914, 0.4822, 0.4465], abs=1e-3)
    assert data.std.tolist() == pytest.approx([0.2470, 0.2435, 0.2616], abs=1e-3)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_cifar_file_is_named(shared, tmp_path, fresh_cache, damage):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    target = folder / "test_batch.bin"
    shutil.copy(shared / "cifar-10-batches-bin" / "test_batch.bin", target)
    target.chmod(0o644)
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[12345] ^= 0xFF
    else:
        data = data[:-100]
    target.write_bytes(bytes(data))
    with pytest.raises(DataError, match="test_batch.bin"):
        load_split("cifar10", "test", tmp_path, download=False)


def test_corrupt_gz_is_named(tmp_path, fresh_cache):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(raw / f"{name}.gz", "wb") as f:
            f.write(b"not mnist")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz.*md5"):
        load_split("mnist", "train", tmp_path, download=False)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00truncated")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz"):
        load_split("mnist", "train", tmp_path, download=False)
    assert not list((fresh_cache / "MNIST" / "raw").glob("train-images*"))  # nothing half-written


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "emnist", "cifar10"])
def test_missing_dir_names_the_fix(tmp_path, fresh_cache, name):
    with pytest.raises(DataError) as err:
        load_split(name, "train", tmp_path / "nowhere", download=False)
    message = str(err.value)
    assert "--data-dir" in message and "NKAT_DATA_DIR" in message and "\n" not in message
    layout = {"mnist": "MNIST/raw", "fashion_mnist": "FashionMNIST/raw", "emnist": "EMNIST/raw",
              "cifar10": "cifar-10-batches-bin"}[name]
    assert layout in message


def test_download_failure_is_one_line(tmp_path, fresh_cache, monkeypatch):
    """A failed download (no network here, and the test must not need it) becomes a DataError."""
    from torchvision.datasets import utils

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(utils, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="download failed.*--data-dir"):
        load_split("cifar10", "test", tmp_path / "data", download=True)


def test_a_named_data_dir_is_never_downloaded_into_unless_asked(tmp_path, fresh_cache,
                                                                 monkeypatch):
    """--data-dir (or NKAT_DATA_DIR) says where the data is: a missing dataset is reported, naming
    the folder and the file, and fetched only with --download (issue: EMNIST was downloaded
    although --data-dir was given, and the error then said "pass --data-dir")."""
    from torchvision import datasets

    from nkat_search.train.sources import DataDir, data_location

    fetched = []

    def offline(*args, **kwargs):
        fetched.append(kwargs)
        raise OSError("network unreachable")

    monkeypatch.setattr(datasets, "EMNIST", offline)
    folder = tmp_path / "datasets"
    folder.mkdir()
    with pytest.raises(DataError) as err:
        load_split("emnist", "train", folder)
    message = str(err.value)
    assert fetched == [] and str(folder) in message and "--download" in message
    assert "emnist-letters-train-images-idx3-ubyte" in message and "\n" not in message
    monkeypatch.setenv("NKAT_DATA_DIR", str(folder))
    with pytest.raises(DataError, match=r"\$NKAT_DATA_DIR"):
        load_split("emnist", "train", None)
    assert fetched == []
    with pytest.raises(DataError, match="download failed"):
        load_split("emnist", "train", data_location(folder, download=True))
    assert len(fetched) == 1
    monkeypatch.delenv("NKAT_DATA_DIR")
    assert data_location(None).download and not data_location(folder).download
    assert data_location(DataDir(folder, False), download=True).download


# ---- EMNIST (hand-written files in the official format) ---------------------------------------


def test_emnist_letters_upright_and_zero_based(emnist_root):
    images, labels = load_split("emnist", "train", emnist_root, download=False)
    assert images.shape == (300, 1, 32, 32) and images.dtype == torch.uint8
    assert labels.min() == 0 and labels.max() == 25 and labels.dtype == torch.int64
    assert labels[:26].tolist() == list(range(26))
    # Upright means the bar runs along the top rows (2..5 after the 2-px padding), not the left.
    assert (images[:, 0, 2:6, 2:30] == 200).all()
    assert (images[:, 0, 12:30, 2] == 100).all() and (images[:, 0, 6:12, 2] == 0).all()
    assert _sample_ids(images).tolist() == list(range(300))
    assert dataset_info("emnist").num_classes == 26


def test_emnist_balanced_plain_files(tmp_path, fresh_cache):
    labels = np.arange(94) % 47
    _write_emnist(tmp_path, "balanced", _bar_images(94), labels, train=False, gz=False)
    images, loaded = load_split("emnist", "test", tmp_path, emnist_split="balanced", download=False)
    assert loaded.tolist() == labels.tolist()
    assert (images[:, 0, 2:6, 2:30] == 200).all()
    assert dataset_info("emnist", "balanced").num_classes == 47


def test_emnist_truncated_file_is_named(tmp_path, fresh_cache):
    _write_emnist(tmp_path, "letters", _bar_images(10), np.arange(10) + 1, train=True, gz=False)
    path = tmp_path / "EMNIST" / "raw" / "emnist-letters-train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="emnist-letters-train-images-idx3-ubyte.*truncated"):
        load_split("emnist", "train", tmp_path, download=False)


def test_emnist_labels_out_of_range(tmp_path, fresh_cache):
    _write_emnist(tmp_path, "letters", _bar_images(10), np.arange(10), train=True, gz=False)
    with pytest.raises(DataError, match="labels outside 1..26"):
        load_split("emnist", "train", tmp_path, download=False)


# ---- load_dataset and DeviceData --------------------------------------------------------------


def test_val_split_is_seeded_and_disjoint(emnist_root):
    data = load_dataset("emnist", emnist_root, "cpu", val_fraction=0.2, seed=3, download=False)
    assert data.eval_split == "val"
    train_ids, val_ids = _sample_ids(data.train_images), _sample_ids(data.eval_images)
    assert len(val_ids) == 60 and len(train_ids) == 240
    assert set(train_ids.tolist()).isdisjoint(val_ids.tolist())
    assert sorted(train_ids.tolist() + val_ids.tolist()) == list(range(300))
    assert train_ids.tolist() == sorted(train_ids.tolist())  # file order kept
    again = load_dataset("emnist", emnist_root, "cpu", val_fraction=0.2, seed=3, download=False)
    assert torch.equal(_sample_ids(again.eval_images), val_ids)
    other = load_dataset("emnist", emnist_root, "cpu", val_fraction=0.2, seed=4, download=False)
    assert not torch.equal(_sample_ids(other.eval_images), val_ids)


def test_limits_take_the_first_images(emnist_root):
    data = load_dataset("emnist", emnist_root, "cpu", train_limit=100, test_limit=7, download=False)
    assert _sample_ids(data.train_images).tolist() == list(range(100))
    assert _sample_ids(data.eval_images).tolist() == list(range(7))
    assert data.eval_split == "test"
    expected = data.train_images.float().div(255).mean()
    assert data.mean.item() == pytest.approx(expected.item(), rel=1e-5)


def test_batches_cover_each_index_at_most_once(emnist_root):
    data = load_dataset("emnist", emnist_root, "cpu", download=False)
    generator = torch.Generator().manual_seed(0)
    seen = []
    for images, labels in data.train_batches(64, generator):
        assert images.shape == (64, 1, 32, 32) and labels.shape == (64,)
        ids = _sample_ids(images)
        assert torch.equal(labels, data.train_labels[ids])
        seen += ids.tolist()
    assert len(seen) == 4 * 64 and len(set(seen)) == len(seen)  # 300 // 64 batches, no repeats
    second = [_sample_ids(b[0]).tolist() for b in data.train_batches(64, generator)]
    assert second[0] != seen[:64]  # a new order each epoch
    eval_ids = torch.cat([_sample_ids(b[0]) for b in data.eval_batches(25)])
    assert eval_ids.tolist() == list(range(52))  # in order, the partial batch of 2 kept
    with pytest.raises(ConfigError, match="batch_size"):
        next(data.train_batches(301, generator))


def test_normalize_matches_stats():
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.25, 1.0])
    data = DeviceData(dataset_info("cifar10"), images, torch.zeros(10), images, torch.zeros(10),
                      "test", mean, std)
    expected = (images.float() / 255 - mean[:, None, None]) / std[:, None, None]
    assert torch.allclose(data.normalize(images), expected, atol=1e-6)


def test_dataset_info_and_data_dir(monkeypatch, tmp_path):
    assert [dataset_info(n).hflip for n in ("mnist", "fashion_mnist", "emnist", "cifar10")] == [
        False, False, False, True]
    assert dataset_info("cifar10").in_chans == 3 and dataset_info("mnist").in_chans == 1
    with pytest.raises(ConfigError):
        dataset_info("imagenet")
    monkeypatch.setenv("NKAT_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert resolve_data_dir("/elsewhere") == Path("/elsewhere")
    monkeypatch.delenv("NKAT_DATA_DIR")
    assert resolve_data_dir(None) == Path("~/.cache/nkat-search/data").expanduser()
