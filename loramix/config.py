"""MixLoraConfig: the adapter's hyper-parameters, their validation, JSON, and reading MoE-PEFT's adapter_config.json."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import LoramixError, Problems
from .nn.routing import ROUTERS

INIT_CHOICES = ("original", "gaussian")
CONFIG_NAME = "adapter_config.json"
# Our routing names and the reference's ``routing_strategy`` for each (the routers own them: nn/routing.py).
ROUTINGS = {name: router.moe_peft_name for name, router in ROUTERS.items()}


@dataclass
class MixLoraConfig:
    """Hyper-parameters of a MixLoRA adapter.

    Attention projections get one LoRA each (``r``, ``lora_alpha``, ``lora_dropout``, ``use_dora``);
    every FFN projection gets ``num_experts`` stacked expert LoRAs (the same values unless
    ``expert_lora`` overrides them); a bias-free fp32 router per layer picks experts by ``routing``:
    ``"top_k"`` (``top_k`` experts, weights renormalised), ``"top_p"`` (experts in order of probability
    until their cumulative probability exceeds ``top_p``, weights not renormalised, ``temperature``
    divides the logits) or ``"switch"`` (one expert with capacity, see docs/variants.md).
    Fields left as None take the routing's default (its router's ``defaults``).
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: str = "original"
    num_experts: int = 8
    routing: str = "top_k"
    top_k: int | None = None
    top_p: float = 0.8
    temperature: float = 1.0
    capacity_factor: float = 1.0
    expert_capacity: int | None = None
    router_init_range: float | None = None
    jitter_noise: float | None = None
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.001
    router_loss: bool = True
    expert_lora: dict[str, Any] | None = None
    act_fn: str | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = "CAUSAL_LM"

    def __post_init__(self) -> None:
        if isinstance(self.routing, str) and self.routing in ROUTERS:
            for key, value in ROUTERS[self.routing].defaults.items():
                if getattr(self, key) is None:
                    setattr(self, key, value)
        self.validate()

    # ---- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise one LoramixError naming every field that is wrong (a line each: the field, what it is, what is
        allowed)."""
        problems = Problems()
        check = problems.check
        for key, check_value in LORA_FIELD_CHECKS.items():
            check(check_value, key, getattr(self, key))
        if self.target_modules is not None and check(_check_target_modules, self.target_modules):
            self.target_modules = list(self.target_modules)
        num_experts_ok = check(_check_int, "num_experts", self.num_experts, minimum=1)
        if check(_check_str, "routing", self.routing) and num_experts_ok:  # the routing checks compare with them
            check(self._validate_routing)
        defaults = isinstance(self.routing, str) and self.routing in ROUTERS  # else None: no routing's default
        if defaults or self.router_init_range is not None:
            check(_check_number, "router_init_range", self.router_init_range, minimum=0)
        if defaults or self.jitter_noise is not None:
            check(_check_number, "jitter_noise", self.jitter_noise, minimum=0, maximum=1, upper_strict=True)
        check(_check_number, "router_aux_loss_coef", self.router_aux_loss_coef, minimum=0)
        check(_check_number, "router_z_loss_coef", self.router_z_loss_coef, minimum=0)
        check(_check_bool, "router_loss", self.router_loss)
        if self.expert_lora is not None and check(_check_mapping, "expert_lora", self.expert_lora):
            for key, value in self.expert_lora.items():
                if check(reject_unknown, key, EXPERT_LORA_KEYS, "expert_lora key"):
                    check(LORA_FIELD_CHECKS[key], f"expert_lora.{key}", value)
        if self.act_fn is not None:
            from transformers.activations import ACT2FN

            if self.act_fn not in ACT2FN:
                check(reject_unknown, self.act_fn, sorted(ACT2FN), "act_fn value")
        problems.raise_if_any()

    def _validate_routing(self) -> None:
        if self.routing not in ROUTINGS:
            reject_unknown(self.routing, list(ROUTINGS), "routing")
        if self.routing == "top_p":
            if self.top_k is not None:
                raise LoramixError("config field 'top_k' is not used by routing 'top_p' (set 'top_p' instead)")
            _check_number("top_p", self.top_p, minimum=0, maximum=1, strict=True)
        else:
            _check_int("top_k", self.top_k, minimum=1)
            if self.top_k > self.num_experts:
                raise LoramixError(
                    f"config field 'top_k' ({self.top_k}) must not exceed 'num_experts' ({self.num_experts})"
                )
        if self.routing == "switch" and self.top_k != 1:
            raise LoramixError(f"config field 'top_k' must be 1 with routing 'switch' (one expert), got {self.top_k}")
        _check_number("temperature", self.temperature, minimum=0, strict=True)
        _check_number("capacity_factor", self.capacity_factor, minimum=0, strict=True)
        if self.expert_capacity is not None:
            _check_int("expert_capacity", self.expert_capacity, minimum=1)

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
        rslora = self.expert_value("use_rslora") if expert else self.use_rslora
        return alpha / math.sqrt(r) if rslora else alpha / r

    # ---- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"peft_type": "MIXLORA", "routing_strategy": ROUTINGS[self.routing], **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "MixLoraConfig":
        """Build from our JSON dict or the reference's ``adapter_config.json`` (MoE-PEFT key names).

        A dict without our ``routing`` key is read with the reference's meanings: its ``routing_strategy``
        picks the routing, and a top-p ``temperature`` of 0 means none (see docs/variants.md).
        """
        if not isinstance(data, dict):
            raise LoramixError(f"{source}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        problems = Problems()
        peft_type = data.pop("peft_type", "MIXLORA")
        if peft_type is not None and str(peft_type).upper() != "MIXLORA":
            raise LoramixError(f"{source}: peft_type {peft_type!r} is not a MixLoRA adapter (expected 'MIXLORA')")
        if "routing_strategy" in data:
            problems.check(_read_routing_strategy, data, source)
        # Reference (MoE-PEFT) names and keys that carry no information for us.
        if "lora_init" in data:
            data["init_lora_weights"] = data.pop("lora_init")
        if data.get("bias", "none") != "none":
            problems.add(f"{source}: bias {data['bias']!r} is not supported (only 'none')")
        data.pop("bias", None)
        for ignored in ("name", "task_name", "sparse_step"):
            data.pop(ignored, None)
        if isinstance(data.get("target_modules"), dict):  # reference also allows {name: bool}
            data["target_modules"] = [k for k, on in data["target_modules"].items() if on]
        if isinstance(data.get("expert_lora"), dict):
            expert = {k: v for k, v in data["expert_lora"].items() if k not in ("bias", "peft_type", "target_modules")}
            if "lora_init" in expert:
                expert["init_lora_weights"] = expert.pop("lora_init")
            data["expert_lora"] = expert
        fields = [f.name for f in dataclasses.fields(cls)]
        known = {key: value for key, value in data.items()
                 if problems.check(reject_unknown, key, fields, "key", prefix=f"{source}: ")}
        config = problems.result(cls, **known, prefix=f"{source}: ")
        problems.raise_if_any()
        return config

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


def _read_routing_strategy(data: dict[str, Any], source: str) -> None:
    """In place: the reference's ``routing_strategy`` becomes our ``routing`` (they must agree if both are given)."""
    strategy = data.pop("routing_strategy")
    by_strategy = {v: k for k, v in ROUTINGS.items()}
    if strategy not in by_strategy:
        raise LoramixError(f"{source}: routing_strategy {strategy!r} is not supported "
                           f"(supported: {', '.join(repr(s) for s in by_strategy)})")
    if "routing" in data:
        if data["routing"] != by_strategy[strategy]:
            raise LoramixError(f"{source}: routing {data['routing']!r} contradicts routing_strategy {strategy!r}")
        return
    data["routing"] = by_strategy[strategy]
    if data["routing"] == "top_p" and "temperature" in data:
        temperature = data["temperature"]
        if temperature == 0:  # the reference's "no temperature"
            data["temperature"] = 1.0
        elif isinstance(temperature, (int, float)) and temperature > 0:
            warnings.warn(f"{source}: the reference divides top-p probabilities by temperature {temperature} "
                          "(scaling the layer output); loramix divides the router logits, so this adapter "
                          "routes differently here (docs/variants.md)", stacklevel=3)


