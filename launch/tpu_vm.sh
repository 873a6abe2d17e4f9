#!/usr/bin/env bash
# Cloud TPU VMs for vlp: create a slice, copy this checkout to every worker, run the
# same command on all workers (--worker=all), delete it.
#
#   launch/tpu_vm.sh create NAME            # ACCELERATOR (v5litepod-16), VERSION, ZONE, SPOT=1
#   launch/tpu_vm.sh copy NAME              # tracked + untracked-unignored files -> ~/vlp
#   launch/tpu_vm.sh run NAME -- ARGS...    # bash launch/tpu_worker.sh ARGS on every worker
#   launch/tpu_vm.sh up NAME -- ARGS...     # create (if missing) + copy + run
#   launch/tpu_vm.sh ssh NAME [WORKER]      # a shell on one worker (default 0)
#   launch/tpu_vm.sh delete NAME
#
# Example (UNITER-base on a v5e-16; /mnt/shared is a file system every worker mounts,
# e.g. Filestore, since all workers write their shards of each checkpoint there):
#   ZONE=us-west4-a ACCELERATOR=v5litepod-16 launch/tpu_vm.sh up vlp-base -- \
#     --config=configs/uniter_base.py --config.data=coco_karpathy \
#     --config.data_dir=/mnt/shared/tfds --workdir=/mnt/shared/runs/base \
#     --config.sharding=fsdp --config.mesh.data=1 --config.mesh.fsdp=-1 \
#     --config.compute_dtype=bfloat16
# Every worker must run the command: a worker left out makes the others wait in
# jax.distributed.initialize until --distributed_timeout. Environment: ZONE
# (required), PROJECT (default: gcloud's), ACCELERATOR, VERSION (runtime image),
# SPOT=1 for spot capacity; TFDS_DATA_DIR, PYTHON, VENV and VLP_* are forwarded.
set -euo pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -ge 2 ]] || usage
cmd=$1 name=$2; shift 2

: "${ZONE:?set ZONE, e.g. ZONE=us-west4-a}"
ACCELERATOR="${ACCELERATOR:-v5litepod-16}"
VERSION="${VERSION:-v2-alpha-tpuv5-lite}"
gc=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && where+=(--project="$PROJECT")

create() {
  local extra=()
  [[ "${SPOT:-0}" == 1 ]] && extra+=(--spot)
  "${gc[@]}" create "$name" "${where[@]}" --accelerator-type="$ACCELERATOR" \
      --version="$VERSION" ${extra[@]+"${extra[@]}"}
}

copy() {
  local repo tarball
  repo="$(cd "$(dirname "$0")/.." && pwd)"
  tarball="$(mktemp -d)/vlp.tgz"
  (cd "$repo" && git ls-files -co --exclude-standard -z | tar czf "$tarball" --null -T -)
  "${gc[@]}" scp "$tarball" "$name":vlp.tgz "${where[@]}" --worker=all
  "${gc[@]}" ssh "$name" "${where[@]}" --worker=all \
      --command='mkdir -p ~/vlp && tar xzf ~/vlp.tgz -C ~/vlp && rm ~/vlp.tgz'
}

run() {
  [[ $# -ge 1 && "$1" == "--" ]] && shift
  local args env="" var
  args="$(printf '%q ' "$@")"
  for var in TFDS_DATA_DIR PYTHON VENV $(compgen -e | grep '^VLP_' || true); do
    [[ -n "${!var:-}" ]] && env+="${var}=$(printf '%q' "${!var}") "
  done
  "${gc[@]}" ssh "$name" "${where[@]}" --worker=all \
      --command="cd ~/vlp && ${env}bash launch/tpu_worker.sh ${args}"
}

case "$cmd" in
  create) create ;;
  copy) copy ;;
  run) run "$@" ;;
  up)
    "${gc[@]}" describe "$name" "${where[@]}" > /dev/null 2>&1 || create
    copy
    run "$@" ;;
  ssh) "${gc[@]}" ssh "$name" "${where[@]}" --worker="${1:-0}" ;;
  delete) "${gc[@]}" delete "$name" "${where[@]}" --quiet ;;
  *) usage ;;
esac
