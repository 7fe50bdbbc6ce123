#!/usr/bin/env bash
# The main job, end to end: install, build shards from the real data, then
#   1. AR pretraining -> 2. LLaDA diffusion continual pretraining from the AR weights -> 3. diffusion SFT,
# each with DeepSpeed ZeRO-2 on NPROC processes (2 CPU processes here; one per GPU when GPUs exist).
# Usage: bash tools/main_job.sh [--skip-install]      Env: LLADA_DATA (default ../shared/data), NPROC,
#        DS_CONFIG (default ds_configs/zero2.json), SIZE (tiny | 30m), PRETRAIN_TOKENS, SFT_DOCS.
set -euo pipefail
cd "$(dirname "$0")/.."
export LLADA_DATA="${LLADA_DATA:-$(cd .. && pwd)/shared/data}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
SIZE="${SIZE:-tiny}"
DS_CONFIG="${DS_CONFIG:-ds_configs/zero2.json}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  NPROC="${NPROC:-$(nvidia-smi -L | wc -l)}"
else
  NPROC="${NPROC:-2}"
fi

if [[ "${1:-}" != "--skip-install" ]]; then
  bash tools/install.sh
fi

PRETRAIN=data/shards/pretrain
SFT=data/shards/sft
if [[ ! -f $PRETRAIN/index.json ]]; then
  # English classics first, then Chinese poetry, up to PRETRAIN_TOKENS (drop the cap for the full 45M tokens).
  python tools/build_shards.py --kind pretrain --tokenizer "$LLADA_DATA/tokenizer/minimind" --output $PRETRAIN \
    --input "$LLADA_DATA/pretrain/en_classics.jsonl.gz" "$LLADA_DATA/pretrain/zh_poetry.jsonl.gz" \
    --max_tokens "${PRETRAIN_TOKENS:-8000000}" --shard_tokens 250000 --num_workers 2
fi
if [[ ! -f $SFT/index.json ]]; then
  python tools/build_shards.py --kind sft --tokenizer "$LLADA_DATA/tokenizer/minimind" --output $SFT \
    --input "$LLADA_DATA/sft/alpaca_en.jsonl.gz" "$LLADA_DATA/sft/alpaca_zh.jsonl.gz" \
    --max_docs "${SFT_DOCS:-20000}" --shard_tokens 250000 --num_workers 2
fi

run() {  # run RECIPE [overrides...]; --resume auto: a rerun continues (or skips) a stage that has checkpoints
  deepspeed --num_gpus "$NPROC" llada_scale/train.py --deepspeed_config "$DS_CONFIG" --resume auto --config "$@"
}
start=$(date +%s)
run "configs/ar_pretrain_${SIZE}.yaml"
run "configs/diffusion_pretrain_${SIZE}.yaml" "train.init_from=runs/ar_pretrain_${SIZE}"
run "configs/sft_diffusion_${SIZE}.yaml" "train.init_from=runs/diffusion_pretrain_${SIZE}"
echo "main job: 3 stages trained in $(( $(date +%s) - start )) s; runs/ and their metrics.jsonl hold the curves"
