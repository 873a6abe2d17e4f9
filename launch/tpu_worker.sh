#!/usr/bin/env bash
# Runs vlp on one Cloud TPU VM worker; `tpu_vm.sh run` starts it on every worker at once.
#
#   bash launch/tpu_worker.sh [MODULE] ARGS...     (MODULE defaults to vlp.pretrain)
#   bash launch/tpu_worker.sh --config=configs/uniter_base.py --workdir=/mnt/shared/run1 \
#       --config.sharding=fsdp --config.compute_dtype=bfloat16
#
# The first run on a worker creates $VENV (default ~/vlp_venv) from
# requirements-tpu.txt (the pinned requirements plus jax[tpu] of the same version)
# and installs this checkout. It then runs with JAX_PLATFORMS=tpu: a worker where
# JAX cannot open the TPU fails instead of running on its CPU. Then it
# runs `python -m MODULE ARGS...`. Every worker runs the same command: JAX detects the
# TPU pod (workers, coordinator) from the TPU metadata and `vlp.parallel.runtime` calls
# `jax.distributed.initialize`, so no process id or address is passed here.
# The workdir must be on a file system all workers share. Environment passed
# through: TFDS_DATA_DIR, VLP_*, PYTHON, VENV and anything exported before.
set -euo pipefail
cd "$(dirname "$0")/.."

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
