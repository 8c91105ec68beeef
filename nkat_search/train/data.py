"""Datasets and the GPU loader.

Data moves once: dataset files -> a uint8 tensor cache -> the device. Every dataset comes out as
uint8 images of shape (N, C, 32, 32) (the 28x28 sets are zero-padded by 2 on each side) and int64
labels; ``load_dataset`` puts one whole dataset on the device, and batches are index slices of
those tensors (see ``DeviceData``).

Where files live:

- the *data dir* (``--data-dir``, else ``$NKAT_DATA_DIR``, else ``~/.cache/nkat-search/data``)
  uses torchvision's layout: ``MNIST/raw/``, ``FashionMNIST/raw/``, ``EMNIST/raw/`` with IDX files
  (plain or ``.gz``), and ``cifar-10-batches-bin/`` (or the pickle ``cifar-10-batches-py/``).
  It may be read-only; we never write into it unless it is writable (downloads only).
- the *cache dir* (``$NKAT_CACHE_DIR``, else ``~/.cache/nkat-search``) holds IDX files decompressed
  from ``.gz`` (``<cache>/<Name>/raw/``, a torchvision root of its own, also the download target when
  the data dir is read-only) and the decoded tensors ``<cache>/tensors/<name>-<split>-<key>.pt``.

Every source file is verified before it is decoded: the official md5 of its content (MNIST,
Fashion-MNIST, CIFAR-10) or, for EMNIST whose per-file md5s are not published, the consistency of
the IDX header with the file size. A bad file is a ``DataError`` naming it, never a partial dataset.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import socket
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from nkat_search.atomic import atomic_path
from nkat_search.config import ConfigError
from nkat_search.errors import UserError


class DataError(UserError):
    """Missing or corrupt dataset files; the message names the file and the expected layout."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_chans: int
    num_classes: int
    # Horizontal flips preserve the class only for natural images (a flipped digit or letter is
    # another symbol, or none).
    hflip: bool


IMAGE_SIZE = 32
# Bumped whenever the decoded tensor format changes, so stale caches are ignored.
_CACHE_FORMAT = 1
# Downloads must fail fast on a machine without internet instead of hanging on a dead socket.
_NETWORK_TIMEOUT_S = 20.0

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Official md5 of the *uncompressed* content (the .gz wrappers differ between copies).
_CONTENT_MD5 = {
    "MNIST": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "FashionMNIST": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}
_CIFAR_DIR = "cifar-10-batches-bin"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
_CIFAR_ARCHIVE_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
_CIFAR_MD5 = {
    "data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
    "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
    "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
    "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
    "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
    "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
}
_CIFAR_RECORD = 1 + 3 * 32 * 32
_CIFAR_FILE_SIZE = 10_000 * _CIFAR_RECORD
_EMNIST_CLASSES = {"letters": 26, "balanced": 47}


def dataset_info(name: str, emnist_split: str = "letters") -> DatasetInfo:
    """Channels, classes and whether horizontal flips are label-preserving, by dataset name."""
    if name in ("mnist", "fashion_mnist"):
        return DatasetInfo(name, 1, 10, False)
    if name == "emnist":
        if emnist_split not in _EMNIST_CLASSES:
            raise ConfigError(
                f"emnist_split: '{emnist_split}' is not one of {', '.join(_EMNIST_CLASSES)}"
            )
        return DatasetInfo(name, 1, _EMNIST_CLASSES[emnist_split], False)
    if name == "cifar10":
        return DatasetInfo(name, 3, 10, True)
    raise ConfigError(f"dataset: '{name}' is not one of mnist, fashion_mnist, emnist, cifar10")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The data dir: the argument, else ``$NKAT_DATA_DIR``, else ``~/.cache/nkat-search/data``."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("NKAT_DATA_DIR"):
        return Path(os.environ["NKAT_DATA_DIR"]).expanduser()
    return Path("~/.cache/nkat-search/data").expanduser()


def cache_dir() -> Path:
    """Where decompressed files and decoded tensors go: ``$NKAT_CACHE_DIR`` or ``~/.cache/nkat-search``."""
    return Path(os.environ.get("NKAT_CACHE_DIR") or "~/.cache/nkat-search").expanduser()


