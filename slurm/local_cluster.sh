#!/usr/bin/env bash
# A real single-node SLURM cluster (Debian's Slurm 22.05) for tests and local trials, without systemd.
#
#   slurm/local_cluster.sh up       install what is missing, configure, start, wait until usable
#   slurm/local_cluster.sh status   show the daemons, the node and the queue
#   slurm/local_cluster.sh down     cancel jobs, stop every daemon by PID (TERM, wait, KILL)
#   slurm/local_cluster.sh purge    down, then delete the state dir (database, job history, keys)
#
# Daemons: munged, MariaDB (for slurmdbd, so that sacct works), slurmdbd, slurmctld, slurmd. Every file
# they use (configs, munge key and socket, database, spool, logs, PID files) lives in one state dir, so
# nothing in /etc is touched except a symlink /etc/slurm/slurm.conf -> STATE/etc/slurm.conf that lets
# sbatch/srun/sacct/submitit find the cluster without SLURM_CONF (only made when /etc/slurm/slurm.conf is
# absent or already ours). Needs root (it installs packages and runs the daemons as root).
#
# Environment (all optional):
#   HPC_CALO_SLURM_DIR    state dir (default /tmp/hpc-calo-slurm). Keep it short: munge and MariaDB put
#                         unix sockets in it, and AF_UNIX paths are limited to 107 bytes.
#   HPC_CALO_SLURM_CPUS   CPUs the node advertises (default: 2 x cores, at least 4; oversubscribes a
#                         small machine so that a few tiny jobs can run side by side)
#   HPC_CALO_SLURM_PORTS  first of 4 consecutive ports: slurmctld, slurmd, slurmdbd, MariaDB (default 6817)
#   HPC_CALO_SLURM_CLUSTER  cluster name in accounting (default hpccalo)
set -euo pipefail

STATE=${HPC_CALO_SLURM_DIR:-/tmp/hpc-calo-slurm}
CLUSTER=${HPC_CALO_SLURM_CLUSTER:-hpccalo}
PORT0=${HPC_CALO_SLURM_PORTS:-6817}
CTLD_PORT=$PORT0
SLURMD_PORT=$((PORT0 + 1))
DBD_PORT=$((PORT0 + 2))
DB_PORT=$((PORT0 + 3))
PARTITION=debug
export PATH=/usr/sbin:/sbin:/usr/bin:/bin:$PATH
export SLURM_CONF=$STATE/etc/slurm.conf
# Every daemon starts with this variable; its children (slurmstepd) inherit it. `down` finds strays by it,
# so it never has to kill by process name.
MARK=HPC_CALO_SLURM_DAEMON
MUNGE_SOCKET=$STATE/munge/munge.socket
DB_SOCKET=$STATE/db/mysqld.sock
ETC_LINK=/etc/slurm/slurm.conf
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

