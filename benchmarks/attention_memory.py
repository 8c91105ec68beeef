"""Step time and peak GPU memory of the long-sequence model: attention filters and recomputation.

The Round 2 space holds conv_stem off + patch 2: 257 tokens, whose attention maps are 240x the
baseline's. This times a few training steps of that model (depth 7, the rest the baseline) at
batch 512, eager and compiled as ``--compile`` compiles. The explicit path
(``NKATAttention.attend``, forced on every row but the last) with the top-k and nucleus filters
applied one after the other (a full sort per row, how the model did it before session 3) or
combined (``model.topk_nucleus_mask``), and with the attention core (logits to weights @ v)
recomputed in backward by ``torch.utils.checkpoint`` to save memory; the last row is the fused
core (``train/attention.py``) that compiled training on a GPU now takes. The sequential rows swap
``model.topk_nucleus_mask`` for the old two-step filter; benchmark only.
Session 3 measured recomputation, before the combined filter, at half the peak (41.0 to 21.8 GiB)
and twice the step time (818 to 1641 ms) on an H100 (results/gpu/session3/attention_memory_log.txt),
so training does not recompute; a worker that runs out of GPU memory waits for its GPU's other
trials and retries instead. ``benchmarks/attention_speed.py`` compares the paths at 17, 65 and 257
tokens.

    python benchmarks/attention_memory.py --data-dir DIR [--steps 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import nkat_search.train.model as model_module  # noqa: E402
from nkat_search.config import RunConfig  # noqa: E402
from nkat_search.train.data import load_dataset  # noqa: E402
from profile_step import Stepper, ms_per_call  # noqa: E402
from nkat_search.train.loop import CUDA_COMPILE_MODE  # noqa: E402

_combined_filter = model_module.topk_nucleus_mask


def _sequential_filters(logits, k, p):
    """The mask of topk_mask then nucleus_mask on the softmax (a full sort per row), as before."""
    from nkat_search.train.model import nucleus_mask, topk_mask

    keep = topk_mask(logits, k)
    return keep & nucleus_mask(logits.masked_fill(~keep, float("-inf")).softmax(dim=-1), p)


def _recomputing(attn):
    """``attn``'s forward with its attention core recomputed in backward instead of stored."""
    from torch.utils.checkpoint import checkpoint

    def forward(x):
        B, N, D = x.shape
        q, k, v = attn._qkv(x)
        out = checkpoint(attn.attend, q, k, v, x, use_reentrant=False)
        return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(B, N, D)))

    return forward


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
    compiled = f"compiled {CUDA_COMPILE_MODE}"
    for name, mode, sequential, recompute, path in (
            ("eager, sequential filters (sort), maps kept", None, True, False, "explicit"),
            ("eager, combined filter, maps kept", None, False, False, "explicit"),
            ("eager, combined filter, maps recomputed", None, False, True, "explicit"),
            (f"{compiled}, sequential filters (sort), maps kept", CUDA_COMPILE_MODE, True, False,
             "explicit"),
            (f"{compiled}, combined filter, maps kept", CUDA_COMPILE_MODE, False, False,
             "explicit"),
            (f"{compiled}, fused core (training now)", CUDA_COMPILE_MODE, False, False, "auto")):
        model_module.topk_nucleus_mask = _sequential_filters if sequential else _combined_filter
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        stepper = Stepper(cfg, data, device, mode, mode is not None, attention_path=path)
        if recompute:
            for block in stepper.model.blocks:
                block.attn.forward = _recomputing(block.attn)
        try:
            ms = ms_per_call(stepper.full_step, args.steps, warmup=3)
            peak = torch.cuda.max_memory_allocated(device) / 2**30
            print(f"{name:<58} {ms:8.1f} ms/step  {cfg.train.batch_size / ms * 1e3:>8,.0f} "
                  f"images/s  peak {peak:6.2f} GiB", flush=True)
        except torch.cuda.OutOfMemoryError as err:
            print(f"{name:<58} out of memory: {str(err).splitlines()[0]}", flush=True)
        del stepper
    return 0


if __name__ == "__main__":
    sys.exit(main())
