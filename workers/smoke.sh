#!/bin/sh
# Check the nkat-search image on this host's GPU once, before trusting it with a search:
#
#   workers/smoke.sh                      # build the image, 1 compiled CIFAR-10 epoch on cuda
#   workers/smoke.sh --epochs 10          # the user's step 1 in the container: GO above 45 %
#   workers/smoke.sh -f docker-compose.worker.yml     # on a worker-only host
#
# It builds the compose file's worker image, then runs `nkat-search smoke --epochs 1 --compile
# --device cuda` in a one-off container of the worker service (`docker compose run`): the same
# GPUs, entrypoint (the MPS daemon), data mount and cache volumes as the worker, so
# torch.compile (Inductor and Triton, which need the image's C compiler), CUDA graphs and MPS are
# exercised as a worker uses them, and the workers later start with the smoke's compiled kernels
# in the cache. It needs .env and the password file in place (the compose file reads them), not
# a running database. Exit 0 when training and evaluation finished (after 1 epoch the verdict is
# NO-GO, and that is fine), non-zero when the image failed. NKAT_SMOKE_BUILD=0 skips the build.
#
# Needs Docker with the NVIDIA Container Toolkit (`docker run --gpus all` works) and an NVIDIA
# driver that supports CUDA 13.0 (R580 or newer).
set -eu

say() { echo "smoke.sh: $*" >&2; }

if [ "${1:-}" = "--in-container" ]; then
    shift
    python - <<'EOF'
import shutil

import torch

gpus = torch.cuda.device_count()
name = torch.cuda.get_device_name(0) if gpus else "none"
print(f"image: torch {torch.__version__} (CUDA {torch.version.cuda}), {gpus} GPU(s) visible "
      f"({name}), C compiler {shutil.which('gcc') or 'MISSING'}", flush=True)
EOF
    status=0
    nkat-search smoke --device cuda --epochs 1 --compile --out /tmp/smoke "$@" \
        || status=$?
    if [ ! -s /tmp/smoke/smoke.json ]; then
        say "FAILED: nkat-search smoke exited with $status before it wrote smoke.json (see above)"
        exit 1
    fi
    python - <<'EOF'
import json

r = json.load(open("/tmp/smoke/smoke.json"))
t = r.get("timings", {})
compile_s = f", {t['compile_s']:.1f} s of it compiling" if t.get("compile_s") else ""
print(f"image OK: {r['epochs_run']} epoch(s) trained compiled on {r['device']}, "
      f"{r['train_seconds']:.1f} s training{compile_s}, {r['images_per_s']:,.0f} images/s, "
      f"accuracy {r['accuracy']:.2%} ({r['verdict']} at {r['go_accuracy']:.0%}; "
      f"meaningful after 10 epochs)")
EOF
    if command -v nvidia-cuda-mps-control >/dev/null 2>&1 \
            && [ -S "${CUDA_MPS_PIPE_DIRECTORY:-/tmp/nvidia-mps}/control" ]; then
        servers="$(echo get_server_list | nvidia-cuda-mps-control 2>/dev/null || true)"
        if [ -n "$servers" ]; then
            echo "MPS: server pid(s) $servers: the run went through MPS"
        else
            echo "MPS: the daemon is up but no server started, so the run did not use it"
        fi
    else
        echo "MPS: not running in this container (see the worker-entrypoint line above)"
    fi
    exit 0
fi

cd "$(dirname "$0")/.."
file=docker-compose.yml
if [ "${1:-}" = "-f" ]; then
    file="${2:?-f needs a compose file}"
    shift 2
fi
command -v docker >/dev/null 2>&1 || { say "docker is not on PATH"; exit 2; }
[ -f "$file" ] || { say "compose file $file not found"; exit 2; }
if [ "${NKAT_SMOKE_BUILD:-1}" != 0 ]; then
    say "building the worker image of $file"
    docker compose -f "$file" build worker
fi
# --no-deps: no database or coordinator is needed; --name: the worker's fixed container name
# may be taken by a running worker.
exec docker compose -f "$file" run --rm --no-deps --name nkat-smoke worker \
    /app/workers/smoke.sh --in-container "$@"
