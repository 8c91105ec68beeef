"""The training loop on CPU slices: a real epoch, bit-for-bit resume, schedule, callbacks."""

import json

import copy
import math

import pytest
import torch
from torch._dynamo.utils import counters

from nkat_search.cli.main import main
from nkat_search.config import RunConfig
from nkat_search.train.loop import (TrainingInterrupted, TrainOptions, Timings, compile_model,
                                    lr_at, param_groups, train_model)
from nkat_search.train.model import build_model

TINY = {"embed_dim": 32, "depth": 1, "train_limit": 256, "test_limit": 128, "batch_size": 64,
        "epochs": 2, "warmup": 1}


def tiny_config(**overrides) -> RunConfig:
    return RunConfig.from_dict(TINY | overrides)


def test_lr_schedule_warms_up_linearly_then_decays_by_cosine():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)  # halfway through the cosine
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.0)


def test_one_epoch_on_a_cifar_slice_reports_through_the_callback(data_dir, tmp_path):
    reports = []
    result = train_model(tiny_config(epochs=1, warmup=0), data_dir=data_dir, device="cpu",
                         out_dir=tmp_path, on_epoch=reports.append, progress=False)
    assert [r.epoch for r in reports] == [1]
    assert 0.0 <= result.accuracy <= 1.0
    assert result.lam == pytest.approx(result.parameters / 1e6)
    assert result.tpe == pytest.approx(reports[0].tpe)
    assert (tmp_path / "checkpoint.pt").exists()


def test_evaluating_only_after_the_last_epoch_gives_the_same_result(data_dir, tmp_path):
    """Stage 2's option: the epochs before the last report NaN accuracy, the result is the same
    run's (evaluation touches neither the weights nor the data generator)."""
    cfg = tiny_config(epochs=3, dataset="mnist")
    every, last_only = [], []
    full = train_model(cfg, data_dir=data_dir, device="cpu", out_dir=tmp_path / "a",
                       on_epoch=every.append, progress=False)
    lean = train_model(cfg, data_dir=data_dir, device="cpu", out_dir=tmp_path / "b",
                       on_epoch=last_only.append, progress=False,
                       options=TrainOptions(evaluate_every_epoch=False))
    assert [r.epoch for r in last_only] == [1, 2, 3]
    assert all(math.isnan(r.accuracy) and math.isnan(r.tpe) for r in last_only[:2])
    assert not any(math.isnan(r.accuracy) for r in every)
    assert lean.accuracy == full.accuracy == last_only[-1].accuracy
    assert [r.train_loss for r in last_only] == [r.train_loss for r in every]


def test_resume_continues_bit_for_bit(data_dir, tmp_path):
    cfg = tiny_config(dataset="mnist")
    straight = train_model(cfg, data_dir=data_dir, device="cpu", out_dir=tmp_path / "a",
                           progress=False)
    polls = []  # polled after each of the 3 first steps, then at the end of epoch 1

    def stop_at_the_first_epochs_end() -> bool:
        polls.append(1)
        return len(polls) >= 4

    with pytest.raises(TrainingInterrupted) as stopped:
        train_model(cfg, data_dir=data_dir, device="cpu", out_dir=tmp_path / "b",
                    stop_requested=stop_at_the_first_epochs_end, progress=False)
    assert (stopped.value.epoch, stopped.value.step) == (1, 0)
    resumed = train_model(cfg, data_dir=data_dir, device="cpu", out_dir=tmp_path / "b",
                          progress=False)
    assert resumed.resumed_from_epoch == 1
    assert resumed.accuracy == straight.accuracy
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key


def test_a_callback_exception_propagates_after_the_checkpoint(data_dir, tmp_path):
    class Stop(Exception):
        pass

    def stop(report):
        raise Stop

    with pytest.raises(Stop):
        train_model(tiny_config(), data_dir=data_dir, device="cpu", out_dir=tmp_path,
                    on_epoch=stop, progress=False,
                    options=TrainOptions(checkpoint_interval_s=0))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["epoch"] == 1


