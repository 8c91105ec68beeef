"""Where a training step's time goes: torch.profiler over a few steps of the baseline on a GPU.

Prints the top operators by CUDA time and by CPU time, and the wall time per step with and
without augmentation, so launch-bound and GPU-bound parts can be told apart.

    python benchmarks/profile_step.py --data-dir DIR [--steps 20]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nkat_search.augment import GpuAugment  # noqa: E402
from nkat_search.config import RunConfig  # noqa: E402
from nkat_search.data import load_dataset  # noqa: E402
from nkat_search.model import build_model  # noqa: E402
from nkat_search.train import soft_cross_entropy  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. top_k=0 top_p=1.0 nkat_strength=0")
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = type(getattr(RunConfig().model, key, getattr(RunConfig().train, key, "")))(
            value) if not isinstance(getattr(RunConfig().model, key, None), bool) else value == "true"
    cfg = RunConfig.from_dict(overrides)
    device = torch.device("cuda")
    data = load_dataset("cifar10", args.data_dir, device)
    model = build_model(cfg.model, 3, 10).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    augment = GpuAugment(cfg.train, data.info, data)
    generator = torch.Generator(device=device).manual_seed(0)
    batches = data.train_batches(cfg.train.batch_size, generator)

    def step(with_augment: bool):
        images, labels = next(batches)
        if with_augment:
            x, y = augment(images, labels, generator)
        else:
            x = data.normalize(images)
            y = torch.nn.functional.one_hot(labels, 10).float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = soft_cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()

    for with_augment in (True, False):
        for _ in range(5):
            step(with_augment)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(args.steps):
            step(with_augment)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - started) / args.steps * 1e3
        print(f"augment={with_augment}: {ms:.1f} ms/step, "
              f"{cfg.train.batch_size / ms * 1e3:,.0f} images/s")
    images, labels = next(batches)
    started = time.perf_counter()
    for _ in range(args.steps):
        augment(images, labels, generator)
    torch.cuda.synchronize()
    print(f"augment alone: {(time.perf_counter() - started) / args.steps * 1e3:.1f} ms/batch")

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step(True)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
