"""Expert parallelism for LLaDA2's MoE layers through DeepSpeed AutoEP (``train.expert_parallel_size``).

DeepSpeed (0.19.8) replaces each matched MoE block by its ``AutoEPMoELayer`` inside ``deepspeed.initialize``
when the config has an enabled ``expert_parallel`` section: each rank of an expert-parallel group of size P keeps
E / P of every layer's routed experts (fused [E/P, ...] tensors), tokens go to the experts' owners by all-to-all
(dropless), and DeepSpeed's MoE-aware ZeRO reduces expert gradients over the expert-data-parallel group, writes
one checkpoint file per expert (``layer_<l>_expert_<e>_mp_rank_00_model_states.pt``) and consolidates them in
``ds_to_universal``. Its router (``TokenChoiceTopKRouter``) expresses LLaDA2's gate (the release's
``LLaDA2MoeGate``, DeepSeek-V3 routing): sigmoid scores, the selection-only score correction bias, group-limited
top-k (sum of each group's two best biased scores, ``-inf`` for the other groups), weights from the unbiased scores,
normalised and scaled by ``routed_scaling_factor``; plus the shared experts. :func:`ds_section` writes that
section from the model config (the module names of :mod:`llada_scale.model.llada2_moe`).

What AutoEP lacks and this module adds (docs/LOG.md, 2026-12-08, issue 17):

* the router logits in float32 (the release computes ``F.linear`` of float32 inputs and weights; AutoEP's gate
  is an ``nn.Linear`` in the training dtype): :func:`attach` makes the gate compute in float32;
* the selection bias kept in float32 (the engine casts buffers to bf16, where a 1e-3 balancing step vanishes);
* the auxiliary-loss-free bias update (AutoEP rejects ``load_balance_coeff``), the per-layer load / entropy
  statistics and the sequence-wise aux loss: each router gets a :class:`AutoEPRouter` view, the same
  :class:`llada_scale.model.moe.RouterStats` that :class:`llada_scale.model.moe.Router` keeps, fed by forward
  hooks, so :mod:`llada_scale.training.moe_balance` serves both.

Checkpoint parameter names under AutoEP are DeepSpeed's (``mlp.router.gate.weight``, ``mlp.experts.w1|w2|w3``,
``mlp.router.e_score_correction_bias``), experts in per-expert files; :mod:`llada_scale.checkpoint.autoep` reads
them back under the model's names. Resuming with another expert-parallel size is refused (:func:`check_resume`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llada_scale.model.moe import MoEBlock, RouterStats
from llada_scale.training.config import ConfigError

__all__ = ["ds_section", "check", "prepare", "moe_optimizer", "attach", "AutoEPRouter", "check_resume"]


def ds_section(model_cfg, ep_size: int, device: torch.device) -> dict:
    """The DeepSpeed ``expert_parallel`` (AutoEP) section for a LLaDA2 config: module patterns of
    :class:`llada_scale.model.llada2_moe.LLaDA2DecoderLayer` and the router of the release (see the module
    docstring). ``route_norm`` follows :func:`llada_scale.model.moe.route` (normalised when top_k > 1);
    ``torch._grouped_mm`` for the experts on CUDA, one GEMM per expert on CPU."""
    m = model_cfg
    return {"enabled": True, "autoep_size": ep_size, "moe_layer_pattern": r"model\.layers\.\d+\.mlp",
            "router_pattern": "gate", "expert_pattern": "experts", "expert_w1": "gate_proj",
            "expert_w2": "down_proj", "expert_w3": "up_proj", "num_experts_attr": "num_experts",
            "top_k_attr": "num_experts_per_tok", "score_func": "sigmoid", "route_norm": m.num_experts_per_tok > 1,
            "num_expert_groups": m.n_group, "num_limited_groups": m.topk_group,
            "routed_scaling_factor": m.routed_scaling_factor, "has_shared_experts": m.num_shared_experts > 0,
            "shared_experts_pattern": "shared_experts", "use_grouped_mm": device.type == "cuda"}


def check(cfg, world_size: int) -> None:
    """One-line refusals before anything is built.

    Raises:
        ConfigError: expert parallelism asked of a DeepSpeed without AutoEP, of a dense model, with LoRA or
            sequence parallelism (not supported together), or a size that does not divide the world size or the
            number of experts.
    """
    ep = cfg.train.expert_parallel_size
    if ep == 1:
        return
    where = f"train.expert_parallel_size={ep}"
    try:
        from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer  # noqa: F401
    except ImportError:
        import deepspeed

        raise ConfigError(f"{where} needs DeepSpeed's AutoEP (tested with 0.19.8), this is DeepSpeed "
                          f"{deepspeed.__version__}; upgrade it") from None
    if not hasattr(cfg.model, "num_experts"):
        raise ConfigError(f"{where} needs a mixture-of-experts model (model.model_type: llada2_moe); "
                          "set it to 1 for a dense model")
    if world_size % ep:
        raise ConfigError(f"{where} does not divide the world size {world_size}; use a divisor of it")
    if cfg.model.num_experts % ep:
        raise ConfigError(f"{where} does not divide model.num_experts={cfg.model.num_experts}; use a divisor of it")
    if cfg.train.sequence_parallel_size > 1:
        raise ConfigError(f"{where} with train.sequence_parallel_size={cfg.train.sequence_parallel_size} is not "
                          "supported (DeepSpeed AutoEP); use one of them")
    if cfg.train.lora.enabled:
        raise ConfigError(f"{where} with train.lora is not supported (AutoEP replaces the adapted expert "
                          "tensors); train LoRA with expert_parallel_size 1")


def prepare(model: nn.Module) -> None:
    """Before ``deepspeed.initialize``: expose each router's ``expert_bias`` under the name AutoEP copies into its
    router (``e_score_correction_bias``); the replaced blocks are dropped afterwards."""
    for module in model.modules():
        if isinstance(module, MoEBlock):
            gate = module.gate
            gate.register_buffer("e_score_correction_bias", gate.expert_bias)


def moe_optimizer(make):
    """``make(param_groups) -> torch.optim.Optimizer`` (None: DeepSpeed builds the one of its JSON) as the callable
    ``deepspeed.initialize`` calls with the parameter groups remapped onto the AutoEP layers, split into the
    expert groups DeepSpeed's MoE ZeRO needs (``deepspeed.moe.utils.split_params_into_different_moe_groups_for_
    optimizer``: ``moe: True`` groups of the expert tensors, same hyperparameters)."""
    if make is None:
        return None
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    def build(groups):
        named = [{"name": f"group{i}", **g} for i, g in enumerate(groups)]  # the split keys the groups by name
        return make(split_params_into_different_moe_groups_for_optimizer(named))

    return build


class _Float32Gate(nn.Linear):
    """AutoEP's router projection computed as the release's gate: float32 inputs and weights -> float32 logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


