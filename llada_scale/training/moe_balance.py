"""Load balancing of mixture-of-experts backbones while training, and its logs.

* Auxiliary-loss-free balancing (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", arXiv 2412.19437, Sec.
  2.1.2): after each optimizer step, for every MoE layer, b_e += rate * sign(mean_e' load_e' - load_e), where
  load_e counts the (token, expert) pairs routed to expert e during the step on all data-parallel ranks (one
  all-reduce of a [moe layers, E] tensor). ``model.moe.bias_update_rate`` (0 = frozen bias, the default for SFT).
  The bias is a buffer (:class:`llada_scale.model.moe.Router`), identical on every rank, saved with checkpoints.
* Sequence-wise auxiliary loss (same paper, eqs. 17-20): ``model.moe.aux_loss_coef`` x the sum over MoE layers
  of :meth:`llada_scale.model.moe.Router.sequence_aux_loss`, added to the training loss of each micro batch.
* Logs, per MoE layer i: ``moe/layer{i}/load_imbalance`` (max / mean pairs per expert over the log window),
  ``moe/layer{i}/router_entropy`` (mean entropy of the normalised router scores, nats) and
  ``moe/layer{i}/bias_range`` (max - min of the expert bias); the console line gets the worst imbalance, the
  mean entropy and the widest bias range.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["MoEBalancer"]


class MoEBalancer:
    """Balancing and statistics of ``model``'s MoE layers (nothing to do for a dense model: ``enabled`` False).

    Args:
        model: the unwrapped backbone (has ``moe_layers()`` when it is a MoE model).
        moe_cfg: ``{"bias_update_rate": r, "aux_loss_coef": c}`` (``LLaDA2Config.moe``).
        routers: ``(layer index, router)`` pairs to use instead of the model's own
            (:class:`llada_scale.model.moe.RouterStats` with an ``expert_bias``; expert parallelism's
            :func:`llada_scale.training.expert_parallel.attach`).
    """

    def __init__(self, model, moe_cfg: dict | None, routers: list | None = None):
        if routers is None:
            routers = [(i, block.gate) for i, block in model.moe_layers()] if hasattr(model, "moe_layers") else []
        self.layers = routers
        self.enabled = bool(self.layers)
        cfg = moe_cfg or {}
        self.rate = float(cfg.get("bias_update_rate", 0.0))
        self.aux_coef = float(cfg.get("aux_loss_coef", 0.0))

    def aux_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` + aux_loss_coef x sum of the layers' sequence-wise balance losses of the last forward."""
        if not self.enabled or self.aux_coef <= 0:
            return loss
        terms = [router.aux_loss for _, router in self.layers if router.aux_loss is not None]
        return loss + self.aux_coef * torch.stack(terms).sum() if terms else loss

    @torch.no_grad()
    def after_step(self, device) -> dict:
        """Call once per optimizer step on every rank: gather the step's loads (all-reduce), update the expert
        biases when ``bias_update_rate > 0``, and return local sums for the log window: ``moe_load``
        [layers, E] (all ranks' pairs; divide by world size when summed over ranks again), ``moe_entropy_sum``
        [layers] and ``moe_forwards`` (this rank's)."""
        if not self.enabled:
            return {}
        e = self.layers[0][1].expert_bias.numel()
        loads = torch.zeros(len(self.layers), e, device=device)
        ent = torch.zeros(len(self.layers), device=device)
        forwards = 0
        for j, (_, router) in enumerate(self.layers):
            load, entropy, n = router.take_stats()
            if n:
                loads[j] = load.to(device)
                ent[j] = entropy.to(device)
                forwards = n
        local = loads.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(loads)
        if self.rate > 0:
            for j, (_, router) in enumerate(self.layers):
                b = router.expert_bias
                b.add_(self.rate * torch.sign(loads[j].mean() - loads[j]).to(b.device, b.dtype))
        return {"moe_load": local, "moe_entropy_sum": ent, "moe_forwards": torch.tensor(float(forwards),
                                                                                       device=device)}

    def metrics(self, sums: dict) -> tuple[dict, str]:
        """Per-layer metrics and a console fragment from the log window's all-reduced sums."""
        if not self.enabled or "moe_load" not in sums:
            return {}, ""
        e = self.layers[0][1].expert_bias.numel()
        load = torch.tensor(sums["moe_load"]).view(len(self.layers), e)
        ent = torch.tensor(sums["moe_entropy_sum"]).view(len(self.layers)) / max(sums["moe_forwards"], 1)
        out = {}
        for j, (i, router) in enumerate(self.layers):
            bias = router.expert_bias
            out[f"moe/layer{i}/load_imbalance"] = float(load[j].max() / load[j].mean().clamp_min(1e-9))
            out[f"moe/layer{i}/router_entropy"] = float(ent[j])
            out[f"moe/layer{i}/bias_range"] = float(bias.max() - bias.min())
        imb = max(v for k, v in out.items() if k.endswith("load_imbalance"))
        rng = max(v for k, v in out.items() if k.endswith("bias_range"))
        line = f" | moe imb {imb:.2f} ent {float(ent.mean()):.2f} bias {rng:.3f}"
        return out, line
