"""The Python API: load any checkpoint we produce or import and generate, chat or score text in a few lines.

    import llada_scale
    model = llada_scale.load("runs/sft/checkpoints")            # DeepSpeed tag/run dir, consolidated or HF dir
    print(model.generate("What is the capital of France?", chat=True, gen_length=64)[0])
    print(model.chat([{"role": "user", "content": "Write a haiku about rain."}]))
    print(model.log_likelihood("The capital of France is", " Paris"))

:func:`load` reads the weights (:func:`llada_scale.checkpoint.build_model_from_checkpoint`) and the tokenizer the
checkpoint names, and returns a :class:`Model`. AR or diffusion, and for diffusion whether the checkpoint was
trained with block diffusion, are read from the checkpoint: the defaults follow (AR: left-to-right decoding with
a KV cache and the exact chain rule; diffusion: LLaDA low-confidence remasking and LLaDA's Monte Carlo ELBO;
block diffusion: block-by-block decoding and the block NELBO). The samplers are those of
:mod:`llada_scale.sampling`; their docstrings give the algorithms and sources.
"""

from __future__ import annotations

import os
import zlib
from typing import Callable, Sequence

import torch

from llada_scale.sampling import validate

__all__ = ["SAMPLERS", "Model", "load", "default_sampler", "trained_block_length", "special_ids", "render_partial"]

SAMPLERS = ("low_confidence", "random", "threshold", "block", "edit", "llada2")


# ------------------------------------------------------------------------------------------------ checkpoints
def _objective(meta: dict | None) -> dict:
    cfg = (meta or {}).get("config")
    obj = cfg.get("objective") if isinstance(cfg, dict) else None
    return obj if isinstance(obj, dict) else {}


def default_sampler(meta: dict | None) -> str:
    """``"block"`` when the checkpoint's stored run config has block diffusion on
    (``config.objective.block_length > 0`` or a non-empty ``block_schedule``), else ``"llada"`` (also when the
    checkpoint stores no run config, e.g. HF exports)."""
    obj = _objective(meta)
    bl = obj.get("block_length") or 0
    return "block" if (isinstance(bl, int) and bl > 0) or obj.get("block_schedule") else "llada"


def trained_block_length(meta: dict | None) -> int | None:
    """The block length the checkpoint was last trained with: ``objective.block_length``, or the
    ``block_schedule`` value at the checkpoint's last step (its last phase when the step is unknown). None when
    block diffusion is off, the value is ``"full"`` or the schedule is unreadable."""
    from llada_scale.objectives import block_diffusion as bd

    obj = _objective(meta)
    bl = obj.get("block_length") or 0
    if isinstance(bl, int) and bl > 0:
        return bl
    sched = obj.get("block_schedule")
    if not sched:
        return None
    step = (meta or {}).get("step")
    try:
        if not isinstance(step, int) or step < 1:
            step = sum(int(s) for _, s in sched)  # past the end: the last phase
        out = bd.block_length_at(sched, step - 1)
    except (ValueError, TypeError):
        return None
    return None if out >= bd.FULL_LENGTH else out


def special_ids(model_config, tokenizer) -> tuple[int | None, list[int], list[int]]:
    """``(mask_token_id, suppress_token_ids, stop_ids)`` for a model and its tokenizer.

    mask id: the model config's, else the tokenizer's (None for AR models). Suppressed: the embedding's padding
    rows beyond the tokenizer (never trained), and the mask token of an AR model. Stops: eos, then pad.

    Raises:
        ValueError: the tokenizer is larger than the model's vocabulary, or a diffusion model has no usable
            mask id.
    """
    cfg = model_config
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model only {cfg.vocab_size} rows; "
                         "wrong tokenizer?")
    mask = cfg.mask_token_id if cfg.mask_token_id is not None else tokenizer.mask_token_id
    suppress = list(range(tokenizer.vocab_size, cfg.vocab_size))
    if cfg.causal and mask is not None and 0 <= mask < cfg.vocab_size:
        suppress.append(mask)
    if not cfg.causal and not (mask is not None and 0 <= mask < cfg.vocab_size):
        raise ValueError(f"diffusion model: mask token id {mask} outside the vocabulary ({cfg.vocab_size})")
    stops = [tokenizer.eos_token_id] + ([tokenizer.pad_token_id] if tokenizer.pad_token_id not in
                                        (None, tokenizer.eos_token_id) else [])
    return (None if cfg.causal else mask), sorted(set(suppress)), stops


