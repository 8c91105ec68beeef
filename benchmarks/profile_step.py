"""Where a training step's time goes, on a GPU: the parts timed alone, whole-step variants, a profile.

One process, one GPU, the baseline model at batch 512 with the full recipe. Prints, in ms:

- the augmentation alone, eager and compiled (``GpuAugment(compile=...)``);
- the model step alone (forward, loss, backward, clip, AdamW, EMA) on one fixed augmented batch,
  eager and for each ``torch.compile`` mode given;
- whole steps (augmentation + model step) for each variant, with images/s;
- for the last variant, torch.profiler's GPU kernel time per step beside the wall time per step
  (a GPU busy share well below 100 % means the step waits on the CPU launching work), and the top
  kernels.

    python benchmarks/profile_step.py --data-dir DIR [--steps 40] [--modes default reduce-overhead]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nkat_search.train.augment import GpuAugment  # noqa: E402
from nkat_search.config import RunConfig  # noqa: E402
from nkat_search.train.data import load_dataset  # noqa: E402
from nkat_search.train.model import build_model  # noqa: E402
from nkat_search.train.loop import EmaModel, param_groups, soft_cross_entropy  # noqa: E402


class Stepper:
    """One training setup: model, optimizer, EMA and augmentation, as ``train_model`` builds them."""

    def __init__(self, cfg: RunConfig, data, device, mode: str | None, compile_augment: bool,
                 attention_path: str = "auto"):
        torch.manual_seed(0)
        self.model = build_model(cfg.model, 3, 10, device, attention_path)
        self.ema = EmaModel(self.model, cfg.train.effective_ema())
        self.optimizer = torch.optim.AdamW(param_groups(self.model, 0.05), lr=1e-4, fused=True)
        self.augment = GpuAugment(cfg.train, data.info, data, compile=compile_augment)
        self.forward = self.model if mode is None else torch.compile(self.model, mode=mode)
        self.cudagraphs = mode is not None and "reduce-overhead" in mode
        self.generator = torch.Generator(device=device).manual_seed(0)
        self.data = data
        self.batch_size = cfg.train.batch_size
        self._batches = self._endless()

    def _endless(self):
        while True:
            yield from self.data.train_batches(self.batch_size, self.generator)

    def augmented(self):
        images, labels = next(self._batches)
        return self.augment(images, labels, self.generator)

    def model_step(self, x, y) -> None:
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = soft_cross_entropy(self.forward(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)
        self.optimizer.step()
        self.ema.update()

    def full_step(self) -> None:
        self.model_step(*self.augmented())


def ms_per_call(fn, steps: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--modes", nargs="*", default=["default", "reduce-overhead"],
                        help="torch.compile modes to time for the model")
    args = parser.parse_args()
    device = torch.device("cuda")
    cfg = RunConfig()
    data = load_dataset("cifar10", args.data_dir, device)
    batch = cfg.train.batch_size
    print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; batch {batch}")

    def report(name: str, ms: float) -> None:
        print(f"{name:<58} {ms:7.2f} ms  {batch / ms * 1e3:>9,.0f} images/s", flush=True)

    print("-- augmentation alone")
    for compiled in (False, True):
        stepper = Stepper(cfg, data, device, None, compiled)
        report(f"augment {'compiled' if compiled else 'eager'}", ms_per_call(stepper.augmented, args.steps))

    print("-- model step alone (one fixed augmented batch)")
    for mode in [None, *args.modes]:
        torch._dynamo.reset()
        stepper = Stepper(cfg, data, device, mode, False)
        x, y = stepper.augmented()
        report(f"model step, {'eager' if mode is None else 'compiled ' + mode}",
               ms_per_call(lambda: stepper.model_step(x, y), args.steps))

    print("-- whole steps")
    variants = [(None, False)] + [(mode, aug) for mode in args.modes for aug in (False, True)]
    for mode, aug in variants:
        torch._dynamo.reset()
        stepper = Stepper(cfg, data, device, mode, aug)
        name = (f"model {'eager' if mode is None else 'compiled ' + mode}, "
                f"augment {'compiled' if aug else 'eager'}")
        report(name, ms_per_call(stepper.full_step, args.steps))

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(args.steps):
            stepper.full_step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - started) / args.steps * 1e3
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events) / args.steps
    kernels = sum(e.count for e in events if e.self_device_time_total > 0) / args.steps
    print(f"-- profile of the last variant: wall {wall_ms:.2f} ms/step (profiler on), GPU kernels "
          f"{kernel_us / 1e3:.2f} ms/step, {kernels:.0f} kernels/step, GPU busy "
          f"{kernel_us / 1e3 / wall_ms:.0%}")
    print(events.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main())