log() { printf '[local_cluster +%ss] %s\n' "$SECONDS" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- processes -----------------------------------------------------------------------------------------

pidfile() {
    if [[ $1 == mariadbd ]]; then echo "$STATE/db/mariadbd.pid"; else echo "$STATE/run/$1.pid"; fi
}

# Prints the PID of daemon $1 if it runs and is ours (the PID file may be stale and the PID reused).
daemon_pid() {
    local f pid
    f=$(pidfile "$1")
    [[ -s $f && -r $f ]] || return 1
    pid=$(tr -dc '0-9' <"$f")
    [[ -n $pid ]] && is_ours "$pid" "$1" || return 1
    echo "$pid"
}

is_ours() {
    # Without root, other users' environments are unreadable: fall back to the process name.
    if [[ $(id -u) != 0 && -n ${2:-} ]]; then
        [[ $(cat "/proc/$1/comm" 2>/dev/null) == "$2" ]]
        return
    fi
    # stderr first: kernel threads and exited processes make the input redirection itself fail.
    tr '\0' '\n' 2>/dev/null <"/proc/$1/environ" | grep -qxF "$MARK=$STATE"
}

# TERM, wait up to $2 seconds, then KILL.
stop_pid() {
    local pid=$1 wait_s=${2:-20} i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < wait_s * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "pid $pid ignored SIGTERM for ${wait_s}s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

# Processes carrying our mark (slurmstepd and anything else a daemon left behind), excluding this script.
marked_pids() {
    local d pid
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
        is_ours "$pid" && echo "$pid"
    done
    return 0
}

# Runs a daemon in the background with our mark; it writes its own PID file.
start_daemon() {
    env "$MARK=$STATE" "$@"
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2 i
    shift 2
    for ((i = 0; i < limit * 5; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    die "$what not ready after ${limit}s (logs in $STATE/log)"
}

# --- install -------------------------------------------------------------------------------------------

PACKAGES=(slurm-wlm slurmdbd munge mariadb-server mariadb-client)

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    [[ $(id -u) == 0 ]] || die "packages missing (${missing[*]}) and not root: install them or run as root"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Package scripts must not start the system's own munge/mariadb/slurm services: we run our own.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
    fi
    local apt=(apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confdef
        -o Dpkg::Options::=--force-confold)
    if ! apt-cache policy slurm-wlm 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        apt-get update -q
    fi
    if ! "${apt[@]}" "${missing[@]}"; then
        log "install failed; refreshing the package lists once and retrying"
        apt-get update -q
        "${apt[@]}" "${missing[@]}"
    fi
    ((made_policy)) && rm -f "$policy"
    return 0
}

# --- configuration -------------------------------------------------------------------------------------

# Writes stdin to $1 with mode $2 (default 644) only when the content differs, so a re-run of `up` keeps
# files as they are; CHANGED tells whether any file changed.
CHANGED=0
write_if_changed() {
    local tmp
    tmp=$(mktemp "$1.XXXXXX")
    cat >"$tmp"
    chmod "${2:-644}" "$tmp"
    if [[ -f $1 ]] && cmp -s "$tmp" "$1"; then
        rm -f "$tmp"
        chmod "${2:-644}" "$1"
    else
        mv -f "$tmp" "$1"
        CHANGED=1
    fi
}

node_hw() { # sets NODE, REAL_MEM, CORES
    NODE=$(hostname -s)
    CORES=$(nproc)
    REAL_MEM=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
    if [[ -z $REAL_MEM ]]; then REAL_MEM=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024)); fi
    # Leave some memory to the OS and the daemons.
    REAL_MEM=$((REAL_MEM * 9 / 10))
}

write_configs() {
    node_hw
    local cpus=${HPC_CALO_SLURM_CPUS:-$((CORES * 2 > 4 ? CORES * 2 : 4))}
    mkdir -p "$STATE"/{etc,run,log,spool/ctld,spool/d,munge,db}
    # munged wants its socket dir world-searchable; the key itself is 0400.
    chmod 755 "$STATE/munge"

    write_if_changed "$STATE/etc/slurm.conf" <<EOF
# Written by slurm/local_cluster.sh: a single-node cluster for tests. Do not edit; edit the script.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s): short, so that a
# requeued training job resumes within seconds; one node, so a credential is used as soon as it is made.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
CredType=cred/munge
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups here (no systemd to delegate them): processes are tracked by parentage. A job that
# daemonizes (e.g. "ray start" without --block) escapes tracking: stop such daemons inside the job.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
# srun wires MPI ranks through PMI-2 by default; the mpich wheel's PMI client speaks it.
MpiDefault=pmi2
# Consumable cores, memory not consumed: small jobs share the node without asking for --mem.
SchedulerType=sched/backfill
# The main scheduling pass every 2 s (default 60): a job that becomes eligible by time (a requeued job's
# BeginTime) starts at the next pass.
SchedulerParameters=bf_interval=5,sched_min_interval=100000,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Use the CPU count below even if it exceeds the hardware (a little oversubscription for tiny jobs).
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldTimeout=60
SlurmdTimeout=60
InactiveLimit=0
MessageTimeout=20
# Time limits: enforced exactly (no grace), 10 s between SIGTERM and SIGKILL; requeue allowed so that
# submitit's Checkpointable jobs can "scontrol requeue" themselves on USR2 (--signal=USR2@N).
OverTimeLimit=0
KillWait=10
JobRequeue=1
# Keep finished jobs visible to scontrol/squeue for an hour (sacct has them forever).
MinJobAge=3600
# Accounting through slurmdbd + MariaDB: sacct, and job states for submitit.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# With slurmdbd this "password" is the munge socket for talking to slurmdbd (else /run/munge/...).
AccountingStoragePass=$MUNGE_SOCKET
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$REAL_MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

    if [[ ! -s $STATE/db/slurm.pass ]]; then
        (umask 077 && head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$STATE/db/slurm.pass")
    fi
    local pass
    pass=$(cat "$STATE/db/slurm.pass")
    # slurmdbd refuses a config that others can read (it holds the database password).
    write_if_changed "$STATE/etc/slurmdbd.conf" 600 <<EOF
# Written by slurm/local_cluster.sh.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$pass
StorageLoc=slurm_acct_db
EOF

    write_if_changed "$STATE/etc/my.cnf" <<EOF
# Written by slurm/local_cluster.sh: a private MariaDB for slurmdbd, on 127.0.0.1 only.
[mariadbd]
user=mysql
datadir=$STATE/db/data
socket=$DB_SOCKET
pid-file=$STATE/db/mariadbd.pid
port=$DB_PORT
bind-address=127.0.0.1
log-error=$STATE/db/error.log
skip-name-resolve
innodb_buffer_pool_size=128M
innodb_log_file_size=32M
innodb_lock_wait_timeout=900
EOF

    if [[ ! -s $STATE/munge/munge.key ]]; then
        (umask 077 && dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none)
    fi
    chmod 400 "$STATE/munge/munge.key"

    # Clients (sbatch, sacct, submitit) look in /etc/slurm by default.
    mkdir -p /etc/slurm
    if [[ -L $ETC_LINK || ! -e $ETC_LINK ]]; then
        ln -sfn "$STATE/etc/slurm.conf" "$ETC_LINK"
    elif [[ $(readlink -f "$ETC_LINK") != "$STATE/etc/slurm.conf" ]]; then
        log "warning: $ETC_LINK exists and is not ours; clients need: export SLURM_CONF=$SLURM_CONF"
    fi
}

# --- start ---------------------------------------------------------------------------------------------

start_munge() {
    daemon_pid munged >/dev/null && return 0
    log "starting munged"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    start_daemon munged --socket="$MUNGE_SOCKET" --key-file="$STATE/munge/munge.key" \
        --pid-file="$(pidfile munged)" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munge.seed" \
        --num-threads=10
    wait_for 10 munged bash -c "munge -S '$MUNGE_SOCKET' -n | unmunge -S '$MUNGE_SOCKET'"
}


start_mariadb() {
    if ! daemon_pid mariadbd >/dev/null; then
        chown mysql:mysql "$STATE/db"
        if [[ ! -d $STATE/db/data/mysql ]]; then
            log "initialising MariaDB in $STATE/db/data"
            mariadb-install-db --defaults-file="$STATE/etc/my.cnf" --auth-root-authentication-method=socket \
                --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 || {
                tail -20 "$STATE/log/mariadb-install.log" >&2
                die "mariadb-install-db failed"
            }
        fi
        log "starting MariaDB"
        rm -f "$DB_SOCKET"
        # mariadbd does not daemonize; it writes its own PID file (pid-file in my.cnf).
        env "$MARK=$STATE" setsid mariadbd --defaults-file="$STATE/etc/my.cnf" </dev/null \
            >>"$STATE/log/mariadbd.out" 2>&1 &
    fi
    wait_for 60 MariaDB mariadb-admin --socket="$DB_SOCKET" -u root ping
    local pass
    pass=$(cat "$STATE/db/slurm.pass")
    mariadb --socket="$DB_SOCKET" -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF
}

start_slurmdbd() {
    if ! daemon_pid slurmdbd >/dev/null; then
        log "starting slurmdbd (its first start creates the accounting tables)"
        start_daemon slurmdbd
    fi
    wait_for 60 slurmdbd sacctmgr -n show cluster
    if ! sacctmgr -n -P show cluster format=cluster | grep -qxF "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
}

start_slurmctld() {
    daemon_pid slurmctld >/dev/null || { log "starting slurmctld" && start_daemon slurmctld; }
    wait_for 60 slurmctld bash -c "scontrol ping | grep -q UP"
}

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1; }

start_slurmd() {
    daemon_pid slurmd >/dev/null || { log "starting slurmd" && start_daemon slurmd -N "$NODE"; }
    local i state=""
    for ((i = 0; i < 150; i++)); do
        state=$(node_state)
        case $state in
            idle | mixed | allocated | completing) return 0 ;;
            drain* | down*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.2
    done
    die "node $NODE is '$state', not idle, after 30s (see $STATE/log/slurmd.log)"
}

