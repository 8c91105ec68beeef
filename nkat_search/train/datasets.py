"""What we know about each dataset, in one table: files, official checksums, shape, classes.

``sources.py`` finds, verifies, downloads and decodes files from these facts, ``data.py`` puts
the decoded tensors on the device, the model takes channels and classes from here. A new dataset
is one more entry in ``DATASETS``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nkat_search.config import ConfigError


@dataclass(frozen=True)
class DatasetInfo:
    """What the model and the augmentation need to know about a dataset."""

    name: str
    in_chans: int
    num_classes: int
    # Horizontal flips preserve the class only for natural images (a flipped digit or letter is
    # another symbol, or none).
    hflip: bool


@dataclass(frozen=True)
class DatasetFacts:
    """One dataset's files and format. ``{split}`` in a file name is the EMNIST split."""

    name: str
    folder: str                          # under the data dir (torchvision's layout)
    format: str                          # "idx" (28x28 grayscale) or "cifar-bin"
    in_chans: int
    classes: dict[str, int]              # by EMNIST split; "" for datasets without splits
    hflip: bool
    files: dict[str, tuple[str, ...]]    # "train" / "test" -> file names (idx: images, labels)
    content_md5: dict[str, str] = field(default_factory=dict)  # official, of the plain content
    first_label: dict[str, int] = field(default_factory=dict)  # raw label of class 0, by split
    transposed: bool = False             # images stored transposed (EMNIST)
    torchvision_class: str = ""          # the torchvision dataset that downloads it
    archive_url: str = ""                # or the official archive, with its md5
    archive_md5: str = ""

    def num_classes(self, emnist_split: str) -> int:
        return self.classes.get(emnist_split if self.name == "emnist" else "", 0)

    def file_names(self, split: str, emnist_split: str = "letters") -> tuple[str, ...]:
        return tuple(name.format(split=emnist_split) for name in self.files[split])

    def layout(self, emnist_split: str = "letters") -> str:
        """The files under the data dir, in words for error messages."""
        if self.format == "cifar-bin":
            return f"{self.folder}/data_batch_1..5.bin and test_batch.bin"
        train_images = self.file_names("train", emnist_split)[0]
        stem = train_images.replace("train-images-idx3-ubyte", "")
        tests = "t10k" if self.files["test"][0].startswith("t10k") else "test"
        return f"{self.folder}/raw/{stem}{{train,{tests}}}-{{images-idx3,labels-idx1}}-ubyte[.gz]"


_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

DATASETS: dict[str, DatasetFacts] = {
    "mnist": DatasetFacts(
        "mnist", "MNIST", "idx", 1, {"": 10}, False, _MNIST_FILES,
        content_md5={
            "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
            "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
            "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
            "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
        },
        torchvision_class="MNIST"),
    "fashion_mnist": DatasetFacts(
        "fashion_mnist", "FashionMNIST", "idx", 1, {"": 10}, False, _MNIST_FILES,
        content_md5={
            "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
            "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
        },
        torchvision_class="FashionMNIST"),
    # NIST publishes no per-file md5s for EMNIST (only for the whole gzip.zip, which torchvision
    # checks on download), so its files are checked by their IDX headers against their sizes.
    "emnist": DatasetFacts(
        "emnist", "EMNIST", "idx", 1, {"letters": 26, "balanced": 47}, False,
        {"train": ("emnist-{split}-train-images-idx3-ubyte", "emnist-{split}-train-labels-idx1-ubyte"),
         "test": ("emnist-{split}-test-images-idx3-ubyte", "emnist-{split}-test-labels-idx1-ubyte")},
        first_label={"letters": 1, "balanced": 0}, transposed=True, torchvision_class="EMNIST"),
    "cifar10": DatasetFacts(
        "cifar10", "cifar-10-batches-bin", "cifar-bin", 3, {"": 10}, True,
        {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)},
        content_md5={
            "data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
            "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
            "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
            "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
            "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
            "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
        },
        archive_url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        archive_md5="c32a1d4ab5d03f1284b67883e8d87530"),
}


def facts(name: str, emnist_split: str = "letters") -> DatasetFacts:
    """The registry entry for ``name``; an unknown dataset or EMNIST split is a ConfigError."""
    if name not in DATASETS:
        raise ConfigError(f"dataset: '{name}' is not one of {', '.join(DATASETS)}")
    found = DATASETS[name]
    if name == "emnist" and emnist_split not in found.classes:
        raise ConfigError(f"emnist_split: '{emnist_split}' is not one of "
                          f"{', '.join(found.classes)}")
    return found


def dataset_info(name: str, emnist_split: str = "letters") -> DatasetInfo:
    """Channels, classes and whether horizontal flips are label-preserving, by dataset name."""
    found = facts(name, emnist_split)
    return DatasetInfo(name, found.in_chans, found.num_classes(emnist_split), found.hflip)


def expected_layout(name: str, emnist_split: str = "letters") -> str:
    return facts(name, emnist_split).layout(emnist_split)
