"""The Hugging Face ``config.json`` <-> :class:`llada_scale.model.transformer.ModelConfig` mapping for the Llama,
Mistral, Qwen2/2.5 and Qwen3 families (key names need no mapping: our modules follow ``LlamaForCausalLM``, and
Qwen2's biases / Qwen3's ``q_norm``/``k_norm`` have the same names), and ``pytorch_model.bin`` reading.
"""

from __future__ import annotations

import math
import os

import torch

from llada_scale.checkpoint.files import CheckpointError, read_json


def load_pytorch_bin(dirpath: str) -> dict:
    index = os.path.join(dirpath, "pytorch_model.bin.index.json")
    files = sorted(set(read_json(index)["weight_map"].values())) if os.path.isfile(index) else ["pytorch_model.bin"]
    sd = {}
    for f in files:
        try:
            sd.update(torch.load(os.path.join(dirpath, f), map_location="cpu", weights_only=True))
        except Exception as e:
            raise CheckpointError(f"cannot read {os.path.join(dirpath, f)}: {type(e).__name__}: {e}") from None
    return sd


#: model_type -> what import-hf reads from it (anything else is refused with this list).
SUPPORTED_HF = {"llama": "Llama 2, 3, 3.x (llama3 / yarn rope scaling)", "mistral": "Mistral (no sliding window)",
                "qwen2": "Qwen2, Qwen2.5 (q/k/v biases)", "qwen3": "Qwen3 dense (QK-norm, any head_dim)"}


def _supported() -> str:
    return "; ".join(f"{k}: {v}" for k, v in SUPPORTED_HF.items()) + "; LLaDA (model_type llada): use import-llada"


def model_config_from_hf(hf: dict, source: str = "config.json") -> dict:
    """Map a Hugging Face ``config.json`` dict (see :data:`SUPPORTED_HF`) to a :class:`ModelConfig` dict.

    qwen2 always has q/k/v biases (``attention_bias=True``, o_proj has none); qwen3 has per-head QK-norm;
    ``head_dim`` is read when present (Qwen3-0.6B: hidden 1024, 16 heads, head_dim 128). Reads ``llada_scale``
    / ``mask_token_id`` written by ``export-hf`` to restore diffusion models (``causal=False``).

    Raises:
        CheckpointError: another model_type (the message lists the supported ones), or a feature our backbone
            cannot represent (o_proj or MLP biases, rope scaling other than llama3 / YaRN or YaRN options we do
            not implement, non-SiLU activation, sliding windows, MoE), naming the key.
    """
    mt = hf.get("model_type", "llama")
    if mt not in SUPPORTED_HF:
        raise CheckpointError(f"{source}: model_type {mt!r} is not supported; supported: {_supported()}")
    need = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"]
    missing = [k for k in need if k not in hf]
    if missing:
        raise CheckpointError(f"{source}: missing key(s) {missing}")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if not hf.get("head_dim") and hf["hidden_size"] % heads:
        raise CheckpointError(f"{source}: hidden_size {hf['hidden_size']} is not divisible by num_attention_heads "
                              f"{heads} and no head_dim is given")
    if mt != "qwen2" and hf.get("attention_bias"):
        raise CheckpointError(f"{source}: attention_bias=true on {mt} also puts a bias on o_proj, which our backbone "
                              "does not have (only q/k/v biases, as Qwen2)")
    if hf.get("mlp_bias"):
        raise CheckpointError(f"{source}: mlp_bias=true is not supported (our MLP projections have no bias)")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {hf.get('hidden_act')!r} is not supported (only silu/SwiGLU)")
    rope_params = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    scaling = hf.get("rope_scaling") or ({k: v for k, v in rope_params.items() if k != "rope_theta"}
                                         if rope_params.get("rope_type", "default") != "default" else None)
    if hf.get("sliding_window") and hf.get("use_sliding_window", mt == "mistral") \
            or "sliding_attention" in (hf.get("layer_types") or ()):
        raise CheckpointError(f"{source}: sliding-window attention is not supported")
    if hf.get("num_experts") or hf.get("num_local_experts"):
        raise CheckpointError(f"{source}: mixture-of-experts models are not supported")
    extra = hf.get("llada_scale") if isinstance(hf.get("llada_scale"), dict) else {}
    theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None  # plain RoPE spelled out
    rope_scaling = _rope_scaling_from_hf(hf, scaling, float(theta), head_dim, source) if scaling else None
    return {
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads,
        "intermediate_size": hf["intermediate_size"],
        "max_seq_len": hf.get("max_position_embeddings", 2048),
        "rope_theta": float(theta),
        "rope_scaling": rope_scaling,
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "causal": bool(extra.get("causal", True)),
        "qk_norm": mt == "qwen3",
        "norm_weight": True,
        "mask_token_id": hf.get("mask_token_id", extra.get("mask_token_id")),
        "attention_bias": mt == "qwen2",
        "head_dim": head_dim,
    }


