"""Arguments shared by the subcommands: which model/adapter to load and which tasks/data to read."""
from __future__ import annotations

import argparse
import dataclasses
import logging as std_logging
import os
from typing import Any

from ..data import TEMPLATE_NAMES, Example, canonical_task_name, load_examples
from ..errors import LoramixError, Problems
from ..io.base_model import check_model_files, resolve_device
from ..loading import check_adapter_folder
from ..runconfig import QUANTIZATIONS, DatasetSpec, ModelSpec, RunConfig, load_run_config
from ..training.trainer import ADAPTER_DIR


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--config", help="a run config (YAML): its model, data.eval and trained adapter are the defaults")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    g.add_argument("--model", help="base model: hub id, local folder or .gguf file")
    g.add_argument("--tokenizer", help="tokenizer folder, when the model folder has none")
    g.add_argument("--dtype", help="float32 (default) or bfloat16")
    add_quantization_args(g)
    g.add_argument("--adapter", help="a MixLoRA or PEFT LoRA adapter folder; 'none' for the bare model")
    g.add_argument("--device", default="auto", help="auto (default: the GPU when there is one), cpu, cuda, cuda:N")


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--task", action="append", default=[], metavar="NAME[=PATH]",
                   help="a task: NAME=PATH reads a file; NAME alone takes the task from --config or the hub "
                        "(built-in: arc-e, arc-c, boolq, obqa, piqa, siqa, hellaswag, winogrande)")
    g.add_argument("--data", action="append", default=[], metavar="PATH",
                   help="a data file (JSON/JSONL/TSV); the format and task name are detected")
    g.add_argument("--template", help="prompt template for --task/--data files: alpaca, plain or chat")
    g.add_argument("--limit", type=int, help="at most this many examples per task")
    g.add_argument("--cutoff-len", type=int, default=None, help="longest sequence in tokens")
    g.add_argument("--batch-size", type=int, default=None,
                   help="rows per forward (default: the config's train.eval_batch_size, else 8)")


def add_quantization_args(g) -> None:
    """``--quantization`` and ``--double-quant``: load the base through bitsandbytes (docs/quantization.md)."""
    g.add_argument("--quantization", choices=QUANTIZATIONS,
                   help="load the base quantised: nf4 or fp4 (4-bit, computing in --dtype) or int8 (LLM.int8)")
    g.add_argument("--double-quant", action="store_true", help="with nf4/fp4: quantise the block scales too")


def with_quantization(spec: ModelSpec, args: argparse.Namespace) -> ModelSpec:
    """``spec`` with ``--quantization`` / ``--double-quant`` when given."""
    if args.quantization:
        spec = dataclasses.replace(spec, quantization=args.quantization, double_quant=False)
    if args.double_quant:
        spec = dataclasses.replace(spec, double_quant=True)
    return spec


def run_config(args: argparse.Namespace) -> RunConfig | None:
    return load_run_config(args.config, args.set) if args.config else None


def model_spec(args: argparse.Namespace, cfg: RunConfig | None) -> ModelSpec:
    """``--model`` etc. over the config's model section."""
    spec = cfg.model if cfg else ModelSpec()
    if args.model:
        spec = ModelSpec(name_or_path=args.model)
    if args.tokenizer:
        spec = dataclasses.replace(spec, tokenizer=args.tokenizer)
    if args.dtype:
        spec = dataclasses.replace(spec, dtype=args.dtype)
    spec = with_quantization(spec, args)
    if not spec.name_or_path:
        raise LoramixError("no model given: pass --model or --config")
    return spec


def adapter_path(args: argparse.Namespace, cfg: RunConfig | None) -> str | None:
    """``--adapter`` ('none' = bare model), else the config's trained adapter when it exists."""
    if args.adapter:
        return None if args.adapter == "none" else args.adapter
    if cfg:
        path = os.path.join(cfg.train.output_dir, ADAPTER_DIR)
        return path if os.path.isdir(path) else None
    return None


def _named(cfg: RunConfig | None, name: str) -> list[DatasetSpec]:
    if cfg is None:
        return []
    want = canonical_task_name(name)
    for group in (cfg.data.eval, cfg.data.datasets):
        hits = [s for s in group if s.task and canonical_task_name(s.task) == want]
        if hits:
            return hits
    return []


