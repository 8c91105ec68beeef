"""``nkat-search train`` with the NKAT attention path chosen: the accuracy check of the fast paths.

``auto`` is what training does (``model.KERNEL_BY_DEFAULT`` says whether that is the Triton
kernel for rows of ``KERNEL_MIN_TOKENS`` or more on a GPU, or the fused core); ``kernel`` turns
the kernel on for those rows; ``fused`` keeps them on the fused core (under ``--compile``), the
path before the kernel; ``explicit`` keeps every layer on ``NKATAttention.attend``, the path
before both. Everything after ``--`` goes to ``nkat-search train`` unchanged. For the issue's
comparison, one 257-token configuration, 40 epochs, the same seed, each run on the GPU alone:

    python benchmarks/attention_accuracy.py kernel -- --conv_stem off --patch_size 2 --compile \\
        --quiet --out runs/attn_kernel
    python benchmarks/attention_accuracy.py explicit -- --conv_stem off --patch_size 2 --compile \\
        --quiet --out runs/attn_explicit

Each writes ``metrics.json`` (accuracy, images/s) into its ``--out``; re-running the same command
resumes from the checkpoint there (the explicit run takes about 14 minutes on an H200).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("auto", "kernel", "fused", "explicit") or argv[1] != "--":
        print("usage: attention_accuracy.py auto|kernel|fused|explicit -- TRAIN_FLAGS...",
              file=sys.stderr)
        return 2
    import nkat_search.train.model as model_module
    from nkat_search.cli.main import main as cli_main

    if argv[0] == "kernel":
        model_module.KERNEL_BY_DEFAULT = True
    if argv[0] in ("fused", "explicit"):
        # No row is long enough for the kernel.
        model_module.KERNEL_MIN_TOKENS = sys.maxsize
    if argv[0] == "explicit":
        # Nor for the fused core: every layer takes the explicit path.
        model_module.FUSED_MIN_TOKENS = sys.maxsize
    return cli_main(["train", *argv[2:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
