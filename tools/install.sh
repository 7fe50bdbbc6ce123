#!/usr/bin/env bash
# Install llada_scale and its dependencies. torch is pinned first so nothing pulls another build:
# TORCH_SPEC=torch==2.13.0 (default; the CPU wheel on CPU-only machines) or e.g. "torch==2.13.0 --index-url ..." on clusters.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
python -m pip install -q -e ".[test]"
