"""CUDA MPS: the trials sharing a GPU run their kernels side by side instead of taking turns.

Without MPS the GPU time-slices between processes: one trial's kernels run, then another's. A
trial of a small model leaves most of the GPU idle in each of its kernels, so K trials per GPU
gain little. Under the MPS control daemon (``nvidia-cuda-mps-control -d``) the K processes share
one GPU context and their kernels overlap. ``up`` starts a daemon for its workers and stops it
when they are done; ``worker`` joins a running daemon, or starts one for its own K processes.

The daemon is told where to put its pipes (``CUDA_MPS_PIPE_DIRECTORY``) and logs
(``CUDA_MPS_LOG_DIRECTORY``); its clients find it through the same variables, so each ``up`` run
has a daemon of its own under its run folder and never touches one it did not start.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nkat_search.errors import UserError

CONTROL = "nvidia-cuda-mps-control"
# Where NVIDIA's container toolkit and the GPU machine put the driver's tools when they are not
# on PATH.
EXTRA_BIN_DIRS = ("/usr/local/nvidia/bin", "/usr/local/cuda/bin")
MODES = ("auto", "on", "off")
# The control pipe is a Unix socket: its path must fit in sun_path (108 bytes).
MAX_PIPE_DIR = 80
START_TIMEOUT_S = 10.0


@dataclass
class MpsDaemon:
    pipe_dir: Path
    log_dir: Path
    control: str
    started: bool  # False: joined a daemon someone else started

    def env(self) -> dict[str, str]:
        return {"CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir),
                "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir)}

    def describe(self) -> str:
        verb = "started" if self.started else "joined"
        return f"CUDA MPS daemon {verb} (pipes in {self.pipe_dir})"

    def stop(self) -> None:
        """Quit the daemon if we started it; its clients must have exited first."""
        if not self.started:
            return
        env = dict(os.environ, **self.env())
        try:
            subprocess.run([self.control], input="quit\n", text=True, env=env, timeout=30,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            pass


def find_control() -> str | None:
    found = shutil.which(CONTROL)
    if found:
        return found
    for folder in EXTRA_BIN_DIRS:
        candidate = Path(folder) / CONTROL
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def start_or_join(mode: str, folder: Path, gpus: int) -> tuple[MpsDaemon | None, str]:
    """``(daemon or None, one line saying what happened)`` for ``--mps MODE``.

    ``auto``: join the daemon of ``$CUDA_MPS_PIPE_DIRECTORY`` if one answers there, else start one
    with its pipes under ``folder``; without GPUs or without the control binary, go on without
    MPS. ``on``: the same, but a missing binary or a daemon that does not start is an error.
    ``off``: no MPS.
    """
    if mode not in MODES:
        raise UserError(f"--mps: '{mode}' is not one of {', '.join(MODES)}")
    if mode == "off":
        return None, "CUDA MPS off (--mps off): trials on one GPU take turns"
    if gpus == 0:
        if mode == "on":
            raise UserError("--mps on: no CUDA GPU is visible; use --mps off (or auto)")
        return None, "CUDA MPS not used: no GPU"
    control = find_control()
    if control is None:
        if mode == "on":
            raise UserError(f"--mps on: {CONTROL} not found on PATH or in "
                            f"{', '.join(EXTRA_BIN_DIRS)}; install the NVIDIA driver utilities "
                            "or use --mps off")
        return None, f"CUDA MPS not used: {CONTROL} not found (trials on one GPU take turns)"
    given = os.environ.get("CUDA_MPS_PIPE_DIRECTORY")
    if given and _answers(control, Path(given)):
        log_dir = Path(os.environ.get("CUDA_MPS_LOG_DIRECTORY") or given)
        daemon = MpsDaemon(Path(given), log_dir, control, started=False)
        return daemon, daemon.describe()
    pipe_dir = Path(given) if given else _pipe_dir(folder)
    log_dir = Path(os.environ.get("CUDA_MPS_LOG_DIRECTORY") or pipe_dir.parent / "log")
    daemon = MpsDaemon(pipe_dir, log_dir, control, started=True)
    try:
        _start(daemon)
    except OSError as err:
        if mode == "on":
            raise UserError(f"--mps on: the CUDA MPS daemon did not start ({err}); see "
                            f"{log_dir}/control.log, or use --mps off") from None
        return None, f"CUDA MPS not used: the daemon did not start ({err}); see {log_dir}"
    return daemon, daemon.describe()


def _pipe_dir(folder: Path) -> Path:
    pipe = (folder / "mps" / "pipe").resolve()
    if len(str(pipe)) <= MAX_PIPE_DIR:
        return pipe
    digest = hashlib.sha1(str(pipe).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"nkat-mps-{digest}" / "pipe"


def _start(daemon: MpsDaemon) -> None:
    daemon.pipe_dir.mkdir(parents=True, exist_ok=True)
    daemon.log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **daemon.env())
    done = subprocess.run([daemon.control, "-d"], env=env, capture_output=True, text=True,
                          timeout=30)
    if done.returncode != 0:
        raise OSError(done.stderr.strip() or f"exit code {done.returncode}")
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (daemon.pipe_dir / "control").exists():
        if time.monotonic() > deadline:
            raise OSError(f"no control pipe in {daemon.pipe_dir} after {START_TIMEOUT_S:.0f} s")
        time.sleep(0.1)


def _answers(control: str, pipe_dir: Path) -> bool:
    """True when a control daemon listens in ``pipe_dir`` (it answers ``get_server_list``)."""
    if not (pipe_dir / "control").exists():
        return False
    env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=str(pipe_dir))
    try:
        done = subprocess.run([control], input="get_server_list\n", text=True, env=env,
                              capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0
