"""``loramix export``: a top-k MixLoRA model as a standard MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE), or
as a GGUF file for llama.cpp (through llama.cpp's own converter)."""
from __future__ import annotations

import argparse
import os
import tempfile

from ..convert.gguf import OUTTYPES
from ..errors import LoramixError, Problems
from .common import add_quantization_args, quiet_transformers, with_quantization

# The checkpoint dtype each GGUF type is converted from (None: the base's; q8_0 quantises it).
GGUF_SOURCE_DTYPE = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "q8_0": None}


def add_output_args(p: argparse.ArgumentParser) -> None:
    """The arguments ``export`` and ``merge`` share: what to load and how to write."""
    p.add_argument("output_dir", metavar="OUT", help="folder to write the checkpoint into (--to gguf: the .gguf file)")
    p.add_argument("--model", required=True, help="the base model: local folder, hub id or .gguf file")
    p.add_argument("--adapter", required=True, help="the MixLoRA adapter folder")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the written weights (default: the base checkpoint's)")
    p.add_argument("--tokenizer", help="copy tokenizer files from this folder (default: the base model's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest weight file, e.g. 5GB or 500MB")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    add_quantization_args(p.add_argument_group(
        "quantised base", "load the base as the adapter was trained on it; its weights are dequantised, then folded"))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="write a MixLoRA model as a Mixtral / Qwen-MoE checkpoint",
                              description=__doc__ + " Serve it with vLLM, SGLang, TGI or llama.cpp (docs/export.md).")
    add_output_args(p)
    p.add_argument("--to", default="auto", choices=("auto", "mixtral", "qwen2_moe", "qwen3_moe", "gguf"),
                   help="target architecture (auto: mixtral for llama/mistral, qwen2_moe for qwen2, "
                        "qwen3_moe for qwen3), or gguf: that checkpoint converted by llama.cpp's converter")
    gguf = p.add_argument_group("--to gguf")
    gguf.add_argument("--converter", metavar="PATH",
                      help="llama.cpp's convert_hf_to_gguf.py, or a folder holding it (a llama.cpp clone, or "
                           "vendor/llama.cpp in llama-cpp-python's sdist)")
    gguf.add_argument("--converter-python", metavar="PY",
                      help="the Python that runs the converter (default: this one; it needs the converter's "
                           "requirements: torch, numpy, transformers, sentencepiece)")
    gguf.add_argument("--outtype", choices=OUTTYPES, default="f16",
                      help="GGUF weight type (default f16, as llama.cpp's own conversions)")
    p.set_defaults(run=run)


def check_arguments(args: argparse.Namespace) -> None:
    """Before anything loads: the base model's files, the adapter folder (a valid MixLoRA config and weights),
    OUT, the shard size and the tokenizer folder; one LoramixError for all."""
    from ..io.base_model import check_model_files
    from ..io.model_folder import check_output_dir, parse_size
    from ..loading import check_adapter_folder
    from ..runconfig import ModelSpec

    problems = Problems()
    problems.check(check_model_files, ModelSpec(name_or_path=args.model), prefix="model.")
    if problems.result(check_adapter_folder, args.adapter) == "lora":
        problems.add(f"{args.adapter}: a plain LoRA adapter; merge it with PEFT's merge_and_unload")
    problems.check(check_output_dir, args.output_dir, overwrite=args.overwrite)
    problems.check(parse_size, args.max_shard_size)
    if args.tokenizer and not os.path.isdir(args.tokenizer):
        problems.add(f"--tokenizer {args.tokenizer}: no such folder")
    problems.raise_if_any()


def load_mixlora(args: argparse.Namespace):
    """(MixLoraModel, torch dtype, tokenizer folder or object or None) from --model, --adapter, --dtype, --tokenizer."""
    import torch
    from transformers import AutoConfig

    from ..io.base_model import load_base_model, load_tokenizer
    from ..loading import attach_adapter
    from ..runconfig import ModelSpec

    quiet_transformers()
    check_arguments(args)
    dtype = args.dtype
    if dtype is None:  # the base checkpoint's own dtype (GGUF files are dequantised to float32)
        found = "float32"
        if not args.model.endswith(".gguf"):
            try:
                found = str(AutoConfig.from_pretrained(args.model).dtype).removeprefix("torch.")
            except (OSError, ValueError) as e:
                raise LoramixError(f"could not read the config of {args.model!r}: {str(e).splitlines()[0]}") from None
        dtype = found if found in ("float32", "bfloat16", "float16") else "float32"
    spec = with_quantization(ModelSpec(name_or_path=args.model, dtype=dtype), args)
    model = attach_adapter(load_base_model(spec), args.adapter)
    tokenizer = args.tokenizer or (args.model if os.path.isdir(args.model) else None)
    if tokenizer is None:  # a hub id or a .gguf file: save the tokenizer transformers builds from it
        try:
            tokenizer = load_tokenizer(spec)
        except LoramixError:
            tokenizer = None
    return model, getattr(torch, dtype), tokenizer


def run(args: argparse.Namespace) -> int:
    from ..convert.export import export_moe

    if args.to == "gguf":
        return run_gguf(args)
    model, dtype, tokenizer = load_mixlora(args)
    summary = export_moe(model, args.output_dir, architecture=args.to, dtype=dtype,
                         max_shard_size=args.max_shard_size, overwrite=args.overwrite, tokenizer=tokenizer)
    print(summary.report())
    return 0


def run_gguf(args: argparse.Namespace) -> int:
    """Export into a temporary folder beside OUT, convert it with llama.cpp's converter, keep only the .gguf."""
    from ..convert.export import architecture_for, export_moe
    from ..convert.gguf import check_llama_cpp_runs, find_converter
    from ..io.model_folder import format_bytes

    out = os.path.abspath(args.output_dir)
    if not out.endswith(".gguf"):
        raise LoramixError(f"--to gguf writes one file: OUT must end in .gguf, got {args.output_dir}")
    if os.path.exists(out) and not args.overwrite:
        raise LoramixError(f"{args.output_dir} exists (--overwrite replaces it)")
    if args.dtype is not None:
        raise LoramixError("--dtype sets the checkpoint's weights; with --to gguf use --outtype")
    converter = find_converter(args.converter, args.converter_python)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    args.dtype = GGUF_SOURCE_DTYPE[args.outtype]  # as `--dtype` would: the converter then only copies the floats
    model, dtype, tokenizer = load_mixlora(args)
    arch = architecture_for(model.config.model_type)
    check_llama_cpp_runs(arch.model_type, arch.architecture)
    with tempfile.TemporaryDirectory(prefix=".loramix-gguf-", dir=os.path.dirname(out)) as folder:
        summary = export_moe(model, folder, architecture=arch.model_type, dtype=dtype,
                             max_shard_size=args.max_shard_size, overwrite=True, tokenizer=tokenizer)
        print(summary.report().replace(f" to {folder}", ""))
        converter.convert(folder, out, outtype=args.outtype)
    print(f"wrote {args.output_dir} ({format_bytes(os.path.getsize(out))}, {args.outtype}) with {converter.script}")
    return 0
