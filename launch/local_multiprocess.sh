#!/usr/bin/env bash
# Runs N processes of one JAX program on this machine, as one multi-process job.
#
#   launch/local_multiprocess.sh N [--cpu_devices=K] [--gpus_per_process=G] -- COMMAND...
#
#   # 2 processes x 2 forced CPU devices = one 4-device job:
#   launch/local_multiprocess.sh 2 --cpu_devices=2 -- \
#       python -m vlp.pretrain --config=configs/uniter_base.py:tiny --workdir=/tmp/mp
#   # One process per GPU of this host:
#   launch/local_multiprocess.sh 8 --gpus_per_process=1 -- python -m vlp.pretrain ...
#
# Process i gets VLP_COORDINATOR_ADDRESS=127.0.0.1:PORT (a free port, or $VLP_PORT),
# VLP_NUM_PROCESSES=N and VLP_PROCESS_ID=i, which `vlp.parallel.runtime` turns into
# `jax.distributed.initialize`. --cpu_devices=K forces K host CPU devices per process
# (JAX_PLATFORMS=cpu, XLA_FLAGS device count); --gpus_per_process=G gives process i
# the GPUs i*G .. i*G+G-1 (CUDA_VISIBLE_DEVICES). Output lines are prefixed "[i] ";
# with LOG_DIR set, process i also writes LOG_DIR/process_i.log.
#
# Waits for all processes. If one fails, the others are stopped (SIGTERM, then
# SIGKILL after $KILL_GRACE seconds) and its exit status is returned. SIGINT or
# SIGTERM to this script is forwarded to every process (a pre-emption drill): they
# write a checkpoint and exit 42 (pre-empted, not a failure), and so does this
# script; running it again with the same --workdir resumes there.
set -euo pipefail

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
preempted=42  # vlp.parallel.preemption.EXIT_PREEMPTED

[[ $# -ge 1 && "$1" =~ ^[0-9]+$ && "$1" -ge 1 ]] || usage
num=$1; shift
cpu_devices=0
gpus_per_process=0
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --cpu_devices=*) cpu_devices="${1#*=}" ;;
    --gpus_per_process=*) gpus_per_process="${1#*=}" ;;
    *) echo "local_multiprocess.sh: unknown option $1" >&2; usage ;;
  esac
  shift
done
[[ $# -ge 2 && "$1" == "--" ]] || usage
shift

port="${VLP_PORT:-$(${PYTHON:-python3} -c \
  'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
grace="${KILL_GRACE:-10}"
[[ -n "${LOG_DIR:-}" ]] && mkdir -p "$LOG_DIR"

pids=()
for ((i = 0; i < num; i++)); do
  (
    export VLP_COORDINATOR_ADDRESS="127.0.0.1:${port}" VLP_NUM_PROCESSES="$num" VLP_PROCESS_ID="$i"
    if [[ "$cpu_devices" -gt 0 ]]; then
      # Drop an inherited device count, then force ours.
      flags="$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g')"
      export JAX_PLATFORMS=cpu XLA_FLAGS="${flags} --xla_force_host_platform_device_count=${cpu_devices}"
    fi
    if [[ "$gpus_per_process" -gt 0 ]]; then
      CUDA_VISIBLE_DEVICES="$(seq -s, $((i * gpus_per_process)) $((i * gpus_per_process + gpus_per_process - 1)))"
      export CUDA_VISIBLE_DEVICES
    fi
    if [[ -n "${LOG_DIR:-}" ]]; then
      exec "$@" > >(tee "$LOG_DIR/process_$i.log" | sed -u "s/^/[$i] /") 2>&1
    else
      exec "$@" > >(sed -u "s/^/[$i] /") 2>&1
    fi
  ) &
  pids+=($!)
done

stop_all() {  # $1: signal
  for pid in "${pids[@]}"; do kill -"$1" "$pid" 2>/dev/null || true; done
}
trap 'stop_all TERM' INT TERM

status=0
killer=""
left=$num
declare -A finished=()
while [[ $left -gt 0 ]]; do
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [[ -n "${finished[$pid]:-}" ]] && continue
    kill -0 "$pid" 2>/dev/null && continue
    rc=0; wait "$pid" || rc=$?
    finished[$pid]=1; left=$((left - 1))
    if [[ $rc -eq $preempted ]]; then
      # Checkpoint written; the others stop at the same step by themselves.
      if [[ $status -eq 0 ]]; then status=$rc; fi
    elif [[ $rc -ne 0 && ( $status -eq 0 || $status -eq $preempted ) ]]; then
      status=$rc
      echo "local_multiprocess.sh: process $i exited with status $rc; stopping the others" >&2
      stop_all TERM
      ( sleep "$grace"; stop_all KILL ) &
      killer=$!
    fi
  done
  [[ $left -gt 0 ]] && sleep 0.2
done
[[ -n "$killer" ]] && kill "$killer" 2>/dev/null || true
exit "$status"
