"""Dataset files: where they are, whether they are the official ones, downloads, the tensor cache.

``load_split`` turns one official split into CPU tensors, uint8 images (N, C, 32, 32) (the 28x28
sets zero-padded by 2 on each side) and int64 labels, from the facts in ``datasets.py``.

Where files live:

- the *data dir* (``--data-dir``, else ``$NKAT_DATA_DIR``, else ``~/.cache/nkat-search/data``)
  uses torchvision's layout: ``MNIST/raw/``, ``FashionMNIST/raw/``, ``EMNIST/raw/`` with IDX files
  (plain or ``.gz``, read in place), and ``cifar-10-batches-bin/`` (or the pickle
  ``cifar-10-batches-py/``). We never write into it, except downloads into a writable one.
- the *cache dir* (``$NKAT_CACHE_DIR``, else ``~/.cache/nkat-search``) holds the decoded tensors
  ``<cache>/tensors/<name>-<split>-<key>.pt``, and downloads when the data dir is read-only.

Downloads: a data dir that was named (``--data-dir`` or ``$NKAT_DATA_DIR``) is a promise of where
the data is, so a dataset missing there is reported, naming the folder and the files, and nothing
is fetched unless asked (``--download``, ``DataDir.download``). Without a named folder the default
one is filled from the official sources.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from nkat_search.atomic import atomic_path
from nkat_search.errors import UserError
from nkat_search.train.datasets import DatasetFacts, facts

IMAGE_SIZE = 32
DEFAULT_DATA_DIR = "~/.cache/nkat-search/data"
DATA_DIR_ENV = "NKAT_DATA_DIR"
# Bumped whenever the decoded tensor format changes, so stale caches are ignored.
_CACHE_FORMAT = 1
# Downloads must fail fast on a machine without internet instead of hanging on a dead socket.
_NETWORK_TIMEOUT_S = 20.0
_CIFAR_RECORD = 1 + 3 * 32 * 32
_CIFAR_FILE_SIZE = 10_000 * _CIFAR_RECORD


class DataError(UserError):
    """Missing or corrupt dataset files; the message names the file and the expected layout."""


@dataclass(frozen=True)
class DataDir:
    """The dataset root and whether missing datasets may be downloaded into it.

    ``origin`` says who named the folder (``--data-dir``, ``$NKAT_DATA_DIR`` or ``default``), so a
    message can say what to change.
    """

    path: Path
    download: bool
    origin: str = "--data-dir"


def data_location(data_dir: str | os.PathLike | DataDir | None = None,
                  download: bool = False) -> DataDir:
    """The data dir: the argument, else ``$NKAT_DATA_DIR``, else the default (which downloads).

    ``download=True`` also lets a named folder be filled from the official sources.
    """
    if isinstance(data_dir, DataDir):
        return DataDir(data_dir.path, data_dir.download or download, data_dir.origin)
    if data_dir:
        return DataDir(Path(data_dir).expanduser(), download, "--data-dir")
    if os.environ.get(DATA_DIR_ENV):
        return DataDir(Path(os.environ[DATA_DIR_ENV]).expanduser(), download, f"${DATA_DIR_ENV}")
    return DataDir(Path(DEFAULT_DATA_DIR).expanduser(), True, "default")


def resolve_data_dir(data_dir: str | os.PathLike | DataDir | None) -> Path:
    """The data dir's path (see ``data_location``)."""
    return data_location(data_dir).path


def cache_dir() -> Path:
    """Where decoded tensors (and downloads beside a read-only data dir) go."""
    return Path(os.environ.get("NKAT_CACHE_DIR") or "~/.cache/nkat-search").expanduser()


