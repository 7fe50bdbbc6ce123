"""Evaluation: benchmark tasks on the local eval sets (:mod:`.tasks`), running them in batches
(:mod:`.runner`) and the ``tools/eval_diffusion.py`` command line (:mod:`.cli`)."""