cmd_up() {
    local t0=$SECONDS
    if [[ $(id -u) != 0 ]]; then die "run as root (it installs packages and runs the daemons as root)"; fi
    local d all=1
    for d in "${DAEMONS[@]}"; do daemon_pid "$d" >/dev/null || all=0; done
    install_packages
    write_configs
    if ((CHANGED)) && daemon_pid slurmctld >/dev/null; then
        log "warning: the configuration changed while the cluster runs: '$0 down' then '$0 up' applies it"
    fi
    start_munge
    start_mariadb
    start_slurmdbd
    start_slurmctld
    start_slurmd
    wait_for 30 sacct sacct -n -X -S now-1hour
    if ((all)); then
        log "already up ($STATE)"
    else
        log "up in $((SECONDS - t0)) s"
    fi
    cat >&2 <<EOF
[local_cluster] SLURM cluster '$CLUSTER' is up: node $NODE, partition $PARTITION (default).
  config:  $SLURM_CONF (linked from $ETC_LINK; else export SLURM_CONF=$SLURM_CONF)
  try:     sinfo; sbatch --wrap 'hostname'; squeue; sacct
  MPI:     srun -n 2 --mpi=pmi2 .venv/bin/python -c 'from mpi4py import MPI; print(MPI.COMM_WORLD.Get_rank())'
  logs:    $STATE/log
  stop:    $0 down
EOF
}

