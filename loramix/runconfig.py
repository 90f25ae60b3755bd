"""The run config: one YAML file with the base model, the adapter, the data and the training settings.

Sections ``model``, ``adapter``, ``data``, ``train``; ``docs/cli.md`` documents every key. Unknown keys are
errors with a did-you-mean; ``--set a.b=value`` overrides any key (list items by index: ``data.datasets.0.path``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from .config import reject_unknown
from .errors import LoramixError, Problems
from .nn.dispatch import CHOICES as DISPATCH_CHOICES
from .nn.dispatch import DEFAULT_DISPATCH
from .training.methods import check_peft_lora, method_spec


DATA_FORMATS = ("auto", "instruction", "commonsense", "classification", "tsv", "reference", "hub")
MODEL_DTYPES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")
_PRECISIONS = ("fp32", "bf16")
QUANTIZATIONS = ("nf4", "fp4", "int8")
_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "polynomial", "cosine_with_restarts")


def _key(default: Any, **rule: Any) -> Any:
    """A config key with its allowed values: ``ge``/``gt``/``le``/``lt`` bounds or ``choices`` (see _check_rule)."""
    return field(default=default, metadata=rule)


@dataclass
class ModelSpec:
    """The frozen base model: a hub id, a local folder, or a local ``.gguf`` file.

    ``quantization`` loads it through bitsandbytes (docs/quantization.md): ``nf4`` or ``fp4`` (4-bit,
    computing in ``dtype``; ``double_quant`` also quantises the block scales) or ``int8`` (LLM.int8).
    """

    name_or_path: str = ""
    gguf_file: str | None = None
    tokenizer: str | None = None
    dtype: str = _key("float32", choices=MODEL_DTYPES)
    trust_remote_code: bool = False
    quantization: str | None = None
    double_quant: bool = False


@dataclass
class DatasetSpec:
    """One dataset of a (multi-task) mixture; see docs/cli.md for the formats."""

    path: str = ""
    format: str = _key("auto", choices=DATA_FORMATS)
    task: str | None = None
    template: str | None = None
    weight: float = _key(1.0, gt=0)
    samples: int | None = _key(None, ge=1)
    limit: int | None = _key(None, ge=1)
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
    cutoff_len: int = _key(256, ge=1)
    train_on_inputs: bool = False
    add_eos: bool = True


@dataclass
class TrainSpec:
    """Optimiser, schedule, batching, precision, checkpointing and logging."""

    output_dir: str = "runs/loramix"
    epochs: float = _key(1.0, gt=0)
    max_steps: int | None = _key(None, ge=1)
    micro_batch_size: int = _key(4, ge=1)
    gradient_accumulation_steps: int = _key(1, ge=1)
    learning_rate: float = _key(2e-4, gt=0)
    lr_scheduler: str = _key("linear", choices=_SCHEDULERS)
    warmup_ratio: float = _key(0.0, ge=0, le=1)
    warmup_steps: int = _key(0, ge=0)
    loraplus_lr_ratio: float = _key(1.0, ge=1)
    weight_decay: float = _key(0.0, ge=0)
    adam_beta1: float = _key(0.9, ge=0, lt=1)
    adam_beta2: float = _key(0.999, ge=0, lt=1)
    adam_epsilon: float = _key(1e-8, gt=0)
    max_grad_norm: float | None = _key(1.0, gt=0)
    skip_nonfinite: bool = False
    collective_timeout_s: float | None = _key(600.0, gt=0)
    precision: str = _key("fp32", choices=_PRECISIONS)
    gradient_checkpointing: bool | None = None  # None: on for a quantised base, off otherwise
    fsdp: bool = False
    moe_dispatch: str = _key(DEFAULT_DISPATCH, choices=DISPATCH_CHOICES)
    seed: int = _key(42, ge=0)
    logging_steps: int = _key(1, ge=1)
    save_steps: int = _key(0, ge=0)
    save_total_limit: int | None = _key(2, ge=1)
    eval_batch_size: int = _key(8, ge=1)
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
        number = None
        if not isinstance(value, bool):  # YAML reads 2e-4 (no dot) as a string
            with contextlib.suppress(TypeError, ValueError):
                number = float(value)
        if number is None or not math.isfinite(number):
            raise LoramixError(f"{where}: must be a finite number, found {value!r}")
        value = number
    elif origin is str:
        if not isinstance(value, str):
            raise LoramixError(f"{where}: must be a string, found {value!r}")
    elif origin is list and not isinstance(value, list):
        raise LoramixError(f"{where}: must be a list, found {value!r}")
    return value


def _check_rule(value: Any, rule: dict[str, Any], where: str) -> None:
    """``value`` (already of the key's type; None passes) within the key's bounds or choices."""
    if value is None:
        return
    if "choices" in rule and value not in rule["choices"]:
        raise LoramixError(f"{where}: must be one of {', '.join(rule['choices'])}, found {value!r}")
    for name, sign, fails in (("ge", ">=", lambda v, b: v < b), ("gt", ">", lambda v, b: v <= b),
                              ("le", "<=", lambda v, b: v > b), ("lt", "<", lambda v, b: v >= b)):
        if name in rule and fails(value, rule[name]):
            raise LoramixError(f"{where}: must be {sign} {rule[name]}, found {value}")


def _build(cls: type, raw: Any, where: str, problems: Problems, clean: dict[str, bool]) -> Any:
    """Dataclass ``cls`` from a dict; unknown keys and wrong values are recorded in ``problems`` (and left at
    their defaults). ``clean[where]`` says whether this part had none."""
    before = len(problems)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.add(f"{where}: expected a mapping of keys, found {type(raw).__name__}")
        raw = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if not problems.check(reject_unknown, key, list(fields), "key", prefix=f"{where}: "):
            continue
        if key in ("datasets", "eval"):
            if not isinstance(value, list):
                problems.add(f"{where}.{key}: must be a list of datasets")
                continue
            kwargs[key] = [_build(DatasetSpec, v, f"{where}.{key}[{i}]", problems, clean) for i, v in enumerate(value)]
        else:
            ok, value = problems.run(_checked_value, value, hints[key], fields[key].metadata, f"{where}.{key}")
            if ok:
                kwargs[key] = value
    clean[where] = len(problems) == before
    return cls(**kwargs)


def _checked_value(value: Any, tp: Any, rule: dict[str, Any], where: str) -> Any:
    value = _coerce(value, tp, where)
    _check_rule(value, rule, where)
    return value


def _check_adapter(adapter: dict[str, Any]) -> None:
    """The adapter section as its builder reads it: ``type: mixlora`` through training.methods.method_spec (the
    MixLoraConfig keys plus ``method`` and ``lora_r``), ``type: lora`` as PEFT LoraConfig keys."""
    keys = {k: v for k, v in adapter.items() if k != "type"}
    if adapter["type"] == "mixlora":
        method_spec(keys, source="adapter")
    else:
        check_peft_lora(keys, source="adapter")


def build_run_config(raw: Any, *, source: str = "config",
                     check_model: Callable[[ModelSpec], None] | None = None,
                     check_dataset: Callable[[DatasetSpec], None] | None = None) -> RunConfig:
    """Validate a parsed YAML document into a RunConfig; one LoramixError lists every problem, a line each.

    For a run that is about to start, ``check_model`` is applied to the model section and ``check_dataset`` to
    each training dataset (then ``data.datasets`` must not be empty), when those parts are well-formed.
    """
    if not isinstance(raw, dict):
        raise LoramixError(f"{source}: expected a YAML mapping with sections model, adapter, data, train")
    problems = Problems()
    for key in raw:
        problems.check(reject_unknown, key, ["model", "adapter", "data", "train"], "section")
    clean: dict[str, bool] = {}
    model = _build(ModelSpec, raw.get("model"), "model", problems, clean)
    if not model.name_or_path:
        problems.add("model.name_or_path is required (a hub id, a local folder or a .gguf file)")
    else:
        problems.check(check_quantization, model)
    if model.name_or_path and check_model is not None and clean["model"]:
        problems.check(check_model, model, prefix="model.")
    adapter = raw.get("adapter") or {}
    if not isinstance(adapter, dict):
        problems.add(f"adapter: expected a mapping of keys, found {type(adapter).__name__}")
        adapter = {}
    adapter = dict(adapter)
    if adapter.setdefault("type", "mixlora") not in ("mixlora", "lora"):
        problems.add(f"adapter.type: must be 'mixlora' or 'lora', found {adapter['type']!r}")
    else:
        problems.check(_check_adapter, adapter)
    data = _build(DataSpec, raw.get("data"), "data", problems, clean)
    train = _build(TrainSpec, raw.get("train"), "train", problems, clean)
    if check_dataset is not None:
        entries = raw["data"].get("datasets") if isinstance(raw.get("data"), dict) else None
        if entries in (None, []):
            problems.add("data.datasets is empty: give at least one training dataset")
        for i, spec in enumerate(data.datasets):
            where = f"data.datasets[{i}]"
            if clean[where]:
                problems.check(check_dataset, dataclasses.replace(spec, template=spec.template or data.template),
                               prefix=f"{where}: ")
    problems.raise_if_any(prefix=f"{source}: ")
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


def load_run_config(path: str, overrides: list[str] = (), **checks: Any) -> RunConfig:
    """Read a YAML run config, apply ``--set`` overrides and validate it (``checks``: as in build_run_config)."""
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
    return build_run_config(raw, source=path, **checks)
