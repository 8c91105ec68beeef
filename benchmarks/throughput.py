"""Training throughput on CIFAR-10, side by side in one run: the user's pipeline against ours.

- user:     torch DataLoader, per-image PIL transforms on the CPU (crop + flip), batch 32, fp32,
            no EMA: the pipeline the user ran before this project.
- ours:     the dataset resident on the GPU as uint8, batched GPU augmentation (the full recipe:
            crop, flip, RandAugment, cutout, mixup/cutmix), bf16 autocast, EMA, batch 512;
            eager; with only the model compiled (Inductor's default mode, what --compile did
            until session 3); and as --compile does now (the model under CUDA graphs, the
            augmentation's arithmetic compiled too).

All on the baseline model. Prints a table (images/s, ratio to the user's pipeline, seconds per
CIFAR-10 epoch, projected 40-epoch training time, peak GPU memory, model FLOPs utilisation) and
writes it as JSON. Timings are meaningful only on a GPU; on a CPU use --quick to check it runs.

    python benchmarks/throughput.py --data-dir DIR [--out results/throughput.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nkat_search.config import RunConfig  # noqa: E402
from nkat_search.train.data import load_dataset, load_split  # noqa: E402
from nkat_search.train.model import build_model, count_parameters  # noqa: E402
from nkat_search.train.loop import (  # noqa: E402
    TrainOptions, train_model)
from nkat_search.train.device import torch_device  # noqa: E402

# Dense bf16 peak used for MFU; the H100 SXM datasheet figure without sparsity.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
CIFAR_TRAIN_IMAGES = 50_000


def flops_per_training_image(cfg: RunConfig, device: torch.device) -> float:
    """Forward + backward FLOPs per image, counted by PyTorch's FlopCounterMode on one batch."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(cfg.model, 3, 10, device)
    x = torch.randn(8, 3, 32, 32, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 8


def user_pipeline(cfg: RunConfig, data_dir, device, steps: int, warmup_steps: int,
                  workers: int) -> dict:
    """The user's own style: per-image CPU transforms through a DataLoader, batch 32, fp32."""
    import torchvision.transforms as T
    from torch.utils.data import DataLoader, Dataset

    images, labels = load_split("cifar10", "train", data_dir)

    class PerImageCifar(Dataset):
        transform = T.Compose([T.ToPILImage(), T.RandomCrop(32, padding=4),
                               T.RandomHorizontalFlip(), T.ToTensor(),
                               T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))])

        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return self.transform(images[i]), int(labels[i])

    loader = DataLoader(PerImageCifar(), batch_size=32, shuffle=True, num_workers=workers,
                        pin_memory=device.type == "cuda", drop_last=True,
                        persistent_workers=workers > 0)
    model = build_model(cfg.model, 3, 10, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    model.train()
    batches = iter(loader)
    started = None
    for step in range(warmup_steps + steps):
        if step == warmup_steps:
            _sync(device)
            started = time.perf_counter()
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    _sync(device)
    seconds = time.perf_counter() - started
    return {"images_per_s": steps * 32 / seconds, "peak_memory_gib": _peak(device)}


def our_pipeline(cfg: RunConfig, data, device, compile_model: bool, epochs: int,
                 compile_mode: str | None = None, compile_augment: bool | None = None) -> dict:
    """Our training loop; the images/s of the last epoch (the first includes compilation)."""
    run_cfg = RunConfig.from_dict({"compile": compile_model, "epochs": epochs, "warmup": 1},
                                  base=cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reports = []
    options = TrainOptions(data=data, compile_mode=compile_mode,
                           compile_augment=compile_augment is not False)
    result = train_model(run_cfg, device=device, on_epoch=reports.append, progress=False,
                         options=options)
    return {"images_per_s": reports[-1].images_per_s, "first_epoch_s": reports[0].epoch_seconds,
            "last_epoch_s": reports[-1].epoch_seconds, "accuracy": result.accuracy,
            "peak_memory_gib": _peak(device)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="dataset root (default: $NKAT_DATA_DIR)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="results/throughput.json")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run of ours")
    parser.add_argument("--user-steps", type=int, default=300)
    parser.add_argument("--user-workers", type=int, default=4, help="DataLoader workers")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model and slices, to check the script on a CPU")
    args = parser.parse_args()

    device = torch_device(args.device)
    overrides = {"batch_size": args.batch_size}
    if args.quick:
        overrides |= {"embed_dim": 32, "depth": 1, "train_limit": 512, "test_limit": 256,
                      "batch_size": 64}
        args.user_steps, args.epochs = 8, 2
    cfg = RunConfig.from_dict(overrides)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    flops = flops_per_training_image(cfg, device)
    data = load_dataset("cifar10", args.data_dir, device, train_limit=cfg.train.train_limit,
                        test_limit=cfg.train.test_limit)
    rows = {"user (DataLoader, batch 32, fp32)": user_pipeline(
        cfg, args.data_dir, device, args.user_steps, 20 if not args.quick else 2,
        args.user_workers)}
    rows[f"ours eager (GPU data, bf16, batch {cfg.train.batch_size})"] = our_pipeline(
        cfg, data, device, False, args.epochs)
    if not args.no_compile:
        rows["ours, model compiled (default mode)"] = our_pipeline(
            cfg, data, device, True, args.epochs, compile_mode="default", compile_augment=False)
        rows["ours --compile (CUDA graphs + compiled augment)"] = our_pipeline(
            cfg, data, device, True, args.epochs)

    peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    base = next(iter(rows.values()))["images_per_s"]
    print(f"device: {gpu}; model lambda {count_parameters(build_model(cfg.model, 3, 10)) / 1e6:.4f}; "
          f"{flops / 1e9:.3f} GFLOP per training image (fwd+bwd)")
    print(f"{'pipeline':<48} {'images/s':>10} {'ratio':>7} {'s/epoch':>8} {'40 ep s':>8} "
          f"{'peak GiB':>9} {'MFU':>6}")
    for name, row in rows.items():
        row["ratio_to_user"] = row["images_per_s"] / base
        row["seconds_per_cifar10_epoch"] = CIFAR_TRAIN_IMAGES / row["images_per_s"]
        row["projected_40_epoch_training_s"] = 40 * row["seconds_per_cifar10_epoch"]
        row["mfu"] = flops * row["images_per_s"] / (peak * 1e12) if peak else None
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        print(f"{name:<48} {row['images_per_s']:>10,.0f} {row['ratio_to_user']:>6.1f}x "
              f"{row['seconds_per_cifar10_epoch']:>8.2f} {row['projected_40_epoch_training_s']:>8.0f} "
              f"{row['peak_memory_gib']:>9.2f} {mfu:>6}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": gpu, "torch": torch.__version__,
                               "flops_per_training_image": flops, "config": cfg.to_dict(),
                               "rows": rows, "command": " ".join(sys.argv)}, indent=2))
    print(f"wrote {out}")
    return 0


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


if __name__ == "__main__":
    sys.exit(main())
