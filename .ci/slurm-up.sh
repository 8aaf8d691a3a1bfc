#!/usr/bin/env bash
# Bring up a single-node Slurm cluster (munged + slurmctld + slurmd) on this machine.
#
# For CI boxes and containers without systemd (Debian 12, run as root). Idempotent: installs
# slurm-wlm/munge if missing, (re)writes /etc/slurm/slurm.conf and cgroup.conf, keeps a working
# munged, restarts slurmctld and slurmd cleanly, waits until the node is idle and prints one line.
#
#   sudo .ci/slurm-up.sh            # bring up (or restart) the cluster
#   sudo .ci/slurm-up.sh --down     # stop slurmd, slurmctld and munged
#
# Environment: SLURM_UP_TIMEOUT (seconds to wait for the node, default 60),
#              SLURM_UP_CLUSTER (ClusterName, default moe),
#              SLURM_UP_CRED_EXPIRE (AuthInfo=cred_expire; a requeued job restarts after this
#                 many seconds + 1, default 20 instead of Slurm's 120),
#              SLURM_UP_PMIX=1 (also install libpmix so that `srun --mpi=pmix` can load).
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
TIMEOUT=${SLURM_UP_TIMEOUT:-60}
CLUSTER=${SLURM_UP_CLUSTER:-moe}
CRED_EXPIRE=${SLURM_UP_CRED_EXPIRE:-20}
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
T0=$(date +%s.%N)

log() { echo "slurm-up: $*" >&2; }
die() {
    log "ERROR: $*"
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log"; do
        [[ -f $f ]] && { echo "----- tail $f -----" >&2; tail -n 25 "$f" >&2; }
    done
    # munged logs an "Unauthorized credential" info line for many ordinary requests: skip those.
    f=/var/log/munge/munged.log
    [[ -f $f ]] && { echo "----- tail $f -----" >&2; grep -v 'Unauthorized credential' "$f" | tail -n 8 >&2; }
    exit 1
}

[[ $EUID -eq 0 ]] || { echo "slurm-up: must run as root" >&2; exit 1; }

# Stop a daemon given its pid file and binary name; waits up to 15 s, then SIGKILL.
stop_daemon() {
    local pidfile=$1 name=$2 pid=""
    [[ -s $pidfile ]] && pid=$(cat "$pidfile" 2>/dev/null || true)
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && [[ $(cat /proc/"$pid"/comm 2>/dev/null) == "$name" ]]; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then log "$name ($pid) did not stop, SIGKILL"; kill -KILL "$pid" || true; fi
    fi
    # Daemons started without our pid file (e.g. by hand): match the exact command name only.
    local others
    others=$(pgrep -x "$name" || true)
    for pid in $others; do
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    done
    rm -f "$pidfile"
}

if [[ ${1:-} == --down ]]; then
    stop_daemon "$SLURMD_PID" slurmd
    stop_daemon "$CTLD_PID" slurmctld
    stop_daemon "$MUNGE_PID" munged
    log "stopped"
    exit 0
fi

# ---- 1. packages -------------------------------------------------------------------------------
need=()
command -v slurmctld >/dev/null || need+=(slurm-wlm)
command -v munged >/dev/null || need+=(munge)
if [[ ${SLURM_UP_PMIX:-0} == 1 ]] && ! ldconfig -p | grep -q 'libpmix\.so '; then
    need+=(libpmix-dev)
