# Sourced by the gpu_*_session.sh scripts: where the staged data, wheels, runs and results live on
# the device machine (see ../shared/device/stage.sh). The project runs from the source tree there.
OUT=${OUT:-results/gpu}
RUNS=${RUNS:-/root/nkat-runs}
mkdir -p "$OUT" "$RUNS"
export PYTHONPATH=/root/nkat-site:.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export NKAT_DATA_DIR=${NKAT_DATA_DIR:-/root/nkat-data} NKAT_CACHE_DIR=${NKAT_CACHE_DIR:-/root/nkat-cache}
