"""Peak GPU memory and step time of the long-sequence model, with and without recomputation.

The Round 2 space holds conv_stem off + patch 2: 257 tokens, whose attention maps are 240x the
baseline's. This times a few training steps of that model (depth 7, the rest the baseline) at
batch 512: eager keeping the maps, eager recomputing the attention core (logits to weights @ v)
in backward with ``torch.utils.checkpoint``, and that compiled as ``--compile`` compiles.
Measured on an H100 (results/gpu/session3/attention_memory_log.txt), recomputation halved the
peak (41.0 to 21.8 GiB) and doubled the step time (818 to 1641 ms), so training does not use it;
instead a worker that runs out of GPU memory waits for its GPU's other trials and retries.

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


def _recomputing(attn):
    """``attn``'s forward with its attention core recomputed in backward instead of stored."""
    from torch.utils.checkpoint import checkpoint

    def forward(x):
        B, N, D = x.shape
        q, k, v = attn._qkv(x)
        out = checkpoint(_core, attn, q, k, v, x, use_reentrant=False)
        return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(B, N, D)))

    return forward


def _core(attn, q, k, v, x):
    """The NKAT branch of ``NKATAttention.forward``, from the logits to ``weights @ v``."""
    from nkat_search.model import nucleus_mask, topk_mask

    logits = (q @ k.transpose(-2, -1)) * attn.scale
    if attn.top_k > 0:
        logits = logits.masked_fill(~topk_mask(logits, attn.top_k), float("-inf"))
    if attn.top_p < 1.0:
        logits = logits.masked_fill(~nucleus_mask(logits.softmax(dim=-1), attn.top_p), float("-inf"))
    weights = attn.attn_drop(logits.softmax(dim=-1))
    if attn.alpha is not None:
        weights = weights * attn.modulation(x)
    return weights.to(v.dtype) @ v


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
        if recompute:
            for block in stepper.model.blocks:
                block.attn.forward = _recomputing(block.attn)
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