fi
if ((${#need[@]})); then
    log "installing ${need[*]}"
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends "${need[@]}" >/tmp/slurm-up-apt.log 2>&1 \
        || { tail -n 30 /tmp/slurm-up-apt.log >&2; die "apt-get install ${need[*]} failed"; }
fi
T_INSTALL=$(date +%s.%N)

# ---- 2. configuration ---------------------------------------------------------------------------
HOST=$(hostname -s)
# slurmctld, slurmd, srun and MPICH's mpiexec all look the short host name up.
if ! getent hosts "$HOST" >/dev/null; then
    log "$HOST does not resolve: adding '127.0.0.1 $HOST' to /etc/hosts"
    echo "127.0.0.1 $HOST" >>/etc/hosts
fi
CPUS=$(nproc)
# A bit below the memory slurmd will find (it drains a node that reports less than RealMemory);
# from MemTotal, not MemAvailable, so that the file stays the same from run to run.
MEM_TOTAL_MB=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
REAL_MEM=$((MEM_TOTAL_MB * 90 / 100 / 64 * 64))
((REAL_MEM >= 256)) || REAL_MEM=256

# Sockets/cores/threads as slurmd sees them (avoids "Node reconfigured socket/core boundaries"),
# unless the CPUs this process may use (nproc: cpuset, container limits) are fewer than it counts.
TOPO=""
if C=$(slurmd -C 2>/dev/null | head -n1) && [[ $C =~ CPUs=([0-9]+)\ (Boards=.*ThreadsPerCore=[0-9]+) ]] \
    && [[ ${BASH_REMATCH[1]} == "$CPUS" ]]; then
    TOPO=" ${BASH_REMATCH[2]}"
fi

mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd /run
cat >"$CONF_DIR/slurm.conf.new" <<EOF
# Written by .ci/slurm-up.sh: single-node cluster for CI and laptops. Do not edit by hand.
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=$CRED_EXPIRE
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
# Refuse at submission (instead of pending forever, Reason=PartitionConfig) a job asking more
# CPUs than the node has, e.g. -n 9 on 2 cores without --overcommit.
EnforcePartLimits=ALL
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
# Batch jobs may be requeued (scontrol requeue, node failure) unless submitted with --no-requeue.
JobRequeue=1
MinJobAge=300
SlurmdTimeout=120
SlurmctldTimeout=120
InactiveLimit=0
KillWait=30
Waittime=0
NodeName=$HOST CPUs=$CPUS$TOPO RealMemory=$REAL_MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
# With proctrack/linuxproc + task/none + jobacct_gather/none no cgroup plugin is loaded, so this is
# belt and braces: if anything does load one (e.g. someone switches a plugin), pick the hierarchy
# that exists instead of autodetecting it in a container, and constrain nothing.
if [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then CGPLUGIN=cgroup/v2; else CGPLUGIN=cgroup/v1; fi
cat >"$CONF_DIR/cgroup.conf.new" <<EOF
# Written by .ci/slurm-up.sh
CgroupPlugin=$CGPLUGIN
CgroupAutomount=no
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
ConstrainSwapSpace=no
EOF
for f in slurm.conf cgroup.conf; do
    if cmp -s "$CONF_DIR/$f.new" "$CONF_DIR/$f"; then rm -f "$CONF_DIR/$f.new"; else mv "$CONF_DIR/$f.new" "$CONF_DIR/$f"; fi
    chmod 644 "$CONF_DIR/$f"
done

# ---- 3. munge -----------------------------------------------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating munge key"
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
    else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none; fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    stop_daemon "$MUNGE_PID" munged
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- munged --pid-file="$MUNGE_PID" || die "munged failed to start"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munge credentials do not round-trip"
fi

# ---- 4. slurmctld + slurmd (clean restart) ------------------------------------------------------
stop_daemon "$SLURMD_PID" slurmd
stop_daemon "$CTLD_PID" slurmctld
slurmctld -i || die "slurmctld failed to start"
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
scontrol ping 2>/dev/null | grep -q 'is UP' || die "slurmctld does not answer 'scontrol ping'"
SLURMD_T0=$(date +%s)
slurmd || die "slurmd failed to start"

# ---- 5. wait for the node -----------------------------------------------------------------------
deadline=$(($(date +%s) + TIMEOUT))
state=""
while :; do
    state=$(sinfo -h -n "$HOST" -o '%T' 2>/dev/null | head -n1 || true)
    # After a restart slurmctld reloads the old node state; wait until this slurmd has registered.
    registered=$(scontrol show node "$HOST" 2>/dev/null | sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p')
    registered=$(date -d "$registered" +%s 2>/dev/null || echo 0)
    case $state in
        idle | mixed | allocated | completing) ((registered >= SLURMD_T0 - 1)) && break ;;
        drain* | down* | fail*)
            # Left over from an earlier run (e.g. "Low RealMemory" or "Node unexpectedly rebooted").
            scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
    esac
    (($(date +%s) < deadline)) || die "node $HOST not idle after ${TIMEOUT}s (state '${state:-none}'; $(scontrol show node "$HOST" 2>/dev/null | grep -o 'Reason=.*' || true))"
    sleep 0.5
done
T_END=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
echo "slurm-up: cluster $CLUSTER ready: node $HOST $state, CPUs=$CPUS RealMemory=${REAL_MEM}MB," \
    "partition debug, $(sinfo -V) (install $(elapsed "$T0" "$T_INSTALL")s, start $(elapsed "$T_INSTALL" "$T_END")s)"
