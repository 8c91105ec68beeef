"""One training loop for every dataset. It takes a config and callbacks and knows nothing of Optuna.

Recipe (MISSION.md sec. 3): AdamW, linear warm-up then cosine decay, label smoothing, mixup /
cutmix / RandAugment / cutout on the GPU, EMA weights for evaluation, gradient clipping, bf16
autocast on CUDA, optional ``torch.compile``. A checkpoint is written atomically at the end of an
epoch, at most once per ``TrainOptions.checkpoint_interval_s`` (a full checkpoint of the baseline
is about 200 MB, and a compiled baseline epoch lasts about a second), and always after the last
epoch and when a stop is requested; a run continues from it bit-for-bit because each epoch's data
order and augmentation draw from a generator seeded by (seed, epoch), and the global RNG (dropout)
is saved and restored.

Every run records where its wall time went (``Timings``: data, setup, compile, training steps,
evaluation, checkpoints), into its ``TrainResult`` and, however it ends, into a caller's
accumulator, so a run that is pruned or stopped half-way still counts.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nkat_search.atomic import atomic_path
from nkat_search.config import CHECKPOINT_INTERVAL_S, COMPILE_SCOPE, COMPILE_SCOPES, RunConfig
from nkat_search.errors import UserError
from nkat_search.terminal import draws_bars
from nkat_search.train import metrics
from nkat_search.train.augment import GpuAugment
from nkat_search.train.compile_cache import use_persistent_compile_cache
from nkat_search.train.data import load_dataset
from nkat_search.train.device import torch_device
from nkat_search.train.errors import CheckpointMismatch
from nkat_search.train.model import build_model, count_parameters

CHECKPOINT_NAME = "checkpoint.pt"
EVAL_BATCH_SIZE = 1024
# The baseline is small (17 tokens, 384 wide): at batch 512 a compiled step launches about 700
# kernels and, without CUDA graphs, the GPU waits on the CPU launching them. On an H100 the model
# step took 14.4 ms compiled and 7.2 ms compiled with CUDA graphs (benchmarks/profile_step.py,
# results/gpu/session3/profile_log.txt).
CUDA_COMPILE_MODE = "reduce-overhead"
# The first steps of a run compile (Dynamo, Inductor, CUDA-graph recording) and warm up; their
# time beyond that of as many steady steps is counted as compile time.
WARM_STEPS = 3


@dataclass
class Timings:
    """Where a run's (or a trial's) wall time went, in seconds, and how many images it trained."""

    data_s: float = 0.0        # loading the dataset onto the device (0 when a session had it)
    setup_s: float = 0.0       # model, optimizer and EMA built, checkpoint loaded
    compile_s: float = 0.0     # the first steps' time beyond steady steps: compile and warm-up
    train_s: float = 0.0       # training steps, compile excluded
    eval_s: float = 0.0        # EMA evaluation after every epoch
    checkpoint_s: float = 0.0  # checkpoint writes
    checkpoints: int = 0
    train_images: int = 0

    def add(self, **parts: float) -> None:
        for name, value in parts.items():
            setattr(self, name, getattr(self, name) + value)

    def merge(self, other: Timings) -> None:
        self.add(**asdict(other))

    @contextmanager
    def timed(self, phase: str):
        """Adds the block's seconds to ``phase``; a block that raises adds nothing."""
        started = time.perf_counter()
        yield
        self.add(**{phase: time.perf_counter() - started})

    def add_steps(self, seconds: float, steps: int, images: int, warm_steps: int = 0,
                  warm_seconds: float = 0.0) -> None:
        """``seconds`` of ``steps`` training steps, split into compile (what the first
        ``warm_steps``, which took ``warm_seconds``, took beyond steady steps) and train."""
        compile_seconds = 0.0
        if warm_steps > 0 and steps > warm_steps:
            steady = (seconds - warm_seconds) / (steps - warm_steps)
            compile_seconds = max(0.0, warm_seconds - warm_steps * steady)
        self.add(compile_s=compile_seconds, train_s=seconds - compile_seconds, train_images=images)

    @property
    def total_s(self) -> float:
        return (self.data_s + self.setup_s + self.compile_s + self.train_s + self.eval_s
                + self.checkpoint_s)

    def as_attrs(self) -> dict[str, float]:
        """Flat ``time_<phase>_s`` attributes, plus ``train_images`` and ``checkpoints``."""
        return {f"time_{k}" if k.endswith("_s") else k: v for k, v in asdict(self).items()}