def dataset_specs(args: argparse.Namespace, cfg: RunConfig | None) -> list[DatasetSpec]:
    """The datasets named by --task/--data, or the config's data.eval when neither is given."""
    specs: list[DatasetSpec] = []
    for item in args.task:
        name, _, path = item.partition("=")
        if path:
            specs.append(DatasetSpec(path=path, task=name))
        else:
            specs.extend(_named(cfg, name) or [DatasetSpec(task=name)])
    specs.extend(DatasetSpec(path=p) for p in args.data)
    if not specs and cfg is not None:
        specs = list(cfg.data.eval)
        if not specs:
            raise LoramixError(f"{cfg.source}: data.eval is empty; name tasks with --task or files with --data")
    if not specs:
        raise LoramixError("no data: pass --task NAME[=PATH], --data PATH or --config")
    default_template = args.template or (cfg.data.template if cfg else None)
    return [dataclasses.replace(s, template=s.template or default_template,
                                limit=args.limit if args.limit is not None else s.limit) for s in specs]


def load_task_examples(args: argparse.Namespace, cfg: RunConfig | None) -> list[Example]:
    """Every dataset's examples; one LoramixError lists the problems of all of them."""
    examples: list[Example] = []
    problems = Problems()
    for spec in dataset_specs(args, cfg):
        examples.extend(problems.result(load_examples, spec) or [])
    problems.raise_if_any()
    return examples


def check_template(name: str | None, flag: str = "--template") -> None:
    if name is not None and name not in TEMPLATE_NAMES:
        raise LoramixError(f"{flag} {name!r}: unknown template (allowed: {', '.join(TEMPLATE_NAMES)})")


def check_at_least(args: argparse.Namespace, names: tuple[str, ...], problems: Problems, minimum: int = 1) -> None:
    """Integer flags (``--limit`` ...) given as at least ``minimum``."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            problems.add(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def preflight(args: argparse.Namespace, problems: Problems) -> RunConfig | None:
    """Check the config, the model, adapter and device arguments without loading anything, into ``problems``;
    the run config (None without --config, or when it is invalid: the rest is then not checked)."""
    cfg = problems.result(run_config, args)
    if args.config and cfg is None:
        return None
    spec = problems.result(model_spec, args, cfg)
    if spec is not None:
        problems.check(check_model_files, spec, prefix="model.")
    adapter = adapter_path(args, cfg)
    if adapter is not None:
        problems.check(check_adapter_folder, adapter)
    problems.check(resolve_device, args.device)
    return cfg


def cutoff_len(args: argparse.Namespace, cfg: RunConfig | None, default: int = 1024) -> int:
    if args.cutoff_len:
        return args.cutoff_len
    return cfg.data.cutoff_len if cfg else default


def eval_batch_size(args: argparse.Namespace, cfg: RunConfig | None) -> int:
    return args.batch_size or (cfg.train.eval_batch_size if cfg else 8)


def quiet_transformers() -> None:
    """Keep transformers' loading progress bars and advisory warnings off the CLI's output, and bitsandbytes'
    (a note per 8-bit matmul that its input is cast to fp16; a CPU kernel package that is not installed)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    std_logging.getLogger("bitsandbytes").setLevel(std_logging.ERROR)


def loaded_model(args: argparse.Namespace, cfg: RunConfig | None) -> tuple[Any, Any, str | None]:
    """(model, tokenizer, adapter path) as the arguments ask."""
    from ..loading import load_model

    quiet_transformers()
    adapter = adapter_path(args, cfg)
    model, tokenizer = load_model(model_spec(args, cfg), adapter, args.device)
    return model, tokenizer, adapter


@dataclasses.dataclass
class Scoring:
    """What eval and inspect work on: the examples, the model (with its adapter) and an encoder."""

    cfg: RunConfig | None
    examples: list[Example]
    model: Any
    encoder: Any
    adapter: str | None
    batch_size: int


def scoring_setup(args: argparse.Namespace) -> Scoring:
    """Check the flags, the config, the data, the model and adapter paths first (every problem at once), then
    load the model."""
    from ..data import Encoder

    problems = Problems()
    check_at_least(args, ("limit", "cutoff_len", "batch_size"), problems)
    problems.check(check_template, args.template)
    cfg = preflight(args, problems)
    examples = problems.result(load_task_examples, args, cfg) if cfg is not None or not args.config else None
    problems.raise_if_any()
    model, tokenizer, adapter = loaded_model(args, cfg)
    return Scoring(cfg, examples, model, Encoder(tokenizer, cutoff_len=cutoff_len(args, cfg)), adapter,
                   eval_batch_size(args, cfg))
