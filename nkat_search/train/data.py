"""The GPU loader: one whole dataset resident on the device, batches as index slices of it.

Data moves once: dataset files -> a uint8 tensor cache -> the device (``sources.load_split`` does
the first two steps). Every dataset comes out as uint8 images of shape (N, C, 32, 32) and int64
labels; ``load_dataset`` puts one whole dataset on the device, and batches are index slices of
those tensors (``DeviceData``), never copies to the host.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from nkat_search.config import ConfigError
from nkat_search.train.datasets import DatasetInfo, dataset_info
from nkat_search.train.sources import DataDir, load_split


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
    data_dir: str | os.PathLike | DataDir | None,
    device: str | torch.device,
    *,
    emnist_split: str = "letters",
    val_fraction: float = 0.0,
    seed: int = 0,
    train_limit: int = 0,
    test_limit: int = 0,
    download: bool | None = None,
) -> DeviceData:
    """Load a dataset onto ``device``.

    With ``val_fraction > 0`` a seeded random slice of the train split becomes the eval set
    (``eval_split == "val"``) and the test split is not touched; otherwise the eval set is the
    official test split. Both parts keep file order. ``train_limit`` / ``test_limit`` (0 = all)
    then keep the first N train / eval images. ``download`` None: as the data dir says
    (``sources.data_location``).
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
