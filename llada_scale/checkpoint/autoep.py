"""DeepSpeed checkpoints of expert-parallel runs (``train.expert_parallel_size`` > 1, DeepSpeed AutoEP), read back
under the model's own parameter names, and the ``ds_to_universal`` command line shared with resuming.

At ZeRO-1/2 an AutoEP tag directory holds DeepSpeed's per-expert files
``layer_<l>_expert_<e>_mp_rank_00_model_states.pt`` next to the usual model and optimizer states, at ZeRO-3 the
experts are partitioned over their expert-data-parallel groups in the ZeRO shards; ``zero_to_fp32`` merges
neither, DeepSpeed's universal-checkpoint conversion does: it merges the ZeRO fragments and stacks each
layer's experts into ``zero/<name>/fp32.pt`` (``{"param": [E, ...] float32, "is_expert_param": True, ...}``, or
the bare tensor for some ZeRO-3 entries).
:func:`load_state` runs that conversion into a temporary directory, reads the float32 master weights and the
buffers (the routers' score correction biases, from ``mp_rank_00_model_states.pt``), and maps AutoEP's names to
:class:`llada_scale.model.llada2_moe.LLaDA2MoeModel`'s (:func:`to_model_names`).
"""

from __future__ import annotations

import glob
import math
import os
import re
import subprocess
import sys
import tempfile

import torch

from llada_scale.checkpoint.files import CheckpointError

__all__ = ["TO_MODEL_NAMES", "to_model_names", "is_autoep", "universal_command", "load_state"]

# AutoEP's names of an MoE layer's tensors -> the model's (llada_scale.model.moe: MoEBlock.gate / .experts)
TO_MODEL_NAMES = ((r"\.mlp\.router\.gate\.weight$", ".mlp.gate.weight"),
                  (r"\.mlp\.router\.e_score_correction_bias$", ".mlp.gate.expert_bias"),
                  (r"\.mlp\.experts\.w1$", ".mlp.experts.gate_proj"),
                  (r"\.mlp\.experts\.w3$", ".mlp.experts.up_proj"),
                  (r"\.mlp\.experts\.w2$", ".mlp.experts.down_proj"))


def to_model_names(name: str) -> str:
    """A parameter or buffer name of an AutoEP model -> its name in the model (other names unchanged)."""
    for pattern, repl in TO_MODEL_NAMES:
        name = re.sub(pattern, repl, name)
    return name


def is_autoep(tag_dir: str, meta: dict | None = None) -> bool:
    """True when ``tag_dir`` is of an expert-parallel run: its metadata (``llada_scale.json``, as ``meta``) says
    ``train.expert_parallel_size`` > 1, or it holds DeepSpeed's per-expert files (ZeRO-1/2; at ZeRO-3 the
    experts are in the ZeRO shards)."""
    size = ((meta or {}).get("config") or {}).get("train", {}).get("expert_parallel_size", 1)
    return size > 1 or bool(glob.glob(os.path.join(tag_dir, "layer_*_expert_*_model_states.pt")))


def universal_command(tag_dir: str, out_dir: str, workers: int) -> list[str]:
    """The ``deepspeed.checkpoint.ds_to_universal`` command converting ``tag_dir`` into ``out_dir`` (states
    DeepSpeed did not save are injected, as its loader expects them)."""
    return [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
            "--output_folder", str(out_dir), "--inject_missing_state", "--num_extract_workers", str(workers),
            "--num_merge_workers", str(workers)]


def load_state(tag_dir: str) -> dict[str, torch.Tensor]:
    """float32 parameters (experts stacked [E, ...]) and buffers of an AutoEP tag directory, under the model's
    names.

    Raises:
        CheckpointError: the conversion fails (its last output lines) or the files are not DeepSpeed's.
    """
    names = [f for f in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
             if os.path.isfile(os.path.join(tag_dir, f))]  # ZeRO-1/2, ZeRO-3: the buffers are in either
    if not names:
        raise CheckpointError(f"{tag_dir} has no DeepSpeed model states file (incomplete save?)")
    states = torch.load(os.path.join(tag_dir, names[0]), map_location="cpu", weights_only=False)
    module = states.get("module") if isinstance(states, dict) else None
    if not isinstance(module, dict):
        raise CheckpointError(f"{tag_dir}/{names[0]} has no 'module' state dict")
    groups = states.get("param_shapes") or []
    shapes = {k: tuple(v) for g in ([groups] if isinstance(groups, dict) else groups) for k, v in g.items()}
    sd = {}
    with tempfile.TemporaryDirectory(prefix="llada_autoep_") as tmp:
        out = os.path.join(tmp, "universal")
        r = subprocess.run(universal_command(tag_dir, out, 1), capture_output=True, text=True)
        if r.returncode != 0:
            raise CheckpointError(f"cannot merge expert-parallel checkpoint {tag_dir} (ds_to_universal exit "
                                  f"{r.returncode}): {(r.stderr or r.stdout).strip()[-800:]}")
        for d in sorted(glob.glob(os.path.join(out, "zero", "*", "fp32.pt"))):
            name = os.path.basename(os.path.dirname(d))
            t = torch.load(d, map_location="cpu", weights_only=False)
            t = t["param"] if isinstance(t, dict) else t
            shape = shapes.get(name)  # ZeRO-3 writes the flat tensor of a non-expert parameter
            if shape and t.dim() == 1 and len(shape) > 1 and t.numel() == math.prod(shape):
                t = t.view(shape)
            sd[to_model_names(name)] = t.float()
    if not sd:
        raise CheckpointError(f"{tag_dir} is not a DeepSpeed expert-parallel checkpoint (no ZeRO fragments)")
    for name in states.get("buffer_names") or ():
        sd[to_model_names(name)] = module[name].clone()
    return sd