# --- stop ----------------------------------------------------------------------------------------------

cancel_jobs() {
    daemon_pid slurmctld >/dev/null || return 0
    local jobs i
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    [[ -z $jobs ]] && return 0
    log "cancelling jobs: ${jobs//$'\n'/ }"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for ((i = 0; i < 30 * 5; i++)); do # KillWait is 10 s
        [[ -z $(squeue -h -o %A -t R,CG,S,PD,CF 2>/dev/null) ]] && return 0
        sleep 0.2
    done
    log "jobs still listed after 30 s; stopping anyway"
}

cmd_down() {
    cancel_jobs
    local d pid i
    for d in slurmd slurmctld slurmdbd mariadbd munged; do
        if pid=$(daemon_pid "$d"); then
            log "stopping $d (pid $pid)"
            stop_pid "$pid" 30
        fi
        rm -f "$(pidfile "$d")"
    done
    # Whatever a daemon left behind (slurmstepd of a job step that outlived slurmd).
    local strays
    for ((i = 0; i < 2; i++)); do
        strays=$(marked_pids)
        [[ -z $strays ]] && break
        for pid in $strays; do
            log "stopping stray pid $pid ($(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | cut -c1-60))"
            stop_pid "$pid" 10
        done
    done
    if [[ -L $ETC_LINK && $(readlink "$ETC_LINK") == "$STATE/etc/slurm.conf" ]]; then rm -f "$ETC_LINK"; fi
    log "down (state kept in $STATE; '$0 purge' deletes it)"
}

cmd_purge() {
    cmd_down
    case $STATE in /tmp/* | /var/tmp/*) ;; *) [[ -f $STATE/etc/slurm.conf ]] || die "refusing to delete $STATE" ;; esac
    rm -rf "$STATE"
    log "deleted $STATE"
}

cmd_status() {
    local d pid up=0
    for d in "${DAEMONS[@]}"; do
        if pid=$(daemon_pid "$d"); then
            printf '%-10s running  pid %s\n' "$d" "$pid"
            up=$((up + 1))
        else
            printf '%-10s stopped\n' "$d"
        fi
    done
    if ((up == ${#DAEMONS[@]})); then
        echo
        sinfo || true
        echo
        squeue || true
        return 0
    fi
    return 3
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    purge) cmd_purge ;;
    status) cmd_status ;;
    *)
        sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
        [[ ${1:-} == -h || ${1:-} == --help ]] && exit 0
        exit 2
        ;;
esac