def expected_layout(name: str, emnist_split: str = "letters") -> str:
    """The files a dataset needs under the data dir, in words for error messages."""
    if name == "cifar10":
        return f"{_CIFAR_DIR}/data_batch_1..5.bin and test_batch.bin"
    if name == "emnist":
        return f"EMNIST/raw/emnist-{emnist_split}-{{train,test}}-{{images-idx3,labels-idx1}}-ubyte[.gz]"
    folder = _torchvision_folder(name)
    return f"{folder}/raw/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz]"


def load_split(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None,
    emnist_split: str = "letters",
    download: bool = True,
) -> tuple[Tensor, Tensor]:
    """One official split as CPU tensors: uint8 images (N, C, 32, 32) and int64 labels (N,).

    Decoded tensors are cached under ``<cache>/tensors``, keyed by the md5s of the sources (the
    official ones where they exist), so a repeated load reads one file.
    """
    dataset_info(name, emnist_split)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = resolve_data_dir(data_dir)
    if name == "cifar10":
        return _load_cifar10(root, split, download)
    if name == "emnist":
        return _load_emnist(root, split, emnist_split, download)
    return _load_mnist_like(name, root, split, download)


@dataclass
class DeviceData:
    """One dataset resident on one device as uint8; batches are index slices, never copies to CPU.

    ``mean`` / ``std`` are per channel on the [0, 1] scale, computed from the train images in use
    (after the validation split and ``train_limit``) over the full 32x32 frame, padding included:
    they describe exactly what the model is fed.
    """

    info: DatasetInfo
    train_images: Tensor
    train_labels: Tensor
    eval_images: Tensor
    eval_labels: Tensor
    eval_split: str
    mean: Tensor
    std: Tensor

    @property
    def device(self) -> torch.device:
        return self.train_images.device

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of shuffled batches; the last partial batch is dropped so shapes never change.

        The permutation is drawn on the generator's device (use a generator on the data's device
        to keep the loop free of host-device copies).
        """
        n = len(self.train_labels)
        if batch_size > n:
            raise ConfigError(
                f"batch_size: {batch_size} is larger than the {n} training images; "
                "lower batch_size or raise train_limit"
            )
        order = torch.randperm(n, generator=generator, device=generator.device).to(self.device)
        for start in range(0, n - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            yield self.train_images[index], self.train_labels[index]

    def eval_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The eval set in order, the last partial batch included."""
        for start in range(0, len(self.eval_labels), batch_size):
            yield self.eval_images[start:start + batch_size], self.eval_labels[start:start + batch_size]

    def normalize(self, images_uint8: Tensor) -> Tensor:
        """float32 ``(x / 255 - mean) / std`` per channel."""
        x = images_uint8.to(torch.float32).div_(255.0)
        return x.sub_(self.mean[:, None, None]).div_(self.std[:, None, None])


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None,
    device: str | torch.device,
    *,
    emnist_split: str = "letters",
    val_fraction: float = 0.0,
    seed: int = 0,
    train_limit: int = 0,
    test_limit: int = 0,
    download: bool = True,
) -> DeviceData:
    """Load a dataset onto ``device``.

    With ``val_fraction > 0`` a seeded random slice of the train split becomes the eval set
    (``eval_split == "val"``) and the test split is not touched; otherwise the eval set is the
    official test split. Both parts keep file order. ``train_limit`` / ``test_limit`` (0 = all)
    then keep the first N train / eval images.
    """
    info = dataset_info(name, emnist_split)
    train_images, train_labels = load_split(name, "train", data_dir, emnist_split, download)
    if val_fraction > 0:
        if not val_fraction < 1:
            raise ConfigError(f"val_fraction: must be in [0, 1), got {val_fraction}")
        n = len(train_labels)
        n_val = min(max(1, round(n * val_fraction)), n - 1)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        val_index, train_index = order[:n_val].sort().values, order[n_val:].sort().values
        eval_images, eval_labels = train_images[val_index], train_labels[val_index]
        train_images, train_labels = train_images[train_index], train_labels[train_index]
        eval_split = "val"
    else:
        eval_images, eval_labels = load_split(name, "test", data_dir, emnist_split, download)
        eval_split = "test"
    if train_limit:
        train_images, train_labels = train_images[:train_limit], train_labels[:train_limit]
    if test_limit:
        eval_images, eval_labels = eval_images[:test_limit], eval_labels[:test_limit]
    mean, std = channel_stats(train_images)
    device = torch.device(device)
    return DeviceData(
        info=info,
        train_images=train_images.contiguous().to(device),
        train_labels=train_labels.contiguous().to(device),
        eval_images=eval_images.contiguous().to(device),
        eval_labels=eval_labels.contiguous().to(device),
        eval_split=eval_split,
        mean=mean.to(device),
        std=std.to(device),
    )


