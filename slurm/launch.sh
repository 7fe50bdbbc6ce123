#!/bin/bash
# Shared launcher of the slurm/*.sh stage scripts (see docs/SLURM.md). A stage script is an #SBATCH header,
# its default recipe and DeepSpeed config, and
#     source "${LLADA_ROOT:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" "$@"
#
# Arguments (after the script name on the sbatch line) and environment:
#   --config FILE             recipe (default: the stage's LLADA_CONFIG)
#   --deepspeed_config FILE   DeepSpeed JSON (default: the stage's LLADA_DS_CONFIG)
#   key.sub=value ...         recipe overrides, passed to llada_scale.train as they are (as are --resume,
#                             --init_from, --run_dir, --wandb)
#   LLADA_OVERRIDES="k=v k=v" more overrides from the environment (applied before the arguments)
#   LLADA_ROOT                the repository (default: the directory sbatch was called from)
#   LLADA_PYTHON              the interpreter on the compute nodes (default: python from PATH)
#   LLADA_DEVICE              gpu | cpu | auto (default auto: gpu when nvidia-smi lists a GPU)
#   MASTER_ADDR, MASTER_PORT  rendezvous (default: first node of the allocation, port from the job id)
#   LLADA_ENV_FILE, and everything in slurm/env.sh
#
# Launch pattern: ONE SRUN TASK PER GPU (per rank). SLURM starts every rank itself and each task maps
# SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS / SLURM_NTASKS_PER_NODE to RANK / LOCAL_RANK / WORLD_SIZE /
# LOCAL_WORLD_SIZE, then execs python: no torchrun agent and no pdsh/ssh (`deepspeed` launcher) in
# between. Why: (1) signals reach the training processes directly -- torchrun would die on SIGUSR1, whose
# default action is to terminate, and it turns SIGTERM into a kill of its workers after a grace period,
# so the checkpoint-on-preemption below could not run; (2) srun --kill-on-bad-exit=1 ends all ranks as
# soon as one fails, so a crashed rank never leaves the others hanging in a collective; (3) SLURM does
# the process placement, binding, accounting and cleanup; (4) nothing needs ssh between nodes or loses
# environment variables on the way.
#
# Preemption and time limits (the stage scripts have --signal=B:USR1@<s> and --requeue):
#   * SLURM sends SIGUSR1 to this batch shell <s> seconds before the time limit (or you do, with
#     `scancel --signal=USR1 --batch <jobid>`); the trap below forwards it to srun, which forwards it to
#     every rank. SIGUSR1/SIGTERM sent to the ranks directly (`scancel --signal=USR1 <jobid>`, preemption,
#     the time limit itself) work the same way.
#   * The trainer records the signal, all ranks agree on it through an all-reduce at the next micro
#     step, finish that optimizer step, save a complete checkpoint together and exit with 75.
#   * On 75, this script runs `scontrol requeue $SLURM_JOB_ID`: the same job id goes back to the queue,
#     and when it starts again train.resume=auto picks the newest complete checkpoint of run_dir (a
#     half-written one is never picked), keeping the wandb run (<run_dir>/wandb_id).
#   * It does NOT requeue when the batch shell got SIGTERM (scancel, a kill at the time limit,
#     preemption -- SLURM requeues preempted jobs itself when PreemptMode=REQUEUE), when LLADA_REQUEUE=0,
#     or after LLADA_MAX_RESTARTS restarts. Any other exit status ends the job with that status.

llada_die() {
    echo "launch.sh: error: $*" >&2
    exit 2
}

llada_log() {
    echo "[launch.sh $(date '+%F %T')] $*"
}

# An address of node $1 that the other nodes can reach: the NodeAddr SLURM itself uses for the node; if
# that is a name, the name when it resolves (every node resolves it for itself, so a 127.0.1.1 entry for
# the own hostname on the first node does no harm), else its first IPv4 address from getent.
llada_node_addr() {
    local node=$1 addr ip
    addr=$(scontrol show node "$node" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)
    [[ -n "$addr" && "$addr" != "(null)" ]] || addr=$node
    if [[ "$addr" =~ ^[0-9]+(\.[0-9]+){3}$ || "$addr" == *:* ]]; then
        echo "$addr"
        return 0
    fi
    ip=$(getent ahostsv4 "$addr" 2>/dev/null | awk 'NR == 1 {print $1}')
    if [[ -n "$ip" ]]; then
        echo "$addr"
        return 0
    fi
    ip=$(getent hosts "$node" 2>/dev/null | awk 'NR == 1 {print $1}')
    [[ -n "$ip" ]] || return 1
    echo "$ip"
}