def render_partial(tokenizer, tokens: Sequence[int], mask_id: int, symbol: str = "░") -> str:
    """Decode ``tokens`` with every mask token shown as ``symbol`` (runs of real tokens decoded together)."""
    out, run = [], []
    for t in tokens:
        if t == mask_id:
            if run:
                out.append(tokenizer.decode(run))
                run = []
            out.append(symbol)
        else:
            run.append(t)
    if run:
        out.append(tokenizer.decode(run))
    return "".join(out)


# ------------------------------------------------------------------------------------------------ the model
class Model:
    """A loaded checkpoint with its tokenizer: :meth:`generate`, :meth:`chat`, :meth:`log_likelihood`.

    Attributes:
        module: the :class:`llada_scale.model.transformer.Transformer` (eval mode).
        tokenizer: the :class:`llada_scale.data.tokenizer.Tokenizer` the checkpoint names.
        causal: AR (True) or masked diffusion (False).
        mask_token_id, suppress_token_ids, stop_ids: see :func:`special_ids`.
        sampler: the default sampler (``"block"`` for block-diffusion checkpoints, else ``"low_confidence"``;
            AR models decode left to right and ignore it).
        block_length: the block length the checkpoint was trained with (block diffusion) or None.
        estimator: the default likelihood estimator: ``"ar"`` (exact), ``"full"`` (LLaDA's ELBO) or ``"block"``
            (the block NELBO, for block-diffusion checkpoints).
        meta: the checkpoint metadata (:func:`llada_scale.checkpoint.load_model_state`).
    """

    def __init__(self, module, tokenizer, meta: dict | None = None):
        self.module, self.tokenizer, self.meta = module, tokenizer, meta or {}
        self.config = module.config
        self.causal = bool(self.config.causal)
        self.mask_token_id, self.suppress_token_ids, self.stop_ids = special_ids(self.config, tokenizer)
        block = not self.causal and default_sampler(self.meta) == "block"
        self.sampler = "block" if block else "low_confidence"
        self.block_length = trained_block_length(self.meta) if block else None
        if getattr(self.config, "model_type", None) == "llada2_moe":  # LLaDA2: the release's own decoding loop
            self.sampler, self.block_length = "llada2", self.block_length or 32
        self.estimator = "ar" if self.causal else ("block" if self.block_length else "full")

    def __repr__(self) -> str:
        kind = "AR" if self.causal else f"diffusion ({self.sampler})"
        return f"Model({self.meta.get('path', '?')}, {kind}, {self.module.num_params() / 1e6:.1f}M parameters)"

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    # ------------------------------------------------------------------ text <-> ids
    def encode_prompt(self, prompt: str | list[dict], chat: bool = False) -> list[int]:
        """Token ids of a prompt: raw text, or (``chat``, or a list of messages) the tokenizer's chat template
        with the assistant generation prompt."""
        if isinstance(prompt, (list, tuple)):
            return self.tokenizer.render_prompt(validate.check_messages(prompt))
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a str or a list of messages, got {type(prompt).__name__}")
        validate.check_text("prompt", prompt)
        return self.tokenizer.render_prompt([{"role": "user", "content": prompt}]) if chat else \
            self.tokenizer.encode(prompt)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``(context ids, continuation ids)`` as lm-evaluation-harness splits them: trailing spaces of the
        context move to the continuation, the whole text is encoded and split after the context's tokens; an
        empty context becomes the bos (else eos) token."""
        validate.check_text("context", context)
        validate.check_text("continuation", continuation)
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        if not context:
            tok = self.tokenizer
            return [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id], tok.encode(continuation)
        ctx = self.tokenizer.encode(context)
        return ctx, self.tokenizer.encode(context + continuation)[len(ctx):]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: str | list[str], *, chat: bool = False, gen_length: int = 128,
                 steps: int | None = None, block_length: int | None = None, sampler: str | None = None,
                 temperature: float = 0.0, cfg_scale: float = 0.0, threshold: float | None = None,
                 cache: str | None = None, repetition_penalty: float = 1.0, seed: int = 0, batch_size: int = 16,
                 allow_extrapolation: bool = False,
                 callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                 **edit_kwargs) -> list[str]:
        """Generate an answer for each prompt; returns the text up to the first stop token (eos/pad).

        Args:
            prompts: one string or a list of strings (one answer each, in order).
            chat: wrap each prompt as a user message in the tokenizer's chat template (instruction-tuned models).
            gen_length: tokens to generate per prompt (diffusion: the answer length; AR: the maximum; default 128).
            steps: denoising steps for ``gen_length`` tokens (default ``gen_length``: one token per step, LLaDA's
                best-quality setting); block sampler: ``round(steps * block_length / gen_length)`` per block.
                Ignored by ``"threshold"`` and AR models.
            block_length: semi-autoregressive block length in tokens (default: the trained one for block
                diffusion, else 32, or ``gen_length`` when shorter).
            sampler: ``"low_confidence"`` / ``"random"`` remasking or ``"threshold"`` (Fast-dLLM parallel decoding)
                with :func:`llada_scale.sampling.diffusion_generate`; ``"block"`` with
                :func:`llada_scale.sampling.generate_blocks_batch` (block-diffusion models); ``"edit"``: LLaDA 2.1's
                editing decoder (:func:`llada_scale.sampling.edit.edit_generate`, block-diffusion models); ``"llada2"``:
                the LLaDA2 release's ``generate`` (:func:`llada_scale.sampling.llada2.generate_llada2`, the default of
                LLaDA2 checkpoints; ``steps`` x block_length / gen_length steps per block). Default
                :attr:`sampler`. AR models ignore it.
            temperature: 0 = greedy (default); > 0 Gumbel-max sampling.
            cfg_scale: classifier-free guidance strength (default 0 = off; not with ``"block"``).
            threshold: confidence threshold of ``"threshold"`` (default 0.9), ``"edit"`` (default 0.7) and
                ``"llada2"`` (default 0.95).
            cache: None (exact, default), ``"prefix"`` or ``"dual"``: Fast-dLLM's approximate KV caches (LLaDA
                samplers; the block sampler and AR models always use their exact caches).
            repetition_penalty: HF-style penalty on tokens already present (default 1 = off).
            seed: seed of all sampling noise (default 0).
            batch_size: prompts per forward (default 16; at temperature 0 the result does not depend on it).
            allow_extrapolation: allow prompt + gen_length beyond the model's ``max_seq_len``.
            callback: ``callback(step, tokens [B, gen_length], committed [B, gen_length])`` after every
                denoising step of each batch (diffusion only), e.g. to watch the answer unmask; ``"edit"`` adds
                ``edited [B, gen_length]`` (the committed tokens rewritten at this step) as a fourth argument.
            edit_kwargs: ``"edit"`` only: ``editing_threshold`` (default 0.5; None = no edits), ``max_post_steps``
                (default 16), ``preset`` (``"quality"`` 0.7 / 0.5 / 16 or ``"speed"`` 0.5 / 0.0 / 16: sets the
                three), ``top_k``, ``top_p``, ``eos_early_stop``. See docs/EVAL.md.
        Returns:
            One answer per prompt (a list also for a single string prompt).
        Raises:
            ValueError: an unknown sampler or cache, a setting the sampler refuses, a prompt longer than the
                context without ``allow_extrapolation``, any argument of the wrong type or out of range (0, NaN,
                inf; ``steps`` above ``gen_length``), a prompt that is not valid Unicode, a batch that cannot fit in
                the free memory (:mod:`llada_scale.sampling.validate`; one line each).
        """
        if not isinstance(prompts, (str, list, tuple)) or not prompts:
            raise ValueError("prompts must be a str or a non-empty list of str")
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = [self.encode_prompt(p, chat) for p in texts]
        res = self.generate_ids(ids, gen_length=gen_length, steps=steps, block_length=block_length, sampler=sampler,
                                temperature=temperature, cfg_scale=cfg_scale, threshold=threshold, cache=cache,
                                repetition_penalty=repetition_penalty, seed=seed, batch_size=batch_size,
                                allow_extrapolation=allow_extrapolation, callback=callback, **edit_kwargs)
        return [self.decode(t) for t in res.tokens]

    def chat(self, messages: list[dict], **kwargs) -> str:
        """The assistant's next turn for ``messages`` (``[{"role": "system"|"user"|"assistant", "content": str},
        ...]``) rendered with the tokenizer's chat template; ``kwargs`` as :meth:`generate`.

        Raises:
            ValueError: malformed messages (see :func:`llada_scale.sampling.validate.check_messages`) and as
                :meth:`generate`.
        """
        res = self.generate_ids([self.encode_prompt(validate.check_messages(messages))], **kwargs)
        return self.decode(res.tokens[0])

    @torch.no_grad()
    def generate_ids(self, prompt_ids: list[list[int]], *, gen_length: int = 128, steps: int | None = None,
                     block_length: int | None = None, sampler: str | None = None, temperature: float = 0.0,
                     cfg_scale: float = 0.0, threshold: float | None = None, cache: str | None = None,
                     repetition_penalty: float = 1.0, seed: int = 0, batch_size: int = 16,
                     allow_extrapolation: bool = False, callback=None, **edit_kwargs):
        """:meth:`generate` on token ids: a :class:`llada_scale.sampling.GenerationResult` whose ``tokens`` are
        cut at the first stop id (the stop id dropped); ``nfe``, ``seconds`` and ``steps`` summed over batches."""
        from llada_scale import sampling
        from llada_scale.sampling.common import check_prompts

        args = validate.check_generation(gen_length=gen_length, steps=steps, block_length=block_length,
                                         temperature=temperature, cfg_scale=cfg_scale, threshold=threshold,
                                         repetition_penalty=repetition_penalty, seed=seed, batch_size=batch_size)
        gen_length, steps, block_length, temperature, cfg_scale, threshold, repetition_penalty, seed, batch_size = (
            args[k] for k in ("gen_length", "steps", "block_length", "temperature", "cfg_scale", "threshold",
                              "repetition_penalty", "seed", "batch_size"))
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be callable(step, tokens, committed), got {type(callback).__name__}")
        if not isinstance(allow_extrapolation, bool):
            raise ValueError(f"allow_extrapolation must be True or False, got {allow_extrapolation!r}")
        prompt_ids = check_prompts(prompt_ids)
        sampler = sampler or self.sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        rows = min(batch_size, len(prompt_ids)) * (2 if cfg_scale > 0 else 1)
        validate.check_fits(self.config, rows, max(map(len, prompt_ids)) + gen_length, self.device, "generate")
        steps = steps or gen_length
        if edit_kwargs and (sampler != "edit" or self.causal):
            raise ValueError(f"{', '.join(sorted(edit_kwargs))} only apply to sampler='edit' (diffusion models)")
        if sampler == "edit" and not self.causal:
            res = self._edit(prompt_ids, gen_length, block_length, temperature, cfg_scale, threshold, cache,
                             repetition_penalty, seed, batch_size, allow_extrapolation, callback, **edit_kwargs)
            res.tokens = [sampling.truncate_at(t, self.stop_ids) for t in res.tokens]
            return res
        threshold = 0.9 if threshold is None else threshold
        common = dict(temperature=temperature, suppress_token_ids=self.suppress_token_ids,
                      repetition_penalty=repetition_penalty, allow_extrapolation=allow_extrapolation)
        if self.causal:
            res = sampling.GenerationResult([], 0, 0.0)
            for i in range(0, len(prompt_ids), batch_size):
                r = sampling.ar_generate(self.module, prompt_ids[i:i + batch_size], max_new_tokens=gen_length,
                                         eos_token_id=self.stop_ids[0], **common,
                                         generator=torch.Generator(self.device).manual_seed(seed + i))
                res.tokens += r.tokens
                res.nfe, res.seconds, res.steps = res.nfe + r.nfe, res.seconds + r.seconds, res.steps + r.steps
        elif sampler == "llada2":
            from llada_scale.sampling.llada2 import generate_llada2

            if cache is not None or cfg_scale > 0 or repetition_penalty != 1.0:
                raise ValueError("the llada2 sampler always uses its exact KV cache and has no CFG or repetition "
                                 "penalty; drop cache/cfg_scale/repetition_penalty")
            block = block_length or self.block_length or 32
            res = generate_llada2(self.module, prompt_ids, mask_token_id=self.mask_token_id, gen_length=gen_length,
                                  block_length=block, steps=max(1, round(steps * block / gen_length)),
                                  threshold=0.95 if threshold is None else threshold, temperature=temperature,
                                  eos_token_id=self.stop_ids[0] if self.stop_ids else None, seed=seed,
                                  suppress_token_ids=self.suppress_token_ids, batch_size=batch_size,
                                  allow_extrapolation=allow_extrapolation)
        elif sampler == "block":
            if cache is not None or cfg_scale > 0:
                raise ValueError("the block sampler always uses its exact KV cache and has no CFG; drop cache/cfg_scale")
            block = block_length or self.block_length or min(32, gen_length)
            res = sampling.generate_blocks_batch(
                self.module, prompt_ids, mask_token_id=self.mask_token_id, gen_length=gen_length, block_length=block,
                steps_per_block=max(1, round(steps * block / gen_length)), batch_size=batch_size,
                seeds=[seed + i for i in range(len(prompt_ids))], callback=callback, **common)
        else:
            block = block_length or min(32, gen_length)
            res = sampling.GenerationResult([], 0, 0.0)
            for i in range(0, len(prompt_ids), batch_size):
                r = sampling.diffusion_generate(
                    self.module, prompt_ids[i:i + batch_size], mask_token_id=self.mask_token_id,
                    gen_length=gen_length, block_length=block, steps=steps,
                    remasking="random" if sampler == "random" else "low_confidence",
                    threshold=(0.9 if threshold is None else threshold) if sampler == "threshold" else None,
                    cfg_scale=cfg_scale, cache=cache,
                    generator=torch.Generator(self.device).manual_seed(seed + i), callback=callback, **common)
                res.tokens += r.tokens
                res.nfe, res.seconds, res.steps = res.nfe + r.nfe, res.seconds + r.seconds, res.steps + r.steps
        res.tokens = [sampling.truncate_at(t, self.stop_ids) for t in res.tokens]
        return res

    def _edit(self, prompt_ids, gen_length, block_length, temperature, cfg_scale, threshold, cache, repetition_penalty,
              seed, batch_size, allow_extrapolation, callback, editing_threshold: float | None = 0.5,
              max_post_steps: int = 16, preset: str | None = None, top_k: int | None = None,
              top_p: float | None = None, eos_early_stop: bool = False):
        """``sampler="edit"``: :func:`llada_scale.sampling.edit.edit_generate` (arguments as :meth:`generate`)."""
        from llada_scale.sampling.edit import edit_generate, preset as edit_preset

        if cache is not None or cfg_scale > 0 or repetition_penalty != 1.0:
            raise ValueError("the edit sampler uses its exact KV cache and has no CFG or repetition penalty; drop "
                             "cache / cfg_scale / repetition_penalty")
        knobs = dict(threshold=0.7 if threshold is None else threshold, editing_threshold=editing_threshold,
                     max_post_steps=max_post_steps)
        if preset is not None:
            knobs = edit_preset(preset)
        return edit_generate(self.module, prompt_ids, mask_token_id=self.mask_token_id, gen_length=gen_length,
                             block_length=block_length or self.block_length or min(32, gen_length), **knobs,
                             temperature=temperature, top_k=top_k, top_p=top_p, batch_size=batch_size,
                             seeds=[seed + i for i in range(len(prompt_ids))], eos_token_id=self.stop_ids[0],
                             eos_early_stop=eos_early_stop, suppress_token_ids=self.suppress_token_ids,
                             callback=callback, allow_extrapolation=allow_extrapolation)

    # ------------------------------------------------------------------ likelihood
    def log_likelihood(self, context: str, continuation: str, *, mc_samples: int = 128, batch_size: int = 32,
                       cfg_scale: float = 0.0, seed: int = 0, estimator: str | None = None) -> float:
        """log p(continuation | context) in nats.

        AR models: exact (chain rule). Diffusion models: a Monte Carlo estimate of the ELBO (a lower bound),
        LLaDA's estimator (``estimator="full"``) or, by default for block-diffusion checkpoints, the block NELBO
        they were trained with (``"block"``); see :func:`llada_scale.sampling.log_likelihood_batch`.

        Args:
            context, continuation: text; the split follows lm-evaluation-harness (:meth:`encode_pair`).
            mc_samples: Monte Carlo samples (diffusion; default 128, as LLaDA). batch_size: rows per forward.
            cfg_scale: classifier-free guidance (diffusion; default 0). seed: Monte Carlo seed (default 0).
            estimator: None = :attr:`estimator`; ``"full"`` or ``"block"`` for diffusion models.
        Raises:
            ValueError: an empty continuation, an unknown estimator, a text longer than the context, an argument
                of the wrong type or out of range, text that is not valid Unicode, a batch that cannot fit.
        """
        return self.log_likelihood_ids([self.encode_pair(context, continuation)], mc_samples=mc_samples,
                                       batch_size=batch_size, cfg_scale=cfg_scale, seed=seed, estimator=estimator)[0]

    @torch.no_grad()
    def log_likelihood_ids(self, pairs: list[tuple[list[int], list[int]]], *, mc_samples: int = 128,
                           batch_size: int = 32, cfg_scale: float = 0.0, seed: int = 0, estimator: str | None = None,
                           return_greedy: bool = False, allow_extrapolation: bool = False, progress: bool = False):
        """:meth:`log_likelihood` for token-id pairs; every pair draws its Monte Carlo noise from a seed made of
        ``seed`` and its own tokens, so its value does not depend on the other pairs or the batching.
        ``return_greedy`` (AR): ``(log p, is_greedy)`` tuples."""
        from llada_scale.sampling.common import check_prompts
        from llada_scale.sampling.likelihood import log_likelihood_batch

        validate.check_likelihood(mc_samples=mc_samples, batch_size=batch_size, cfg_scale=cfg_scale, seed=seed)
        if not isinstance(pairs, (list, tuple)) or not pairs or not all(isinstance(p, (list, tuple)) and len(p) == 2
                                                                       for p in pairs):
            raise ValueError("pairs must be a non-empty list of (context ids, continuation ids) pairs")
        for name, part in (("contexts", [p[0] for p in pairs]), ("continuations", [p[1] for p in pairs])):
            check_prompts(part, name)
        validate.check_fits(self.config, batch_size, max(len(c) + len(a) for c, a in pairs), self.device,
                            "log_likelihood")
        estimator = estimator or self.estimator
        if estimator not in (("ar",) if self.causal else ("full", "block")):
            raise ValueError(f"estimator {estimator!r} does not fit this {'AR' if self.causal else 'diffusion'} "
                             "model (AR: ar; diffusion: full or block)")
        block = (self.block_length or 32) if estimator == "block" else None
        seeds = [zlib.crc32(repr((seed, list(c), list(a))).encode()) for c, a in pairs]
        return log_likelihood_batch(self.module, pairs, causal=self.causal, mask_token_id=self.mask_token_id,
                                    mc_samples=mc_samples, batch_size=batch_size, pair_seeds=seeds,
                                    cfg_scale=cfg_scale, block_length=block, return_greedy=return_greedy,
                                    allow_extrapolation=allow_extrapolation, progress=progress)


def load(path: str, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None, *,
         tokenizer: str | None = None, progress: bool = False) -> Model:
    """Load a checkpoint and its tokenizer.

    Args:
        path: a DeepSpeed tag directory (any ZeRO stage; or its ``checkpoints``/run directory, through
            ``latest``), a consolidated directory or ``.safetensors`` file, or an exported Hugging Face directory.
        device: default ``"cuda"`` when available, else ``"cpu"``.
        dtype: ``"fp32"`` / ``"bf16"`` / a torch dtype; default bfloat16 on CUDA, float32 on CPU.
        tokenizer: tokenizer directory or file (default: the one the checkpoint names or carries).
        progress: show progress bars while merging ZeRO shards.
    Returns:
        a :class:`Model`.
    Raises:
        llada_scale.checkpoint.CheckpointError: a missing path, a file or directory of another format, weights
            that do not fit the recorded config or their SHA-256, no tokenizer found, a CUDA device without
            CUDA, a LoRA run (merge it first) or a directory in LLaDA's released format (import it first): one
            line each.
    """
    from llada_scale.checkpoint import CheckpointError, build_model_from_checkpoint, tokenizer_path_from_meta
    from llada_scale.data.tokenizer import Tokenizer

    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"device {device!r} is not a device ({e}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {device} requested but CUDA is not available here; pass device='cpu'")
    _refuse_unloadable(os.fspath(path))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    module = build_model_from_checkpoint(os.fspath(path), dtype=dtype, device=str(device), progress=progress)
    meta = module.checkpoint_meta
    src = tokenizer or tokenizer_path_from_meta(meta)
    if not src:
        raise CheckpointError(f"{meta['path']} names no tokenizer that exists here; pass tokenizer=PATH")
    try:
        return Model(module, Tokenizer.load(src), meta)
    except (ValueError, FileNotFoundError) as e:
        raise CheckpointError(f"{meta['path']}: {e}") from None


def _refuse_unloadable(path: str) -> None:
    """Say what to run first for a checkpoint :func:`load` cannot read as it is: a LoRA run's checkpoint holds
    only the adapters (``merge-lora``), a directory in LLaDA's released format needs ``import-llada``.

    Raises:
        CheckpointError: one line with the command to run.
    """
    import json

    from llada_scale.checkpoint import CheckpointError, resolve_checkpoint
    from llada_scale.checkpoint.files import META_FILE

    cli = "python tools/convert_checkpoint.py"
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        try:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError):
            cfg = {}
        if isinstance(cfg, dict) and (cfg.get("model_type") == "llada" or "LLaDAModelLM" in cfg.get("architectures",
                                                                                                   [])):
            raise CheckpointError(f"{path} is in LLaDA's released format; convert it first: {cli} import-llada "
                                  f"{path} OUT_DIR, then load OUT_DIR")
    try:
        kind, resolved = resolve_checkpoint(path)
    except CheckpointError:
        return  # load() reports it
    meta_path = os.path.join(resolved, META_FILE)
    if kind != "deepspeed" or not os.path.isfile(meta_path):
        return
    try:
        with open(meta_path, encoding="utf-8") as f:
            lora = ((json.load(f).get("config") or {}).get("train") or {}).get("lora") or {}
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(lora, dict) and lora.get("rank"):
        raise CheckpointError(f"{resolved} is a LoRA run's checkpoint (adapters only); merge it into its base "
                              f"first: {cli} merge-lora {path} OUT_DIR, then load OUT_DIR")