def yarn_hf_mismatch(head_dim: int, theta: float, rope_scaling: dict) -> str | None:
    """Why HF ``_compute_yarn_parameters`` would compute other frequencies than our (minimind-convention)
    :func:`llada_scale.model.rope.rope_inv_freq` for this YaRN config, or None when the two agree.

    They differ only in clamping the upper ramp bound: minimind to ``head_dim // 2 - 1``, HF to ``head_dim - 1``
    (see :func:`llada_scale.model.rope.yarn_correction_range`); both agree when
    ``low <= ceil(d(beta_slow)) <= head_dim // 2 - 1``.
    """
    orig = rope_scaling["original_max_position_embeddings"]

    def index(rotations: float) -> float:
        return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(index(rope_scaling["beta_fast"])), 0)
    high = math.ceil(index(rope_scaling["beta_slow"]))
    if low <= high <= head_dim // 2 - 1:
        return None
    return (f"YaRN ramp bounds low={low}, high={high} fall outside [low, head_dim/2-1={head_dim // 2 - 1}], where "
            "HF transformers (high clamped to head_dim-1) and minimind/llada_scale (clamped to head_dim/2-1) "
            "compute different rotary frequencies")


def _rope_scaling_from_hf(hf: dict, scaling: dict, theta: float, head_dim: int, source: str) -> dict:
    """HF ``rope_scaling`` / ``rope_parameters`` (llama3 or yarn) -> ``ModelConfig.rope_scaling``; for yarn with
    HF's defaults made explicit (``attention_factor`` = 0.1 ln(factor) + 1 or the mscale ratio when absent, as HF
    computes)."""
    if not isinstance(scaling, dict):
        raise CheckpointError(f"{source}: rope_scaling {scaling!r} is not a dict")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "llama3":
        from llada_scale.model.rope import normalize_rope_scaling

        try:
            return normalize_rope_scaling({k: v for k, v in scaling.items() if k not in ("rope_theta", "type")})
        except ValueError as e:
            raise CheckpointError(f"{source}: {e}") from None
    if kind != "yarn":
        raise CheckpointError(f"{source}: rope_scaling type {kind!r} is not supported (plain RoPE, llama3 and yarn "
                              "are)")
    known = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
             "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate", "partial_rotary_factor"}
    unknown = sorted(set(scaling) - known)
    if unknown:
        raise CheckpointError(f"{source}: rope_scaling key(s) {unknown} are not supported")
    if scaling.get("truncate", True) is not True:
        raise CheckpointError(f"{source}: rope_scaling truncate=false is not supported (YaRN with integer ramp "
                              "bounds only)")
    if scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{source}: partial_rotary_factor != 1 is not supported")
    orig = scaling.get("original_max_position_embeddings", hf.get("original_max_position_embeddings",
                                                                  hf.get("max_position_embeddings")))
    factor = scaling.get("factor")
    if factor is None and orig:
        factor = hf.get("max_position_embeddings", orig) / orig
    attn = scaling.get("attention_factor")
    if attn is None and factor is not None:  # HF's default: get_mscale(factor[, mscale]) ratio
        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    from llada_scale.model.rope import normalize_rope_scaling

    try:
        out = normalize_rope_scaling({"type": "yarn", "factor": factor, "original_max_position_embeddings": orig,
                                      "beta_fast": scaling.get("beta_fast") or 32.0,
                                      "beta_slow": scaling.get("beta_slow") or 1.0, "attention_factor": attn})
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    why = yarn_hf_mismatch(head_dim, theta, out)
    if why:
        raise CheckpointError(f"{source}: {why}; this YaRN config cannot be imported exactly")
    return out