class AutoEPRouter(RouterStats):
    """:class:`RouterStats` of one AutoEP layer, recorded by forward hooks (the layer's input shape, the gate's
    logits, the router's chosen experts); ``expert_bias`` is the router's float32 ``e_score_correction_bias``."""

    def __init__(self, layer: nn.Module, top_k: int, aux_loss_coef: float):
        self.init_stats(top_k)
        self.aux_loss_coef = aux_loss_coef
        self.router = layer.router
        self._seq_shape = self._logits = None
        layer.register_forward_pre_hook(self._layer_input)
        self.router.gate.register_forward_hook(self._gate_output)
        self.router.register_forward_hook(self._router_output)

    @property
    def expert_bias(self) -> torch.Tensor:
        return self.router.e_score_correction_bias

    def _layer_input(self, module, args):
        self._seq_shape = tuple(args[0].shape[:2]) if args[0].dim() == 3 else None

    def _gate_output(self, module, args, logits):
        self._logits = logits

    def _router_output(self, module, args, out):
        if module.training:
            self.observe(torch.sigmoid(self._logits.float()), out[1].long(), self._seq_shape)
        self._logits = None


def attach(module: nn.Module, moe_cfg: dict) -> list[tuple[int, AutoEPRouter]]:
    """After ``deepspeed.initialize``: fix every AutoEP layer of ``module`` (float32 gate, float32 bias) and return
    ``(layer index, AutoEPRouter)`` for :class:`llada_scale.training.moe_balance.MoEBalancer`.

    Raises:
        RuntimeError: DeepSpeed replaced no layer (the ``expert_parallel`` section did not match the model).
    """
    from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

    routers = []
    for name, layer in module.named_modules():
        if not isinstance(layer, AutoEPMoELayer):
            continue
        router = layer.router
        router.gate.__class__ = _Float32Gate
        bias = router.e_score_correction_bias
        if bias is None:  # a source without a bias (cannot happen for our Router): a zero one, as the release
            router.register_buffer("e_score_correction_bias", torch.zeros(layer.num_experts,
                                                                          device=router.gate.weight.device))
        else:
            router.e_score_correction_bias = bias.detach().float()
        routers.append((int(name.split(".")[-2]), AutoEPRouter(layer, router.top_k,
                                                               float(moe_cfg.get("aux_loss_coef", 0.0)))))
    if not routers:
        raise RuntimeError("DeepSpeed AutoEP replaced no MoE layer; its expert_parallel section does not match "
                           "the model's module names (llada_scale.training.expert_parallel.ds_section)")
    return routers


def check_resume(meta: dict, ep_size: int, tag_dir) -> None:
    """Refuse to resume a checkpoint written with another ``train.expert_parallel_size`` (its experts are stored
    for that layout and names; DeepSpeed's universal checkpoint would need the same module tree at both sizes).

    Raises:
        ConfigError: the sizes differ (one line: which, and how to go on).
    """
    saved = int(meta.get("config", {}).get("train", {}).get("expert_parallel_size", 1))
    if saved != ep_size:
        raise ConfigError(f"{tag_dir} was written with train.expert_parallel_size={saved}, this run has {ep_size}; "
                          f"resume with expert_parallel_size={saved}, or consolidate it (tools/convert_checkpoint.py "
                          "consolidate) and start a new run from it with train.init_from")
