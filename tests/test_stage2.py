"""Stage 2 over all four datasets on CPU slices: EMNIST from files in the official format that
the test writes (the real EMNIST cannot be had here), the others from the shared data."""

import json

import numpy as np

from nkat_search.cli.main import main
from test_data import _bar_images, _write_emnist

TINY = ["--embed_dim", "32", "--depth", "1", "--epochs", "1", "--warmup", "0",
        "--train_limit", "128", "--test_limit", "64", "--batch_size", "64"]


def test_stage2_table_covers_all_four_datasets(data_dir, tmp_path, capsys):
    root = tmp_path / "data"
    for name in ("MNIST", "FashionMNIST", "cifar-10-batches-bin"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(data_dir / name)
    _write_emnist(root, "letters", _bar_images(156), np.arange(156) % 26 + 1, train=True, gz=True)
    _write_emnist(root, "letters", _bar_images(52), np.arange(52) % 26 + 1, train=False, gz=True)
    out = tmp_path / "out"
    code = main(["stage2", *TINY, "--data-dir", str(root), "--device", "cpu", "--out", str(out),
                 "--quiet"])
    assert code == 0
    report = json.loads((out / "stage2.json").read_text())
    table = report["table"]
    assert report["missing"] == {} and table["missing"] == []
    rows = {row["dataset"]: row for row in table["rows"]}
    assert set(rows) == {"mnist", "fashion_mnist", "emnist", "cifar10"}
    # One architecture: lambda differs by the 16 extra classifier rows of EMNIST letters (26
    # classes, 33 weights + bias each at embed_dim 32) and by CIFAR-10's 3-channel first conv.
    assert round((rows["emnist"]["lam"] - rows["mnist"]["lam"]) * 1e6) == 16 * 33
    assert round((rows["cifar10"]["lam"] - rows["mnist"]["lam"]) * 1e6) == 2 * 32 * 9
    assert "emnist" in capsys.readouterr().out