def load_split(
    name: str,
    split: str,
    data_dir: str | os.PathLike | DataDir | None,
    emnist_split: str = "letters",
    download: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """One official split as CPU tensors: uint8 images (N, C, 32, 32) and int64 labels (N,).

    ``download`` None follows the data dir (``data_location``); True or False overrides it.
    Decoded tensors are cached under ``<cache>/tensors``, keyed by the md5s of the sources (the
    official ones where they exist), so a repeated load reads one file.
    """
    info = facts(name, emnist_split)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    where = data_location(data_dir)
    if download is not None:
        where = DataDir(where.path, download, where.origin)
    files = info.file_names(split, emnist_split)
    if info.format == "cifar-bin" and _find(info, files[0], where) is None and \
            (where.path / "cifar-10-batches-py").is_dir():
        return _cached(f"cifar10py-{split}", [str(where.path)],
                       lambda: _load_cifar10_pickle(where.path, split))
    sources = [_find(info, file, where) for file in files]
    if None in sources:
        if not where.download:
            raise _missing(info, files[sources.index(None)], where, emnist_split)
        _fetch(info, where, emnist_split)
        sources = [_find(info, file, where) for file in files]
        if None in sources:
            raise _missing(info, files[sources.index(None)], where, emnist_split,
                           after_download=True)
    # Without official md5s (EMNIST) the cache key is the md5 of the files as found.
    keys = [info.content_md5.get(f) or _md5_file(p) for f, p in zip(files, sources)]
    stem = f"emnist_{emnist_split}-{split}" if name == "emnist" else f"{name}-{split}"
    if info.format == "cifar-bin":
        return _cached(stem, keys, lambda: _decode_cifar(info, files, sources))
    return _cached(stem, keys, lambda: _decode_idx(info, files, sources, emnist_split))


# ---- finding and fetching files -----------------------------------------------------------------


def check_present(name: str, data_dir, emnist_split: str = "letters") -> None:
    """The ``DataError`` that ``load_split`` would raise for missing files, without reading or
    downloading anything, so a command can refuse before it does any work; a data folder that
    is a file is named as such."""
    where = data_location(data_dir)
    if where.path.exists() and not where.path.is_dir():
        raise DataError(f"{where.path}: is a file, not a folder (the {where.origin} data folder)")
    if where.download:
        return
    info = facts(name, emnist_split)
    for split in ("train", "test"):
        files = info.file_names(split, emnist_split)
        if info.format == "cifar-bin" and (where.path / "cifar-10-batches-py").is_dir():
            continue
        for file in files:
            if _find(info, file, where) is None:
                raise _missing(info, file, where, emnist_split)



def _search_roots(where: DataDir) -> list[Path]:
    """The data dir, then where downloads go beside it (the cache dir when it is read-only)."""
    return list(dict.fromkeys([where.path, _download_root(where.path), cache_dir()]))


def _find(info: DatasetFacts, file: str, where: DataDir) -> Path | None:
    sub = Path(info.folder) if info.format == "cifar-bin" else Path(info.folder) / "raw"
    for root in _search_roots(where):
        candidates = [root / sub / file]
        if info.format == "idx":
            candidates.append(root / sub / f"{file}.gz")
        for candidate in candidates:
            if candidate.is_file():
                return candidate
    return None


def _download_root(root: Path) -> Path:
    """Downloads go into the data dir when we may write there, else into the cache dir."""
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return root if os.access(probe, os.W_OK) else cache_dir()


def _fetch(info: DatasetFacts, where: DataDir, emnist_split: str) -> None:
    """Download a dataset with torchvision, with a socket timeout; a failure is one DataError."""
    # torchvision costs 1.3 s on top of torch: imported only to download or read pickles.
    from torchvision import datasets
    from torchvision.datasets import utils

    target = str(_download_root(where.path))
    if info.archive_url:
        fetch = lambda: utils.download_and_extract_archive(  # noqa: E731
            info.archive_url, download_root=target, md5=info.archive_md5, remove_finished=True)
    elif info.name == "emnist":
        fetch = lambda: datasets.EMNIST(target, split=emnist_split, download=True)  # noqa: E731
    else:
        fetch = lambda: getattr(datasets, info.torchvision_class)(target, download=True)  # noqa: E731
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_NETWORK_TIMEOUT_S)
    try:
        fetch()
    except Exception as err:  # urllib, socket, checksum and extraction errors all end up here
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"{info.name}: not found under {where.path} and the download failed ({reason}); "
            f"pass --data-dir or set {DATA_DIR_ENV} to a folder with {info.layout(emnist_split)}"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def _missing(info: DatasetFacts, file: str, where: DataDir, emnist_split: str,
             after_download: bool = False) -> DataError:
    sub = info.folder if info.format == "cifar-bin" else f"{info.folder}/raw"
    named = {"--data-dir": "the --data-dir folder", "default": "the default data folder"}.get(
        where.origin, f"the {where.origin} folder")
    if after_download:
        return DataError(f"{info.name}: {sub}/{file} is still missing under {where.path} after "
                         f"the download; expected {info.layout(emnist_split)}")
    gz = "[.gz]" if info.format == "idx" else ""
    return DataError(
        f"{info.name}: {sub}/{file}{gz} not found in {where.path} ({named}); put "
        f"{info.layout(emnist_split)} there, point --data-dir or {DATA_DIR_ENV} at a folder that "
        "has them, or pass --download to fetch them from the official source"
    )


# ---- decoding -----------------------------------------------------------------------------------


