"""Evaluation: benchmark tasks on the local eval sets (:mod:`.tasks`), running them in batches
(:mod:`.runner`), the ``tools/eval_diffusion.py`` command line (:mod:`.cli`), and lm-evaluation-harness
(:mod:`.harness`: the ``llada_scale`` model, ``python -m llada_scale.eval.harness`` and the offline task YAMLs
in ``lm_eval_tasks/``; importing it requires ``lm-eval``)."""
