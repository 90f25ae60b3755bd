"""The run config: one YAML file with the base model, the adapter, the data and the training settings.

Sections ``model``, ``adapter``, ``data``, ``train``; ``docs/cli.md`` documents every key. Unknown keys are
errors with a did-you-mean; ``--set a.b=value`` overrides any key (list items by index: ``data.datasets.0.path``).
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from .config import reject_unknown
from .errors import LoramixError
from .nn.dispatch import DEFAULT_DISPATCH, check_dispatch


@dataclass
class ModelSpec:
    """The frozen base model: a hub id, a local folder, or a local ``.gguf`` file.

    ``quantization`` loads it through bitsandbytes (docs/quantization.md): ``nf4`` or ``fp4`` (4-bit,
    computing in ``dtype``; ``double_quant`` also quantises the block scales) or ``int8`` (LLM.int8).
    """

    name_or_path: str = ""
    gguf_file: str | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    quantization: str | None = None
    double_quant: bool = False


@dataclass
class DatasetSpec:
    """One dataset of a (multi-task) mixture; see docs/cli.md for the formats."""

    path: str = ""
    format: str = "auto"
    task: str | None = None
    template: str | None = None
    weight: float = 1.0
    samples: int | None = None
    limit: int | None = None
    split: str | None = None
    subset: str | None = None
    instruction: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    header: bool | None = None
    label_names: list | None = None


@dataclass
class DataSpec:
    """Training data, evaluation data and how they are tokenised."""

    datasets: list[DatasetSpec] = field(default_factory=list)
    eval: list[DatasetSpec] = field(default_factory=list)
    template: str | None = None
    cutoff_len: int = 256
    train_on_inputs: bool = False
    add_eos: bool = True


@dataclass
class TrainSpec:
    """Optimiser, schedule, batching, precision, checkpointing and logging."""

    output_dir: str = "runs/loramix"
    epochs: float = 1.0
    max_steps: int | None = None
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    loraplus_lr_ratio: float = 1.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    precision: str = "fp32"
    gradient_checkpointing: bool | None = None  # None: on for a quantised base, off otherwise
    fsdp: bool = False
    moe_dispatch: str = DEFAULT_DISPATCH
    seed: int = 42
    logging_steps: int = 1
    save_steps: int = 0
    save_total_limit: int | None = 2
    eval_batch_size: int = 8
    progress_bar: bool = True


@dataclass
class RunConfig:
    """A whole run. ``adapter`` is kept as a dict: ``type`` (mixlora | lora) plus that adapter's own keys."""

    model: ModelSpec
    adapter: dict[str, Any]
    data: DataSpec
    train: TrainSpec
    source: str = "config"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


