"""Train a model (AR pretraining, LLaDA diffusion continual pretraining, SFT) with DeepSpeed ZeRO.

Launch with any of::

    deepspeed --num_gpus 2 llada_scale/train.py --deepspeed_config ds_configs/zero2.json --config configs/X.yaml [key=value ...]
    torchrun --nproc_per_node 2 -m llada_scale.train --deepspeed_config ds_configs/zero2.json --config configs/X.yaml
    python -m llada_scale.train --config configs/X.yaml          # one process

The trainer knows the model only through ``Transformer(cfg)`` and the objective's ``compute_loss``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist

from llada_scale import checkpointer
from llada_scale.config import ConfigError, RunConfig, load_config
from llada_scale import signals
from llada_scale.engine import TrainError, build_ds_config, init_distributed, load_init_weights, param_groups  # noqa: F401
from llada_scale.metrics import Logger, SpeedMonitor, device_peak_flops, flops_per_token
from llada_scale.model import Transformer
from llada_scale.signals import PREEMPTED_EXIT, watch_stop_signals  # noqa: F401
from llada_scale.objectives import NUM_T_BUCKETS, compute_loss, is_diffusion
from llada_scale.schedule import lr_multiplier

log = logging.getLogger("llada_scale")


# ----------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Owns the DeepSpeed engine, the loaders, the noise RNG and the loop. Construct on every rank."""

    _signal_received = 0  # set by the signal handler on this rank only; agreed on in train_step
    _stop_signal = 0  # the signal all ranks agreed to stop on (from the all-reduced flags)
    _loss_ema: float | None = None  # running mean of the (max over ranks) micro-batch loss, for spikes
    _spike_run = 0  # consecutive micro batches skipped as spikes
    _universal_dir: Path | None = None  # universal copy of the resume checkpoint (world size changed)

    def __init__(self, cfg: RunConfig, ds_config_path: str | None, loader_factory=None):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        from llada_scale.tokenizer import Tokenizer

        self.cfg = cfg
        self.rank, self.local_rank, self.world_size = dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), \
            dist.get_world_size()
        self.device = torch.device(get_accelerator().current_device_name())
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)

        self.tokenizer = Tokenizer.load(cfg.tokenizer)
        cfg.model.vocab_size = self.tokenizer.padded_vocab_size()
        cfg.model.mask_token_id = self.tokenizer.mask_token_id
        self.diffusion = is_diffusion(cfg.objective, cfg.model.causal)

        resume_dir = self._resume_dir()
        torch.manual_seed(cfg.seed)
        model = Transformer(cfg.model)
        self.init_meta = None
        if cfg.train.init_from and resume_dir is None:
            self.init_meta = load_init_weights(model, cfg.train.init_from)
        n_flop_params = model.num_params(exclude_embeddings=True)
        self.num_params = model.num_params()

        ds_cfg = build_ds_config(ds_config_path, cfg, self.world_size, self.device)
        self.grad_accum = ds_cfg["gradient_accumulation_steps"]
        self.zero_stage = ds_cfg.get("zero_optimization", {}).get("stage", 0)
        resume_dir = self._prepare_resume(resume_dir, ds_cfg)  # world size changed: universal checkpoint
        o = cfg.optim
        lr_fn = lambda step: lr_multiplier(step, schedule=o.schedule, max_steps=cfg.train.max_steps,  # noqa: E731
                                           warmup_steps=o.warmup_steps, min_lr_ratio=o.min_lr_ratio,
                                           decay_fraction=o.decay_fraction)
        optimizer = None
        if "optimizer" not in ds_cfg:
            optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps,
                                          fused=self.device.type == "cuda")
        self.engine, _, _, self.lr_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_cfg,
            model_parameters=param_groups(model, o.weight_decay) if optimizer is None else None,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_fn))

        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed * 1000 + self.rank)
        self.loader = loader_factory() if loader_factory else self._build_loader("train")
        if loader_factory is None:  # once per run, not at every validation
            d = cfg.data
            for shard_dir in {d.train_shards, d.val_shards if cfg.train.val_every else d.train_shards}:
                self._check_tokenizer(shard_dir)
        self.step = 0
        self.skipped_batches = 0
        self._grad_norm = None
        if resume_dir is not None:
            self._load(resume_dir)
        self.speed = SpeedMonitor(flops_per_token(n_flop_params, cfg.model.num_layers, cfg.model.hidden_size,
                                                  cfg.data.seq_len),
                                  self.world_size, device_peak_flops(cfg.train.peak_flops, self.device))
        self.logger = Logger(cfg, self.rank)

    # -- data
    def _build_loader(self, split: str, rank: int | None = None, world_size: int | None = None):
        from llada_scale.data.loader import PackedDataset, build_dataloader

        d = self.cfg.data
        shard_dir = d.train_shards if split == "train" else d.val_shards
        if not shard_dir:
            raise TrainError("data.train_shards is not set; build shards with tools/build_shards.py first")
        ds = PackedDataset(shard_dir, split, d.seq_len, self.cfg.train.micro_batch_size,
                           rank=self.rank if rank is None else rank,
                           world_size=self.world_size if world_size is None else world_size,
                           seed=self.cfg.seed, eos_token_id=self.tokenizer.eos_token_id,
                           num_workers=d.num_workers if split == "train" else 0)
        return build_dataloader(ds, d.num_workers if split == "train" else 0)

    def _check_tokenizer(self, shard_dir: str):
        from llada_scale.data.shards import load_index

        ident = load_index(shard_dir).get("tokenizer", {})
        mine = self.tokenizer.identity()
        if ident.get("sha256") and ident.get("sha256") != mine.get("sha256"):
            raise TrainError(f"shards in {shard_dir} were built with another tokenizer ({ident.get('path')}) than "
                             f"the recipe's {self.cfg.tokenizer}; rebuild the shards or fix `tokenizer:`")

    def _next_batch(self, it):
        batch = next(it)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # -- checkpoints
    def _resume_dir(self) -> Path | None:
        mode = self.cfg.train.resume
        if mode in ("none", "", None):
            return None
        if mode == "auto":
            return checkpointer.find_latest(self.ckpt_dir)
        try:
            return checkpointer.resolve(mode)
        except checkpointer.CheckpointError as e:
            raise TrainError(f"train.resume: {e}") from None

    def _meta(self) -> dict:
        return {"config": self.cfg.to_dict(), "tokenizer": self.tokenizer.identity(), "zero_stage": self.zero_stage,
                "world_size": self.world_size, "num_params": self.num_params}

    def save(self):
        """Collective: save engine, loader and RNG states of every rank at the current step."""
        loader_states = [None] * self.world_size
        rng_states = [None] * self.world_size
        dist.all_gather_object(loader_states, self.loader.state_dict())
        dist.all_gather_object(rng_states, self.generator.get_state().cpu())
        client = {"step": self.step, "loader": loader_states, "rng": rng_states, "skipped": self.skipped_batches,
                  "loss_ema": self._loss_ema, "world_size": self.world_size, "config": self.cfg.to_dict(),
                  "tokenizer": self.tokenizer.identity()}  # config/tokenizer also in llada_scale.json
        path = checkpointer.save(self.engine, self.ckpt_dir, self.step, client, self._meta(), self.cfg.train.keep_last)
        if self.rank == 0:
            log.info(f"saved checkpoint {path}")

    def _load(self, tag_dir: Path):
        meta = checkpointer.read_meta(tag_dir)
        saved = meta.get("config", {}).get("model", {})
        mine = self.cfg.model.to_dict()
        diff = {k: (saved.get(k), v) for k, v in mine.items() if k in saved and saved[k] != v and k != "attention_backend"}
        if diff:
            raise TrainError(f"checkpoint {tag_dir} is of another model (checkpoint vs recipe: {diff}); "
                             "resume with the recipe it was trained with, or use train.init_from")
        src = self._universal_dir or tag_dir
        load_path, client = self.engine.load_checkpoint(str(src.parent), tag=src.name)
        if load_path is None:
            raise TrainError(f"DeepSpeed could not load {src}")
        self.step = client["step"]
        self.skipped_batches = client.get("skipped", 0)
        self._loss_ema = client.get("loss_ema")
        old_world = len(client["rng"])
        resharded = self._load_loader_state(client["loader"])
        if self.rank < old_world:
            state = client["rng"][self.rank]
            self.generator.set_state(state.to(self.generator.device) if self.device.type != "cuda" else state)
        else:  # a rank the old run did not have: its own noise stream, distinct per rank and resume step
            self.generator.manual_seed(self.cfg.seed * 1000 + self.rank + 1_000_003 * self.step)
        if self._universal_dir is not None:
            dist.barrier()  # every rank has read it: the converted copy is no longer needed
            if self.rank == 0:
                shutil.rmtree(self._universal_dir, ignore_errors=True)
                (self._universal_dir.parent / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's
                try:
                    self._universal_dir.parent.rmdir()  # checkpoints/universal, when now empty
                except OSError:
                    pass
        if self.rank == 0:
            how = f" (written by {old_world} ranks, now {self.world_size}: " \
                  f"{'universal checkpoint, ' if self._universal_dir else ''}" \
                  f"{'loader resharded' if resharded else 'loader state as saved'})" if old_world != self.world_size \
                else ""
            log.info(f"resumed from {tag_dir} at step {self.step}{how}")

    def _load_loader_state(self, saved: list) -> bool:
        """Restore this rank's loader position; under another layout, reshard it (returns True then).

        ``saved`` is the list over the old run's ranks of ``StatefulDataLoader.state_dict()``. Same layout
        (world size, loader workers, micro batch, seq_len): exact resume. Otherwise every rank derives its
        position from all old positions with :meth:`PackedDataset.load_resharded` (no document repeated or
        skipped mid-shard; see its docstring for the exact guarantee).
        """
        from llada_scale.data.loader import LoaderStateError, PackedDataset, loader_dataset_states

        dataset = getattr(self.loader, "dataset", None)
        old = [s for st in saved for s in loader_dataset_states(st)]
        same = len(saved) == self.world_size and all(dataset.same_layout(s) for s in old) \
            if isinstance(dataset, PackedDataset) else True
        try:
            if same:
                self.loader.load_state_dict(saved[self.rank])
                return False
            dataset.load_resharded(old)
        except LoaderStateError as e:
            raise TrainError(f"cannot resume the data loader: {e}") from None
        return True

    def _prepare_resume(self, tag_dir: Path | None, ds_cfg: dict) -> Path | None:
        """Before ``deepspeed.initialize``: make a checkpoint written by another world size loadable.

        ZeRO stages 1-3 shard the optimizer state by rank, so rank 0 converts the checkpoint once into a
        universal checkpoint (``deepspeed.checkpoint.ds_to_universal --inject_missing_state``) under
        ``checkpoints/universal/<tag>`` (written to ``<tag>.tmp`` and renamed; reused when present) and
        ``ds_cfg["checkpoint"]["load_universal"]`` is set. ZeRO-0 checkpoints hold the whole optimizer state
        and load at any world size as they are. Collective. Returns ``tag_dir``.
        """
        if tag_dir is None:
            return None
        try:
            meta = checkpointer.read_meta(tag_dir)
        except checkpointer.CheckpointError as e:
            raise TrainError(str(e)) from None
        old_world, stage = meta.get("world_size"), meta.get("zero_stage", 0)
        if old_world == self.world_size or not stage:
            return tag_dir
        uni = tag_dir.parent / "universal" / tag_dir.name
        error = None
        if self.rank == 0 and not uni.is_dir():
            log.info(f"checkpoint {tag_dir} was written by {old_world} ranks, this run has {self.world_size}: "
                     f"converting it to a universal checkpoint in {uni}")
            tmp = uni.with_name(uni.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            workers = str(max(1, min(8, (os.cpu_count() or 2) // 2)))
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
                   "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", workers,
                   "--num_merge_workers", workers]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                error = (f"converting {tag_dir} to a universal checkpoint failed (exit {r.returncode}): "
                         f"{(r.stderr or r.stdout).strip()[-1500:]}\nresume on {old_world} ranks, or run "
                         f"{' '.join(cmd[1:])} yourself and rename the output to {uni}")
            else:
                os.replace(tmp, uni)
                log.info(f"universal checkpoint written in {time.perf_counter() - t0:.1f} s")
        box = [error]
        dist.broadcast_object_list(box, src=0)  # also the barrier: the conversion is finished
        if box[0]:
            raise TrainError(box[0])
        ds_cfg["checkpoint"] = {**ds_cfg.get("checkpoint", {}), "load_universal": True}
        self._universal_dir = uni
        return tag_dir

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

    # -- loss guards
    SPIKE_EMA_DECAY = 0.99  # running mean over roughly the last 100 micro batches
    SPIKE_MAX_CONSECUTIVE = 20  # this many spikes in a row: the loss level really changed, stop

    def _is_spike(self, loss: float) -> bool:
        """Loss-spike rule on the largest micro-batch loss over ranks (identical on every rank).

        With ``train.spike_factor`` > 0 and after ``train.spike_warmup`` steps, a micro batch whose loss
        exceeds spike_factor x the running mean is a spike: ``train.spike_action=skip`` drops it on every
        rank (no backward, counted in train/skipped_batches, logged), ``stop`` raises TrainError. Spikes
        do not update the running mean. Returns True when the micro batch is to be skipped.
        """
        t = self.cfg.train
        ema = self._loss_ema
        if t.spike_factor > 0 and ema is not None and self.step >= t.spike_warmup and loss > t.spike_factor * ema:
            self._spike_run += 1
            self.skipped_batches += 1
            msg = (f"step {self.step}: loss spike, micro-batch loss {loss:.4f} > train.spike_factor "
                   f"{t.spike_factor} x running mean {ema:.4f}")
            if t.spike_action == "stop":
                raise TrainError(f"{msg}; lower optim.lr, raise train.spike_factor or set train.spike_action=skip")
            if self._spike_run >= self.SPIKE_MAX_CONSECUTIVE:
                raise TrainError(f"{msg}: {self._spike_run} spikes in a row, the loss level has changed; raise "
                                 "train.spike_factor or set it to 0 (off)")
            if self.rank == 0:
                log.warning(f"{msg}: micro batch skipped ({self.skipped_batches} skipped so far)")
                self.logger.log(self.step, {"train/spike_loss": loss, "train/spike_mean": ema})
            return True
        self._spike_run = 0
        d = self.SPIKE_EMA_DECAY
        self._loss_ema = loss if ema is None else d * ema + (1 - d) * loss
        return False

    # -- loop
    def train_step(self, it) -> dict:
        """One optimizer step over ``grad_accum`` micro batches; returns local stats (summed tensors)."""
        self.engine.train()
        totals: dict[str, torch.Tensor] = {}
        micro = 0
        while micro < self.grad_accum:
            batch = self._next_batch(it)
            loss, stats = compute_loss(self.engine, batch, self.cfg.objective, self.cfg.model.causal,
                                       self.cfg.model.mask_token_id, self.generator, step=self.step)
            finite = bool(torch.isfinite(loss))
            # one MAX all-reduce: [non-finite anywhere, stop signal anywhere, largest finite loss]
            flags = torch.tensor([0.0 if finite else 1.0, float(max(self._signal_received, signals.signal_seen)),
                                  float(loss.detach()) if finite else 0.0], device=self.device, dtype=torch.float64)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            flags = flags.tolist()
            if flags[1] > 0:
                self._stop_signal = int(flags[1])
            if flags[0] > 0:  # non-finite on some rank: every rank drops this micro batch
                self.skipped_batches += 1
                if self.rank == 0:
                    log.warning(f"step {self.step}: non-finite loss, micro batch skipped "
                                f"({self.skipped_batches} so far)")
                if self.cfg.train.nonfinite == "stop":
                    raise TrainError(f"non-finite loss at step {self.step}; lower optim.lr or set train.nonfinite=skip")
                continue
            if self._is_spike(flags[2]):
                continue
            self.engine.backward(loss)
            if self.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
                # DeepSpeed records the global grad norm only in its ZeRO/bf16 optimizers.
                grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
                self._grad_norm = float(torch.nn.utils.get_total_norm(grads))
            self.engine.step()
            micro += 1
            for k, v in stats.items():
                totals[k] = totals.get(k, 0) + v.detach().float().to(self.device)
            # order-insensitive fingerprint of the data seen (resume tests compare it step by step)
            totals["data_checksum"] = totals.get("data_checksum", 0) + batch["input_ids"].sum().float()
        self.step += 1
        return totals

    @torch.no_grad()
    def validate(self) -> dict:
        """Mean validation loss over ``val_batches`` batches per rank, noise fixed across validations."""
        self.engine.eval()
        loader = self._build_loader("val", rank=0, world_size=1)
        it = iter(loader)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 999_983)
        total = torch.zeros(2, device=self.device)
        for i in range(self.cfg.train.val_batches * self.world_size):
            batch = self._next_batch(it)
            if i % self.world_size != self.rank:
                continue
            loss, _ = compute_loss(self.engine, batch, self.cfg.objective, self.cfg.model.causal,
                                   self.cfg.model.mask_token_id, gen, step=self.step)
            total += torch.stack([loss.detach().float(), torch.ones((), device=self.device)])
        dist.all_reduce(total)
        return {"val/loss": (total[0] / total[1]).item()}

    @torch.no_grad()
    def sample(self) -> list[str]:
        """Generate from a few fixed prompts (every rank runs the forwards: ZeRO-3 needs them all)."""
        from llada_scale import generate

        prompts = self._sample_prompts()[: self.cfg.train.num_samples]
        if not prompts:
            return []
        model = self.engine.module
        model.eval()
        t = self.cfg.train
        eos = self.tokenizer.eos_token_id
        mask_id = self.cfg.model.mask_token_id
        unused = list(range(self.tokenizer.vocab_size, self.cfg.model.vocab_size))  # the embedding's padding rows
        if self.cfg.model.causal:
            outs = generate.ar_generate(model, prompts, max_new_tokens=t.sample_tokens, eos_token_id=eos).tokens
        elif self.cfg.objective.block_diffusion:  # block-causal model: block-by-block decoding with a KV cache
            from llada_scale.block_sampling import generate_blocks_batch

            block = min(self.cfg.objective.block_length_at(self.step), t.sample_tokens)
            outs = generate_blocks_batch(model, prompts, mask_token_id=mask_id, gen_length=t.sample_tokens,
                                         block_length=block, steps_per_block=block, suppress_token_ids=unused).tokens
        else:  # LLaDA low-confidence remasking; small blocks (semi-AR) keep SFT models from flooding EOS
            block = t.sample_block_length or t.sample_tokens
            outs = generate.diffusion_generate(model, prompts, mask_token_id=mask_id, gen_length=t.sample_tokens,
                                               block_length=block, steps=t.sample_tokens,
                                               suppress_token_ids=unused).tokens
        return [f"{self.tokenizer.decode(p)!r} -> {self.tokenizer.decode(generate.truncate_at(o, eos))!r}"
                for p, o in zip(prompts, outs)]

    def _sample_prompts(self) -> list[list[int]]:
        if self.cfg.objective.name == "sft":
            questions = ["Give three tips for staying healthy.", "请介绍一下你自己。", "What is the capital of France?"]
            return [self.tokenizer.render_prompt([{"role": "user", "content": q}]) for q in questions]
        return [self.tokenizer.encode(t) for t in ("ROMEO:\n", "床前明月光，", "The history of")]

    def _log_step(self, window: dict, step_time: float):
        t = self.cfg.train
        keys = sorted(window)
        flat = torch.cat([window[k].reshape(-1).float() for k in keys])
        dist.all_reduce(flat)
        sums, off = {}, 0
        for k in keys:
            n = window[k].numel()
            sums[k] = flat[off:off + n]
            off += n
        loss = (sums["loss_sum"] / sums["loss_count"]).item()
        speed = self.speed.report()
        lr = self.lr_scheduler.get_last_lr()[0]
        gnorm = self.engine.get_global_grad_norm() if self.zero_stage > 0 else self._grad_norm
        gnorm = float(gnorm) if gnorm is not None else float("nan")
        metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": gnorm,
                   "perf/tokens_per_s": speed["tokens_per_s"], "perf/tokens_per_s_per_device":
                   speed["tokens_per_s_per_device"], "perf/mfu": speed["mfu"], "perf/step_time_s": step_time,
                   "train/skipped_batches": self.skipped_batches, "data/checksum": sums["data_checksum"].item()}
        if "block_length" in sums and speed["mfu"] is not None \
                and (sums["block_length"] / sums["loss_count"]).item() < self.cfg.data.seq_len:
            speed["mfu"] *= 2  # block diffusion runs [x_t ; x_0]: two positions per data token
            metrics["perf/mfu"] = speed["mfu"]
        mfu = "-" if speed["mfu"] is None else f"{100 * speed['mfu']:.1f}%"
        line = (f"step {self.step:>6}/{t.max_steps} | loss {loss:.4f} | lr {lr:.2e} | gnorm {gnorm:.3f} | "
                f"tok/s {speed['tokens_per_s']:,.0f} | tok/s/dev {speed['tokens_per_s_per_device']:,.0f} | mfu {mfu}")
        if "t_bucket_ce_sum" in sums:
            ce = (sums["t_bucket_ce_sum"] / sums["t_bucket_count"].clamp(min=1)).tolist()
            for i, v in enumerate(ce):
                lo, hi = i / NUM_T_BUCKETS, (i + 1) / NUM_T_BUCKETS
                metrics[f"train/ce_t{lo:.1f}-{hi:.1f}"] = v
            line += " | ce by t " + "/".join(f"{v:.2f}" for v in ce)
        if "block_length" in sums:
            metrics["train/block_length"] = (sums["block_length"] / sums["loss_count"]).item()
            line += f" | block {metrics['train/block_length']:.0f}"
        self.logger.log(self.step, metrics, line)

    def fit(self) -> dict:
        """Run until ``train.max_steps`` (or a stop signal); returns the last logged metrics dict."""
        t = self.cfg.train
        if self.rank == 0:
            log.info(f"model {self.num_params / 1e6:.2f}M params | world {self.world_size} | ZeRO-{self.zero_stage} | "
                     f"micro {t.micro_batch_size} x accum {self.grad_accum} x world = global {t.global_batch_size} "
                     f"seqs of {self.cfg.data.seq_len} | bf16 {self.engine.bfloat16_enabled()} | "
                     f"objective {self.cfg.objective.name} ({'diffusion' if self.diffusion else 'AR'}) | "
                     f"{self.speed.flops_per_token / 1e6:.1f} MFLOP/token, peak "
                     f"{'unknown' if not self.speed.peak_flops else f'{self.speed.peak_flops / 1e9:.0f} GFLOP/s'} per device")
        it = iter(self.loader)
        window: dict = {}
        last = {}
        tokens_per_step = t.global_batch_size * self.cfg.data.seq_len
        self.speed.reset()
        while self.step < t.max_steps:
            t0 = time.perf_counter()
            stats = self.train_step(it)
            for k, v in stats.items():
                window[k] = window.get(k, 0) + v
            self.speed.update(tokens_per_step)
            step_time = time.perf_counter() - t0
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                self._log_step(window, step_time)
                window = {}
            if t.val_every and (self.step % t.val_every == 0 or self.step == t.max_steps):
                last = self.validate()
                samples = self.sample()
                self.logger.log(self.step, last, f"step {self.step:>6} | val loss {last['val/loss']:.4f}")
                for s in samples:
                    self.logger.log(self.step, {}, f"  sample: {s}")
                self.speed.reset()
            if self._stop_signal:
                if self.rank == 0:
                    log.info(f"signal {self._stop_signal} received: checkpointing at step {self.step} and stopping")
                self.save()
                return {**last, "preempted": True}
            if (t.save_every and self.step % t.save_every == 0) or self.step == t.max_steps \
                    or self.step == t.stop_at_step:
                self.save()
                self.speed.reset()
            if self.step == t.stop_at_step:
                return {**last, "stopped_at": self.step}
        return last

    def close(self):
        self.logger.close()
        self.engine.destroy()


# ----------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train an AR or LLaDA diffusion model with DeepSpeed ZeRO. Positional key=value arguments "
                    "override the recipe (e.g. optim.lr=3e-4 train.max_steps=100 model.preset=30m).")
    p.add_argument("--config", required=True, help="YAML recipe in configs/ (model, data, objective, optim, train)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                   help="DeepSpeed JSON from ds_configs/ (ZeRO stage, bf16, offload); 'auto' fields are filled from "
                        "the recipe. Default: ZeRO-0")
    p.add_argument("--resume", default=None,
                   help="auto (latest complete checkpoint of the run, default), none, or a checkpoint directory")
    p.add_argument("--init_from", default=None,
                   help="initialise weights from this checkpoint (run dir, tag dir or safetensors dir), e.g. AR -> diffusion")
    p.add_argument("--run_dir", default=None, help="output directory (default runs/<run_name>)")
    p.add_argument("--wandb", default=None, choices=["auto", "online", "offline", "off"],
                   help="wandb mode (auto: offline without WANDB_API_KEY)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="recipe overrides key.sub=value")
    args = p.parse_args(argv)
    for flag, key in (("resume", "train.resume"), ("init_from", "train.init_from"), ("run_dir", "run_dir"),
                      ("wandb", "train.wandb")):
        if getattr(args, flag) is not None:
            args.overrides.append(f"{key}={getattr(args, flag)}")
    return args


def main(argv=None) -> int:
    """Train; returns 0 (done, or stopped at train.stop_at_step), 2 (bad input / TrainError), or
    :data:`PREEMPTED_EXIT` = 75 when a SIGUSR1/SIGTERM made every rank checkpoint and stop early."""
    watch_stop_signals()  # SLURM may signal any time, start-up included: record, never die of it
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # library deprecation chatter that would otherwise repeat in every log (torchdata 0.11, DeepSpeed 0.19)
    warnings.filterwarnings("ignore", message=".*set_vital.*")
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.distributed.*deprecated.*")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rank, _, _ = init_distributed()
    if rank != 0:
        logging.getLogger("llada_scale").setLevel(logging.WARNING)
    trainer = None
    try:
        trainer = Trainer(cfg, args.deepspeed_config)
        trainer.install_signal_handlers()
        result = trainer.fit()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if not type(e).__module__.startswith("llada_scale") and not isinstance(e, FileNotFoundError):
            raise  # a bug or a library failure: keep the traceback
        print(f"error (rank {rank}): {e}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
    if rank == 0 and result:
        log.info("final " + " ".join(f"{k}={v}" for k, v in result.items()))
    if result and result.get("preempted"):
        try:
            dist.barrier()  # leave together: srun --kill-on-bad-exit must not kill a rank still finishing
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
        return PREEMPTED_EXIT
    return 0


if __name__ == "__main__":
    from llada_scale.train import PREEMPTED_EXIT as _PREEMPTED  # import as a module so error classes keep
    from llada_scale.train import main as _main  # their module name

    _code = _main()
    if _code == _PREEMPTED:
        # Every rank has just left a barrier: exit now, all within a millisecond, skipping the interpreter's
        # teardown. Otherwise srun --kill-on-bad-exit=1 may see one rank's 75 while another is still tearing
        # down, kill that one, and report 143 instead of 75 (no requeue; slurm/launch.sh copes, but late).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_code)
    sys.exit(_code)
