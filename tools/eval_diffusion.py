#!/usr/bin/env python
"""Evaluate AR and masked-diffusion (LLaDA) checkpoints on WikiText-2, LAMBADA, PIQA, GSM8K and the poem reversal
set; AR vs diffusion side by side; a live unmasking view. ``--help`` lists every flag; the implementation is
:mod:`llada_scale.eval.cli` (docs/EVAL.md has recipes).

  python tools/eval_diffusion.py --checkpoint runs/x/checkpoints/step00001000 --tasks piqa,lambada --limit 200
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llada_scale.eval.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