def test_checkpoints_follow_the_time_cadence_and_the_last_epoch_always_saves(data_dir, tmp_path):
    """An interval longer than the run: one checkpoint, after the last epoch; 0: every epoch."""
    timings = Timings()
    result = train_model(tiny_config(epochs=3), data_dir=data_dir, device="cpu",
                         out_dir=tmp_path / "cadence", progress=False,
                         options=TrainOptions(checkpoint_interval_s=3600, timings=timings))
    assert timings.checkpoints == 1 and result.timings["checkpoints"] == 1
    assert torch.load(tmp_path / "cadence" / "checkpoint.pt", weights_only=False)["epoch"] == 3
    every = train_model(tiny_config(epochs=3), data_dir=data_dir, device="cpu",
                        out_dir=tmp_path / "every", progress=False,
                        options=TrainOptions(checkpoint_interval_s=0))
    assert every.timings["checkpoints"] == 3
    # 256 training images at batch 64: 4 steps an epoch, every image counted once per epoch.
    assert timings.train_images == 3 * 4 * 64
    assert timings.train_s > 0 and timings.eval_s > 0 and timings.checkpoint_s > 0


def test_a_stop_request_checkpoints_at_once_even_between_cadence_points(data_dir, tmp_path):
    with pytest.raises(TrainingInterrupted) as stopped:
        train_model(tiny_config(epochs=3), data_dir=data_dir, device="cpu", out_dir=tmp_path,
                    progress=False, stop_requested=lambda: True,
                    options=TrainOptions(checkpoint_interval_s=3600))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert (state["epoch"], state["step"]) == (0, 1) == (stopped.value.epoch, stopped.value.step)
    assert "in epoch 1 at step 1 of 4" in str(stopped.value)


@pytest.mark.parametrize("stop_after_steps", [2, 5, 6])
def test_a_stop_mid_epoch_resumes_bit_for_bit(data_dir, tmp_path, stop_after_steps):
    """Stopped after 2 steps (epoch 1), 5 (epoch 2, step 1) or 6: the same weights as unbroken."""
    cfg = tiny_config(dataset="mnist", epochs=3)  # 4 steps an epoch
    straight = train_model(cfg, data_dir=data_dir, device="cpu", out_dir=tmp_path / "a",
                           progress=False)
    calls = []

    def stop_after() -> bool:
        calls.append(1)
        return len(calls) >= stop_after_steps

    with pytest.raises(TrainingInterrupted):
        train_model(cfg, data_dir=data_dir, device="cpu", out_dir=tmp_path / "b",
                    stop_requested=stop_after, progress=False,
                    options=TrainOptions(checkpoint_interval_s=3600))
    resumed = train_model(cfg, data_dir=data_dir, device="cpu", out_dir=tmp_path / "b",
                          progress=False)
    assert resumed.accuracy == straight.accuracy
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert a["ema_updates"] == b["ema_updates"] == 12 and "step" not in b
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)


def test_train_command_accepts_the_users_baseline_flags_verbatim(data_dir, tmp_path):
    baseline = ("--dataset cifar10 --conv_stem tiny --patch_size 2 --embed_dim 384 --depth 7 "
                "--temperature 0.65 --top_k 6 --top_p 0.80 --nkat_strength 0.0024 --nkat_decay 0.99 "
                "--dropout_attn 0.17 --dropout_embed 0.08 --mixup 0.1 --cutmix 0.2 --randaugment 2 9 "
                "--lr 2e-4 --epochs 40 --warmup 5 --ema 0.9995 --clip_grad 1.0 --cutout 8").split()
    # The same flags, then a tiny override so the test runs in seconds on a CPU.
    tiny = ("--embed_dim 32 --depth 1 --epochs 1 --warmup 0 --train_limit 128 --test_limit 64 "
            "--batch_size 64").split()
    code = main(["train", *baseline, *tiny, "--data-dir", str(data_dir), "--device", "cpu",
                 "--out", str(tmp_path), "--quiet"])
    assert code == 0
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["config"]["top_k"] == 6 and written["config"]["randaugment"] == [2, 9]
    assert written["config"]["embed_dim"] == 32
    assert 0.0 <= written["accuracy"] <= 1.0


