#!/usr/bin/env python
"""Evaluate AR and masked-diffusion (LLaDA) checkpoints side by side on WikiText-2, LAMBADA, PIQA, GSM8K and the
poem reversal set through lm-evaluation-harness (the ``llada_scale`` model and the offline task YAMLs), and watch
an answer being unmasked. ``--help`` lists every flag; the implementation is :mod:`llada_scale.eval.cli`
(docs/EVAL.md, section 4).

  python tools/eval_diffusion.py --checkpoint runs/sft_diffusion_tiny runs/ar_pretrain_tiny --limit 40
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llada_scale.eval.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