[[ -n "${SLURM_JOB_ID:-}" ]] || llada_die "submit with sbatch (SLURM_JOB_ID is not set): sbatch slurm/<stage>.sh"
LLADA_ROOT=${LLADA_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$LLADA_ROOT" || llada_die "cannot cd to LLADA_ROOT=$LLADA_ROOT"
[[ -f llada_scale/train.py ]] || llada_die "$LLADA_ROOT is not the llada_scale repository: call sbatch from the repository root or set LLADA_ROOT"
# shellcheck source=slurm/env.sh
source slurm/env.sh || llada_die "slurm/env.sh failed"

# ---------------------------------------------------------------------------------------------- arguments
llada_config=${LLADA_CONFIG:-}
llada_ds_config=${LLADA_DS_CONFIG:-}
llada_opts=()  # train.py options go before the key=value overrides (argparse cannot interleave them)
read -r -a llada_args <<< "${LLADA_OVERRIDES:-}"
while (($#)); do
    case $1 in
        --config) [[ $# -ge 2 ]] || llada_die "--config needs a file"; llada_config=$2; shift 2 ;;
        --config=*) llada_config=${1#*=}; shift ;;
        --deepspeed_config | --deepspeed-config) [[ $# -ge 2 ]] || llada_die "$1 needs a file"; llada_ds_config=$2; shift 2 ;;
        --deepspeed_config=* | --deepspeed-config=*) llada_ds_config=${1#*=}; shift ;;
        --resume | --init_from | --run_dir | --wandb) [[ $# -ge 2 ]] || llada_die "$1 needs a value"; llada_opts+=("$1" "$2"); shift 2 ;;
        --*) llada_opts+=("$1"); shift ;;
        *) llada_args+=("$1"); shift ;;
    esac
done
[[ -n "$llada_config" ]] || llada_die "no recipe: pass --config configs/<recipe>.yaml"
[[ -f "$llada_config" ]] || llada_die "recipe $llada_config does not exist (relative paths are from $LLADA_ROOT)"
llada_cmd=("${LLADA_PYTHON:-python}" -u -m llada_scale.train --config "$llada_config")
if [[ -n "$llada_ds_config" ]]; then
    [[ -f "$llada_ds_config" ]] || llada_die "DeepSpeed config $llada_ds_config does not exist"
    llada_cmd+=(--deepspeed_config "$llada_ds_config")
fi
llada_cmd+=("${llada_opts[@]}" "${llada_args[@]}")

# ---------------------------------------------------------------------------------------------- device
LLADA_DEVICE=${LLADA_DEVICE:-auto}
if [[ "$LLADA_DEVICE" == auto ]]; then
    if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L 2> /dev/null | grep -q '^GPU'; then
        LLADA_DEVICE=gpu
    else
        LLADA_DEVICE=cpu
    fi
fi
case $LLADA_DEVICE in
    gpu) ;;
    cpu) export CUDA_VISIBLE_DEVICES="" ;;  # gloo on CPU even where a GPU exists
    *) llada_die "LLADA_DEVICE must be gpu, cpu or auto, not $LLADA_DEVICE" ;;
esac
export LLADA_DEVICE

# ---------------------------------------------------------------------------------------------- rendezvous
llada_first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
[[ -n "$llada_first_node" ]] || llada_die "cannot expand SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
if [[ -z "${MASTER_ADDR:-}" ]]; then
    MASTER_ADDR=$(llada_node_addr "$llada_first_node") ||
        llada_die "cannot resolve node $llada_first_node (no NodeAddr, no DNS/hosts entry); set MASTER_ADDR"
fi
# A port from the job id (10000-29999: below the usual ephemeral range 32768+) that also changes with
# every requeue, so a restarted job never collides with a socket of its previous run in TIME_WAIT.
MASTER_PORT=${MASTER_PORT:-$((10000 + (SLURM_JOB_ID % 5000) * 4 + ${SLURM_RESTART_COUNT:-0} % 4))}
export MASTER_ADDR MASTER_PORT

# ---------------------------------------------------------------------------------------------- run
llada_term=0
llada_usr1=0
llada_trapped=0
llada_srun_pid=
# shellcheck disable=SC2317  # trap handlers: called indirectly
llada_on_usr1() {
    llada_trapped=1
    llada_usr1=1
    llada_log "SIGUSR1 (time limit near / requested): asking every rank to checkpoint and stop"
    [[ -n "$llada_srun_pid" ]] && kill -s USR1 "$llada_srun_pid" 2> /dev/null
}
# shellcheck disable=SC2317
llada_on_term() {
    llada_trapped=1
    llada_term=1
    llada_log "SIGTERM: SLURM is ending the job; the ranks got it too and checkpoint if they can (no requeue)"
}
trap llada_on_usr1 USR1
trap llada_on_term TERM

llada_log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_JOB_NUM_NODES} node(s)" \
    "[$SLURM_JOB_NODELIST] x ${SLURM_NTASKS_PER_NODE:-?} task(s) = $SLURM_NTASKS ranks, device $LLADA_DEVICE," \
    "rendezvous $MASTER_ADDR:$MASTER_PORT"