def _decode_idx(info: DatasetFacts, files: tuple[str, ...], sources: list[Path],
                emnist_split: str) -> tuple[Tensor, Tensor]:
    """IDX images and labels, read in place (plain or ``.gz``), checked, padded to 32x32.

    Read here rather than with torchvision's MNIST reader, which insists on all four plain files
    in one writable ``raw/`` folder: a ``.gz`` is decompressed once, in memory, while its md5 is
    checked, with no decompressed copy on disk.
    """
    images = _read_idx(sources[0], info.content_md5.get(files[0]), magic=0x0803, tail=(28, 28))
    labels = _read_idx(sources[1], info.content_md5.get(files[1]), magic=0x0801, tail=())
    if len(images) != len(labels):
        raise DataError(f"{sources[0]}: {len(images)} images but {sources[1].name} has "
                        f"{len(labels)} labels")
    if info.transposed:
        images = images.transpose(0, 2, 1)
    first = info.first_label.get(emnist_split if info.name == "emnist" else "", 0)
    classes = info.num_classes(emnist_split)
    labels = torch.from_numpy(labels.astype(np.int64)) - first
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        split_note = f" for the EMNIST {emnist_split} split" if info.name == "emnist" else ""
        raise DataError(f"{sources[1]}: labels outside {first}..{first + classes - 1}{split_note}")
    # np.array copies: the buffer read from the file is read-only, torch wants a writable one.
    return _pad_to_32(torch.from_numpy(np.array(images))), labels


def _read_idx(path: Path, md5: str | None, magic: int, tail: tuple[int, ...]) -> np.ndarray:
    """An IDX file's array; its content md5 (when official) and header are checked first."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot decompress it, corrupt or truncated ({err})") from None
    if md5 is not None:
        digest = hashlib.md5(raw, usedforsecurity=False).hexdigest()
        if digest != md5:
            raise DataError(f"{path}: content md5 {digest} is not the official {md5} "
                            "(corrupt or not the official file)")
    dims = len(tail) + 1
    header_size = 4 + 4 * dims
    if len(raw) < header_size or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"{path}: not an IDX file of the expected type (bad header)")
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    if tuple(shape[1:]) != tail:
        raise DataError(f"{path}: expected items of shape {tail}, the header says "
                        f"{tuple(shape[1:])}")
    expected = header_size + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes but the header implies {expected} (truncated "
                        "or corrupt)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def _decode_cifar(info: DatasetFacts, files: tuple[str, ...],
                  sources: list[Path]) -> tuple[Tensor, Tensor]:
    """The official binary version: records of 1 label byte and 3 x 1024 pixel bytes."""
    images, labels = [], []
    for file, path in zip(files, sources):
        size = path.stat().st_size
        if size != _CIFAR_FILE_SIZE:
            raise DataError(f"{path}: {size} bytes, expected {_CIFAR_FILE_SIZE} (truncated or "
                            "corrupt); replace it with the official binary version")
        raw = path.read_bytes()
        digest = hashlib.md5(raw, usedforsecurity=False).hexdigest()
        if digest != info.content_md5[file]:
            raise DataError(f"{path}: md5 {digest} is not the official {info.content_md5[file]} "
                            "(corrupt); replace it with the official binary version")
        records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
        labels.append(torch.from_numpy(records[:, 0].astype(np.int64)))
        images.append(torch.from_numpy(records[:, 1:].reshape(-1, 3, 32, 32).copy()))
    result = (torch.cat(images), torch.cat(labels))
    if int(result[1].max()) >= info.num_classes(""):
        raise DataError(f"{sources[0].parent}: labels outside 0..9")
    return result


def _load_cifar10_pickle(root: Path, split: str) -> tuple[Tensor, Tensor]:
    from torchvision import datasets  # 1.3 s: only for this layout (see _fetch)

    try:
        ds = datasets.CIFAR10(str(root), train=split == "train", download=False)
    except RuntimeError as err:
        raise DataError(
            f"{root / 'cifar-10-batches-py'}: incomplete or corrupt ({err}); pass --data-dir or "
            f"set {DATA_DIR_ENV} to a folder with {facts('cifar10').layout()}"
        ) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(ds.targets, dtype=torch.int64)


def _pad_to_32(images: Tensor) -> Tensor:
    """(N, 28, 28) uint8 -> (N, 1, 32, 32), zero border of 2 px (the classic LeNet input size)."""
    pad = (IMAGE_SIZE - images.shape[-1]) // 2
    return torch.nn.functional.pad(images[:, None], (pad, pad, pad, pad))


# ---- the tensor cache ---------------------------------------------------------------------------


def _cached(stem: str, source_keys: list[str], decode) -> tuple[Tensor, Tensor]:
    """The decoded split from ``<cache>/tensors``, or ``decode()`` and store it there."""
    key = hashlib.sha1(f"{_CACHE_FORMAT}:{','.join(source_keys)}".encode()).hexdigest()[:16]
    path = cache_dir() / "tensors" / f"{stem}-{key}.pt"
    if path.is_file():
        try:
            blob = torch.load(path, weights_only=True)
            return blob["images"], blob["labels"]
        except Exception:  # a damaged cache file is rebuilt from the sources, not trusted
            pass
    result = decode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save({"images": result[0], "labels": result[1]}, tmp)
    except OSError:
        pass  # a read-only cache only costs speed; the data is already verified and in memory
    return result


def _md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
