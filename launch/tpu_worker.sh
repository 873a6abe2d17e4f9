#!/usr/bin/env bash
# Runs vlp on one Cloud TPU VM worker; `tpu_vm.sh run` starts it on every worker at once.
#
#   bash launch/tpu_worker.sh [MODULE] ARGS...     (MODULE defaults to vlp.pretrain)
#   bash launch/tpu_worker.sh --config=configs/uniter_base.py --workdir=/mnt/shared/run1 \
#       --config.sharding=fsdp --config.compute_dtype=bfloat16
#   bash launch/tpu_worker.sh --detach [MODULE] ARGS...   # the same, in the background
#   bash launch/tpu_worker.sh --status                   # running / exit status, last line
#   bash launch/tpu_worker.sh --stop                     # SIGTERM: checkpoint, exit 42
#   bash launch/tpu_worker.sh --logs                     # follow the log (tail -F)
#
# The first run on a worker creates $VENV (default ~/vlp_venv) from
# requirements-tpu.txt (the pinned requirements plus jax[tpu] of the same version)
# and installs this checkout. It then runs with JAX_PLATFORMS=tpu: a worker where
# JAX cannot open the TPU fails instead of running on its CPU. Then it
# runs `python -m MODULE ARGS...`. Every worker runs the same command: JAX detects the
# TPU pod (workers, coordinator) from the TPU metadata and `vlp.parallel.runtime` calls
# `jax.distributed.initialize`, so no process id or address is passed here.
# The workdir must be on a file system all workers share. Environment passed
# through: TFDS_DATA_DIR, VLP_*, PYTHON, VENV, LOG_DIR and anything exported before.
#
# --detach starts the run in a session of its own (setsid, nohup, no terminal), so it
# outlives the ssh session that started it. Its output goes to $LOG_DIR/HOST.log
# (LOG_DIR default ~/vlp_logs) and, when it ends, its exit status to
# $LOG_DIR/HOST.status: 0 finished, 42 pre-empted with a checkpoint (start it again
# with the same arguments to resume), anything else failed.
set -euo pipefail
cd "$(dirname "$0")/.."
self="$PWD/launch/tpu_worker.sh"

LOG_DIR="${LOG_DIR:-$HOME/vlp_logs}"
host="$(hostname)"
log="$LOG_DIR/$host.log" status_file="$LOG_DIR/$host.status" group_file="$LOG_DIR/$host.pgid"
running() { [[ -f "$group_file" ]] && kill -0 -- "-$(cat "$group_file")" 2>/dev/null; }

case "${1:-}" in
  --detach)
    shift
    if running; then
      echo "tpu_worker: $host already runs (process group $(cat "$group_file")), log $log" >&2
      exit 1
    fi
    mkdir -p "$LOG_DIR"
    rm -f "$status_file"
    # The outer bash records the run's status. Its trap only makes it wait out a SIGTERM
    # sent to the whole group (--stop), which the run answers with a checkpoint.
    # shellcheck disable=SC2016  # $0, $@ and $VLP_STATUS_FILE are the inner bash's.
    VLP_STATUS_FILE="$status_file" setsid nohup bash -c \
        'trap : TERM; bash "$0" "$@"; echo "$?" > "$VLP_STATUS_FILE"' "$self" "$@" \
        > "$log" 2>&1 < /dev/null &
    echo "$!" > "$group_file"  # setsid made it a session and process-group leader.
    echo "tpu_worker: $host started in the background (process group $!), log $log"
    exit 0 ;;
  --status)
    if [[ -f "$status_file" ]]; then  # Written last: the run is over.
      rc="$(cat "$status_file")"
      case "$rc" in
        0) echo "$host: finished (status 0)" ;;
        42) echo "$host: pre-empted (status 42), checkpoint written: run again to resume" ;;
        *) echo "$host: failed (status $rc)" ;;
      esac
    elif running; then
      echo "$host: running (process group $(cat "$group_file"))"
    elif [[ -f "$group_file" ]]; then
      echo "$host: gone without a status (killed, or the VM restarted): run again to resume"
    else
      echo "$host: not started"
    fi
    if [[ -f "$log" ]]; then tail -n 1 "$log" | sed 's/^/  /'; fi
    exit 0 ;;
  --logs) exec tail -n 200 -F "$log" ;;
  --stop)
    if running; then
      kill -TERM -- "-$(cat "$group_file")"
      echo "$host: SIGTERM sent; the run writes a checkpoint and exits 42"
    else
      echo "$host: not running"
    fi
    exit 0 ;;
esac

VENV="${VENV:-$HOME/vlp_venv}"
PYTHON="${PYTHON:-python3}"
if [[ ! -f "$VENV/.vlp_ready" ]]; then
  if "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    if ! "$PYTHON" -m venv "$VENV"; then  # Debian/Ubuntu ship venv separately.
      ver="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
      sudo apt-get update -qq && sudo apt-get install -y -qq "python${ver}-venv"
      "$PYTHON" -m venv "$VENV"
    fi
  else
    # The pins need Python 3.11+, and TPU VM images ship 3.10: uv (from PyPI) brings
    # a standalone CPython 3.11 into the venv, without root or a PPA.
    echo "tpu_worker: $("$PYTHON" --version 2>&1) is older than 3.11; making $VENV with uv" >&2
    "$PYTHON" -m pip install -q --user uv
    "$PYTHON" -m uv venv --seed --python 3.11 "$VENV"
  fi
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -r requirements-tpu.txt
  "$VENV/bin/pip" install -q --no-deps -e .
  touch "$VENV/.vlp_ready"
fi

# No silent fallback to the CPU: JAX must find the TPU through libtpu.
if ! "$VENV/bin/python" -c 'import importlib.util as u, sys; sys.exit(not u.find_spec("libtpu"))'; then
  echo "tpu_worker: $VENV has no libtpu; delete $VENV/.vlp_ready to reinstall from" \
       "requirements-tpu.txt" >&2
  exit 3
fi
export JAX_PLATFORMS="${JAX_PLATFORMS:-tpu}"
# Persistent XLA compilation cache: a restarted job does not recompile every step.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/vlp_jax}"

module=vlp.pretrain
if [[ $# -gt 0 && "$1" != -* ]]; then module="$1"; shift; fi
# One line per worker, so a worker that never started is easy to spot.
echo "tpu_worker: $(hostname) running python -m ${module} $*" >&2
exec "$VENV/bin/python" -m "$module" "$@"