@dataclass
class TrainOptions:
    """How a run trains, apart from what it trains (the config): knobs of workers and benchmarks.

    ``data``: an already loaded ``DeviceData`` (benchmarks). ``session``: a ``TrainingSession``
    that keeps datasets and the compiled model between the runs of one process (workers).
    ``timings``: an accumulator that every phase is added to as it ends. ``compile_mode``:
    ``torch.compile``'s mode (default: CUDA graphs on a GPU, Inductor's default elsewhere);
    ``compile_augment=False`` leaves the augmentation eager (``benchmarks/throughput.py`` times the
    variants side by side). ``compile_scope``: one of ``COMPILE_SCOPES`` (``compile_model``).
    ``evaluate_every_epoch=False`` evaluates after the last epoch only (the others report NaN
    accuracy): Stage 2 of a trial, where only the final accuracy is scored and nothing prunes on
    the way, skips a test-split pass per epoch.
    """

    data: object | None = None
    session: object | None = None
    timings: Timings | None = None
    checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S
    compile_mode: str | None = None
    compile_augment: bool = True
    compile_scope: str = COMPILE_SCOPE
    evaluate_every_epoch: bool = True

    def __post_init__(self) -> None:
        if self.compile_scope not in COMPILE_SCOPES:
            raise ValueError(f"compile_scope: expected one of {COMPILE_SCOPES}, "
                             f"got {self.compile_scope!r}")


@dataclass
class EpochReport:
    epoch: int
    epochs: int
    dataset: str
    train_loss: float
    accuracy: float
    lam: float
    tpe: float
    epoch_seconds: float
    images_per_s: float


@dataclass
class TrainResult:
    dataset: str
    eval_split: str
    accuracy: float
    parameters: int
    lam: float
    tpe: float
    epochs_run: int
    resumed_from_epoch: int
    train_seconds: float
    images_per_s: float
    epoch_seconds: list[float] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    device: str = ""
    peak_memory_gib: float = 0.0
    timings: dict = field(default_factory=dict)


class TrainingInterrupted(Exception):
    """``stop_requested()`` turned true; a checkpoint of the progress so far is on disk.

    ``epoch`` epochs are complete and ``step`` steps of the next one (0: at an epoch's end).
    """

    def __init__(self, epoch: int, step: int = 0, steps_per_epoch: int = 0):
        where = (f"after epoch {epoch}" if step == 0
                 else f"in epoch {epoch + 1} at step {step} of {steps_per_epoch}")
        super().__init__(f"training interrupted {where}")
        self.epoch, self.step, self.where = epoch, step, where


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warm-up to ``peak_lr`` over ``warmup_steps``, then cosine decay to zero."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class EmaModel(torch.nn.Module):
    """Exponential moving average of a model's weights and buffers, used for evaluation.

    Written here rather than using ``torch.optim.swa_utils.AveragedModel``, whose update compares
    a device tensor on the host every step (a GPU sync per step). The decay warms up as
    ``min(decay, (1+n)/(10+n))`` so that short runs (smoke test, CPU studies) do not evaluate
    weights that are still mostly the random initialisation.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        self._float_pairs = [(e, m) for e, m in pairs if e.is_floating_point()]
        self._other_pairs = [(e, m) for e, m in pairs if not e.is_floating_point()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        torch._foreach_lerp_([e for e, _ in self._float_pairs], [m for _, m in self._float_pairs],
                             1.0 - decay)
        for ema_tensor, model_tensor in self._other_pairs:
            ema_tensor.copy_(model_tensor)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets (label smoothing and mixing are already in them)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, tokens and position embeddings (the usual ViT practice)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or "pos_embed" in name or "cls_token" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model: torch.nn.Module, data, device: torch.device, autocast: bool) -> float:
    """Top-1 accuracy (0..1) of ``model`` on the data's eval split."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    for images, labels in data.eval_batches(EVAL_BATCH_SIZE):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(data.normalize(images))
        correct += (logits.argmax(dim=-1) == labels).sum()
        total += labels.numel()
    return correct.item() / max(1, total)


