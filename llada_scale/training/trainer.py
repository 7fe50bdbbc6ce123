"""The training loop: AR pretraining, LLaDA diffusion continual pretraining and SFT on a DeepSpeed engine.

:class:`Trainer` owns the engine, the loaders, the noise RNG and the loop (train step, validation, samples,
logging, checkpoints). It knows the model only through ``build_model(cfg)`` (:mod:`llada_scale.model.registry`)
and the objective's ``compute_loss``; resuming lives in :mod:`llada_scale.training.resume`, the loss guards in
:mod:`llada_scale.training.guards`, the entry point in :mod:`llada_scale.train`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from llada_scale.checkpoint import checkpointer
from llada_scale.model.registry import build_model, is_moe
from llada_scale.objectives.config import is_diffusion
from llada_scale.objectives.editing import replacement_vocab, tokenizer_special_ids
from llada_scale.objectives.losses import check_objective_data, compute_loss, model_input_length
from llada_scale.training import expert_parallel, preflight, resume, runlock, sequence_parallel, signals, zero_init
from llada_scale.training.moe_balance import MoEBalancer
from llada_scale.training.config import RunConfig
from llada_scale.training.engine import (TrainError, build_ds_config, check_init_config, checkpoint_model_config,
                                         fit_init_source, load_init_weights, param_groups)
from llada_scale.training.lora import apply_lora
from llada_scale.training.lora import base_identity as lora_base_identity, check_base as check_lora_base
from llada_scale.training.guards import DivergedError, LossGuard
from llada_scale.training.metrics import (FlopCounter, Logger, block_diffusion_attention_density, device_peak_flops,
                                          t_bucket_metrics, throughput)
from llada_scale.training.parallelize import parallelize
from llada_scale.training.samples import generate_samples
from llada_scale.training.schedule import lr_multiplier

log = logging.getLogger("llada_scale")


# ----------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Owns the DeepSpeed engine, the loaders, the noise RNG and the loop. Construct on every rank."""

    _signal_received = 0  # set by the signal handler on this rank only; agreed on in train_step
    _stop_signal = 0  # the signal all ranks agreed to stop on (from the all-reduced flags)

    def __init__(self, cfg: RunConfig, ds_config_path: str | None, loader_factory=None):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        from llada_scale.data.tokenizer import Tokenizer

        self.cfg = cfg
        self.rank, self.local_rank, self.world_size = dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), \
            dist.get_world_size()
        self.device = torch.device(get_accelerator().current_device_name())
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.run_lock = runlock.hold(self.run_dir, self.rank)  # one trainer per run_dir (rank 0 creates it)

        self.tokenizer = Tokenizer.load(cfg.tokenizer)
        if loader_factory is None:  # before the weights load: both splits, tokenizer, shard kind (index files only)
            preflight.check_data(cfg, self.tokenizer)
        self.diffusion = is_diffusion(cfg.objective, cfg.model.causal)
        self.edit_vocab = None  # T2T editing with random replacements: the non-special tokenizer ids
        if cfg.objective.edit_prob > 0 and cfg.objective.edit_source == "random":
            self.edit_vocab = replacement_vocab(self.tokenizer.vocab_size, tokenizer_special_ids(self.tokenizer),
                                                self.device)
        self.sp = sequence_parallel.setup(cfg, self.rank, self.world_size)  # SP 1: dp_rank/size = rank/world
        expert_parallel.check(cfg, self.world_size)

        resume_dir = resume.choose_resume_dir(cfg.train, self.ckpt_dir, self.rank)
        if resume_dir is not None:
            sequence_parallel.check_resume(checkpointer.read_meta(resume_dir), self.sp, self.world_size, resume_dir)
            expert_parallel.check_resume(checkpointer.read_meta(resume_dir), cfg.train.expert_parallel_size,
                                         resume_dir)
        lora = cfg.train.lora.enabled  # LoRA checkpoints hold only the adapters: the base comes from init_from
        source = checkpointer.read_meta(resume_dir).get("config", {}).get("model") if resume_dir else \
            checkpoint_model_config(cfg.train.init_from) if cfg.train.init_from else None
        fit_init_source(cfg.model, self.tokenizer, source, str(resume_dir or cfg.train.init_from))
        ds_cfg = build_ds_config(ds_config_path, cfg, self.sp.dp_size, self.device)
        self.grad_accum = ds_cfg["gradient_accumulation_steps"]
        self.zero_stage = ds_cfg.get("zero_optimization", {}).get("stage", 0)
        init_from = cfg.train.init_from and (resume_dir is None or lora)
        # ZeRO-3: no full model per rank (dense or MoE backbone, any SP; see zero_init.enabled)
        partitioned = zero_init.enabled(self.zero_stage, cfg.train)
        if partitioned:
            model = zero_init.build_partitioned(cfg.model, ds_cfg, cfg.seed, random_init=not (init_from or resume_dir),
                                                mpu=self.sp.mpu)
        else:
            torch.manual_seed(cfg.seed)
            model = build_model(cfg.model)  # the dense Transformer or, for model_type llada2_moe, the MoE backbone
        if init_from:
            (zero_init.load_init_weights_partitioned if partitioned else load_init_weights)(model, cfg.train.init_from)
            check_init_config(cfg.model, source, cfg.train.init_from)
        elif lora:
            raise TrainError("train.lora needs train.init_from (the frozen base weights)")
        self.lora_base = lora_base_identity(model, cfg.train.init_from) if lora else None
        if lora and resume_dir is not None:  # the adapters only fit the base they were trained on
            try:
                check_lora_base(checkpointer.read_meta(resume_dir).get("lora_base"), self.lora_base, str(resume_dir))
            except ValueError as e:
                raise TrainError(f"{e} (train.init_from)") from None
        if lora:
            model = apply_lora(model, cfg.train.lora)
        self.num_params = sum(zero_init.numel(p) for p in model.parameters())
        m = cfg.model
        embed = zero_init.numel(model.model.embed_tokens.weight)
        # FLOPs count the parameters a token is multiplied by: for a MoE model its active ones (top-k + shared)
        flop_params = m.active_params_per_token() + embed if is_moe(m) else self.num_params
        self.flops = FlopCounter(flop_params, embed, zero_init.numel(model.output_weight()), m.num_layers,
                                 m.num_heads * m.head_dim, m.tie_embeddings)

        self.sp.grad_scale = sequence_parallel.grad_scale(ds_cfg, self.sp)
        self.parallelized = parallelize(model, sequence_parallel.train_config(cfg.train), self.device,
                                        self.zero_stage)
        sequence_parallel.install(model, self.sp)
        # world size changed: a universal checkpoint to load instead
        universal_dir = resume.prepare_world_size_change(resume_dir, ds_cfg, self.rank, self.world_size)
        o = cfg.optim
        lr_fn = lambda step: lr_multiplier(step, schedule=o.schedule, max_steps=cfg.train.max_steps,  # noqa: E731
                                           warmup_steps=o.warmup_steps, min_lr_ratio=o.min_lr_ratio,
                                           decay_fraction=o.decay_fraction)
        groups = param_groups(model, o.weight_decay)
        make_optimizer = None if "optimizer" in ds_cfg else (  # None: DeepSpeed builds the JSON's from the groups
            lambda params: torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps,
                                             fused=self.device.type == "cuda"))
        if cfg.train.expert_parallel_size > 1:  # DeepSpeed AutoEP swaps the MoE blocks inside deepspeed.initialize
            expert_parallel.prepare(model)
            optimizer, params = expert_parallel.moe_optimizer(make_optimizer), groups
        else:
            optimizer, params = (make_optimizer(groups), None) if make_optimizer else (None, groups)
        self.engine, _, _, self.lr_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_cfg, model_parameters=params,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_fn), mpu=self.sp.mpu)
        self.loss_model = sequence_parallel.model_for_loss(self.engine, self.sp, cfg.model)
        moe_cfg = getattr(cfg.model, "moe", None)
        self.balancer = MoEBalancer(self.engine.module, moe_cfg, expert_parallel.attach(self.engine.module, moe_cfg)
                                    if cfg.train.expert_parallel_size > 1 else None)

        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed * 1000 + self.sp.dp_rank)
        self.loader = loader_factory() if loader_factory else self._build_loader("train")
        self.step = 0
        self.source_tokens = [0.0] * (0 if isinstance(cfg.data.train_shards, str) else len(cfg.data.train_shards))
        self.guard = LossGuard(cfg.train, self.rank)
        self._grad_norm = None
        if resume_dir is not None:
            client = resume.restore(self.engine, self.loader, self.generator, resume_dir, universal_dir,
                                    model_cfg=cfg.model, seed=cfg.seed, rank=self.rank, world_size=self.world_size,
                                    strict=not lora)
            self.step = client["step"]
            self.source_tokens = client.get("source_tokens", self.source_tokens)
            self.guard.load_state_dict(client)
        self.peak_flops, self.peak_source = device_peak_flops(cfg.train.peak_flops, self.device)
        self.logger = Logger(cfg, self.rank)
        self.guard.logger = self.logger

    # -- data
    def _build_loader(self, split: str, rank: int | None = None, world_size: int | None = None):
        from llada_scale.data.loader import PackedDataset, build_dataloader
        from llada_scale.data.mixture import MixtureDataset

        d = self.cfg.data
        shard_dir = d.train_shards if split == "train" else d.val_shards  # set: preflight.check_data
        kind = PackedDataset if isinstance(shard_dir, str) else MixtureDataset  # a list of weighted sources
        ds = kind(shard_dir, split, d.seq_len, self.cfg.train.micro_batch_size,
                  rank=self.sp.dp_rank if rank is None else rank,
                  world_size=self.sp.dp_size if world_size is None else world_size,
                  seed=self.cfg.seed, eos_token_id=self.tokenizer.eos_token_id,
                  num_workers=d.num_workers if split == "train" else 0, vocab_size=self.cfg.model.vocab_size)
        return build_dataloader(ds, d.num_workers if split == "train" else 0)

    def _next_batch(self, it):
        batch = next(it)
        check_objective_data(self.cfg.objective, batch["prompt_mask"])  # on the host batch: no device sync
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # -- checkpoints
    def _meta(self) -> dict:
        return {"config": self.cfg.to_dict(), "tokenizer": self.tokenizer.identity(), "zero_stage": self.zero_stage,
                "world_size": self.world_size, "num_params": self.num_params,
                **({"lora_base": self.lora_base} if self.lora_base else {})}

    def save(self):
        """Collective: save engine, loader and RNG states of every rank at the current step."""
        loader_states = [None] * self.world_size
        rng_states = [None] * self.world_size
        dist.all_gather_object(loader_states, self.loader.state_dict())
        dist.all_gather_object(rng_states, self.generator.get_state().cpu())
        client = {"step": self.step, "loader": loader_states, "rng": rng_states, **self.guard.state_dict(),
                  "source_tokens": self.source_tokens,
                  "world_size": self.world_size, "config": self.cfg.to_dict(),
                  "tokenizer": self.tokenizer.identity()}  # config/tokenizer also in llada_scale.json
        path = checkpointer.save(self.engine, self.ckpt_dir, self.step, client, self._meta(), self.cfg.train.keep_last,
                                 exclude_frozen=self.cfg.train.lora.enabled)
        if self.rank == 0:
            log.info(f"saved checkpoint {path}")
        return path

    # -- signals (SLURM preemption / time limit)
    def install_signal_handlers(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        """On any of ``signals`` the run saves a checkpoint at the next step boundary that all ranks agree on.

        The handler only records the signal on this rank (``_signal_received``). Every micro step
        all-reduces (MAX) it with the other flags, so the stop decision (``_stop_signal``) is the same on
        every rank at the same micro step -- a rank that receives the signal a moment later than another
        cannot make the ranks diverge. Under :func:`main` the signals are blocked and taken by a sigwait
        thread (see :func:`watch_stop_signals`, which also covers start-up); these handlers then only
        matter for a signal directed at a thread that still has them unblocked.
        """

        def handler(signum, frame):
            self._signal_received = signum

        for s in signals:
            signal.signal(s, handler)

    # -- loop
    def train_step(self, it) -> dict:
        """One optimizer step over ``grad_accum`` micro batches; returns local stats (summed device tensors).

        Host synchronisation: one per micro batch, reading the flags all-reduce below (every rank must agree
        on skipping *before* the backward: ZeRO reduces gradients inside each backward, so a micro batch
        cannot be taken back afterwards), plus the model's selection of the loss positions, plus at ZeRO-0 the
        gradient norm at the accumulation boundary (a non-finite update is skipped on the host's decision, as
        DeepSpeed's ZeRO optimizers skip theirs); the stats stay on the device until :meth:`_log_step`.
        """
        self.engine.train()
        totals: dict[str, torch.Tensor] = {}
        micro = 0
        seq_len = model_input_length(self.cfg.objective, self.cfg.model.causal, self.cfg.data.seq_len, self.step)
        while micro < self.grad_accum:
            batch = self._next_batch(it)
            loss, stats = compute_loss(self.loss_model, batch, self.cfg.objective, self.cfg.model.causal,
                                       self.cfg.model.mask_token_id, self.generator, step=self.step, check_data=False,
                                       edit_vocab=self.edit_vocab)
            loss = self.balancer.aux_loss(loss)  # MoE sequence-wise balance loss (model.moe.aux_loss_coef)
            # one MAX all-reduce: [non-finite anywhere, stop signal anywhere, largest finite loss], built on
            # the device and read back once
            finite = torch.isfinite(loss.detach())
            signal_seen = float(max(self._signal_received, signals.signal_seen))
            flags = torch.stack([(~finite).double(), torch.full((), signal_seen, device=self.device,
                                 dtype=torch.float64), torch.where(finite, loss.detach().double(), 0.0)])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            nonfinite, stop_signal, max_loss = flags.tolist()
            if stop_signal > 0:
                self._stop_signal = int(stop_signal)
            if self.guard.skip(self.step, nonfinite=nonfinite > 0, loss=max_loss):
                continue  # non-finite on some rank, or a spike: every rank drops this micro batch
            boundary = self.engine.is_gradient_accumulation_boundary()
            self.engine.backward(loss * self.sp.grad_scale)  # 1 unless SP at ZeRO-3 (sequence_parallel.grad_scale)
            skip_update = False
            if self.zero_stage == 0 and boundary:
                # DeepSpeed records the global grad norm only in its ZeRO/bf16 optimizers.
                grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
                self._grad_norm = torch.nn.utils.get_total_norm(grads)
                skip_update = self.guard.skip_nonfinite_update(self.engine, float(self._grad_norm))  # ZeRO-0: 1 read
            skipped_steps = self.engine.skipped_steps
            self.engine.step()
            if boundary:  # DeepSpeed's ZeRO/bf16 optimizers skip non-finite gradients and count them
                self.guard.step_done(self.step, skip_update or self.engine.skipped_steps > skipped_steps)
            micro += 1
            for k, v in stats.items():
                totals[k] = totals.get(k, 0) + v.detach().float()
            # order-insensitive fingerprint of the data seen (resume tests compare it step by step)
            totals["data_checksum"] = totals.get("data_checksum", 0) + batch["input_ids"].sum().float()
            if "source" in batch:  # a data mixture: tokens fed per source (rows x seq_len)
                per_source = torch.bincount(batch["source"], minlength=len(self.cfg.data.train_shards))
                tokens = per_source.double() * batch["input_ids"].shape[1]
                totals["source_tokens"] = totals.get("source_tokens", 0) + tokens
        totals.update(self.balancer.after_step(self.device))  # MoE expert-bias update + load statistics
        totals["flops"] = self.flops(totals["model_tokens"], seq_len, totals["head_tokens"])  # seq_len fixed per step
        if "block_length" in totals:  # block diffusion: also the FLOPs of the scores its mask keeps
            block = self.cfg.objective.block_length_at(self.step)
            density = block_diffusion_attention_density(self.cfg.data.seq_len, block) \
                if block < self.cfg.data.seq_len else 1.0
            totals["flops_executed"] = self.flops(totals["model_tokens"], seq_len, totals["head_tokens"], density)
        self.step += 1
        return self.sp.scale_stats(totals)

    @torch.no_grad()
    def validate(self) -> dict:
        """Mean validation loss over ``val_batches`` batches per rank, noise fixed across validations."""
        self.engine.eval()
        loader = self._build_loader("val", rank=0, world_size=1)
        it = iter(loader)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 999_983)
        total = torch.zeros(2, device=self.device)
        for i in range(self.cfg.train.val_batches * self.sp.dp_size):  # SP: a group's ranks share each batch
            batch = self._next_batch(it)
            if i % self.sp.dp_size != self.sp.dp_rank:
                continue
            loss, _ = compute_loss(self.loss_model, batch, self.cfg.objective, self.cfg.model.causal,
                                   self.cfg.model.mask_token_id, gen, step=self.step, check_data=False,
                                   edit_vocab=self.edit_vocab)
            total += torch.stack([loss.detach().float(), torch.ones((), device=self.device)])
        dist.all_reduce(total)
        return {"val/loss": (total[0] / total[1]).item()}

    def _log_step(self, window: dict, seconds: float, step_time: float):
        """Log the summed stats of the steps since the last log (one all-reduce, one host read).

        ``seconds``: time spent in those steps' :meth:`train_step` (validation, samples and checkpoints excluded).
        """
        t = self.cfg.train
        keys = sorted(window)
        flat = torch.cat([window[k].reshape(-1).float() for k in keys])
        dist.all_reduce(flat)
        flat, sums, off = flat.tolist(), {}, 0
        for k in keys:
            n = window[k].numel()
            sums[k] = flat[off:off + n] if n > 1 else flat[off]
            off += n
        loss = sums["loss_sum"] / sums["loss_count"]
        speed = throughput(sums["tokens"], sums["flops"], seconds, self.world_size, self.peak_flops)
        lr = self.lr_scheduler.get_last_lr()[0]
        gnorm = self.engine.get_global_grad_norm() if self.zero_stage > 0 else self._grad_norm
        gnorm = float(gnorm) if gnorm is not None else float("nan")
        metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": gnorm,
                   "perf/tokens_per_s": speed["tokens_per_s"], "perf/tokens_per_s_per_device":
                   speed["tokens_per_s_per_device"], "perf/mfu": speed["mfu"], "perf/step_time_s": step_time,
                   "train/skipped_batches": self.guard.skipped, "train/skipped_steps": self.guard.skipped_steps,
                   "data/checksum": sums["data_checksum"]}
        if "source_tokens" in sums:  # cumulative tokens per mixture source (kept in checkpoints)
            window = sums["source_tokens"] if isinstance(sums["source_tokens"], list) else [sums["source_tokens"]]
            self.source_tokens = [a + b for a, b in zip(self.source_tokens, window)]
            metrics.update({f"data/tokens/{s['name']}": v
                            for s, v in zip(self.cfg.data.train_shards, self.source_tokens)})
        mfu = "-" if speed["mfu"] is None else f"{100 * speed['mfu']:.1f}%"
        if "flops_executed" in sums:  # block diffusion: MFU of the attention scores the mask keeps (PaLM: all)
            executed = throughput(sums["tokens"], sums["flops_executed"], seconds, self.world_size, self.peak_flops)
            metrics["perf/mfu_executed"] = executed["mfu"]
            if executed["mfu"] is not None:
                mfu += f" (executed {100 * executed['mfu']:.1f}%)"
        line = (f"step {self.step:>6}/{t.max_steps} | loss {loss:.4f} | lr {lr:.2e} | gnorm {gnorm:.3f} | "
                f"tok/s {speed['tokens_per_s']:,.0f} | tok/s/dev {speed['tokens_per_s_per_device']:,.0f} | mfu {mfu}")
        if "t_bucket_ce_sum" in sums:
            bucket_metrics, bucket_line = t_bucket_metrics(sums["t_bucket_ce_sum"], sums["t_bucket_count"])
            metrics.update(bucket_metrics)
            line += " | ce by t " + bucket_line
        for part in ("m2t", "t2t", "keep", "cap"):  # T2T editing / CAP: the loss split into its terms
            if f"{part}_loss_sum" in sums and ("t2t_loss_sum" in sums or "cap_loss_sum" in sums):
                metrics[f"train/loss_{part}"] = sums[f"{part}_loss_sum"] / sums["loss_count"]
                line += f" | {part} {metrics[f'train/loss_{part}']:.4f}"
        if "source_tokens" in sums:
            line += " | tokens " + " ".join(f"{s['name']} {v / 1e6:.2f}M" for s, v in
                                            zip(self.cfg.data.train_shards, self.source_tokens))
        if "block_length" in sums:
            metrics["train/block_length"] = sums["block_length"] / sums["loss_count"]
            line += f" | block {metrics['train/block_length']:.0f}"
        moe_metrics, moe_line = self.balancer.metrics(sums)
        metrics.update(moe_metrics)
        self.logger.log(self.step, metrics, line + moe_line)

    def fit(self) -> dict:
        """Run until ``train.max_steps`` (or a stop signal); returns the last logged metrics dict."""
        t = self.cfg.train
        if self.rank == 0:
            log.info(f"model {self.num_params / 1e6:.2f}M params | world {self.world_size} | ZeRO-{self.zero_stage} | "
                     f"micro {t.micro_batch_size} x accum {self.grad_accum} x data parallel {self.sp.dp_size} = global "
                     f"{t.global_batch_size} "
                     f"seqs of {self.cfg.data.seq_len} | bf16 {self.engine.bfloat16_enabled()} | "
                     f"objective {self.cfg.objective.name} ({'diffusion' if self.diffusion else 'AR'}) | "
                     f"{self.flops.per_token(self.cfg.data.seq_len) / 1e6:.1f} MFLOP/token | "
                     f"activation checkpointing {self.cfg.train.activation_checkpointing} "
                     f"({len(self.parallelized['activation_checkpointing'])} layers) | "
                     f"compile {self.parallelized['compile']}")
            log.info(f"MFU peak: {self.peak_source}")
        it = iter(self.loader)
        window: dict = {}
        window_time = 0.0
        last = {}
        while self.step < t.max_steps:
            t0 = time.perf_counter()
            try:
                stats = self.train_step(it)
            except DivergedError as e:  # every rank raises it at the same micro step
                if window:
                    self._log_step(window, window_time, time.perf_counter() - t0)
                path = self.save()
                raise DivergedError(f"{e}. Saved the last good state (the skipped steps did not change the "
                                    f"weights) as {path}") from None
            for k, v in stats.items():
                window[k] = window.get(k, 0) + v
            step_time = time.perf_counter() - t0
            window_time += step_time
            validating = bool(t.val_every) and (self.step % t.val_every == 0 or self.step == t.max_steps)
            # a step the run may stop at: log the steps since the last line (log_every would hide them)
            stopping = bool(self._stop_signal) or self.step == t.stop_at_step or \
                (validating and t.early_stop_patience > 0)
            saving = bool(t.save_every) and self.step % t.save_every == 0  # the checkpoint holds what is logged
            if self.step % t.log_every == 0 or self.step == t.max_steps or stopping or saving:
                self._log_step(window, window_time, step_time)
                window, window_time = {}, 0.0
            early_stop = None
            if validating:
                last = self.validate()
                # generation changes lengths: no recompiles; under SP each rank generates on its own
                with torch.compiler.set_stance("force_eager"), self.sp.disabled():
                    samples = generate_samples(self.engine.module, self.cfg, self.tokenizer, self.step)
                self.logger.log(self.step, last, f"step {self.step:>6} | val loss {last['val/loss']:.4f}")
                for s in samples:
                    self.logger.log(self.step, {}, f"  sample: {s}")
                early_stop = self.guard.validated(self.step, last["val/loss"])
            if early_stop:
                self.logger.log(self.step, {"train/early_stopped": self.step}, early_stop)
                self.save()
                return {**last, "early_stopped": self.step}
            if self._stop_signal:
                if self.rank == 0:
                    log.info(f"signal {self._stop_signal} received: checkpointing at step {self.step} and stopping "
                             f"({signals.describe(self._stop_signal)})")
                self.save()
                return {**last, "preempted": True, "signal": self._stop_signal}
            if (t.save_every and self.step % t.save_every == 0) or self.step == t.max_steps \
                    or self.step == t.stop_at_step:
                self.save()
            if self.step == t.stop_at_step:
                return {**last, "stopped_at": self.step}
        return last

    def close(self):
        """End the run cleanly: loader workers, logger, engine, then the stop-signal thread (so that a hung
        teardown can still be killed with SIGTERM). Without the explicit worker shutdown a run with
        ``data.num_workers >= 1`` never exits (see :func:`llada_scale.training.signals.close_loader`)."""
        signals.close_loader(self.loader)
        self.logger.close()
        self.engine.destroy()
        signals.stop_watching()
        if self.run_lock is not None:
            self.run_lock.release()
