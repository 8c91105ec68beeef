"""``nkat-search worker``: pull trials from a study and train them on one device."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from nkat_search.cli import launch
from nkat_search.cli.checks import check_seconds
from nkat_search.cli.commands.storage_arg import add_storage_argument, child_env, resolve_storage
from nkat_search.cli.commands.train import add_data_arguments
from nkat_search.cli.mps import start_or_join
from nkat_search.config import (CHECKPOINT_INTERVAL_S, COMPILE_SCOPE, COMPILE_SCOPES,
                                 STORAGE_WAIT_S)
from nkat_search.errors import UserError

# Compiled trials of Round 2's mix side by side on one H200 (benchmarks/packing.py, results/gpu/
# session4/packing.json), as trials' worth of training at once against one at a time: K = 2 gave
# 1.17x, K = 4 1.45x, K = 6 (one of them a 257-token model) 1.43x. So 4, where memory allows:
# a 257-token trial needs about 25 GiB (39 GiB peak seen beside five others), so a GPU gets one
# trial per GPU_GIB_PER_TRIAL of its memory, at most GPU_TRIALS_PER_DEVICE and at least one.
# On a CPU a second process only splits the same cores.
GPU_TRIALS_PER_DEVICE = 4
GPU_GIB_PER_TRIAL = 25

HELP = ("Pull trials from a study and train them on one device until the study's budget "
        "(n_trials of its study file, counted over all workers) is spent. The sampler, pruner, "
        "gate and Stage 2 datasets come from the study file stored in the study. The worker "
        "first checks the device, CIFAR-10 and the checkpoint folder (exit 2 with one line if it "
        "cannot run a trial), and stops (exit 4) when its trials fail the same way 3 times in a "
        "row or a checkpoint cannot be written (a full disk), queueing them for the other "
        "workers. SIGTERM/SIGINT checkpoint the trial after its "
        "current step and queue it to resume (a stop uses none of the study's retries); a second "
        "signal stops at once. Prints one line per finished trial. Exit 3: the study has "
        "configurations without a result (every attempt failed, no retry left).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_storage_argument(parser)
    parser.add_argument("--study", required=True, metavar="NAME", help="study name")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda if available), cpu, cuda:N, or all (one worker per "
                        "visible GPU: the form for a container that reserves every GPU)")
    parser.add_argument("--trials-per-gpu", type=int, default=None, metavar="K",
                        help=f"run K workers on each device (K-1 extra processes; default on a "
                        f"GPU: one per {GPU_GIB_PER_TRIAL} GiB of its memory, 1 to "
                        f"{GPU_TRIALS_PER_DEVICE}; 1 on the CPU)")
    parser.add_argument("--n-trials", type=int, default=None, metavar="M",
                        help="stop this worker after M trials (default: until the budget is spent)")
    add_data_arguments(parser)
    parser.add_argument("--checkpoint-dir", default="runs/checkpoints", metavar="DIR",
                        help="checkpoints go to DIR/<study>/trial-<n>/<dataset>/ (shared by retries)")
    parser.add_argument("--checkpoint-store", default=os.environ.get("NKAT_CHECKPOINT_STORE"),
                        metavar="URL",
                        help="also keep every checkpoint in this Optuna artifact store, a folder "
                        "(file system shared by the hosts) or s3://BUCKET/PREFIX (S3, MinIO: "
                        "boto3's AWS_* variables), so a trial retried on another host resumes "
                        "from it (default: $NKAT_CHECKPOINT_STORE; none: local checkpoints only)")
    parser.add_argument("--checkpoint-interval", type=float, default=CHECKPOINT_INTERVAL_S,
                        metavar="S",
                        help="write a trial's checkpoint at most every S seconds (0: after every "
                        "epoch); always at the end of a stage and on SIGTERM / Ctrl-C, so a "
                        "kill -9 loses at most about S seconds of training")
    parser.add_argument("--compile-scope", choices=COMPILE_SCOPES, default=COMPILE_SCOPE,
                        help="how torch.compile covers a trial's model: model (default: one "
                        "graph for the whole model) or blocks (one graph for every block: "
                        "compiles in about a third of the time on the CPU, and a later trial of "
                        "the same width, row length and top_k loads it from Inductor's cache; "
                        "results/README.md)")
    parser.add_argument("--mps", choices=("auto", "on", "off"), default="off",
                        help="CUDA MPS for the K trials on one GPU. off (default): start none (a "
                        "daemon that $CUDA_MPS_PIPE_DIRECTORY names is still used); auto: join "
                        "that daemon or, with K > 1 on a GPU, start one (pipes under the "
                        "checkpoint dir) and stop it when this worker's processes end; on: the "
                        "same, or an error. Measured on an H200: 1.66x the training of one trial "
                        "for four small trials (1.45x without), but 1.09x (1.43x without) when a "
                        "257-token trial shares the GPU, which then takes nearly all of it")
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="take no new trial after S seconds; the running trials finish "
                        "(as Optuna's optimize(timeout=)). The study keeps its budget: a later "
                        "worker goes on from there")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep checkpoints of finished trials (default: only unfinished ones)")
    parser.add_argument("--storage-wait", type=float, default=STORAGE_WAIT_S, metavar="S",
                        help="when the database goes away, wait up to S seconds for it to come "
                        "back before stopping (a trial keeps training through an outage shorter "
                        "than the study's heartbeat grace, less a second)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    # search.worker imports optuna and torch: not for --help.
    from nkat_search.search.worker import StopFlag, run_worker, worst

    args.storage = resolve_storage(args.storage, args.study)
    devices = _devices(args.device)
    if args.trials_per_gpu is None:
        args.trials_per_gpu = default_trials_per_device(devices[0])
    _check(args)
    # The cores are split over this worker's processes unless OMP_NUM_THREADS says otherwise.
    threads = launch.threads_per_process(args.trials_per_gpu * len(devices))
    options = _options(args, devices[0], threads)
    mps = _start_mps(args, devices)
    stop = StopFlag()
    stop.install()
    children = []

    def start_siblings() -> None:
        # The siblings get the URL through the environment: on their command lines ps would
        # show its password to every user of the host. A password from the password file stays
        # out of it too: they read the file themselves.
        env = child_env(args.storage)
        siblings = launch.start_siblings
        children.extend(siblings(_sibling_argv(args, devices[0], 1), args.trials_per_gpu - 1,
                                 stop, threads, env))
        for device in devices[1:]:
            children.extend(siblings(_sibling_argv(args, device, args.trials_per_gpu), 1, stop,
                                     threads, env))

    try:
        code = run_worker(options, stop, on_ready=start_siblings)
    except KeyboardInterrupt:
        code = 130
    finally:
        # Siblings get our signals forwarded (StopFlag); wait so the group ends together.
        codes = [child.wait() for child in children]
        if mps is not None:
            mps.stop()
    return worst([code, *codes])


def _check(args: argparse.Namespace) -> None:
    """The numbers argparse cannot check: one line naming the flag."""
    if args.trials_per_gpu < 1:
        raise UserError(f"--trials-per-gpu: must be >= 1, got {args.trials_per_gpu}")
    if args.n_trials is not None and args.n_trials < 1:
        raise UserError(f"--n-trials: must be >= 1, got {args.n_trials}")
    check_seconds("--checkpoint-interval", args.checkpoint_interval, zero_ok=True)
    check_seconds("--timeout", args.timeout)
    check_seconds("--storage-wait", args.storage_wait)


def _options(args: argparse.Namespace, device: str, cpu_threads: int | None):
    """The ``WorkerOptions`` of this process (its siblings get theirs from their flags)."""
    from nkat_search.search.worker import WorkerOptions  # optuna: not for --help

    return WorkerOptions(storage=args.storage, study=args.study, device=device,
                         n_trials=args.n_trials, data_dir=args.data_dir, download=args.download,
                         checkpoint_dir=args.checkpoint_dir,
                         checkpoint_interval_s=args.checkpoint_interval,
                         keep_checkpoints=args.keep_checkpoints,
                         checkpoint_store=args.checkpoint_store or None,
                         progress=False if args.quiet else None, cpu_threads=cpu_threads,
                         storage_wait_s=args.storage_wait, timeout_s=args.timeout,
                         compile_scope=args.compile_scope)


def _start_mps(args: argparse.Namespace, devices: list[str]):
    """Start or join a CUDA MPS daemon before this process touches CUDA; its env reaches siblings."""
    gpus = sum(1 for d in devices if d.startswith("cuda") or d == "auto")
    if args.mps == "off" or (args.mps == "auto" and args.trials_per_gpu < 2
                             and not os.environ.get("CUDA_MPS_PIPE_DIRECTORY")):
        return None
    if gpus and devices == ["auto"]:
        from nkat_search.train.device import gpu_names  # torch: not for --help

        gpus = len(gpu_names())
    daemon, line = start_or_join(args.mps, Path(args.checkpoint_dir), gpus)
    print(f"worker: {line}", flush=True)
    if daemon is not None:
        os.environ.update(daemon.env())
    return daemon


def default_trials_per_device(device: str) -> int:
    """Trials side by side on ``device``: 1 on the CPU; on a GPU one per 25 GiB, 1 to 4."""
    # torch: not for --help.
    import torch

    from nkat_search.train.device import device_name

    try:
        # Only auto is resolved here: whether a named device exists is the preflight's to say.
        resolved = device_name(device) if device == "auto" else device
        if not resolved.startswith("cuda"):
            return 1
        total = torch.cuda.get_device_properties(torch.device(resolved)).total_memory / 2**30
    except (UserError, RuntimeError, AssertionError, ValueError):
        return 1  # a device that cannot be read is reported by the worker's own checks
    return max(1, min(GPU_TRIALS_PER_DEVICE, int(total // GPU_GIB_PER_TRIAL)))


def _devices(device: str) -> list[str]:
    """``all`` becomes every visible GPU; any other value is one device."""
    if device != "all":
        return [device]
    from nkat_search.train.device import gpu_names  # torch: not for --help

    if not gpu_names():
        raise UserError("--device all: no CUDA GPU is visible; use --device cpu")
    return gpu_names()


def worker_argv(study: str, device: str, checkpoint_dir, *, trials_per_gpu: int | None = None,
                n_trials: int | None = None, checkpoint_interval: float | None = None,
                storage_wait: float | None = None, timeout: float | None = None,
                data_dir: str | None = None, download: bool = False,
                checkpoint_store: str | None = None, keep_checkpoints: bool = False,
                quiet: bool = False, compile_scope: str | None = None) -> list[str]:
    """``worker ...``: the command line of a worker that ``up`` or a worker's siblings start.

    None, '' and False leave a flag out, so the child takes the worker's default. ``--mps off``:
    whoever starts the child started or joined the daemon, whose variables reach the child in its
    environment; the flag only keeps it from starting one of its own. The storage is no flag: its
    URL travels in ``NKAT_STORAGE`` (``storage_arg.child_env``), out of sight of ``ps``.
    """
    argv = ["worker", "--study", study, "--device", device,
            "--checkpoint-dir", str(checkpoint_dir), "--mps", "off"]
    values = {"--trials-per-gpu": trials_per_gpu, "--n-trials": n_trials,
              "--checkpoint-interval": checkpoint_interval, "--storage-wait": storage_wait,
              "--timeout": timeout, "--data-dir": data_dir, "--checkpoint-store": checkpoint_store,
              "--compile-scope": compile_scope}
    for flag, value in values.items():
        if value is not None and value != "":
            argv += [flag, str(value)]
    switches = {"--download": download, "--keep-checkpoints": keep_checkpoints, "--quiet": quiet}
    return argv + [flag for flag, on in switches.items() if on]


def _sibling_argv(args: argparse.Namespace, device: str, trials_per_gpu: int) -> list[str]:
    """A sibling's command line: this worker's flags, on ``device`` with ``trials_per_gpu``."""
    return worker_argv(args.study, device, args.checkpoint_dir, trials_per_gpu=trials_per_gpu,
                       n_trials=args.n_trials, checkpoint_interval=args.checkpoint_interval,
                       storage_wait=args.storage_wait, timeout=args.timeout,
                       data_dir=args.data_dir, download=args.download,
                       checkpoint_store=args.checkpoint_store,
                       keep_checkpoints=args.keep_checkpoints, quiet=args.quiet,
                       compile_scope=args.compile_scope)