def hf_config_from_model_config(mc: dict, torch_dtype: str = "float32") -> dict:
    """Map a :class:`ModelConfig` dict to a Hugging Face ``config.json`` dict of the family that represents it:
    ``LlamaForCausalLM`` (no biases, no QK-norm), ``Qwen2ForCausalLM`` (q/k/v biases) or ``Qwen3ForCausalLM``
    (QK-norm). Module names are ours in all three.

    Diffusion models (``causal=False``) additionally record ``mask_token_id`` and
    ``"llada_scale": {"causal": false, "mask_token_id": N}``; HF's classes ignore them (see docs/EVAL.md for
    loading such a model with the causal mask removed; export-llada writes a loader that needs no such step).

    Rope scaling is written as ``rope_scaling`` (transformers 4.x) and ``rope_parameters`` (5.x) with every
    parameter explicit (YaRN's ``attention_factor`` too: HF's default differs).

    Raises:
        CheckpointError: q/k/v biases together with QK-norm, or ``norm_weight=False`` (no HF class represents
            them), or a YaRN config for which HF computes different frequencies (:func:`yarn_hf_mismatch`).
    """
    if mc.get("qk_norm") and mc.get("attention_bias"):
        raise CheckpointError("this model has both q/k/v biases and QK-norm, which no HF model class represents; "
                              "keep it in the consolidated safetensors format")
    if not mc.get("norm_weight", True):
        raise CheckpointError("this model uses weightless RMSNorm (norm_weight=false), which HF LlamaForCausalLM "
                              "cannot represent; keep it in the consolidated safetensors format")
    head_dim = mc.get("head_dim") or mc["hidden_size"] // mc["num_heads"]
    rope_scaling = None
    rs = mc.get("rope_scaling")
    if rs and rs.get("type") == "llama3":
        rope_scaling = {"rope_type": "llama3", **{k: v for k, v in rs.items() if k != "type"}}
    elif rs:
        why = yarn_hf_mismatch(head_dim, mc["rope_theta"], rs)
        if why:
            raise CheckpointError(f"{why}; keep this model in the consolidated safetensors format")
        rope_scaling = {"rope_type": "yarn", **{k: rs[k] for k in ("factor", "original_max_position_embeddings",
                                                                   "beta_fast", "beta_slow", "attention_factor")}}
    family = "qwen3" if mc.get("qk_norm") else "qwen2" if mc.get("attention_bias") else "llama"
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
    out = {
        "architectures": [arch],
        "model_type": family,
        "vocab_size": mc["vocab_size"],
        "hidden_size": mc["hidden_size"],
        "intermediate_size": mc["intermediate_size"],
        "num_hidden_layers": mc["num_layers"],
        "num_attention_heads": mc["num_heads"],
        "num_key_value_heads": mc["num_kv_heads"],
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": mc["max_seq_len"],
        "rms_norm_eps": mc["norm_eps"],
        "rope_theta": mc["rope_theta"],
        "rope_scaling": rope_scaling,
        "rope_parameters": {**(rope_scaling or {"rope_type": "default"}), "rope_theta": mc["rope_theta"]},
        "attention_dropout": 0.0,
        "tie_word_embeddings": bool(mc["tie_embeddings"]),
        "initializer_range": mc.get("init_std", 0.02),
        "torch_dtype": torch_dtype,
        "use_cache": bool(mc.get("causal", True)),
    }
    if family == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=mc["num_layers"])
        if family == "qwen3":
            out["attention_bias"] = False
    if not mc.get("causal", True):
        out["mask_token_id"] = mc.get("mask_token_id")
        out["llada_scale"] = {"causal": False, "mask_token_id": mc.get("mask_token_id")}
    return out
