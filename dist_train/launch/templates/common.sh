# ---- dist_train SLURM glue: pasted into every rendered job script --------
# Source: slurm/common.sh (rendered by dist_train/slurm.py; do not edit the
# copy in RUN_DIR/job.sbatch, it is rewritten on every submit).
#
# Preemption contract (measured and explained in tests/slurm/NOTES.md):
#  * SLURM sends USR1 to this batch shell GRACE seconds before the time limit
#    (sbatch --signal=B:USR1@GRACE); `scancel --batch --signal=USR1 JOB`
#    simulates a preemption notice.
#  * The shell forwards USR1/TERM to the ranks. Launchers (torchrun,
#    accelerate launch) are started with USR1 *ignored*, because their default
#    action on USR1 is to die and orphan the ranks; the ranks inherit the
#    ignore only until the trainer installs its own USR1 handler. A signal
#    that lands before that would be lost, so the shell re-sends it every
#    DT_REFORWARD_S (5) seconds until the launcher exits (the trainer's
#    handler is idempotent).
#  * The trainer saves a checkpoint, touches $DIST_TRAIN_REQUEUE_FILE and exits
#    75. Launchers turn a rank's 75 into 1, hence the file. On 75 or the file,
#    this script requeues the job (array-aware) and exits 0; the next run uses
#    the same RUN_DIR and resumes from the checkpoint.

dt_log() { echo "[dist_train/slurm $(date +%H:%M:%S)] $*" >&2; }

# Start "$@" in the background with USR1 ignored; its pid goes to DT_CHILD.
dt_start() {
    (
        trap '' USR1
        exec "$@"
    ) &
    DT_CHILD=$!
}

# Forward signal $1 to the ranks and remember it in DT_SIGNAL (dt_wait
# re-sends it). DT_FORWARD=children: the ranks are the launcher's direct
# children, each in its own session (torch elastic starts them so), so a
# process-group kill would miss them: signal each child. DT_FORWARD=self:
# DT_CHILD is srun, which relays the signal to every task of the step on
# every node. $2=again: a re-send from dt_wait.
dt_forward() {
    local sig=$1
    [[ -z "${DT_REQUEUING:-}" ]] || return 0
    DT_SIGNAL=$sig
    [[ -n "${DT_CHILD:-}" ]] || return 0
    if [[ "${2:-}" == again ]]; then
        dt_log "re-sending SIG$sig to the ranks (they may have ignored it during start-up)"
    else
        dt_log "got SIG$sig: forwarding to the ranks (mode ${DT_FORWARD:-children})"
    fi
    if [[ "${DT_FORWARD:-children}" == self ]]; then
        kill -s "$sig" "$DT_CHILD" 2>/dev/null || true
    else
        pkill -"$sig" -P "$DT_CHILD" 2>/dev/null || true
    fi
}

# Wait for DT_CHILD and return its real exit status. A trapped signal
# interrupts `wait`; then loop. Once a signal has come (DT_SIGNAL), poll once
# a second and re-send it every DT_REFORWARD_S seconds until DT_CHILD is gone:
# ranks still starting up have USR1 ignored (inherited from dt_start) and
# would drop it, and `pkill -P` finds no ranks before the launcher forks them.
dt_wait() {
    local rc=0 ticks=0 every="${DT_REFORWARD_S:-5}"
    while :; do
        if [[ -z "${DT_SIGNAL:-}" ]]; then
            wait "$DT_CHILD"
            rc=$?
            # No signal trapped: `wait` was not interrupted, rc is the real status.
            [[ -n "${DT_SIGNAL:-}" ]] || break
            continue
        fi
        if ! kill -0 "$DT_CHILD" 2>/dev/null; then
            wait "$DT_CHILD"  # gone: its real status (bash keeps it once reaped)
            rc=$?
            break
        fi
        sleep 1
        ticks=$((ticks + 1))
        if ((ticks >= every)) && kill -0 "$DT_CHILD" 2>/dev/null; then
            ticks=0
            dt_forward "$DT_SIGNAL" again
        fi
    done
    return "$rc"
}

# Run a launcher command with signal forwarding; returns its exit status.
dt_run() {
    trap 'dt_forward USR1' USR1
    trap 'dt_forward TERM' TERM
    dt_start "$@"
    dt_wait
}

# The id `scontrol requeue` needs: ARRAYJOB_TASK inside an array, else JOBID.
dt_job_ref() {
    if [[ -n "${SLURM_ARRAY_JOB_ID:-}" && -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
        echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    else
        echo "${SLURM_JOB_ID}"
    fi
}

# TEST CLUSTERS ONLY (DIST_TRAIN_REQUEUE_START_NOW=1): a requeued job waits
# ~120 s (BeginTime) before it may start again. A helper detached from the job
# (setsid + double fork, so proctrack/linuxproc does not kill it with the job)
# sets StartTime=now 2 s after the job is PENDING. Not at once: slurmd revokes
# the old run's credential with a 1-second resolution, and a restart in the
# same second is killed ("Job credential revoked", job FAILED; seen here).
# Under proctrack/cgroup the helper dies with the job; it just starts later.
dt_start_now() {
    local ref=$1
    (setsid bash -c '
        for _ in $(seq 240); do
            if [[ "$(squeue -h -j "$1" -o %T 2>/dev/null)" == PENDING ]]; then
                sleep 2
                scontrol update JobId="$1" StartTime=now && exit 0
            fi
            sleep 0.5
        done' dt_start_now "$ref" </dev/null >/dev/null 2>&1 &)
}

# Exit with the trainer's status, or requeue when it stopped on a signal with
# a checkpoint saved. `scontrol requeue` kills this script (SIGTERM), so all
# bookkeeping happens before it.
dt_finish() {
    local rc=$1 ref
    if [[ "$rc" == 75 || -e "$DIST_TRAIN_REQUEUE_FILE" ]]; then
        ref="$(dt_job_ref)"
        DT_REQUEUING=1
        rm -f "$DIST_TRAIN_REQUEUE_FILE"
        dt_log "trainer stopped with a checkpoint (rc=$rc): requeueing $ref (restart ${SLURM_RESTART_COUNT:-0})"
        if [[ "${DIST_TRAIN_REQUEUE_START_NOW:-0}" == 1 ]]; then dt_start_now "$ref"; fi
        if ! scontrol requeue "$ref"; then
            dt_log "scontrol requeue $ref failed (is JobRequeue disabled? the job was submitted with --requeue)"
            exit 1
        fi
        exit 0
    fi
    dt_log "trainer exited with $rc"
    exit "$rc"
}

# Port for the rendezvous: distinct for concurrent jobs on one node.
dt_port() { echo $((DT_PORT_BASE + SLURM_JOB_ID % 20000)); }

export DIST_TRAIN_REQUEUE_FILE="$RUN_DIR/.requeue-${SLURM_JOB_ID:-local}"
rm -f "$DIST_TRAIN_REQUEUE_FILE"
dt_log "job $(dt_job_ref) on $(hostname -s): restart ${SLURM_RESTART_COUNT:-0}, run dir $RUN_DIR"
# ---- end of dist_train SLURM glue ------------------------------------------
