"""Command-line flags for every config field, spelled exactly like the field (``--top_k 6``).

The user's baseline command line (MISSION.md sec. 3) is accepted verbatim. Precedence: the
baseline defaults, then ``--config FILE``, then flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from nkat_search.config import ModelConfig, RunConfig, TrainConfig, load_config_file

# Flags owned by the commands themselves (dataset choice, seed, compile) are still config fields,
# so a config file and a flag stay interchangeable.
_HELP = {
    "conv_stem": "convolutional stem: off (plain patches), tiny (2 convs, 32->8), small (3 convs)",
    "patch_size": "patch embedding kernel = stride after the stem",
    "temperature": "attention logits are divided by this",
    "top_k": "keep the k largest attention logits per query (0 = off)",
    "top_p": "nucleus filter on attention probabilities (1 = off)",
    "nkat_strength": "NKAT modulation strength s_0 (0 = off)",
    "nkat_decay": "per-layer decay of the modulation: s_l = strength * decay**l",
    "lr": "peak learning rate at batch 32; scaled by (batch_size / 32) ** 0.25",
    "ema": "EMA decay per step at batch 32; rescaled to keep the horizon in images",
    "randaugment": "RandAugment N ops at magnitude M (0..30)",
    "mixup": "mixup Beta(alpha, alpha) parameter (0 = off)",
    "cutmix": "probability that a sample is cut-mixed instead of mixed up",
    "cutout": "side in pixels of the square hole cut from each image (0 = off)",
    "val_fraction": "hold out this fraction of train as the eval split (0 = official test split)",
    "train_limit": "use only the first N training images (0 = all)",
    "test_limit": "use only the first N eval images (0 = all)",
    "warmup": "epochs of linear learning-rate warm-up",
    "clip_grad": "gradient norm clipping (0 = off)",
    "bf16": "bf16 autocast on CUDA",
    "compile": "torch.compile the model (with CUDA graphs on a GPU) and the augmentation",
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per config field; unset flags do not override anything."""
    parser.add_argument("--config", metavar="FILE",
                        help="YAML/JSON config (flat fields, or an exported best-trial file)")
    for cls, title in ((ModelConfig, "model"), (TrainConfig, "training recipe")):
        group = parser.add_argument_group(f"{title} (defaults: the user's baseline)")
        defaults = cls()
        for f in dataclasses.fields(cls):
            kind = typing.get_type_hints(cls)[f.name]
            default = getattr(defaults, f.name)
            helptext = f"{_HELP.get(f.name, f.name.replace('_', ' '))} (baseline: {_show(default)})"
            kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=helptext)
            if kind is bool:
                group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kwargs)
            elif typing.get_origin(kind) is tuple:
                group.add_argument(f"--{f.name}", type=int, nargs=2, metavar=("N", "M"), **kwargs)
            else:
                group.add_argument(f"--{f.name}", type=kind, metavar=f.name.upper(), **kwargs)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Baseline, then ``--config``, then the flags given; validated."""
    base = load_config_file(args.config) if getattr(args, "config", None) else RunConfig()
    given = {name: getattr(args, name) for name in _field_names() if hasattr(args, name)}
    if "randaugment" in given:
        given["randaugment"] = list(given["randaugment"])
    return RunConfig.from_dict(given, base=base)


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig) + dataclasses.fields(TrainConfig)]


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)
