"""CUDA MPS handling: when a daemon is started, joined, skipped or refused, and that it is stopped.

There is no GPU here, so the daemon is a stand-in script with the control binary's interface
(``-d`` starts it and creates the control pipe; ``get_server_list`` and ``quit`` on stdin); what
is tested is our side: where the pipes go, what the clients' environment says, who stops it.
"""

import os
import stat
import subprocess
import sys

import pytest

from nkat_search.cli import mps
from nkat_search.errors import UserError

FAKE_CONTROL = """#!/bin/sh
if [ "$1" = "-d" ]; then
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" && : > "$CUDA_MPS_PIPE_DIRECTORY/control"
  echo started >> "$CUDA_MPS_PIPE_DIRECTORY/../calls"
  exit 0
fi
read command
echo "$command" >> "$CUDA_MPS_PIPE_DIRECTORY/../calls"
[ -e "$CUDA_MPS_PIPE_DIRECTORY/control" ] || exit 1
[ "$command" = quit ] && rm "$CUDA_MPS_PIPE_DIRECTORY/control"
exit 0
"""


@pytest.fixture
def control(tmp_path, monkeypatch):
    """A stand-in nvidia-cuda-mps-control on PATH; the real search dirs are hidden."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / mps.CONTROL
    script.write_text(FAKE_CONTROL)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(mps, "EXTRA_BIN_DIRS", ())
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.delenv("CUDA_MPS_LOG_DIRECTORY", raising=False)
    return script


def test_off_and_no_gpu_mean_no_daemon(control, tmp_path):
    assert mps.start_or_join("off", tmp_path, gpus=1)[0] is None
    daemon, line = mps.start_or_join("auto", tmp_path, gpus=0)
    assert daemon is None and "no GPU" in line
    with pytest.raises(UserError, match="no CUDA GPU"):
        mps.start_or_join("on", tmp_path, gpus=0)


def test_without_the_control_binary_auto_goes_on_and_on_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(mps, "EXTRA_BIN_DIRS", ())
    daemon, line = mps.start_or_join("auto", tmp_path, gpus=1)
    assert daemon is None and "not found" in line
    with pytest.raises(UserError, match="--mps on: nvidia-cuda-mps-control not found"):
        mps.start_or_join("on", tmp_path, gpus=1)


def test_a_started_daemon_lives_under_the_run_folder_and_only_its_starter_stops_it(control,
                                                                                   tmp_path,
                                                                                   monkeypatch):
    daemon, line = mps.start_or_join("auto", tmp_path / "run", gpus=1)
    assert daemon.started and daemon.pipe_dir == (tmp_path / "run" / "mps" / "pipe").resolve()
    assert (daemon.pipe_dir / "control").exists() and "started" in line
    # A worker given the daemon's environment joins it and leaves it running when it ends.
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", daemon.env()["CUDA_MPS_PIPE_DIRECTORY"])
    joined, line = mps.start_or_join("auto", tmp_path / "elsewhere", gpus=1)
    assert not joined.started and joined.pipe_dir == daemon.pipe_dir and "joined" in line
    joined.stop()
    assert (daemon.pipe_dir / "control").exists()
    daemon.stop()
    assert not (daemon.pipe_dir / "control").exists()
    calls = (daemon.pipe_dir.parent / "calls").read_text().split()
    assert calls == ["started", "get_server_list", "quit"]


def test_a_long_run_folder_gets_a_short_pipe_path(control, tmp_path):
    deep = tmp_path.joinpath(*["a-rather-long-folder-name"] * 5)
    daemon, _ = mps.start_or_join("on", deep, gpus=1)
    try:
        assert len(str(daemon.pipe_dir / "control")) < 108  # a Unix socket path's limit
    finally:
        daemon.stop()


def test_the_flag_is_checked_by_argparse():
    done = subprocess.run([sys.executable, "-m", "nkat_search", "worker", "--study", "s",
                           "--storage", "sqlite:///x.db", "--mps", "sometimes"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--mps: invalid choice" in done.stderr
