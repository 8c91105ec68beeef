"""The half of workers/smoke.sh that runs inside the image: is this image fit to run trials here?

Prints the image's torch, CUDA, GPUs and C compiler, then runs
``nkat-search smoke --device cuda --epochs 1 --compile`` (flags after these override them), under
a CUDA MPS daemon when ``NKAT_MPS`` is auto or on (started and stopped with the worker's own
``nkat_search.cli.mps``, as ``worker --mps`` does), and says whether the run finished, how long it
compiled and trained, and whether it went through MPS. Exit 0 when training and evaluation
finished (after one epoch the verdict is NO-GO, and that is expected), 1 when they did not, 2 for
NKAT_MPS=on where MPS cannot start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from nkat_search.cli.launch import start

SMOKE_FLAGS = ["--device", "cuda", "--epochs", "1", "--compile"]


def main(argv: list[str]) -> int:
    import torch

    gpus = torch.cuda.device_count()
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(gpus)) or "none"
    print(f"image: torch {torch.__version__} (CUDA {torch.version.cuda}), {gpus} GPU(s) visible "
          f"({names}), C compiler {shutil.which('gcc') or 'MISSING'}", flush=True)
    out = Path(os.environ.get("NKAT_SMOKE_OUT", "/tmp/smoke"))
    (out / "smoke.json").unlink(missing_ok=True)
    daemon = _mps(os.environ.get("NKAT_MPS", "off"), out, gpus)
    env = dict(os.environ, **(daemon.env() if daemon else {}))
    command = ["smoke", *SMOKE_FLAGS, "--out", str(out), "--no-resume", *argv]
    servers: set[str] = set()
    try:
        # On our terminal, as the image's check is watched; it ends with us.
        process = start(command, env=env, own_session=False)
        while process.poll() is None:
            # Asked while the run is alive: an MPS server exists only while it has clients.
            servers |= _mps_servers(daemon, env)
            time.sleep(1.0)
    finally:
        if daemon is not None:
            daemon.stop()
    return _report(out, process.returncode, daemon, servers)


def _mps(mode: str, out: Path, gpus: int):
    if mode == "off":
        print("smoke: CUDA MPS off (NKAT_MPS=off)", flush=True)
        return None
    from nkat_search.cli.mps import start_or_join
    from nkat_search.errors import UserError

    try:
        daemon, line = start_or_join(mode, out, gpus)
    except UserError as err:
        print(f"smoke: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"smoke: {line}", flush=True)
    return daemon


def _mps_servers(daemon, env: dict) -> set[str]:
    if daemon is None:
        return set()
    try:
        done = subprocess.run([daemon.control], input="get_server_list\n", text=True, env=env,
                              capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return set(done.stdout.split()) if done.returncode == 0 else set()


def _report(out: Path, code: int, daemon, servers: set[str]) -> int:
    path = out / "smoke.json"
    if not path.is_file():
        print(f"smoke: FAILED: nkat-search smoke exited with {code} before it wrote {path} "
              "(see above)", file=sys.stderr)
        return 1
    r = json.loads(path.read_text())
    timings = r.get("timings", {})
    compiled = f", {timings['compile_s']:.1f} s of it compiling" if timings.get("compile_s") else ""
    mode = "compiled" if r["config"].get("compile") else "eager"
    print(f"image OK: {r['epochs_run']} epoch(s) trained {mode} on {r['device']}, "
          f"{r['train_seconds']:.1f} s training{compiled}, {r['images_per_s']:,.0f} images/s, "
          f"accuracy {r['accuracy']:.2%} ({r['verdict']} at {r['go_accuracy']:.0%}; meaningful "
          "after 10 epochs)")
    if daemon is None:
        print("MPS: not used")
    elif servers:
        print(f"MPS: the run went through MPS (server pid {', '.join(sorted(servers))})")
    else:
        print("MPS: the daemon ran but no MPS server started, so the run did not use it")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
