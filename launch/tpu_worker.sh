#!/usr/bin/env bash
# Runs vlp on one Cloud TPU VM worker; `tpu_vm.sh run` starts it on every worker at once.
#
#   bash launch/tpu_worker.sh [MODULE] ARGS...     (MODULE defaults to vlp.pretrain)
#   bash launch/tpu_worker.sh --config=configs/uniter_base.py --workdir=/mnt/shared/run1 \
#       --config.sharding=fsdp --config.compute_dtype=bfloat16
#
# The first run on a worker creates $VENV (default ~/vlp_venv) with the pinned
# requirements plus jax[tpu] of the same version, and installs this checkout. Then it
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
  # The pinned numpy needs Python 3.11+. TPU VM images with an older python3: install
  # one on every worker (e.g. deadsnakes' python3.11) and set PYTHON=python3.11.
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "tpu_worker: $("$PYTHON" --version 2>&1) is too old; set PYTHON to a Python >= 3.11" >&2
    exit 2; }
  if ! "$PYTHON" -m venv "$VENV"; then  # Debian/Ubuntu ship venv separately.
    ver="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    sudo apt-get update -qq && sudo apt-get install -y -qq "python${ver}-venv"
    "$PYTHON" -m venv "$VENV"
  fi
  "$VENV/bin/pip" install -q --upgrade pip
  jax_version="$(sed -n 's/^jax==//p' requirements.txt)"
  "$VENV/bin/pip" install -q -r requirements.txt "jax[tpu]==${jax_version}"
  "$VENV/bin/pip" install -q --no-deps -e .
  touch "$VENV/.vlp_ready"
fi

module=vlp.pretrain
if [[ $# -gt 0 && "$1" != -* ]]; then module="$1"; shift; fi
# One line per worker, so a worker that never started is easy to spot.
echo "tpu_worker: $(hostname) running python -m ${module} $*" >&2
exec "$VENV/bin/python" -m "$module" "$@"
