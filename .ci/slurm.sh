#!/usr/bin/env bash
# A one-node Slurm on this machine for tests/launch/test_slurm.py (CI runs it as root).
#
#   .ci/slurm.sh start   install slurm-wlm and munge if missing, start munged, slurmctld and slurmd
#                        with the config $SLURM_CONF, wait until the node is idle
#   .ci/slurm.sh stop    stop the daemons that `start` started (and nothing else)
#
# SLURM_CONF defaults to /tmp/bigmodel-ci-slurm/slurm.conf; its directory also holds the daemons'
# state, logs and started.pids. `start` is idempotent: what already runs is left alone and is
# not stopped by `stop`.
set -euo pipefail

CONF="${SLURM_CONF:-/tmp/bigmodel-ci-slurm/slurm.conf}"
export SLURM_CONF="$CONF"
DIR="$(dirname "$CONF")"
PIDS="$DIR/started.pids"
export PATH="$PATH:/usr/sbin:/sbin"

say() { echo "slurm.sh: $*" >&2; }
die() { say "$*"; exit 1; }

node_idle() { sinfo -h -o %T 2>/dev/null | grep -qx 'idle'; }
munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

install() {
    local bins=(slurmctld slurmd sinfo sbatch scontrol munged munge unmunge)
    local missing=()
    for b in "${bins[@]}"; do command -v "$b" >/dev/null || missing+=("$b"); done
    [ ${#missing[@]} -eq 0 ] && return
    [ "$(id -u)" -eq 0 ] || die "${missing[*]} missing; installing slurm-wlm and munge needs root"
    command -v apt-get >/dev/null || die "${missing[*]} missing and apt-get is not available"
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get install -y -q --no-install-recommends slurm-wlm munge)
    for try in 1 2 3; do
        # A failed install is usually stale package lists or a mirror hiccup: refresh and retry.
        if "${apt[@]}" >&2; then break; fi
        [ "$try" -eq 3 ] && die "apt-get install slurm-wlm munge failed 3 times"
        say "apt-get install failed (try $try); refreshing the package lists"
        apt-get update -q >&2 || true
        sleep $((5 * try))
    done
    for b in "${bins[@]}"; do command -v "$b" >/dev/null || die "$b still missing after installing slurm-wlm munge"; done
}

wait_for_pidfile() {  # wait_for_pidfile FILE -> prints the pid
    for _ in $(seq 75); do
        if [ -s "$1" ]; then read -r pid _ < "$1"; echo "$pid"; return; fi
        sleep 0.2
    done
    die "$1 did not appear"
}

start_munge() {
    munge_works && { say "munged already running"; return; }
    local key=/etc/munge/munge.key
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    [ -s "$key" ] || head -c 1024 /dev/urandom > "$key"
    chown munge:munge "$key" /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 400 "$key"
    rm -f /run/munge/munged.pid
    runuser -u munge -- munged
    echo "munged $(wait_for_pidfile /run/munge/munged.pid)" >> "$PIDS"
    for _ in $(seq 50); do munge_works && return; sleep 0.2; done
    die "munged started but credentials do not verify (munge -n | unmunge)"
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }

write_conf() {
    local host memory_mb
    host="$(hostname -s)"
    memory_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 / 2 ))
    mkdir -p "$DIR/state" "$DIR/spool"
    cat > "$CONF.tmp" <<EOF
ClusterName=bigmodelci
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
ReturnToService=2
MpiDefault=none
NodeName=$host CPUs=$(nproc) RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

start() {
    mkdir -p "$DIR"
    if command -v sinfo >/dev/null && [ -f "$CONF" ] && node_idle; then
        say "Slurm already running with an idle node (SLURM_CONF=$CONF)"
        return
    fi
    install
    start_munge
    # A config from an earlier start whose daemons are gone is rewritten (fresh ports).
    pgrep -f "slurmctld -f $CONF" >/dev/null || write_conf
    for daemon in slurmctld slurmd; do
        if pgrep -f "$daemon -f $CONF" >/dev/null; then continue; fi
        rm -f "$DIR/$daemon.pid"
        "$daemon" -f "$CONF"
        echo "$daemon $(wait_for_pidfile "$DIR/$daemon.pid")" >> "$PIDS"
    done
    for _ in $(seq 120); do
        if node_idle; then say "Slurm is up: $(sinfo -h -o '%N %T %c CPUs')"; return; fi
        sleep 0.5
    done
    tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
    die "the Slurm node did not become idle within 60 s (state: $(sinfo -h -o %T 2>&1))"
}

stop() {
    [ -f "$PIDS" ] || return 0
    local pids=()
    while read -r name pid; do
        if kill -0 "$pid" 2>/dev/null; then say "stopping $name ($pid)"; kill -TERM "$pid"; pids+=("$pid"); fi
    done < <(tac "$PIDS")  # slurmd, then slurmctld, then munged
    for pid in "${pids[@]}"; do
        for _ in $(seq 75); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
    done
    rm -f "$PIDS"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) die "usage: $0 start|stop" ;;
esac
