"""Peak GPU memory and step time of the long-sequence model, with and without recomputation.

The Round 2 space holds conv_stem off + patch 2: 257 tokens, whose attention maps are 240x the
baseline's. This times a few training steps of that model (depth 7, the rest the baseline) at
batch 512: eager keeping the maps, eager recomputing them in backward (what training does from
``model.RECOMPUTE_MIN_TOKENS`` tokens on), and compiled as ``--compile`` does.

    python benchmarks/attention_memory.py --data-dir DIR [--steps 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nkat_search.config import RunConfig  # noqa: E402
from nkat_search.data import load_dataset  # noqa: E402
from profile_step import Stepper, ms_per_call  # noqa: E402
from nkat_search.train import CUDA_COMPILE_MODE  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    device = torch.device("cuda")
    cfg = RunConfig.from_dict({"conv_stem": "off", "patch_size": 2, "depth": 7})
    data = load_dataset("cifar10", args.data_dir, device)
    print(f"device: {torch.cuda.get_device_name(device)}; conv_stem off, patch 2, depth 7 "
          f"(257 tokens), batch {cfg.train.batch_size}")
    for name, mode, recompute in (("eager, maps kept", None, False),
                                  ("eager, maps recomputed", None, True),
                                  (f"compiled {CUDA_COMPILE_MODE}, maps recomputed",
                                   CUDA_COMPILE_MODE, True)):
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        stepper = Stepper(cfg, data, device, mode, mode is not None)
        for block in stepper.model.blocks:
            block.attn.recompute_min_tokens = 128 if recompute else 10**9
        try:
            ms = ms_per_call(stepper.full_step, args.steps, warmup=3)
            peak = torch.cuda.max_memory_allocated(device) / 2**30
            print(f"{name:<44} {ms:8.1f} ms/step  {cfg.train.batch_size / ms * 1e3:>8,.0f} "
                  f"images/s  peak {peak:6.2f} GiB", flush=True)
        except torch.cuda.OutOfMemoryError as err:
            print(f"{name:<44} out of memory: {str(err).splitlines()[0]}", flush=True)
        del stepper
    return 0


if __name__ == "__main__":
    sys.exit(main())
