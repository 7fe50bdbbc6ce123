#!/usr/bin/env python
"""Convert llada_scale checkpoints between formats (one process, no deepspeed launcher needed).

Subcommands (each has its own --help):

  consolidate CKPT OUT_DIR         DeepSpeed tag dir (ZeRO 0-3, any world size) -> safetensors + config.json
                                   + the tokenizer files named by the checkpoint's tokenizer identity
  export-hf SRC OUT_DIR            our model -> HF Llama / Qwen2 / Qwen3 ForCausalLM directory
  import-hf HF_DIR OUT_DIR         local HF Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3 directory -> consolidated
  import-llada HF_DIR OUT_DIR      LLaDA's released format (GSAI-ML/LLaDA-8B-*) -> consolidated
  export-llada SRC OUT_DIR         diffusion model -> LLaDA's format + trust_remote_code modeling files
  import-llada2 HF_DIR OUT_DIR     LLaDA2.x MoE release (inclusionAI LLaDA2.0/2.1-mini/-flash) -> consolidated
  export-llada2 SRC OUT_DIR        LLaDA2 MoE model -> the release's format + trust_remote_code modeling files
  import-nano-llada PT OUT_DIR     Nano-LLaDA diffusion / minimind AR ``.pt`` state dict -> consolidated
  ar-to-diffusion SRC OUT_DIR      AR model -> LLaDA mask predictor (adds the mask-token rows, causal=false)
  merge-lora CKPT OUT_DIR          LoRA run checkpoint + its base -> merged consolidated weights
  average CKPT [CKPT ...] OUT_DIR  weighted mean of checkpoints of one model (LLaDA 2.0's checkpoint merge);
                                   --best_k K RUN_DIR OUT_DIR: the K with the lowest logged val/loss

The work is done by :mod:`llada_scale.checkpoint.convert`, :mod:`llada_scale.checkpoint.llada`,
:mod:`llada_scale.checkpoint.llada2`, :mod:`llada_scale.checkpoint.nano_llada` and :mod:`llada_scale.training.lora` (callable from Python with the same
argument names). Errors print one line ``error: ...`` and exit with status 2 (a full disk too: the previous
output is left as it was). Every output directory gets a ``SHA256SUMS`` of its files; inputs that record digests
are verified before use. The last line printed names the output directory. See docs/EVAL.md and docs/MODELS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llada_scale.checkpoint import average, convert, llada, llada2, nano_llada  # noqa: E402
from llada_scale.checkpoint.files import CheckpointError  # noqa: E402
from llada_scale.training import lora  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def command(name: str, func, source: str | None, source_help: str | None, **texts) -> argparse.ArgumentParser:
        """Subcommand ``name`` running ``func`` (``texts``: its ``help`` and ``description``), with the positionals
        ``source`` (help ``source_help``) and ``out_dir``; None: the caller adds its own positionals. Its own
        options follow; :func:`common`'s are added to every subcommand last."""
        p = sub.add_parser(name, **texts)
        if source is not None:
            p.add_argument(source, help=source_help)
            p.add_argument("out_dir", help="output directory")
        p.set_defaults(func=func)
        return p

    def override_max_seq_len(p, default: str):
        p.add_argument("--max_seq_len", type=int, default=0, help=f"override max_seq_len (default: {default})")

    def common(p):
        p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16"],
                       help="dtype of the written weights. auto (default, like transformers' torch_dtype='auto'): "
                            "the source's stored dtype (DeepSpeed checkpoints: their fp32 master weights; a source "
                            "mixing dtypes: fp32, nothing rounded). The final line names the dtype and its origin")
        p.add_argument("--max_shard_size", default="5GB",
                       help="largest weight file; above it write HF-style shards + model.safetensors.index.json "
                            "(e.g. 5GB, 500MB, 2GiB; default 5GB)")
        p.add_argument("--force", action="store_true",
                       help="write into a non-empty output directory: one this tool wrote before (its SHA256SUMS "
                            "lists every file) is replaced as a whole; in any other only the files of the format "
                            "written (model*.safetensors, the index, SHA256SUMS and the names written now) are "
                            "replaced, everything else is kept. An output that is or contains the input or a "
                            "training run directory is always refused")
        p.add_argument("--no_verify", action="store_true",
                       help="skip checking the input files against their recorded SHA-256 (very large files on "
                            "trusted storage; default: verify)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--tokenizer", default=None,
                       help="tokenizer directory/file to copy and record (default: the one the checkpoint names)")

    p = command("consolidate", convert.consolidate,
                "checkpoint", "runs/<name>/checkpoints/<tag> (or checkpoints/ with a 'latest' file)",
                help="DeepSpeed tag dir (ZeRO 0-3, any world size) -> safetensors",
                description="Merge a DeepSpeed checkpoint tag directory (any ZeRO stage, any number of "
                            "ranks) into fp32 weights with deepspeed's zero_to_fp32 and write them as "
                            "safetensors + config.json + tokenizer files. A checkpoints/ or run directory "
                            "resolves to its 'latest' tag.")
    p.add_argument("--any_source", action="store_true",
                   help="also accept consolidated/HF sources (re-shard / re-type them)")

    command("export-hf", convert.export_hf, "source", "tag dir, consolidated dir or .safetensors file",
            help="our model -> HF Llama / Qwen2 / Qwen3 directory",
            description="Write config.json + safetensors loadable by transformers: LlamaForCausalLM, "
                        "Qwen2ForCausalLM (q/k/v biases) or Qwen3ForCausalLM (QK-norm). Key names are "
                        "unchanged. Diffusion models record mask_token_id and llada_scale.causal=false; "
                        "load them with the causal mask removed (docs/EVAL.md), or use export-llada. "
                        "Weightless-norm models and biases together with QK-norm are refused.")

    p = command("import-hf", convert.import_hf, "hf_dir", "HF model directory",
                help="local HF Llama / Mistral / Qwen2 / Qwen3 directory -> consolidated",
                description="Read a local Hugging Face directory (config.json + safetensors or "
                            "pytorch_model.bin, any number of shards) of model_type llama (Llama 2, 3, 3.x "
                            "with llama3 rope scaling), mistral, qwen2 (Qwen2, Qwen2.5: q/k/v biases) or "
                            "qwen3 (QK-norm, any head_dim) and write our consolidated format, one shard at a "
                            "time. The tokenizer files (chat template included) are copied. Anything else "
                            "(o_proj/MLP biases, other rope scaling, sliding windows, MoE) is refused with "
                            "the list of what is supported.")
    override_max_seq_len(p, "max_position_embeddings")

    p = command("import-llada", llada.import_llada, "hf_dir", "LLaDA checkpoint directory",
                help="LLaDA's released format -> consolidated",
                description="Read a LLaDA checkpoint directory (config.json with model_type llada / "
                            "LLaDAModelLM, sharded safetensors, tokenizer; e.g. GSAI-ML/LLaDA-8B-Base or "
                            "-Instruct downloaded by you) and write our consolidated format, streaming one "
                            "shard at a time. Every shape is read from config.json; unsupported variants, a "
                            "missing or misshapen shard and a tokenizer that does not fit the vocabulary are "
                            "refused before anything is written. The tokenizer is copied with its chat "
                            "template and its mask token (<|mdm_mask|> = 126336) recorded.")
    override_max_seq_len(p, "max_sequence_length")

    command("export-llada", llada.export_llada,
            "source", "tag dir, consolidated dir (streamed) or .safetensors file of a diffusion model",
            help="diffusion model -> LLaDA's format (+ trust_remote_code files)",
            description="Write a mask predictor in LLaDA's format: config.json (LLaDA keys, mask_token_id, "
                        "auto_map), safetensors in LLaDA's names (model.transformer.blocks.N.q_proj ...), "
                        "the tokenizer and our configuration_llada.py / modeling_llada.py, so that "
                        "transformers.AutoModel.from_pretrained(OUT_DIR, trust_remote_code=True) loads it "
                        "offline with llada_scale's logits, and LLaDA's generate.py / chat.py, Fast-dLLM "
                        "and dllm can use it. Causal, QK-norm, rope-scaled models and head_dim != "
                        "hidden/heads are refused (use export-hf).")

    p = command("import-llada2", llada2.import_llada2, "hf_dir", "LLaDA2 checkpoint directory",
                help="LLaDA2.x MoE release format -> consolidated",
                description="Read a LLaDA2.0/2.1 checkpoint directory (config.json with model_type "
                            "llada2_moe, per-expert or dFactory merged-expert safetensors, tokenizer) and write "
                            "our consolidated format, one tensor at a time. Every value comes from "
                            "config.json; unknown keys and variants outside the release are refused.")
    override_max_seq_len(p, "max_position_embeddings")
    p.add_argument("--mask_token", default=None,
                   help="mask token string, only when neither config.json nor tokenizer_config.json names one")

    command("export-llada2", llada2.export_llada2,
            "source", "tag dir or consolidated dir (streamed) of a LLaDA2 MoE model",
            help="LLaDA2 MoE model -> release format (+ trust_remote_code files)",
            description="Write a LLaDA2 MoE model with the release's tensor names (per-expert) and "
                        "config keys, the tokenizer and our configuration_llada2_moe.py / "
                        "modeling_llada2_moe.py, so that transformers.AutoModelForCausalLM."
                        "from_pretrained(OUT_DIR, trust_remote_code=True) loads it offline.")

    p = command("merge-lora", lora.merge_lora_checkpoint,
                "checkpoint", "the LoRA run's directory, checkpoints/ directory or step######## tag",
                help="LoRA checkpoint + base -> merged consolidated weights",
                description="Fold the adapters of a LoRA run (train.lora.rank > 0) into its base weights "
                            "(W + alpha/rank B A) and write an ordinary consolidated checkpoint (export it "
                            "further with export-llada / export-hf).")
    p.add_argument("--base", default=None, help="base weights (default: the run's train.init_from)")

    p = command("average", _average, None, None,
                help="weighted mean of checkpoints of one model (top-k merge)",
                description="Average checkpoints of the same model (LLaDA 2.0's top-k checkpoint merge) into "
                            "a consolidated directory: uniform or --weights, streamed tensor by tensor from "
                            "consolidated sources (DeepSpeed tags are loaded one at a time). Sources with "
                            "another model config, tensor names or shapes are refused. --best_k K takes one "
                            "run directory and averages its K checkpoints with the lowest val/loss logged in "
                            "metrics.jsonl.")
    p.add_argument("paths", nargs="+", metavar="CKPT", help="source checkpoints (or, with --best_k, one run "
                   "directory), then the output directory")
    p.add_argument("--weights", type=float, nargs="+", default=None,
                   help="one weight per source (normalised to sum 1; default uniform)")
    p.add_argument("--best_k", type=int, default=None, help="average the K checkpoints of RUN_DIR with the lowest "
                   "logged validation loss")

    p = command("import-nano-llada", nano_llada.import_nano_llada,
                "pt_file", "torch .pt file: a state dict or {'model_state_dict'|'state_dict'|'model': ...}",
                help="Nano-LLaDA / minimind .pt state dict -> consolidated",
                description="Import a Nano-LLaDA diffusion or AR model (token_emb, blocks.N.attn.c_q, ...) "
                            "or a minimind MiniMindForCausalLM state dict (HF names, optional q_norm/k_norm, "
                            "tied head). Shapes are read from the tensors; head count, RoPE base, norm eps, "
                            "activation, YaRN and causal/bidirectional from the 'args' Nano-LLaDA saves in "
                            "its checkpoints. Without that record the flags below are required; a flag that "
                            "contradicts the record is refused.")
    p.add_argument("--arch", default="auto", choices=["auto", "nano-llada", "minimind"],
                   help="source architecture (default: detect from key names)")
    p.add_argument("--num_heads", type=int, default=None,
                   help="attention heads (the tensors cannot tell). Default: the recorded num_attention_heads (for "
                        "Nano-LLaDA diffusion SFT runs started from a checkpoint: the count that trainer infers, 16 "
                        "for hidden 512), or minimind's q_norm shape; else required")
    p.add_argument("--rope_theta", type=float, default=None,
                   help="RoPE base. Default: the recorded rope_theta; else required (both repos default to 1e6)")
    p.add_argument("--norm_eps", type=float, default=None,
                   help="RMSNorm eps. Default: the recorded rms_norm_eps; else required (Nano-LLaDA 1e-5, recent "
                        "minimind 1e-6)")
    p.add_argument("--max_seq_len", type=int, default=None,
                   help="max_seq_len to record. Default: the recorded training length (seq_len / max_seq_len), "
                        "else 512")
    p.add_argument("--mask_token_id", type=int, default=None,
                   help="mask token id (default for nano-llada with vocab 6401: 6400)")
    p.add_argument("--causal", default="auto", choices=["auto", "true", "false"],
                   help="causal (AR) or bidirectional (diffusion) attention. auto (default): from the recorded "
                        "args (Nano-LLaDA's AR trainers and diffusion trainers save the same tensor names); the "
                        "minimind layout is causal; a Nano-LLaDA file without args needs the flag")
    p.add_argument("--hidden_act", default=None,
                   help="the source MLP activation (only silu maps onto ours). Default: the recorded hidden_act; "
                        "else required")
    p.add_argument("--rope_scaling", default="auto", choices=["auto", "none", "yarn"],
                   help="whether the source used YaRN (--inference-rope-scaling). auto (default): the "
                        "inference_rope_scaling recorded in the .pt's 'args'; without a record pass none or yarn")
    p.add_argument("--rope_factor", type=float, default=16.0, help="YaRN factor (both repos use 16)")
    p.add_argument("--original_max_position_embeddings", type=int, default=2048,
                   help="YaRN original context length (both repos use 2048)")
    p.add_argument("--rope_beta_fast", type=float, default=32.0, help="YaRN beta_fast (default 32)")
    p.add_argument("--rope_beta_slow", type=float, default=1.0, help="YaRN beta_slow (default 1)")
    p.add_argument("--rope_attention_factor", type=float, default=1.0,
                   help="YaRN cos/sin scale (both repos use 1.0; nano-llada accepts only 1.0)")
    p.add_argument("--source_max_position_embeddings", type=int, default=None,
                   help="rows of the source's RoPE table; YaRN applies only above original_max_position_embeddings "
                        "(default: from the .pt's args, Nano-LLaDA max(max_position_embeddings, 2*seq_len); "
                        "else 32768)")

    p = command("ar-to-diffusion", convert.ar_to_diffusion,
                "source", "tag dir, consolidated dir or .safetensors file of an AR model",
                help="AR model -> LLaDA mask predictor",
                description="Add the mask token (grow embedding/head rows via llada_scale.model.transformer.resize_vocab "
                            "when it is outside the vocabulary), record mask_token_id and causal=false.")
    p.add_argument("--mask_token_id", type=int, default=None,
                   help="mask token id (default: the recorded tokenizer's mask_token_id)")
    p.add_argument("--vocab_multiple", type=int, default=64, help="round a grown vocabulary up to this (default 64)")
    p.add_argument("--reset_head_row", action="store_true",
                   help="reset the mask token's embedding and head rows to the mean row even if they exist")

    for p in sub.choices.values():  # the options every subcommand shares, after its own
        common(p)
    return ap


