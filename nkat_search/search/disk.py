"""The checkpoint folder's disk: how much a trial needs, how much is free, and saying so.

A full checkpoint disk is the host's fault, not the configuration's: the worker checks before it
takes a trial that the folder has the room one trial's checkpoints need, and a checkpoint that
cannot be written later (another process filled the disk) stops the worker, with the trial queued
again at no retry cost (``worker.py``).

The room a trial needs is measured on the study's largest model, built on the meta device (no
memory, no time): a checkpoint holds the weights, the EMA copy and AdamW's two moments, about
16 bytes per parameter, and a dataset keeps ``checkpoint.pt`` and ``checkpoint.prev.pt`` while the
next one is written beside them. Every dataset of a trial keeps its own until the trial ends.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from nkat_search.errors import UserError

# weights + EMA weights + AdamW exp_avg + exp_avg_sq, float32
BYTES_PER_PARAMETER = 16
# torch.save's zip container, the RNG states and the optimizer's bookkeeping (measured: 45 KB)
CHECKPOINT_OVERHEAD = 64 * 1024
# checkpoint.pt, checkpoint.prev.pt, and the next one being written
FILES_AT_ONCE = 3
# errno values that mean the host's storage, not the trial, is at fault
HOST_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


def human(size: float) -> str:
    """``1.5 MiB``: bytes for people."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def free_bytes(folder: str | Path) -> int | None:
    """Free bytes on ``folder``'s file system for this user (its nearest existing parent)."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def largest_parameters(spec) -> int:
    """Trainable parameters of the study's largest model on any of its datasets.

    Each searched model field is set, one after the other, to the value (of its choices, or its
    low and high) that makes the model largest; 10 classes and 3 channels, the most of any
    dataset bar EMNIST's 26 letters, whose head adds a few thousand parameters more.
    """
    # torch and train/ load with the first trial, not when the worker starts: a bad URL or
    # study name is reported before paying for them (here and in is_host_fault).
    import torch

    from nkat_search.config import RunConfig
    from nkat_search.train.model import build_model, count_parameters

    base = spec.base_config()

    def size(values: dict) -> int:
        try:
            cfg = RunConfig.from_dict(values, base=base)
            with torch.device("meta"):
                return count_parameters(build_model(cfg.model, 3, 26))
        except Exception:  # noqa: BLE001 - a combination the model refuses is no candidate
            return -1

    model_fields = set(base.model.__dataclass_fields__)
    chosen: dict = {}
    for name, param in spec.search.items():
        if name not in model_fields:
            continue
        candidates = param.choices if param.type == "categorical" else [param.low, param.high]
        chosen[name] = max(candidates, key=lambda value: size({**chosen, name: value}))
    return max(size(chosen), size({}))


def trial_checkpoint_bytes(spec) -> int:
    """Bytes one trial's checkpoints may take at once, on its largest model."""
    per_file = largest_parameters(spec) * BYTES_PER_PARAMETER + CHECKPOINT_OVERHEAD
    datasets = 1 + len(spec.stage2_datasets)
    return per_file * (2 * datasets + 1)


def check_room(folder: str | Path, needed: int, trials: int = 1) -> None:
    """``UserError`` when ``folder`` has less free room than ``trials`` trials' checkpoints need."""
    free = free_bytes(folder)
    if free is not None and free < needed * trials:
        raise UserError(f"--checkpoint-dir {folder}: {human(free)} free, a trial's checkpoints "
                        f"need up to {human(needed * trials)}; free space there or pick another "
                        "folder")


def is_host_fault(err: BaseException) -> bool:
    """True for a checkpoint that could not be written, or a full / read-only / failing disk."""
    from nkat_search.train.loop import CheckpointNotWritten

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, CheckpointNotWritten):
            return True
        if isinstance(err, OSError) and err.errno in HOST_ERRNOS:
            return True
        err = err.__cause__ or err.__context__
    return False