def train_model(
    cfg: RunConfig,
    *,
    data_dir: str | Path | None = None,
    device: str | torch.device = "auto",
    out_dir: str | Path | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    stop_requested: Callable[[], bool] | None = None,
    progress: bool = True,
    resume: bool = True,
    options: TrainOptions | None = None,
) -> TrainResult:
    """Train ``cfg`` on ``cfg.train.dataset`` and return the EMA model's accuracy and TPE.

    ``on_epoch(report)`` runs after every epoch and may raise (the search prunes there);
    ``stop_requested()`` is polled after every step: when true, the progress so far (mid-epoch
    too) is checkpointed and ``TrainingInterrupted`` raised. ``options`` holds the knobs of workers and benchmarks.
    """
    options = options or TrainOptions()
    stop_requested = stop_requested or (lambda: False)
    cfg.validate()
    # Before anything imports torch._dynamo, which fixes Inductor's cache dir on import.
    use_persistent_compile_cache()
    tc = cfg.train
    device = torch_device(device)
    if device.type == "cuda" and device.index is not None:
        # Make cuda:N the current device too, so nothing that uses the current device (a library's
        # scratch buffer, a stray context) lands on GPU 0 while the trial trains on GPU N.
        torch.cuda.set_device(device)
    path = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None
    timings = Timings()
    try:  # the caller's accumulator gets this run's time however it ends (pruned, stopped, failed)
        with timings.timed("data_s"):
            data = options.data
            if data is None:
                data = _load_data(tc, data_dir, device, options)
        with timings.timed("setup_s"):
            state, run = _build(cfg, data, device, options)
            if resume and path is not None and path.exists():
                state.load(path)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        resumed_from, accuracy = state.epoch, 0.0
        if state.epoch >= tc.epochs:
            with timings.timed("eval_s"):
                accuracy = evaluate(state.ema, data, device, run.autocast)
        last_saved = time.monotonic()
        while state.epoch < tc.epochs:
            bar = _progress_bar(progress, run.steps_per_epoch,
                                f"{tc.dataset} epoch {state.epoch + 1}/{tc.epochs}")
            seconds, loss = _run_epoch(state, run, data, timings, stop_requested, bar,
                                       first=state.epoch == resumed_from)
            if state.step:  # a stop mid-epoch: keep these steps (a 257-token epoch lasts 30 s)
                _close(bar)
                _save(state, path, timings)
                raise TrainingInterrupted(state.epoch, state.step, run.steps_per_epoch)
            accuracy = math.nan
            if options.evaluate_every_epoch or state.epoch == tc.epochs:
                with timings.timed("eval_s"):
                    accuracy = evaluate(state.ema, data, device, run.autocast)
            report = EpochReport(state.epoch, tc.epochs, tc.dataset, loss, accuracy, run.lam,
                                 metrics.tpe(accuracy, run.lam), seconds,
                                 run.steps_per_epoch * run.batch_size / seconds)
            _close(bar, report)
            last, stopping = state.epoch == tc.epochs, stop_requested()
            interval = options.checkpoint_interval_s
            due = last or stopping or interval <= 0 or time.monotonic() - last_saved >= interval
            if due and _save(state, path, timings):
                last_saved = time.monotonic()
            if on_epoch is not None:
                on_epoch(report)
            if not last and (stopping or stop_requested()):
                if not due:
                    _save(state, path, timings)
                raise TrainingInterrupted(state.epoch)
    finally:
        if options.timings is not None:
            options.timings.merge(timings)

    return _result(state, run, data, accuracy, resumed_from, timings)