_PRECISIONS = ("fp32", "bf16")
QUANTIZATIONS = ("nf4", "fp4", "int8")
_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "polynomial", "cosine_with_restarts")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against a simple annotation (int, float, str, bool, list, Optional[...])."""
    args = typing.get_args(tp)
    if type(None) in args:
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
    if value is None:
        raise LoramixError(f"{where}: must not be empty")
    origin = typing.get_origin(tp) or tp
    if origin is bool:
        if not isinstance(value, bool):
            raise LoramixError(f"{where}: must be true or false, found {value!r}")
    elif origin is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise LoramixError(f"{where}: must be an integer, found {value!r}")
    elif origin is float:
        try:
            value = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            value = None
        if value is None:
            raise LoramixError(f"{where}: must be a number")
    elif origin is str:
        if not isinstance(value, str):
            raise LoramixError(f"{where}: must be a string, found {value!r}")
    elif origin is list and not isinstance(value, list):
        raise LoramixError(f"{where}: must be a list, found {value!r}")
    return value


def _build(cls: type, raw: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from a dict, rejecting unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise LoramixError(f"{where}: expected a mapping of keys, found {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        reject_unknown(key, names, f"key in {where}")
        if key == "datasets" or key == "eval":
            if not isinstance(value, list):
                raise LoramixError(f"{where}.{key}: must be a list of datasets")
            value = [_build(DatasetSpec, v, f"{where}.{key}[{i}]") for i, v in enumerate(value)]
        else:
            value = _coerce(value, hints[key], f"{where}.{key}")
        kwargs[key] = value
    return cls(**kwargs)


def build_run_config(raw: Any, *, source: str = "config") -> RunConfig:
    """Validate a parsed YAML document into a RunConfig."""
    if not isinstance(raw, dict):
        raise LoramixError(f"{source}: expected a YAML mapping with sections model, adapter, data, train")
    for key in raw:
        reject_unknown(key, ["model", "adapter", "data", "train"], f"section in {source}")
    model = _build(ModelSpec, raw.get("model"), "model")
    if not model.name_or_path:
        raise LoramixError(f"{source}: model.name_or_path is required (a hub id, a local folder or a .gguf file)")
    check_quantization(model)
    adapter = dict(raw.get("adapter") or {})
    if adapter.setdefault("type", "mixlora") not in ("mixlora", "lora"):
        raise LoramixError(f"{source}: adapter.type must be 'mixlora' or 'lora', found {adapter['type']!r}")
    data = _build(DataSpec, raw.get("data"), "data")
    train = _build(TrainSpec, raw.get("train"), "train")
    if train.precision not in _PRECISIONS:
        raise LoramixError(f"train.precision must be one of {', '.join(_PRECISIONS)}, found {train.precision!r}")
    check_dispatch(train.moe_dispatch, what="train.moe_dispatch")
    if train.lr_scheduler not in _SCHEDULERS:
        raise LoramixError(f"train.lr_scheduler must be one of {', '.join(_SCHEDULERS)}, found {train.lr_scheduler!r}")
    for name in ("micro_batch_size", "gradient_accumulation_steps", "logging_steps", "eval_batch_size"):
        if getattr(train, name) < 1:
            raise LoramixError(f"train.{name} must be >= 1, found {getattr(train, name)}")
    if train.loraplus_lr_ratio < 1:
        raise LoramixError(f"train.loraplus_lr_ratio must be >= 1, found {train.loraplus_lr_ratio}")
    return RunConfig(model=model, adapter=adapter, data=data, train=train, source=source)


def check_quantization(model: ModelSpec) -> None:
    """``model.quantization`` is one of QUANTIZATIONS (or empty); ``double_quant`` needs a 4-bit one."""
    if model.quantization is not None and model.quantization not in QUANTIZATIONS:
        raise LoramixError(f"model.quantization must be one of {', '.join(QUANTIZATIONS)}, "
                           f"found {model.quantization!r}")
    if model.double_quant and model.quantization not in ("nf4", "fp4"):
        raise LoramixError(f"model.double_quant quantises the scales of a 4-bit base: it needs model.quantization "
                           f"nf4 or fp4, found {model.quantization or 'none'}")


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``--set a.b.c=value`` to the parsed YAML (the value is parsed as YAML: numbers, lists, ...)."""
    if "=" not in assignment:
        raise LoramixError(f"--set {assignment!r}: expected key=value, e.g. train.learning_rate=1e-4")
    path, _, text = assignment.partition("=")
    keys = path.strip().split(".")
    value = yaml.safe_load(text) if text.strip() else None
    node: Any = raw
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise LoramixError(f"--set {path}: {'.'.join(keys[:i]) or 'list'} has no item {key!r}")
            if last:
                node[int(key)] = value
            else:
                node = node[int(key)]
            continue
        if not isinstance(node, dict):
            raise LoramixError(f"--set {path}: {'.'.join(keys[:i])} is not a section")
        if last:
            node[key] = value
        else:
            node = node.setdefault(key, {})


def load_run_config(path: str, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config, apply ``--set`` overrides and validate it."""
    if not os.path.isfile(path):
        raise LoramixError(f"{path}: no such config file")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise LoramixError(f"{path}{line}: malformed YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict):
        raise LoramixError(f"{path}: expected a YAML mapping with sections model, adapter, data, train")
    for assignment in overrides:
        apply_override(raw, assignment)
    try:
        return build_run_config(raw, source=path)
    except LoramixError as e:
        msg = str(e)
        raise LoramixError(msg if msg.startswith(path) else f"{path}: {msg}") from None
