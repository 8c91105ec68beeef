#!/bin/sh
# Check the nkat-search image on this host's GPU once, before trusting it with a search:
#
#   workers/smoke.sh                      # build the image, 1 compiled CIFAR-10 epoch on cuda
#   workers/smoke.sh --epochs 10          # the user's step 1 in the container: GO above 45 %
#   workers/smoke.sh -f docker-compose.worker.yml     # on a worker-only host
#   NKAT_MPS=on workers/smoke.sh          # the same under a CUDA MPS daemon
#
# It builds the compose file's worker image, then runs workers/smoke_check.py, which runs
# `nkat-search smoke --device cuda --epochs 1 --compile` (flags given here are added after
# these), in a one-off container of the worker service (`docker compose run`): the same GPUs,
# data mount and cache volumes as the worker, so torch.compile (Inductor and Triton, which need
# the image's C compiler) and CUDA graphs are exercised as a worker uses them, and the workers
# later find the smoke's compiled kernels in the cache. It needs .env and the password file in
# place (the compose file reads them), not a running database. Exit 0 when training and
# evaluation finished (after 1 epoch the verdict is NO-GO, and that is fine), non-zero when the
# image failed. NKAT_SMOKE_BUILD=0 skips the build.
#
# Needs Docker with the NVIDIA Container Toolkit (`docker run --gpus all` works) and an NVIDIA
# driver that supports CUDA 13.0 (R580 or newer).
set -eu

say() { echo "smoke.sh: $*" >&2; }

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
exec docker compose -f "$file" run --rm --no-deps --name nkat-smoke \
    -e NKAT_MPS="${NKAT_MPS:-off}" worker python /app/workers/smoke_check.py "$@"