@dataclass
class TrainState:
    """What a run continues from, and what its checkpoint holds: ``save`` writes it as one dict
    and ``load`` reads it back, as nanoGPT's checkpoint.

    ``epoch`` epochs are complete. Between epochs ``step`` is 0; a stop mid-epoch saves the
    ``step`` steps done of the next epoch with the data generator's state after them, their loss
    sum and seconds, and a resume skips those batches of the same permutation and continues
    bit-for-bit. The global RNG (dropout) is saved and restored.
    """

    cfg: RunConfig
    model: nn.Module
    ema: EmaModel
    optimizer: torch.optim.Optimizer
    device: torch.device
    epoch: int = 0
    epoch_seconds: list[float] = field(default_factory=list)
    step: int = 0
    generator: torch.Tensor | None = None  # the data generator's state after ``step`` steps
    loss_sum: torch.Tensor | None = None   # the loss summed over those steps, on the device
    seconds: float = 0.0                   # their training seconds

    # Every checkpoint has these; a file without them is damaged (``load_checkpoint``).
    KEYS = ("config", "epoch", "epoch_seconds", "model", "ema", "ema_updates", "optimizer",
            "cpu_rng")

    def save(self, path: Path) -> None:
        cuda = self.device.type == "cuda"
        mid_epoch = {"step": self.step, "generator": self.generator,
                     "loss_sum": self.loss_sum.detach().clone(),
                     "partial_seconds": self.seconds} if self.step else {}
        save_checkpoint(path, {
            "config": self.cfg.to_dict(), "epoch": self.epoch, "epoch_seconds": self.epoch_seconds,
            "model": self.model.state_dict(), "ema": self.ema.state_dict(),
            "ema_updates": self.ema.updates, "optimizer": self.optimizer.state_dict(),
            "cpu_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if cuda else None,
            **mid_epoch,
        })

    def load(self, path: Path) -> None:
        state = load_checkpoint(path, self.cfg, self.device, self.KEYS)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.ema.updates = state["ema_updates"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.epoch_seconds = state["epoch"], list(state["epoch_seconds"])
        torch.set_rng_state(state["cpu_rng"])
        if self.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        if state.get("step"):
            self.step, self.generator = state["step"], state["generator"]
            self.loss_sum, self.seconds = state["loss_sum"], state["partial_seconds"]


@dataclass
class Run:
    """What stays fixed while a run trains: the compiled step's parts and the step arithmetic."""

    forward: Callable
    augment: Callable
    autocast: bool        # bf16 autocast (CUDA only)
    cudagraphs: bool      # compiled with CUDA graphs ("reduce-overhead")
    clip_grad: float
    parameters: int
    lam: float
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float
    seed: int

    def lr(self, step: int) -> float:
        return lr_at(step, self.total_steps, self.warmup_steps, self.peak_lr)


def _load_data(tc, data_dir, device: torch.device, options: TrainOptions):
    shape = dict(emnist_split=tc.emnist_split, val_fraction=tc.val_fraction, seed=tc.seed,
                 train_limit=tc.train_limit, test_limit=tc.test_limit)
    if options.session is not None:
        return options.session.dataset(tc.dataset, data_dir, device, **shape)
    return load_dataset(tc.dataset, data_dir, device, **shape)


def compile_model(model: nn.Module, mode: str, scope: str = COMPILE_SCOPE) -> Callable:
    """The compiled forward of ``model`` for a compile ``scope`` (``COMPILE_SCOPES``).

    "model": ``torch.compile(model)``, a new callable. "blocks": every block of ``model.blocks``
    is compiled in place (``Module.compile``) and the model itself is the forward. The EMA copy
    evaluates eager in both scopes: a deep copy of a module drops its compiled call.
    """
    if scope == "model":
        return torch.compile(model, mode=mode)
    if scope == "blocks":
        for block in model.blocks:
            block.compile(mode=mode)
        return model
    raise ValueError(f"compile scope: expected one of {COMPILE_SCOPES}, got {scope!r}")


def _build(cfg: RunConfig, data, device: torch.device,
           options: TrainOptions) -> tuple[TrainState, Run]:
    """A fresh run: the model (compiled, or the session's compiled one), EMA, optimizer."""
    tc, info = cfg.train, data.info
    compile_mode = options.compile_mode
    if tc.compile and compile_mode is None:
        compile_mode = CUDA_COMPILE_MODE if device.type == "cuda" else "default"

    def build() -> nn.Module:
        torch.manual_seed(tc.seed)
        return build_model(cfg.model, info.in_chans, info.num_classes, device)

    if tc.compile and options.session is not None:
        key = {"model": asdict(cfg.model), "in_chans": info.in_chans,
               "classes": info.num_classes, "device": str(device), "mode": compile_mode,
               "scope": options.compile_scope}
        model, forward, _ = options.session.compiled_model(
            key, build, lambda m: compile_model(m, compile_mode, options.compile_scope))
    elif tc.compile:
        # A fresh compile state per run: without a session nothing is kept, and stale graphs
        # (with their CUDA-graph memory pools) would pile up and run into Dynamo's recompile
        # limit, after which it silently falls back to eager.
        torch._dynamo.reset()
        model = build()
        forward = compile_model(model, compile_mode, options.compile_scope)
    else:
        model = build()
        forward = model
    parameters = count_parameters(model)
    ema = EmaModel(model, tc.effective_ema())
    peak_lr = tc.effective_lr()
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=peak_lr,
                                  betas=(0.9, 0.999), fused=device.type == "cuda")
    n_train = data.train_labels.numel()
    batch_size = min(tc.batch_size, n_train)
    steps_per_epoch = n_train // batch_size
    run = Run(forward=forward,
              augment=GpuAugment(tc, info, data, compile=tc.compile and options.compile_augment),
              autocast=tc.bf16 and device.type == "cuda",
              cudagraphs=tc.compile and "reduce-overhead" in compile_mode,
              clip_grad=tc.clip_grad, parameters=parameters,
              lam=metrics.param_lambda(parameters), batch_size=batch_size,
              steps_per_epoch=steps_per_epoch, total_steps=steps_per_epoch * tc.epochs,
              warmup_steps=steps_per_epoch * tc.warmup, peak_lr=peak_lr, seed=tc.seed)
    return TrainState(cfg, model, ema, optimizer, device), run


