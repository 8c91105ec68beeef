#!/bin/sh
# Entrypoint of the worker containers: start the CUDA MPS control daemon, then exec the command.
#
# Why here and not in a separate `mps` service: MPS needs the daemon and its clients to share an
# IPC namespace, one pipe directory and one user id. Inside the one worker container of a host
# (it reserves every GPU and runs K trials per GPU) all three hold without `ipc: host` or a shared
# volume, and the daemon lives exactly as long as the workers it serves. A separate service would
# need `ipc: host` (or `service:`), a pipe-directory volume that outlives restarts with stale
# sockets in it, and an order between two containers.
#
# The CUDA driver connects every process that initialises CUDA to the daemon listening in
# $CUDA_MPS_PIPE_DIRECTORY, so the trials run concurrently on each GPU instead of time-slicing,
# with no flag on the worker. A worker whose own MPS handling (`--mps auto`) finds the daemon
# running joins it.
#
# NKAT_MPS: auto (default: start the daemon when nvidia-cuda-mps-control is on PATH and a GPU is
# visible; the NVIDIA Container Toolkit mounts the tool with the `compute` capability), on (the
# same, but fail when it cannot), off (never).
set -eu

mode="${NKAT_MPS:-auto}"
export CUDA_MPS_PIPE_DIRECTORY="${CUDA_MPS_PIPE_DIRECTORY:-/tmp/nvidia-mps}"
export CUDA_MPS_LOG_DIRECTORY="${CUDA_MPS_LOG_DIRECTORY:-/tmp/nvidia-mps-log}"

say() { echo "worker-entrypoint: $*" >&2; }

gpu_visible() {
    for device in /dev/nvidia[0-9]*; do
        [ -e "$device" ] && return 0
    done
    return 1
}

case "$mode" in
    auto | on | off) ;;
    *) say "NKAT_MPS must be auto, on or off, got '$mode'"; exit 2 ;;
esac

if [ "$mode" != off ]; then
    if ! command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
        reason="nvidia-cuda-mps-control is not on PATH (the container needs the GPU 'compute' capability)"
    elif ! gpu_visible; then
        reason="no GPU is visible in the container"
    else
        reason=""
    fi
    if [ -n "$reason" ]; then
        if [ "$mode" = on ]; then
            say "NKAT_MPS=on but $reason; set NKAT_MPS=auto or off"
            exit 2
        fi
        say "MPS not started: $reason"
    elif [ -S "$CUDA_MPS_PIPE_DIRECTORY/control" ] \
            && echo get_server_list | nvidia-cuda-mps-control >/dev/null 2>&1; then
        say "MPS control daemon already running (pipes in $CUDA_MPS_PIPE_DIRECTORY)"
    else
        mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
        if nvidia-cuda-mps-control -d; then
            say "MPS control daemon started (pipes in $CUDA_MPS_PIPE_DIRECTORY, log in $CUDA_MPS_LOG_DIRECTORY)"
        elif [ "$mode" = on ]; then
            say "NKAT_MPS=on but nvidia-cuda-mps-control -d failed; see $CUDA_MPS_LOG_DIRECTORY/control.log"
            exit 1
        else
            say "MPS not started: nvidia-cuda-mps-control -d failed; running without it"
        fi
    fi
fi

# exec: the worker takes this process's place, so the container's init (compose `init: true`)
# hands SIGTERM straight to it and it checkpoints; the daemon is reaped by that init and ends with
# the container.
exec "$@"
