"""MixLoraConfig: the adapter's hyper-parameters, their validation, JSON, and upstream import."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import LoramixError

INIT_CHOICES = ("original", "gaussian")
EXPERT_LORA_KEYS = ("r", "lora_alpha", "lora_dropout")
CONFIG_NAME = "adapter_config.json"


@dataclass
class MixLoraConfig:
    """Hyper-parameters of a MixLoRA adapter.

    Attention projections get one LoRA each (``r``, ``lora_alpha``, ``lora_dropout``); every
    FFN projection gets ``num_experts`` stacked expert LoRAs (the same values unless
    ``expert_lora`` overrides them); a bias-free fp32 router per layer picks ``top_k`` experts.
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None
    use_rslora: bool = False
    init_lora_weights: str = "original"
    num_experts: int = 8
    top_k: int = 2
    router_init_range: float = 0.02
    jitter_noise: float = 0.0
    router_aux_loss_coef: float = 0.001
    router_loss: bool = True
    expert_lora: dict[str, Any] | None = None
    act_fn: str | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = "CAUSAL_LM"

    def __post_init__(self) -> None:
        self.validate()

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise LoramixError naming the first field that is wrong, what it is and what is allowed."""
        _check_int("r", self.r, minimum=1)
        _check_number("lora_alpha", self.lora_alpha, minimum=0, strict=True)
        _check_number("lora_dropout", self.lora_dropout, minimum=0, maximum=1, upper_strict=True)
        if self.target_modules is not None:
            if isinstance(self.target_modules, str) or not all(isinstance(t, str) for t in self.target_modules):
                raise LoramixError(
                    f"config field 'target_modules' must be a list of module names, got {self.target_modules!r}"
                )
            if not self.target_modules:
                raise LoramixError("config field 'target_modules' is empty: name at least one projection")
            self.target_modules = list(self.target_modules)
        _check_bool("use_rslora", self.use_rslora)
        if self.init_lora_weights not in INIT_CHOICES:
            raise LoramixError(
                f"config field 'init_lora_weights' must be one of {list(INIT_CHOICES)}, got {self.init_lora_weights!r}"
            )
        _check_int("num_experts", self.num_experts, minimum=1)
        _check_int("top_k", self.top_k, minimum=1)
        if self.top_k > self.num_experts:
            raise LoramixError(
                f"config field 'top_k' ({self.top_k}) must not exceed 'num_experts' ({self.num_experts})"
            )
        _check_number("router_init_range", self.router_init_range, minimum=0)
        _check_number("jitter_noise", self.jitter_noise, minimum=0, maximum=1, upper_strict=True)
        _check_number("router_aux_loss_coef", self.router_aux_loss_coef, minimum=0)
        _check_bool("router_loss", self.router_loss)
        if self.expert_lora is not None:
            if not isinstance(self.expert_lora, dict):
                raise LoramixError(f"config field 'expert_lora' must be a mapping, got {self.expert_lora!r}")
            for key, value in self.expert_lora.items():
                _reject_unknown(key, EXPERT_LORA_KEYS, "expert_lora key")
                if key == "r":
                    _check_int("expert_lora.r", value, minimum=1)
                elif key == "lora_alpha":
                    _check_number("expert_lora.lora_alpha", value, minimum=0, strict=True)
                else:
                    _check_number("expert_lora.lora_dropout", value, minimum=0, maximum=1, upper_strict=True)
        if self.act_fn is not None:
            from transformers.activations import ACT2FN

            if self.act_fn not in ACT2FN:
                _reject_unknown(self.act_fn, sorted(ACT2FN), "act_fn value")

    # ---- derived values -------------------------------------------------------------------------
    def expert_value(self, key: str) -> Any:
        """An expert LoRA setting: the ``expert_lora`` override if present, else the top-level value."""
        if self.expert_lora and key in self.expert_lora:
            return self.expert_lora[key]
        return getattr(self, key)

    def scaling(self, *, expert: bool) -> float:
        """LoRA scale ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) for attention or expert LoRAs."""
        r = self.expert_value("r") if expert else self.r
        alpha = self.expert_value("lora_alpha") if expert else self.lora_alpha
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # ---- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"peft_type": "MIXLORA", "routing_strategy": "mixlora", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "MixLoraConfig":
        """Build from our JSON dict or the reference's ``adapter_config.json`` (MoE-PEFT key names)."""
        if not isinstance(data, dict):
            raise LoramixError(f"{source}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        peft_type = data.pop("peft_type", "MIXLORA")
        if peft_type is not None and str(peft_type).upper() != "MIXLORA":
            raise LoramixError(f"{source}: peft_type {peft_type!r} is not a MixLoRA adapter (expected 'MIXLORA')")
        strategy = data.pop("routing_strategy", "mixlora")
        if strategy != "mixlora":
            raise LoramixError(
                f"{source}: routing_strategy {strategy!r} is not supported yet (supported: 'mixlora', top-k routing)"
            )
        # Reference (MoE-PEFT) names and keys that carry no information for us.
        if "lora_init" in data:
            data["init_lora_weights"] = data.pop("lora_init")
        if data.get("bias", "none") != "none":
            raise LoramixError(f"{source}: bias {data['bias']!r} is not supported (only 'none')")
        data.pop("bias", None)
        for ignored in ("name", "task_name", "sparse_step"):
            data.pop(ignored, None)
        if isinstance(data.get("target_modules"), dict):  # reference also allows {name: bool}
            data["target_modules"] = [k for k, on in data["target_modules"].items() if on]
        if isinstance(data.get("expert_lora"), dict):
            data["expert_lora"] = {k: v for k, v in data["expert_lora"].items()
                                   if k not in ("bias", "peft_type", "target_modules")}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in data:
            _reject_unknown(key, list(fields), f"{source} key")
        try:
            return cls(**data)
        except LoramixError as exc:
            raise LoramixError(f"{source}: {exc}") from None

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2)
            fh.write("\n")

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "MixLoraConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(path):
            raise LoramixError(f"adapter config not found: {path}")
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise LoramixError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        return cls.from_dict(data, source=path)


def _reject_unknown(key: str, allowed: list[str] | tuple[str, ...], what: str) -> None:
    if key in allowed:
        return
    close = difflib.get_close_matches(str(key), list(allowed), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(allowed)}"
    raise LoramixError(f"unknown {what} {key!r}{hint}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise LoramixError(f"config field {name!r} must be true or false, got {value!r}")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LoramixError(f"config field {name!r} must be an integer, got {value!r}")
    if value < minimum:
        raise LoramixError(f"config field {name!r} must be >= {minimum}, got {value}")


def _check_number(name: str, value: Any, *, minimum: float, maximum: float | None = None,
                  strict: bool = False, upper_strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise LoramixError(f"config field {name!r} must be a number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise LoramixError(f"config field {name!r} must be {'>' if strict else '>='} {minimum}, got {value}")
    if maximum is not None and (value > maximum or (upper_strict and value == maximum)):
        raise LoramixError(f"config field {name!r} must be {'<' if upper_strict else '<='} {maximum}, got {value}")