def _run_epoch(state: TrainState, run: Run, data, timings: Timings,
               stop_requested: Callable[[], bool], bar, first: bool) -> tuple[float, float]:
    """Train epoch ``state.epoch + 1`` from step ``state.step``; returns its seconds and mean loss.

    Each epoch's data order and augmentation draw from a generator seeded by (seed, epoch), so a
    resumed epoch continues the same stream. A stop after a step that is not the epoch's last
    leaves ``state.step`` > 0 (the steps done) and returns; the caller saves and raises.
    ``first``: the first epoch of this call compiles, so its first steps are timed apart.
    """
    model, device = state.model, state.device
    model.train()
    generator = torch.Generator(device=device).manual_seed(run.seed * 1_000_003 + state.epoch)
    batches = data.train_batches(run.batch_size, generator)
    skip, earlier_seconds = state.step, state.seconds
    loss_sum = torch.zeros((), device=device)
    if skip:
        for _ in itertools.islice(batches, skip):  # the first draws the permutation
            pass
        generator.set_state(state.generator)  # and the stream goes on where the stop left it
        loss_sum += state.loss_sum
    warm_steps = min(WARM_STEPS, run.steps_per_epoch - skip - 1) if first else 0
    _sync(device)
    started = time.perf_counter()
    warm_seconds, done = 0.0, 0
    for done, (images, labels) in enumerate(batches, start=1):  # done: steps run in this call
        step = state.epoch * run.steps_per_epoch + skip + done - 1
        for group in state.optimizer.param_groups:
            group["lr"] = run.lr(step)
        inputs, targets = run.augment(images, labels, generator)
        if run.cudagraphs:
            # Tells the CUDA-graph runtime that last step's outputs (logits, gradients) are
            # consumed, so this replay may reuse their memory.
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.autocast):
            logits = run.forward(inputs)
        loss = soft_cross_entropy(logits, targets)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if run.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), run.clip_grad, foreach=True)
        state.optimizer.step()
        state.ema.update()
        loss_sum += loss.detach()
        if bar is not None:
            bar.update(1)
        if warm_steps > 0 and done == warm_steps:
            # One host sync per run, so the compile time is measured, not guessed.
            _sync(device)
            warm_seconds = time.perf_counter() - started
        if skip + done < run.steps_per_epoch and stop_requested():
            break
    _sync(device)
    seconds = time.perf_counter() - started
    timings.add_steps(seconds, done, done * run.batch_size, warm_steps, warm_seconds)
    if skip + done < run.steps_per_epoch:
        state.step, state.generator = skip + done, generator.get_state()
        state.loss_sum, state.seconds = loss_sum, earlier_seconds + seconds
        return earlier_seconds + seconds, math.nan
    state.epoch, state.step, state.generator, state.loss_sum, state.seconds = (
        state.epoch + 1, 0, None, None, 0.0)
    state.epoch_seconds.append(earlier_seconds + seconds)
    return earlier_seconds + seconds, loss_sum.item() / run.steps_per_epoch


