#!/usr/bin/env bash
# A single-node SLURM for tests and demos, from Debian's slurm-wlm and munge.
#
#   cluster/slurm/local_cluster.sh start|stop|status|env
#
# Everything it writes (config, munge key and socket, spool, state, logs, pids) lives under
# $SSLGRID_SLURM_DIR (default /tmp/sslgrid-slurm), and its daemons listen on their own ports
# (slurmctld $SSLGRID_SLURM_PORT, default 16817; slurmd the next one), so it never touches another
# SLURM or munge on the machine. Clients find it through SLURM_CONF: `eval "$(… env)"` sets it.
# Must run as root (slurmd runs jobs as their owner).
set -euo pipefail

DIR=${SSLGRID_SLURM_DIR:-/tmp/sslgrid-slurm}
PORT=${SSLGRID_SLURM_PORT:-16817}
CONF=$DIR/etc/slurm.conf
HOST=$(hostname -s)

install_packages() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    echo "installing slurm-wlm and munge from Debian's packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
  fi
}

write_config() {
  mkdir -p "$DIR"/{etc,munge,spool/ctld,spool/d,log,run}
  chmod 700 "$DIR/munge"
  [ -f "$DIR/munge/munge.key" ] || mungekey -c -k "$DIR/munge/munge.key" >/dev/null 2>&1 \
    || dd if=/dev/urandom bs=1 count=1024 of="$DIR/munge/munge.key" status=none
  chmod 400 "$DIR/munge/munge.key"
  local mem=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) * 3 / 4 ))
  cat > "$CONF" <<CONF
ClusterName=sslgrid-local
SlurmctldHost=$HOST
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SlurmctldParameters=preempt_send_user_signal
ReturnToService=2
MinJobAge=600
KillWait=5
MaxArraySize=10001
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# without a default, a job that gives no --mem is allotted the whole node's memory under
# CR_Core_Memory, and jobs then run one at a time
DefMemPerCPU=$((mem / $(nproc)))
NodeName=$HOST CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  # slurmd reads cgroup.conf only with cgroup plugins; an empty one keeps it quiet either way
  echo "# no cgroup plugins are used" > "$DIR/etc/cgroup.conf"
}

running() { [ -f "$DIR/run/$1.pid" ] && kill -0 "$(cat "$DIR/run/$1.pid")" 2>/dev/null; }

start() {
  install_packages
  write_config
  if ! running munged; then
    munged --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
      --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munge.seed" \
      --force
  fi
  export SLURM_CONF=$CONF
  running slurmctld || slurmctld -i -f "$CONF"
  running slurmd || slurmd -f "$CONF"
  for _ in $(seq 1 60); do
    if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
      echo "SLURM up: SLURM_CONF=$CONF ($(sinfo -h -o '%P %D %t %c CPUs'))" >&2
      return 0
    fi
    sleep 0.5
  done
  echo "SLURM did not come up; logs in $DIR/log" >&2
  tail -n 20 "$DIR"/log/*.log >&2 || true
  return 1
}

stop() {
  for d in slurmd slurmctld munged; do
    if running "$d"; then kill "$(cat "$DIR/run/$d.pid")" 2>/dev/null || true; fi
  done
  for _ in $(seq 1 40); do
    running slurmd || running slurmctld || running munged || break
    sleep 0.25
  done
  echo "SLURM stopped ($DIR kept for its logs)" >&2
}

status() {
  for d in munged slurmctld slurmd; do
    if running "$d"; then echo "$d: running (pid $(cat "$DIR/run/$d.pid"))"; else echo "$d: stopped"; fi
  done
  if running slurmctld; then SLURM_CONF=$CONF sinfo; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
