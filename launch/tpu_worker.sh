#!/usr/bin/env bash
# Runs vlp on one Cloud TPU VM worker; `tpu_vm.sh run` starts it on every worker at once.
#
#   bash launch/tpu_worker.sh [MODULE] ARGS...     (MODULE defaults to vlp.pretrain)
#   bash launch/tpu_worker.sh --config=configs/uniter_base.py --workdir=gs://BUCKET/run1 \
#       --config.sharding=fsdp --config.compute_dtype=bfloat16
#
# The first run on a worker creates $VENV (default ~/vlp_venv) with the pinned
# requirements plus jax[tpu] of the same version, and installs this checkout. Then it
# runs `python -m MODULE ARGS...`. Every worker runs the same command: JAX detects the
# TPU pod (workers, coordinator) from the TPU metadata and `vlp.dist.runtime` calls
# `jax.distributed.initialize`, so no process id or address is passed here.
# Environment passed through: TFDS_DATA_DIR, VLP_* and anything exported before.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-$HOME/vlp_venv}"
if [[ ! -f "$VENV/.vlp_ready" ]]; then
  python3 -m venv "$VENV"
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