def _result(state: TrainState, run: Run, data, accuracy: float, resumed_from: int,
            timings: Timings) -> TrainResult:
    cfg, device = state.cfg, state.device
    train_seconds = sum(state.epoch_seconds)
    images = run.steps_per_epoch * run.batch_size * len(state.epoch_seconds)
    return TrainResult(
        dataset=cfg.train.dataset, eval_split=data.eval_split, accuracy=accuracy,
        parameters=run.parameters, lam=run.lam, tpe=metrics.tpe(accuracy, run.lam),
        epochs_run=cfg.train.epochs, resumed_from_epoch=resumed_from, train_seconds=train_seconds,
        images_per_s=images / train_seconds if train_seconds > 0 else 0.0,
        epoch_seconds=state.epoch_seconds, config=cfg.to_dict(), device=str(device),
        peak_memory_gib=(torch.cuda.max_memory_allocated(device) / 2**30
                         if device.type == "cuda" else 0.0),
        timings=asdict(timings),
    )


def _save(state: TrainState, path: Path | None, timings: Timings) -> bool:
    """``state.save(path)``, timed; False when the run keeps no checkpoint."""
    if path is None:
        return False
    with timings.timed("checkpoint_s"):
        state.save(path)
    timings.checkpoints += 1
    return True


PREVIOUS_SUFFIX = ".prev"     # checkpoint.prev.pt: the one before, kept to fall back on
UNREADABLE_SUFFIX = ".unreadable"  # a damaged checkpoint, set aside for inspection


class CheckpointNotWritten(Exception):
    """A checkpoint could not be written (a full disk, a lost mount): the host's fault.

    Not a ``UserError`` and not the configuration's fault: the worker queues the trial again at
    no retry cost and stops (``search/worker.py``). torch reports a full disk as an ``OSError``
    or as a ``RuntimeError`` from its zip writer ("unexpected pos"), so both are wrapped.
    """

    def __init__(self, folder: Path, err: BaseException):
        self.folder = Path(folder)
        self.reason = " ".join(str(err).split())[:200] or type(err).__name__
        super().__init__(f"cannot write a checkpoint to {self.folder} ({self.reason})")


