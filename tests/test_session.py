"""A worker's TrainingSession: datasets loaded once, one compile for runs of one architecture."""

import pytest
import torch
from torch._dynamo.utils import counters

from nkat_search.config import RunConfig
from nkat_search.train.sources import DataError
from nkat_search.train.loop import TrainOptions, train_model
from nkat_search.train.model import build_model
from nkat_search.train.session import TrainingSession

TINY = {"embed_dim": 32, "depth": 1, "train_limit": 256, "test_limit": 128, "batch_size": 64,
        "epochs": 1, "warmup": 0}


def test_a_reused_model_starts_from_exactly_the_weights_of_a_fresh_build():
    session = TrainingSession()
    cfg = RunConfig.from_dict(TINY).model

    def build():
        torch.manual_seed(3)
        return build_model(cfg, 1, 10)

    first, forward, reused = session.compiled_model({"k": 1}, build, lambda m: m)
    assert not reused
    with torch.no_grad():
        for p in first.parameters():
            p.add_(1.0)  # a run trained it
    pointers = [p.data_ptr() for p in first.parameters()]
    again, forward_again, reused = session.compiled_model({"k": 1}, build, lambda m: m)
    assert reused and again is first and forward_again is forward
    # In place: CUDA graphs recorded on these addresses stay valid.
    assert [p.data_ptr() for p in again.parameters()] == pointers
    fresh = build().state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in again.state_dict().items())
    other, _, reused = session.compiled_model({"k": 2}, build, lambda m: m)
    assert not reused and other is not first
    assert session.describe() == {"datasets": 0, "compiles": 2, "reuses": 1}


def test_stage2_datasets_of_one_shape_share_one_compile(data_dir):
    """MNIST then Fashion-MNIST (1 channel, 10 classes): the second run compiles nothing."""
    session = TrainingSession()
    graphs = []
    for name in ("mnist", "fashion_mnist"):
        cfg = RunConfig.from_dict(TINY | {"dataset": name, "compile": True})
        result = train_model(cfg, data_dir=data_dir, device="cpu", progress=False,
                             options=TrainOptions(session=session))
        assert 0 <= result.accuracy <= 1
        graphs.append(counters["stats"]["unique_graphs"])
    assert session.compiles == 1 and session.reuses == 1
    assert graphs[1] == graphs[0], "the second dataset made Dynamo compile new graphs"


def test_datasets_load_once_and_a_missing_one_is_looked_for_once(data_dir, tmp_path,
                                                                 monkeypatch):
    # A cache of its own: decoded CIFAR-10 tensors from other tests would hide the broken files.
    monkeypatch.setenv("NKAT_CACHE_DIR", str(tmp_path / "cache"))
    session = TrainingSession()
    device = torch.device("cpu")
    shape = dict(val_fraction=0.1, seed=0, train_limit=128, test_limit=64)
    first = session.dataset("mnist", data_dir, device, **shape)
    assert session.dataset("mnist", data_dir, device, **shape) is first
    assert session.dataset("mnist", data_dir, device, **(shape | {"seed": 1})) is not first

    broken = tmp_path / "data" / "cifar-10-batches-bin"
    broken.mkdir(parents=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        (broken / name).write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match="truncated or corrupt"):
        session.dataset("cifar10", tmp_path / "data", device)
    for path in broken.iterdir():
        path.unlink()  # a second look would now be a download attempt: there is none
    with pytest.raises(DataError, match="truncated or corrupt"):
        session.dataset("cifar10", tmp_path / "data", device)


def test_the_compile_scope_is_part_of_the_compiled_models_key(data_dir):
    """A model compiled whole is not handed to a run that asked for compiled blocks."""
    session = TrainingSession()
    for scope in ("model", "blocks", "blocks"):
        cfg = RunConfig.from_dict(TINY | {"dataset": "mnist", "compile": True})
        result = train_model(cfg, data_dir=data_dir, device="cpu", progress=False,
                             options=TrainOptions(session=session, compile_scope=scope))
        assert 0 <= result.accuracy <= 1
    assert session.compiles == 2 and session.reuses == 1