def _check_target_modules(value: Any) -> None:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(t, str) for t in value):
        raise LoramixError(f"config field 'target_modules' must be a list of module names, got {value!r}")
    if not value:
        raise LoramixError("config field 'target_modules' is empty: name at least one projection")


def _check_mapping(name: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise LoramixError(f"config field {name!r} must be a mapping, got {value!r}")


def _check_init(name: str, value: Any) -> None:
    if value not in INIT_CHOICES:
        raise LoramixError(f"config field {name!r} must be one of {list(INIT_CHOICES)}, got {value!r}")


def reject_unknown(key: str, allowed: list[str] | tuple[str, ...], what: str) -> None:
    if key in allowed:
        return
    close = difflib.get_close_matches(str(key), list(allowed), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(allowed)}"
    raise LoramixError(f"unknown {what} {key!r}{hint}")


def _check_str(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise LoramixError(f"config field {name!r} must be a string, got {value!r}")


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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LoramixError(f"config field {name!r} must be a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise LoramixError(f"config field {name!r} must be {'>' if strict else '>='} {minimum}, got {value}")
    if maximum is not None and (value > maximum or (upper_strict and value == maximum)):
        raise LoramixError(f"config field {name!r} must be {'<' if upper_strict else '<='} {maximum}, got {value}")


# The LoRA settings of the attention LoRAs, which ``expert_lora`` may override for the experts: name -> its check.
LORA_FIELD_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "r": lambda name, value: _check_int(name, value, minimum=1),
    "lora_alpha": lambda name, value: _check_number(name, value, minimum=0, strict=True),
    "lora_dropout": lambda name, value: _check_number(name, value, minimum=0, maximum=1, upper_strict=True),
    "use_dora": _check_bool,
    "use_rslora": _check_bool,
    "init_lora_weights": _check_init,
}
EXPERT_LORA_KEYS = tuple(LORA_FIELD_CHECKS)
