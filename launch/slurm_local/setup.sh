#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (Debian / Ubuntu, as root) for the slow-tier test of launch/slurm.sbatch
# (tests/test_slurm.py): installs slurm-wlm and munge when missing, writes /etc/slurm/slurm.conf for this host
# (SLURM_LOCAL_CPUS CPUs, default 2; partition "local"), starts munged, slurmctld and slurmd. Idempotent: when the
# config is unchanged and the node answers, it does nothing. Logs: /var/log/slurm/. Stop: launch/slurm_local/setup.sh stop
set -euo pipefail
[[ $(id -u) -eq 0 ]] || { echo "slurm_local/setup.sh: run as root (it installs packages and starts daemons)" >&2; exit 1; }

stop_daemons() {  # by pid file: only the daemons this script started
  for f in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
    [[ -s $f ]] && kill "$(cat "$f")" 2>/dev/null || true
  done
  sleep 1
}
if [[ ${1:-} == stop ]]; then stop_daemons; exit 0; fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

host=$(hostname -s)
conf=/etc/slurm/slurm.conf
wanted=$(cat <<CONF
# written by jaxvit launch/slurm_local/setup.sh: a one-node cluster for tests
ClusterName=jaxvit-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
NodeName=$host CPUs=${SLURM_LOCAL_CPUS:-2} State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
)

if [[ -f $conf ]] && [[ "$(cat "$conf")" == "$wanted" ]] && scontrol ping 2>/dev/null | grep -q UP \
   && sinfo -h -o %T 2>/dev/null | grep -qE "idle|mix|alloc"; then
  echo "slurm_local: already up ($(sinfo -h -o '%P %D %T %C'))"
  exit 0
fi

stop_daemons
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
printf '%s\n' "$wanted" > "$conf"
[[ -s /etc/munge/munge.key ]] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
chown munge:munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
runuser -u munge -- /usr/sbin/munged
slurmctld
slurmd
for _ in $(seq 30); do
  if sinfo -h -o %T 2>/dev/null | grep -qE "idle|mix|alloc"; then
    echo "slurm_local: up ($(sinfo -h -o '%P %D %T %C'))"
    exit 0
  fi
  sleep 1
done
echo "slurm_local: the node did not come up; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
sinfo >&2 || true
exit 1