def test_a_checkpoint_of_another_config_is_refused(data_dir, tmp_path, capsys):
    args = ["train", "--embed_dim", "32", "--depth", "1", "--epochs", "1", "--warmup", "0",
            "--train_limit", "64", "--test_limit", "32", "--batch_size", "32",
            "--data-dir", str(data_dir), "--device", "cpu", "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0
    assert main([*args, "--depth", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different config" in err[0]


def test_learning_rate_is_the_users_at_batch_32_and_twice_it_at_batch_512():
    assert RunConfig.from_dict({"batch_size": 32}).train.effective_lr() == pytest.approx(2e-4)
    assert RunConfig.from_dict({"batch_size": 512}).train.effective_lr() == pytest.approx(4e-4)
    # EMA keeps the user's horizon in images: 16 steps at batch 32 are one step at batch 512.
    assert RunConfig.from_dict({"batch_size": 512}).train.effective_ema() == pytest.approx(0.9995 ** 16)


def test_compiled_training_matches_the_eager_run_on_cpu(data_dir, tmp_path):
    """--compile (model and augmentation compiled; CUDA graphs only on a GPU) trains the same model.

    Compiled kernels round differently, so the two runs agree closely, not bit for bit; dropout
    is off because compiled code draws its dropout masks from a random stream of its own.
    """
    cfg = {"epochs": 1, "warmup": 0, "dropout_attn": 0.0, "dropout_embed": 0.0}
    eager = train_model(tiny_config(**cfg), data_dir=data_dir, device="cpu",
                        out_dir=tmp_path / "eager", progress=False)
    compiled = train_model(tiny_config(**cfg, compile=True), data_dir=data_dir,
                           device="cpu", out_dir=tmp_path / "compiled", progress=False)
    a = torch.load(tmp_path / "eager" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "compiled" / "checkpoint.pt", weights_only=False)["model"]
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-3, rtol=1e-3), key
    assert abs(eager.accuracy - compiled.accuracy) <= 0.02


@pytest.mark.parametrize("depth", [5, 9])
def test_the_blocks_scope_compiles_one_graph_for_every_block_and_trains_as_eager(depth):
    """Regional compilation: one Block graph for the whole model, also past Dynamo's recompile
    limit of 8 (depth 9), where per-block graphs would have fallen back to eager; two training
    steps give the eager losses. The strength differs per block (decay 0.9), the dropout is off
    (compiled code draws its masks from a random stream of its own)."""
    cfg = RunConfig.from_dict({"embed_dim": 32, "depth": depth, "nkat_decay": 0.9,
                               "dropout_attn": 0.0, "dropout_embed": 0.0}).model
    torch.manual_seed(0)
    eager = build_model(cfg, 3, 10)
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    forward = compile_model(compiled, "default", "blocks")
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    losses = {}
    for name, model, run in (("eager", eager, eager), ("blocks", compiled, forward)):
        optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
        losses[name] = []
        for _ in range(2):
            loss = torch.nn.functional.cross_entropy(run(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    assert counters["stats"]["unique_graphs"] == 1
    assert losses["blocks"] == pytest.approx(losses["eager"], rel=1e-4, abs=1e-5)


def test_trials_with_other_temperature_top_p_and_strength_run_on_one_block_graph():
    """A trial's temperature, top_p and strength are inputs of the compiled Block graph, not its
    constants: a second trial's model (same shapes and top_k) runs on the first one's graph, and
    with its own values (each matches its eager forward; the values differ enough to show)."""
    base = {"embed_dim": 32, "depth": 2, "dropout_attn": 0.0, "dropout_embed": 0.0}
    trials = [{"temperature": 0.6, "top_p": 0.8, "nkat_strength": 0.001},
              {"temperature": 1.0, "top_p": 0.95, "nkat_strength": 0.005}]
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    counters.clear()
    eager_outputs = []
    for knobs in trials:
        torch.manual_seed(0)  # the same weights: only the knobs differ
        model = build_model(RunConfig.from_dict(base | knobs).model, 3, 10)
        eager = model(images)
        compiled = compile_model(copy.deepcopy(model), "default", "blocks")(images)
        assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-5)
        eager_outputs.append(eager)
    assert counters["stats"]["unique_graphs"] == 1
    assert not torch.allclose(*eager_outputs, rtol=1e-3, atol=1e-4)


def test_dropout_rates_are_inputs_of_one_compiled_graph():
    """Two rates on one compiled graph, each keeping its own share (binomial bounds, 6 sigma)."""
    from nkat_search.train.model import RateDropout

    torch._dynamo.reset()
    counters.clear()
    ones = torch.ones(200_000)
    for p in (0.1, 0.4):
        out = torch.compile(RateDropout(p).train())(ones)
        kept = (out > 0).float().mean().item()
        assert abs(kept - (1 - p)) < 6 * (p * (1 - p) / ones.numel()) ** 0.5
        assert torch.allclose(out[out > 0], torch.tensor(1 / (1 - p)))
    assert counters["stats"]["unique_graphs"] == 1
