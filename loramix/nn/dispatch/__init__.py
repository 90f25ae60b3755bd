"""The MoE dispatch paths, one module each, registered here by name.

Every path implements :class:`~loramix.nn.ffn.Dispatch` over an :class:`~loramix.nn.ffn.ExpertFFN` and
computes the same function (tests/test_fast_path.py holds them to the per-expert path). Adding a kernel
is one module plus one entry in ``_PATHS``. ``auto`` (auto.py), the default, is no path of its own: each
call runs the registered path its table names for the device, dtype and widths.
"""

from __future__ import annotations

from ...errors import LoramixError
from ..ffn import Dispatch
from .auto import AutoDispatch
from .dense import DenseDispatch
from .grouped import GroupedDispatch
from .grouped_mm import GroupedMMDispatch
from .per_expert import PerExpertDispatch

_PATHS: tuple[Dispatch, ...] = (GroupedDispatch(), GroupedMMDispatch(), DenseDispatch(), PerExpertDispatch())
PATHS: dict[str, Dispatch] = {path.name: path for path in _PATHS}
DISPATCHES: tuple[str, ...] = tuple(PATHS)  # the concrete paths
AUTO = AutoDispatch(PATHS)
DEFAULT_DISPATCH = AUTO.name
CHOICES: tuple[str, ...] = (AUTO.name, *DISPATCHES)  # what set_dispatch and train.moe_dispatch accept


def check_dispatch(name: str, *, what: str = "dispatch") -> str:
    """``name`` if it is ``auto`` or a registered path; else a LoramixError naming ``what`` and the choices."""
    if name not in CHOICES:
        raise LoramixError(f"{what} must be one of {', '.join(map(repr, CHOICES))}, got {name!r}")
    return name


def dispatch_path(name: str, *, dora: bool) -> Dispatch:
    """The path to run for ``name``: the per-expert path when the FFN has DoRA experts that ``name`` cannot
    compute."""
    path = AUTO if name == AUTO.name else PATHS[name]
    return path if path.handles_dora or not dora else PATHS[PerExpertDispatch.name]
