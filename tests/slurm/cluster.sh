#!/usr/bin/env bash
# A real one-node SLURM cluster on THIS machine, for the tests in tests/slurm.
#
#   tests/slurm/cluster.sh up       install (first time), start munged/slurmctld/slurmd, wait for idle
#   tests/slurm/cluster.sh down     stop the daemons started by `up` (by recorded PID)
#   tests/slurm/cluster.sh status   sinfo + squeue
#
# Needs root (apt-get, munge key, /etc/slurm). Idempotent: `up` on a running
# cluster only re-checks it; `down` on a stopped one does nothing.
# State (pids, logs, spool) lives in $DIST_TRAIN_SLURM_DIR (default
# /var/lib/dist-train-slurm). The config is written to /etc/slurm/slurm.conf so
# plain `sbatch`/`squeue` work without SLURM_CONF; an existing slurm.conf that
# this script did not write is never overwritten.
# Knobs: DIST_TRAIN_SLURM_CPUS (CPUs advertised, default nproc; more than the
# real count is allowed via config_overrides so tests can run jobs side by side),
# DIST_TRAIN_SLURM_WAIT (seconds to wait for the node, default 30).
set -euo pipefail

STATE_DIR="${DIST_TRAIN_SLURM_DIR:-/var/lib/dist-train-slurm}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARKER="# written by dist_train tests/slurm/cluster.sh"
WAIT_S="${DIST_TRAIN_SLURM_WAIT:-30}"
NODE="$(hostname -s)"

log() { echo "[cluster.sh] $*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
die() { log "ERROR: $*"; exit 1; }

need_root() {
    [[ "$(id -u)" == 0 ]] || die "must run as root (installs packages, writes /etc/slurm and /etc/munge)"
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return
    fi
    local t0
    t0=$(now)
    log "installing slurm-wlm and munge with apt-get (first run only)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    # policy-rc.d=101 stops the packages from trying to start their own
    # services (there is no systemd here; we start the daemons ourselves).
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created_policy=1
    fi
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
        || { [[ $created_policy == 1 ]] && rm -f "$policy"; die "apt-get install slurm-wlm munge failed"; }
    [[ $created_policy == 1 ]] && rm -f "$policy"
    log "installed in $(since "$t0") s"
}

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then
            mungekey --create --force --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 755 /run/munge
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return  # already running (ours or the system's)
    fi
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    # munged forks into the background itself; it runs as the munge user, so
    # its pid file goes to /run/munge and is copied into the state dir.
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/dist-train-munged.pid \
        || die "munged failed to start (see /var/log/munge/munged.log)"
    for _ in $(seq 50); do
        if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
            cp /run/munge/dist-train-munged.pid "$STATE_DIR/munged.pid"
            return
        fi
        sleep 0.1
    done
    die "munged started but munge -n | unmunge fails"
}

write_conf() {
    if [[ -f "$CONF" ]] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to overwrite it"
    fi
    local cpus mem_mb
    cpus="${DIST_TRAIN_SLURM_CPUS:-$(nproc)}"
    # Advertise 80% of total memory (at least 512 MB): never more than slurmd
    # detects, else the node is drained with "Low RealMemory".
    mem_mb=$(free -m | awk '/^Mem:/ {m = int($2 * 0.8); print (m < 512 ? 512 : m)}')
    mkdir -p "$CONF_DIR" "$STATE_DIR/ctld" "$STATE_DIR/d"
    cat >"$CONF.tmp" <<CONF
$MARKER
# One-node test cluster; regenerate with \`cluster.sh up\`.
ClusterName=disttrain
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
# Keep finished jobs visible to \`scontrol show job\` for 5 minutes (no sacct
# without slurmdbd): tests poll for COMPLETED/FAILED there.
MinJobAge=300
# Fast kills and no extra minutes past --time, so time-limit tests are quick.
KillWait=5
OverTimeLimit=0
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
    mv "$CONF.tmp" "$CONF"
}

node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -1; }

wait_idle() {
    local deadline=$((SECONDS + WAIT_S)) state=""
    while ((SECONDS < deadline)); do
        state="$(node_state || true)"
        case "$state" in
            idle | mixed | allocated | completing) return 0 ;;
            down* | drain* | drained* | fail*)
                scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    log "node $NODE not idle after ${WAIT_S}s (state: '${state}'); last log lines:"
    tail -n 20 "$STATE_DIR/slurmctld.log" "$STATE_DIR/slurmd.log" >&2 || true
    return 1
}

start_daemon() {  # name args...
    local name=$1; shift
    pid_alive "$STATE_DIR/$name.run.pid" && return
    # -D: stay in the foreground so the recorded PID is the daemon's own.
    nohup "$name" -D "$@" >"$STATE_DIR/$name.out" 2>&1 </dev/null &
    echo $! >"$STATE_DIR/$name.run.pid"
}

cmd_up() {
    need_root
    local t0 t1
    t0=$(now)
    install_packages
    t1=$(now)
    mkdir -p "$STATE_DIR"
    start_munge
    if pid_alive "$STATE_DIR/slurmctld.run.pid" && pid_alive "$STATE_DIR/slurmd.run.pid"; then
        wait_idle || die "cluster running but node not usable"
        log "already up (node $NODE: $(node_state))"
        return
    fi
    write_conf
    # -i: ignore saved state problems; a leftover state dir is fine to reuse.
    start_daemon slurmctld -i
    for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
    start_daemon slurmd
    wait_idle || die "cluster did not come up"
    log "up: node $NODE $(node_state); bring-up $(since "$t1") s (total incl. install $(since "$t0") s)"
}

stop_pidfile() {  # pidfile
    local f=$1 pid
    [[ -f "$f" ]] || return 0
    pid="$(cat "$f")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            log "pid $pid ($f) ignored TERM for 10 s; sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.2
        fi
    fi
    rm -f "$f"
}

cmd_down() {
    need_root
    stop_pidfile "$STATE_DIR/slurmd.run.pid"
    stop_pidfile "$STATE_DIR/slurmctld.run.pid"
    stop_pidfile "$STATE_DIR/munged.pid"
    log "down"
}

cmd_status() {
    if ! command -v sinfo >/dev/null; then echo "slurm not installed"; return 1; fi
    sinfo || return 1
    squeue
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
