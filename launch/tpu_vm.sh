#!/usr/bin/env bash
# Cloud TPU VMs for vlp: create a slice, copy this checkout to every worker, start the
# same command on all workers (--worker=all) in the background, watch it, delete it.
#
#   launch/tpu_vm.sh create NAME            # ACCELERATOR (v5litepod-16), VERSION, ZONE, SPOT=1
#   launch/tpu_vm.sh copy NAME              # tracked + untracked-unignored files -> ~/vlp
#   launch/tpu_vm.sh run NAME -- ARGS...    # tpu_worker.sh --detach ARGS on every worker
#   launch/tpu_vm.sh up NAME -- ARGS...     # create (if missing or pre-empted) + copy + run
#   launch/tpu_vm.sh status NAME            # slice state; per worker: running or exit status
#   launch/tpu_vm.sh logs NAME [WORKER]     # follow one worker's log (default 0)
#   launch/tpu_vm.sh stop NAME              # SIGTERM on every worker: checkpoint, exit 42
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
# `run` returns once every worker has started: the run does not depend on the ssh
# session (setsid + nohup on each worker), and each worker logs to
# ~/vlp_logs/HOST.log (LOG_DIR) and leaves HOST.status there when it ends: 0 done,
# 42 pre-empted with a checkpoint, other values failed. Every worker must run the
# command: a worker left out makes the others wait in jax.distributed.initialize
# until --distributed_timeout.
# Resuming: a pre-empted spot slice (state PREEMPTED) has lost its processes and
# disks: `up NAME -- ARGS` again deletes it, creates it anew and resumes from the
# latest checkpoint in --workdir. Workers that exited 42 on a live slice (`stop`, a
# maintenance event): `run NAME -- ARGS` resumes.
# Environment: ZONE (required), PROJECT (default: gcloud's), ACCELERATOR, VERSION
# (runtime image), SPOT=1 for spot capacity; TFDS_DATA_DIR, PYTHON, VENV, LOG_DIR and
# VLP_* are forwarded to the workers.
set -euo pipefail

usage() { sed -n '2,34p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
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

delete() { "${gc[@]}" delete "$name" "${where[@]}" --quiet; }

state() { "${gc[@]}" describe "$name" "${where[@]}" --format='value(state)' 2>/dev/null || true; }

copy() {
  local repo tarball
  repo="$(cd "$(dirname "$0")/.." && pwd)"
  tarball="$(mktemp -d)/vlp.tgz"
  (cd "$repo" && git ls-files -co --exclude-standard -z | tar czf "$tarball" --null -T -)
  "${gc[@]}" scp "$tarball" "$name":vlp.tgz "${where[@]}" --worker=all
  "${gc[@]}" ssh "$name" "${where[@]}" --worker=all \
      --command='mkdir -p ~/vlp && tar xzf ~/vlp.tgz -C ~/vlp && rm ~/vlp.tgz'
}

on_workers() {  # $1: worker(s); the rest: arguments of launch/tpu_worker.sh there.
  local worker=$1 args env="" var
  shift
  args="$(printf '%q ' "$@")"
  for var in TFDS_DATA_DIR PYTHON VENV LOG_DIR $(compgen -e | grep '^VLP_' || true); do
    [[ -n "${!var:-}" ]] && env+="${var}=$(printf '%q' "${!var}") "
  done
  "${gc[@]}" ssh "$name" "${where[@]}" --worker="$worker" \
      --command="cd ~/vlp && ${env}bash launch/tpu_worker.sh ${args}"
}

run() {
  [[ $# -ge 1 && "$1" == "--" ]] && shift
  on_workers all --detach "$@"
}

case "$cmd" in
  create) create ;;
  copy) copy ;;
  run) run "$@" ;;
  up)
    current="$(state)"
    if [[ "$current" == PREEMPTED ]]; then
      echo "tpu_vm.sh: $name was pre-empted; deleting it and creating it again" >&2
      delete
      current=""
    fi
    [[ -n "$current" ]] || create
    copy
    run "$@" ;;
  status)
    echo "$name: $(state)"
    on_workers all --status ;;
  logs) on_workers "${1:-0}" --logs ;;
  stop) on_workers all --stop ;;
  ssh) "${gc[@]}" ssh "$name" "${where[@]}" --worker="${1:-0}" ;;
  delete) delete ;;
  *) usage ;;
esac
