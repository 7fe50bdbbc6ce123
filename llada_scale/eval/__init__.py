"""Evaluation on lm-evaluation-harness: the ``llada_scale`` model and ``python -m llada_scale.eval.harness``
(:mod:`.harness`), the offline task YAMLs with their dataset readers and scoring functions (``lm_eval_tasks/``),
and the ``tools/eval_diffusion.py`` front end (:mod:`.cli`: checkpoints side by side, ``--watch``). Importing
:mod:`.harness` requires ``lm-eval``."""
