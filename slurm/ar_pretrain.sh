#!/bin/bash
# Stage 1: autoregressive pretraining, 2 nodes x 8 H100 (docs/SLURM.md).
#   sbatch slurm/ar_pretrain.sh [--config FILE] [--deepspeed_config FILE] [key.sub=value ...]
#SBATCH --job-name=llada-ar-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

LLADA_CONFIG=${LLADA_CONFIG:-configs/ar_pretrain_1b.yaml}
LLADA_DS_CONFIG=${LLADA_DS_CONFIG:-ds_configs/zero1.json}  # ZeRO-1: gradients reduced once per step (docs/LOG.md, issue 21)
# shellcheck source=slurm/launch.sh
source "${LLADA_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/launch.sh" "$@"