def channel_stats(images_uint8: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std (float32, [0, 1] scale) of uint8 images (N, C, H, W).

    Sums run in float64 over chunks, so the whole set is never expanded to floats at once.
    """
    channels = images_uint8.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, len(images_uint8), chunk):
        x = images_uint8[start:start + chunk].to(torch.float64)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    count = images_uint8.numel() // channels
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    return (mean / 255).float(), (std / 255).clamp_min(1e-6).float()


# ---- MNIST and Fashion-MNIST ------------------------------------------------------------------


def _torchvision_folder(name: str) -> str:
    return {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "emnist": "EMNIST"}[name]


def _load_mnist_like(name: str, root: Path, split: str, download: bool) -> tuple[Tensor, Tensor]:
    from torchvision import datasets

    folder = _torchvision_folder(name)
    md5s = _CONTENT_MD5[folder]
    cache_file = _tensor_cache_path(f"{name}-{split}", [md5s[f] for f in _IDX_FILES[split]])
    cached = _read_tensor_cache(cache_file)
    if cached is not None:
        return cached

    # torchvision's reader insists on all four plain files in one raw/ folder, so prepare them all
    # (the test files are small) in whichever root already has them, or in the cache.
    tv_root = _prepare_idx_root(name, folder, root, md5s, download)
    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    ds = cls(str(tv_root), train=split == "train", download=False)
    images, labels = ds.data, ds.targets
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DataError(f"{tv_root / folder / 'raw'}: unexpected IDX shapes {tuple(images.shape)}")
    if int(labels.max()) >= 10:
        raise DataError(f"{tv_root / folder / 'raw'}: labels outside 0..9")
    result = (_pad_to_32(images), labels.to(torch.int64))
    _write_tensor_cache(cache_file, result)
    return result


def _prepare_idx_root(name: str, folder: str, root: Path, md5s: dict[str, str], download: bool) -> Path:
    """A torchvision root whose ``<folder>/raw`` holds the four verified, uncompressed IDX files."""
    if all(_plain_file_ok(root / folder / "raw" / f, md5) for f, md5 in md5s.items()):
        return root
    cache = cache_dir()
    missing = [f for f in md5s if not _find_idx_source(folder, f, [root, cache])]
    if missing:
        if not download:
            raise _missing_error(name, root, folder, missing[0], "download=False")
        _download_torchvision(name, root, _download_root(root))
    for file, md5 in md5s.items():
        target = cache / folder / "raw" / file
        # A bad file in our own cache is rebuilt from the source rather than reported.
        if target.is_file() and _md5_file(target) == md5:
            continue
        source = _find_idx_source(folder, file, [root, cache, _download_root(root)])
        if source is None:
            raise _missing_error(name, root, folder, file, "not found after download")
        _copy_verified(source, target, md5)
    return cache


def _find_idx_source(folder: str, file: str, roots: list[Path]) -> Path | None:
    for base in roots:
        for candidate in (base / folder / "raw" / file, base / folder / "raw" / f"{file}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _plain_file_ok(path: Path, md5: str) -> bool:
    """True when a plain file exists with the right md5; a wrong one is an error, not a miss."""
    if not path.is_file():
        return False
    if _md5_file(path) != md5:
        raise DataError(
            f"{path}: md5 mismatch (corrupt or not the official file); delete it or replace it "
            "with the official release"
        )
    return True


def _copy_verified(source: Path, target: Path, md5: str | None) -> None:
    """Decompress (or copy) ``source`` into ``target`` atomically, checking the content md5."""
    digest = hashlib.md5(usedforsecurity=False)
    opener = gzip.open if source.suffix == ".gz" else open
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        try:
            with opener(source, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{source}: cannot decompress it, corrupt or truncated ({err})") from None
        if md5 is not None and digest.hexdigest() != md5:
            raise DataError(
                f"{source}: content md5 {digest.hexdigest()} is not the official {md5} "
                "(corrupt or not the official file)"
            )


# ---- EMNIST -----------------------------------------------------------------------------------


def _load_emnist(root: Path, split: str, emnist_split: str, download: bool) -> tuple[Tensor, Tensor]:
    from torchvision import datasets

    prefix = f"emnist-{emnist_split}-{split}"
    files = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    cache = cache_dir()
    sources = [_find_idx_source("EMNIST", f, [root, cache]) for f in files]
    if None in sources:
        if not download:
            missing = files[sources.index(None)]
            raise _missing_error("emnist", root, "EMNIST", missing, "download=False", emnist_split)
        _download_torchvision("emnist", root, _download_root(root), emnist_split)
        sources = [_find_idx_source("EMNIST", f, [root, cache, _download_root(root)]) for f in files]
        if None in sources:
            missing = files[sources.index(None)]
            raise _missing_error("emnist", root, "EMNIST", missing, "not found after download", emnist_split)

    # No official per-file md5s exist offline, so the cache key is the md5 of the files we found.
    cache_file = _tensor_cache_path(f"emnist_{emnist_split}-{split}", [_md5_file(s) for s in sources])
    cached = _read_tensor_cache(cache_file)
    if cached is not None:
        return cached

    if all(s.parent == root / "EMNIST" / "raw" and s.suffix != ".gz" for s in sources):
        tv_root = root
    else:
        tv_root = cache
        for source, file in zip(sources, files):
            target = cache / "EMNIST" / "raw" / file
            if source != target:
                _copy_verified(source, target, md5=None)
    image_path, label_path = (tv_root / "EMNIST" / "raw" / f for f in files)
    n_images = _check_idx(image_path, magic=0x0803, dims=3, tail=(28, 28))
    n_labels = _check_idx(label_path, magic=0x0801, dims=1, tail=())
    if n_images != n_labels:
        raise DataError(f"{image_path}: {n_images} images but {label_path.name} has {n_labels} labels")

    ds = datasets.EMNIST(str(tv_root), split=emnist_split, train=split == "train", download=False)
    # EMNIST stores every image transposed; torchvision hands them back as stored.
    images = ds.data.transpose(1, 2).contiguous()
    labels = ds.targets.to(torch.int64)
    if emnist_split == "letters":
        labels = labels - 1
    num_classes = _EMNIST_CLASSES[emnist_split]
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raw = "1..26" if emnist_split == "letters" else f"0..{num_classes - 1}"
        raise DataError(f"{label_path}: labels outside {raw} for the EMNIST {emnist_split} split")
    result = (_pad_to_32(images), labels)
    _write_tensor_cache(cache_file, result)
    return result


def _check_idx(path: Path, magic: int, dims: int, tail: tuple[int, ...]) -> int:
    """Check that an IDX file's header matches its size; return the item count."""
    header_size = 4 + 4 * dims
    with open(path, "rb") as f:
        header = f.read(header_size)
    if len(header) < header_size or int.from_bytes(header[:4], "big") != magic:
        raise DataError(f"{path}: not an IDX file of the expected type (bad header)")
    shape = [int.from_bytes(header[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    if tuple(shape[1:]) != tail:
        raise DataError(f"{path}: expected items of shape {tail}, the header says {tuple(shape[1:])}")
    expected = header_size + int(np.prod(shape))
    actual = path.stat().st_size
    if actual != expected:
        raise DataError(f"{path}: {actual} bytes but the header implies {expected} (truncated or corrupt)")
    return shape[0]


# ---- CIFAR-10 ---------------------------------------------------------------------------------


def _load_cifar10(root: Path, split: str, download: bool) -> tuple[Tensor, Tensor]:
    files = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    cache_file = _tensor_cache_path(f"cifar10-{split}", [_CIFAR_MD5[f] for f in files])
    cached = _read_tensor_cache(cache_file)
    if cached is not None:
        return cached

    folder = _find_cifar_folder(root, files)
    if folder is None and (root / "cifar-10-batches-py").is_dir():
        result = _load_cifar10_pickle(root, split)
        _write_tensor_cache(cache_file, result)
        return result
    if folder is None:
        if not download:
            raise _missing_error("cifar10", root, _CIFAR_DIR, files[0], "download=False")
        target = _download_root(root)
        _download(
            "cifar10", root,
            lambda: _tv_utils().download_and_extract_archive(
                _CIFAR_URL, download_root=str(target), md5=_CIFAR_ARCHIVE_MD5, remove_finished=True),
        )
        folder = _find_cifar_folder(target, files)
        if folder is None:
            raise _missing_error("cifar10", root, _CIFAR_DIR, files[0], "not found after download")

    images, labels = [], []
    for file in files:
        path = folder / file
        size = path.stat().st_size
        if size != _CIFAR_FILE_SIZE:
            raise DataError(
                f"{path}: {size} bytes, expected {_CIFAR_FILE_SIZE} (truncated or corrupt); "
                "replace it with the official binary version"
            )
        raw = path.read_bytes()
        digest = hashlib.md5(raw, usedforsecurity=False).hexdigest()
        if digest != _CIFAR_MD5[file]:
            raise DataError(
                f"{path}: md5 {digest} is not the official {_CIFAR_MD5[file]} (corrupt); "
                "replace it with the official binary version"
            )
        records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
        labels.append(torch.from_numpy(records[:, 0].astype(np.int64)))
        images.append(torch.from_numpy(records[:, 1:].reshape(-1, 3, 32, 32).copy()))
    result = (torch.cat(images), torch.cat(labels))
    if int(result[1].max()) >= 10:
        raise DataError(f"{folder}: labels outside 0..9")
    _write_tensor_cache(cache_file, result)
    return result


def _find_cifar_folder(root: Path, files: list[str]) -> Path | None:
    folder = root / _CIFAR_DIR
    return folder if all((folder / f).is_file() for f in files) else None


def _load_cifar10_pickle(root: Path, split: str) -> tuple[Tensor, Tensor]:
    from torchvision import datasets

    try:
        ds = datasets.CIFAR10(str(root), train=split == "train", download=False)
    except RuntimeError as err:
        raise DataError(
            f"{root / 'cifar-10-batches-py'}: incomplete or corrupt ({err}); "
            f"pass --data-dir or set NKAT_DATA_DIR to a folder with {expected_layout('cifar10')}"
        ) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(ds.targets, dtype=torch.int64)


# ---- downloads, errors, caching ---------------------------------------------------------------


def _tv_utils():
    from torchvision.datasets import utils

    return utils


def _download_root(root: Path) -> Path:
    """Downloads go into the data dir when we may write there, else into the cache dir."""
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return root if os.access(probe, os.W_OK) else cache_dir()


def _download_torchvision(name: str, root: Path, target: Path, emnist_split: str = "letters") -> None:
    from torchvision import datasets

    if name == "emnist":
        fetch = lambda: datasets.EMNIST(str(target), split=emnist_split, download=True)  # noqa: E731
    else:
        cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
        fetch = lambda: cls(str(target), download=True)  # noqa: E731
    _download(name, root, fetch, emnist_split)


def _download(name: str, root: Path, fetch, emnist_split: str = "letters") -> None:
    """Run a torchvision download with a socket timeout; any failure becomes one DataError line."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_NETWORK_TIMEOUT_S)
    try:
        fetch()
    except Exception as err:  # urllib, socket, checksum and extraction errors all end up here
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"{name}: not found under {root} and the download failed ({reason}); pass --data-dir or "
            f"set NKAT_DATA_DIR to a folder with {expected_layout(name, emnist_split)}"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def _missing_error(name: str, root: Path, folder: str, file: str, why: str,
                   emnist_split: str = "letters") -> DataError:
    where = root / folder / file if name == "cifar10" else root / folder / "raw" / file
    return DataError(
        f"{name}: {where} not found ({why}); pass --data-dir or set NKAT_DATA_DIR to a folder "
        f"with {expected_layout(name, emnist_split)}"
    )


def _pad_to_32(images: Tensor) -> Tensor:
    """(N, 28, 28) uint8 -> (N, 1, 32, 32), zero border of 2 px (the classic LeNet input size)."""
    pad = (IMAGE_SIZE - images.shape[-1]) // 2
    return torch.nn.functional.pad(images[:, None], (pad, pad, pad, pad))


def _md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _tensor_cache_path(stem: str, source_md5s: list[str]) -> Path:
    key = hashlib.sha1(f"{_CACHE_FORMAT}:{','.join(source_md5s)}".encode()).hexdigest()[:16]
    return cache_dir() / "tensors" / f"{stem}-{key}.pt"


def _read_tensor_cache(path: Path) -> tuple[Tensor, Tensor] | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, weights_only=True)
        return blob["images"], blob["labels"]
    except Exception:  # a damaged cache file is rebuilt from the sources, not trusted
        return None


def _write_tensor_cache(path: Path, result: tuple[Tensor, Tensor]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save({"images": result[0], "labels": result[1]}, tmp)
    except OSError:
        pass  # a read-only cache only costs speed; the data is already verified and in memory
