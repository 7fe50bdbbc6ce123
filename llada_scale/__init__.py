"""llada_scale: AR and LLaDA-style masked diffusion language models, trained on DeepSpeed ZeRO from one CPU to
multi-node GPU clusters.

Subpackages, lower layers first (a layer never imports a higher one):

* :mod:`llada_scale.model`: the Llama-style backbone, attention masks, RoPE/YaRN (knows nothing of training);
* :mod:`llada_scale.data`: token shards, the packing resumable loader, the tokenizer and chat templates;
* :mod:`llada_scale.objectives`: AR, LLaDA diffusion, SFT and block-diffusion losses, noise schedules;
* :mod:`llada_scale.sampling`: diffusion / block / AR samplers and likelihoods;
* :mod:`llada_scale.checkpoint`: the run checkpointer, weight I/O, conversions and foreign formats;
* :mod:`llada_scale.training`: the Trainer, DeepSpeed setup, resume, loss guards, metrics, schedules, config;
* :mod:`llada_scale.eval`: benchmark tasks, the evaluation CLI and the lm-evaluation-harness model;
* :mod:`llada_scale.train`: the training entry point;
* :mod:`llada_scale.api`: ``llada_scale.load(path)`` -> a model that generates, chats and scores text.
"""

__all__ = ["load", "Model"]


def __getattr__(name):  # lazy: importing llada_scale.model must not load the checkpoint/tokenizer stack
    if name in __all__:
        from llada_scale import api

        return getattr(api, name)
    raise AttributeError(f"module 'llada_scale' has no attribute {name!r}")
