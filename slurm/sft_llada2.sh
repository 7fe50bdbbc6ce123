#!/bin/bash
# Block-diffusion SFT of LLaDA2.0/2.1-mini (16B MoE), 1 node x 8 H100 80GB, ZeRO-3 (docs/MODELS.md, docs/SLURM.md).
#   python tools/convert_checkpoint.py import-llada2 /path/to/LLaDA2.0-mini models/llada2-mini   (once)
#   sbatch slurm/sft_llada2.sh [--config FILE] [--deepspeed_config FILE] [key.sub=value ...]
# Experts split over the node's GPUs: sbatch slurm/sft_llada2.sh train.expert_parallel_size=8
# LoRA: LLADA_CONFIG=configs/sft_llada2_mini_lora.yaml sbatch slurm/sft_llada2.sh
# 32k tokens (sequence parallel 4): LLADA_CONFIG=configs/sft_llada2_mini_32k.yaml sbatch slurm/sft_llada2.sh
#SBATCH --job-name=llada2-sft
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@900
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

LLADA_CONFIG=${LLADA_CONFIG:-configs/sft_llada2_mini.yaml}
LLADA_DS_CONFIG=${LLADA_DS_CONFIG:-ds_configs/zero3.json}  # model states 37 GB/GPU for mini on 8 GPUs (docs/LOG.md)
# shellcheck source=slurm/launch.sh
source "${LLADA_ROOT:-${SLURM_SUBMIT_DIR:-.}}/slurm/launch.sh" "$@"
