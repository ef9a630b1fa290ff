#!/usr/bin/env bash
# Run N cooperating jaxvit processes on this machine (a multi-host run in miniature, on CPU by default):
#
#   launch/local.sh N <python args>     e.g.  launch/local.sh 2 -m jaxvit.main --config=configs/gz2_lora.py:demo --workdir=W
#
# Each process gets JAX_COORDINATOR_ADDRESS (localhost, a free port), JAX_NUM_PROCESSES and JAX_PROCESS_ID, which
# jaxvit/distributed.py passes to jax.distributed.initialize; CPU collectives go through gloo. Output lines are
# prefixed with the process index. If one process fails, the others are killed and the script exits with its
# status. SIGTERM / SIGUSR1 are forwarded to every process (they save a resume point and exit 75, which is not a
# failure: the others are left to finish theirs); SIGINT stops them. Environment: PYTHON (interpreter, default: python on PATH), LOCAL_DEVICES (CPU devices per process,
# default 1), JAX_PORT (coordinator port, default: a free one), JAX_PLATFORMS (default cpu).
set -u

if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N <python args>   (e.g. $0 2 -m jaxvit.main --config=... --workdir=...)" >&2
  exit 2
fi
n=$1
shift
python=${PYTHON:-$(command -v python || command -v python3)}
port=${JAX_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}

export JAX_COORDINATOR_ADDRESS="localhost:$port" JAX_NUM_PROCESSES="$n"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export JAX_CPU_COLLECTIVES_IMPLEMENTATION=${JAX_CPU_COLLECTIVES_IMPLEMENTATION:-gloo}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${LOCAL_DEVICES:-1}"
export PYTHONUNBUFFERED=1

pids=()
stop() {  # kill the processes still running (ours only, by pid)
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  sleep 2
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
}
trap 'stop; exit 130' INT
trap 'for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done' TERM
trap 'for pid in "${pids[@]}"; do kill -USR1 "$pid" 2>/dev/null; done' USR1

for ((i = 0; i < n; i++)); do
  JAX_PROCESS_ID=$i "$python" "$@" > >(awk -v p="[$i] " '{ print p $0; fflush() }') 2>&1 &
  pids+=($!)
done

status=0
running=("${pids[@]}")
while [[ ${#running[@]} -gt 0 ]]; do
  done=""
  wait -n -p done "${running[@]}"  # bash >= 5.1
  rc=$?
  [[ -z "$done" ]] && continue  # wait was interrupted by a forwarded signal
  left=()
  for pid in "${running[@]}"; do [[ $pid != "$done" ]] && left+=("$pid"); done
  running=("${left[@]}")
  if [[ $rc -eq 75 ]]; then  # preempted after a resume point: the others stop at the same step
    status=75
  elif [[ $rc -ne 0 ]]; then
    echo "local.sh: a process exited with status $rc; stopping the others" >&2
    status=$rc
    stop
    break
  fi
done
wait  # the output prefixers
exit $status