class CheckpointUnreadable(UserError):
    """Every checkpoint of a run was damaged and has been set aside; a fresh start will work."""


def previous_checkpoint(path: Path) -> Path:
    """``checkpoint.pt`` -> ``checkpoint.prev.pt``."""
    path = Path(path)
    return path.with_name(path.stem + PREVIOUS_SUFFIX + path.suffix)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write-then-rename, so a crash mid-write never leaves a half checkpoint behind.

    The file is flushed to disk before the rename (a rename can reach the disk before the data
    it names, leaving an empty file after a power cut), and the checkpoint it replaces stays as
    ``checkpoint.prev.pt`` (a hard link, so ``checkpoint.pt`` exists at every moment): if the new
    one is ever damaged, the run resumes from the one before instead of from scratch.
    """
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as file:
                torch.save(state, file)
                file.flush()
                os.fsync(file.fileno())
            if path.exists():
                previous = previous_checkpoint(path)
                link = previous.with_name(f".{previous.name}.{os.getpid()}.tmp")
                try:
                    link.unlink(missing_ok=True)
                    os.link(path, link)
                    os.replace(link, previous)
                except OSError:  # no hard links on this file system: keep no previous checkpoint
                    link.unlink(missing_ok=True)
    except Exception as err:  # noqa: BLE001 - a full disk is an OSError or torch's RuntimeError
        raise CheckpointNotWritten(path.parent, err) from err


def load_checkpoint(path: Path, cfg: RunConfig, device: torch.device, keys: tuple[str, ...]) -> dict:
    """The state of ``path``, or of the checkpoint before it when ``path`` is damaged.

    A checkpoint that cannot be read (truncated, corrupt, missing keys) is renamed to
    ``*.unreadable`` and the previous one is tried; when none is good, ``CheckpointUnreadable``
    says so, and the next attempt, finding no checkpoint, starts from scratch. A checkpoint of a
    different config is no damage but the user's to sort out: that stays an error.
    """
    path = Path(path)
    damaged = []
    for candidate in (path, previous_checkpoint(path)):
        if not candidate.exists():
            continue
        try:
            state = torch.load(candidate, map_location=device, weights_only=False)
            if not isinstance(state, dict) or any(key not in state for key in keys):
                raise ValueError("not a checkpoint of this trainer (keys missing)")
        except Exception as err:  # noqa: BLE001 - any failure to read means: damaged
            aside = candidate.with_name(candidate.name + UNREADABLE_SUFFIX)
            candidate.replace(aside)
            damaged.append(f"{candidate.name} ({type(err).__name__}), set aside as {aside.name}")
            continue
        if state.get("config") != cfg.to_dict():
            raise CheckpointMismatch(candidate)
        if damaged:
            print(f"checkpoint {path.parent}: {'; '.join(damaged)}; resuming from {candidate.name} "
                  f"(epoch {state['epoch']})", file=sys.stderr, flush=True)
        for key in ("cpu_rng", "cuda_rng", "generator"):  # RNG states are CPU byte tensors
            if state.get(key) is not None:
                state[key] = state[key].cpu()
        return state
    raise CheckpointUnreadable(f"checkpoint {path} is unreadable: {'; '.join(damaged)}; the run "
                               "starts over when run again")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _close(bar, report: EpochReport | None = None) -> None:
    if bar is None:
        return
    if report is not None:
        accuracy = {} if math.isnan(report.accuracy) else {"acc": f"{report.accuracy:.4f}"}
        bar.set_postfix(loss=f"{report.train_loss:.3f}", **accuracy,
                        img_s=f"{report.images_per_s:,.0f}")
    bar.close()


def _progress_bar(enabled: bool, total: int, description: str):
    # A bar redraws its line with carriage returns: in a log file that is noise, not progress.
    if not enabled or not draws_bars(sys.stderr):
        return None
    return tqdm(total=total, desc=description, unit="step", leave=False, dynamic_ncols=True)