llada_log "command: ${llada_cmd[*]}"

llada_srun=(srun --kill-on-bad-exit=1 --label --export=ALL)
# Since Slurm 22.05 srun no longer inherits --cpus-per-task from the batch allocation: pass it on.
[[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && llada_srun+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")

# Each task: SLURM's ids -> torch.distributed's env://, then exec python (signals go straight to it).
# shellcheck disable=SC2016  # the single-quoted script is expanded by each task's bash
"${llada_srun[@]}" bash -c '
export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
[[ "${SLURM_NTASKS_PER_NODE:-}" =~ ^[0-9]+$ ]] && export LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE
echo "task rank $RANK/$WORLD_SIZE local $LOCAL_RANK on node ${SLURMD_NODENAME:-?} ($(hostname)) pid $$" >&2
exec "$@"' llada_task "${llada_cmd[@]}" &
llada_srun_pid=$!

# `wait` returns early (status > 128) when a trapped signal arrives; wait again until srun really ends.
while :; do
    llada_trapped=0
    wait "$llada_srun_pid"
    llada_rc=$?
    if ((llada_rc > 128 && llada_trapped)); then
        continue
    fi
    break
done
trap - USR1 TERM

llada_preempted=0
if ((llada_rc == LLADA_PREEMPTED_EXIT)); then
    llada_preempted=1
elif ((llada_usr1 && !llada_term && (llada_rc == 137 || llada_rc == 143))); then
    # All ranks exit 75 together after a barrier, but if one is a moment late srun --kill-on-bad-exit
    # kills it and reports 128+signal. After our SIGUSR1 that still means "checkpoint and stop": resume
    # takes the newest COMPLETE checkpoint, whichever that is.
    llada_log "srun exited $llada_rc after SIGUSR1 (a rank was ended by the step teardown): treating it as checkpoint-and-stop"
    llada_preempted=1
fi
if ((llada_preempted)); then
    llada_restarts=${SLURM_RESTART_COUNT:-0}
    if ((llada_term)); then
        llada_log "checkpointed after SIGTERM; not requeueing (resubmit the same command to resume)"
    elif [[ "$LLADA_REQUEUE" != 1 ]]; then
        llada_log "checkpointed and stopped; LLADA_REQUEUE=$LLADA_REQUEUE, not requeueing"
    elif ((llada_restarts >= LLADA_MAX_RESTARTS)); then
        llada_log "checkpointed and stopped; already restarted $llada_restarts times (LLADA_MAX_RESTARTS), not requeueing"
    else
        llada_log "checkpointed and stopped: requeueing job $SLURM_JOB_ID (it resumes from the checkpoint)"
        scontrol requeue "$SLURM_JOB_ID" || llada_log "scontrol requeue failed; resubmit the same command to resume"
    fi
    exit 0
fi
llada_log "training exited with status $llada_rc"
exit "$llada_rc"