def _average(paths: list[str], **kwargs) -> None:
    if len(paths) < 2:
        raise ValueError("average needs at least one source and the output directory (CKPT [CKPT ...] OUT_DIR)")
    average.average_checkpoints(paths[:-1], paths[-1], **kwargs)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; 0 on success, 2 with one ``error:`` line on bad input."""
    import errno
    import os

    args = build_parser().parse_args(argv)
    kwargs = {k: v for k, v in vars(args).items() if k not in ("command", "func", "no_verify")}
    out_dir = args.paths[-1] if args.command == "average" else args.out_dir
    saved = os.environ.get("LLADA_SCALE_VERIFY")
    if args.no_verify:
        os.environ["LLADA_SCALE_VERIFY"] = "0"
    try:
        args.func(**kwargs)
    except (CheckpointError, FileNotFoundError, ValueError, KeyError) as e:
        msg = str(e).strip("'\"")
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only or vanished output: nothing was moved into place
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        what = "no space left on device" if full else f"{type(e).__name__}: {e.strerror or e}"
        print(f"error: {what} writing {out_dir} ({e.filename or 'output'}); the previous output is left as "
              "it was", file=sys.stderr)
        return 2
    finally:
        if saved is None:
            os.environ.pop("LLADA_SCALE_VERIFY", None)
        else:
            os.environ["LLADA_SCALE_VERIFY"] = saved
    print(f"output: {os.path.abspath(out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
