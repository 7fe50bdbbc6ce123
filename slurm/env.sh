#!/bin/bash
# Environment defaults for llada_scale jobs on multi-node H100 clusters, in one place.
#
# Sourced by slurm/launch.sh inside the batch job, before `srun`; srun passes the environment on to every
# task. Every variable is a DEFAULT: a value already set when you call sbatch (sbatch exports your
# environment), or set in the file named by LLADA_ENV_FILE, wins. Example:
#     NCCL_DEBUG=INFO NCCL_SOCKET_IFNAME=ib0 sbatch slurm/diffusion_pretrain.sh
# Site-specific settings (module loads, conda/venv activation, NCCL plugin paths) belong in your own file:
#     LLADA_ENV_FILE=$HOME/llada_site.sh sbatch slurm/diffusion_pretrain.sh
# (sourced first, so whatever it exports overrides the defaults below).

if [[ -n "${LLADA_ENV_FILE:-}" ]]; then
    # shellcheck source=/dev/null
    source "$LLADA_ENV_FILE" || { echo "env.sh: cannot source LLADA_ENV_FILE=$LLADA_ENV_FILE" >&2; return 2; }
fi

# ---------------------------------------------------------------------------------------------- threads
# One thread per rank for intra-op CPU work. Each GPU rank only feeds its GPU; more threads per rank x 8
# ranks oversubscribe the node's cores and slow the data loader. On the CPU smoke configuration each rank
# computes on the CPU: raise it there only if a task has several cores (--cpus-per-task).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Tokenizers' Rust thread pool inside loader worker processes: off, the loader already runs in parallel.
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

# ---------------------------------------------------------------------------------------------- NCCL
# Log level. WARN prints only problems. Set INFO (plus NCCL_DEBUG_SUBSYS=INIT,NET) when a job hangs at
# start-up or is slow across nodes: it shows which interface and transport (IB / socket) NCCL picked.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# InfiniBand verbs timeout, 4.096 us * 2^N. 22 (~17 s) rides out brief fabric hiccups on large jobs; the
# NCCL default (20, ~4 s) turns them into "NCCL WARN NET/IB : Got completion ... error 12" aborts.
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
# Interfaces NCCL may use for its bootstrap / socket traffic. Unset = NCCL chooses (skips lo and docker*
# when others exist). Set it when nodes have several networks and NCCL picks an unroutable one (a hang at
# init, or "NCCL WARN Bootstrap : no socket interface found"): e.g. NCCL_SOCKET_IFNAME=ib0 or =^docker,lo.
# export NCCL_SOCKET_IFNAME=...
# Which InfiniBand HCAs to use; unset = all. Pin it when some HCAs are storage-only, e.g. =mlx5_0,mlx5_1.
# export NCCL_IB_HCA=...
# AWS p5 / GCP A3 clusters use EFA / TCPX / FasTrak plugins instead of IB: follow the provider's NCCL recipe
# (FI_PROVIDER, NCCL_NET_PLUGIN, LD_LIBRARY_PATH) in LLADA_ENV_FILE; nothing here conflicts with it.

# ---------------------------------------------------------------------------------------------- PyTorch
# A hung collective (a dead rank, a network partition) raises after the process-group timeout instead of
# hanging forever; the failing rank exits non-zero and srun --kill-on-bad-exit ends the step. Keep it on.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# Minutes a collective may wait for a rank that does not join before it raises (DeepSpeed's process-group
# timeout; its own default is 10). 30 leaves room for a first-step compile on one rank and for rank 0
# converting a checkpoint to a universal one (world-size change) while the others wait. Lower it to
# detect a dead rank sooner.
export DEEPSPEED_TIMEOUT="${DEEPSPEED_TIMEOUT:-30}"
# Record the last collectives of every rank and dump them when a timeout fires (the "flight recorder"):
# the dump names the collective and the ranks that never joined it. Dumps land in run-dir-independent
# files given by TORCH_NCCL_DEBUG_INFO_TEMP_FILE (default /tmp/nccl_trace_rank_<rank>). 0 turns it off.
export TORCH_NCCL_TRACE_BUFFER_SIZE="${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}"
export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"
# Fewer "CUDA out of memory" from fragmentation when sequence packing makes tensor sizes vary.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
# Python output unbuffered, so the job log shows progress and errors as they happen (also at a kill).
export PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-1}"
# DeepSpeed compiles a few ops on first use (e.g. cpu_adam for ds_configs/zero3_offload.json, ~40 s) and
# caches them here. Node-local by default: several nodes compiling into one NFS directory can deadlock on
# its lock file. Point it at a shared directory you pre-built once to skip the compile on every node.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${TMPDIR:-/tmp}/torch_extensions_${USER:-$(id -un)}}"

# ---------------------------------------------------------------------------------------------- wandb
# train.wandb=auto logs online when WANDB_API_KEY is set, offline otherwise (sync later with
# `wandb sync <run_dir>/wandb/offline-run-*`). A requeued job reuses <run_dir>/wandb_id: one run per run_dir.
export WANDB_SILENT="${WANDB_SILENT:-true}"

# ---------------------------------------------------------------------------------------------- launcher
# Exit status of train.py after SIGUSR1/SIGTERM made every rank checkpoint and stop (llada_scale.train.
# PREEMPTED_EXIT). launch.sh requeues the job when it sees it. Do not change unless train.py changes.
export LLADA_PREEMPTED_EXIT="${LLADA_PREEMPTED_EXIT:-75}"
# Requeue the job after such a checkpoint-and-stop (1) or leave it stopped (0).
export LLADA_REQUEUE="${LLADA_REQUEUE:-1}"
# Safety net against a requeue loop (e.g. a job that is signalled before it can make progress).
export LLADA_MAX_RESTARTS="${LLADA_MAX_RESTARTS:-50}"
