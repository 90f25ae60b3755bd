"""The MoE dispatch paths, one module each, registered here by name.

Every path implements :class:`~loramix.nn.ffn.Dispatch` over an :class:`~loramix.nn.ffn.ExpertFFN` and
computes the same function (tests/test_fast_path.py holds them to the per-expert path). Adding a kernel
is one module plus one entry in ``_PATHS``.
"""

from __future__ import annotations

from ...errors import LoramixError
from ..ffn import Dispatch
from .dense import DenseDispatch
from .grouped import GroupedDispatch
from .per_expert import PerExpertDispatch

_PATHS: tuple[Dispatch, ...] = (GroupedDispatch(), DenseDispatch(), PerExpertDispatch())
PATHS: dict[str, Dispatch] = {path.name: path for path in _PATHS}
DISPATCHES: tuple[str, ...] = tuple(PATHS)
DEFAULT_DISPATCH = "grouped"


def check_dispatch(name: str, *, what: str = "dispatch") -> str:
    """``name`` if it is a registered path; else a LoramixError naming ``what`` and the choices."""
    if name not in PATHS:
        raise LoramixError(f"{what} must be one of {', '.join(map(repr, DISPATCHES))}, got {name!r}")
    return name


def dispatch_path(name: str, *, dora: bool) -> Dispatch:
    """The path to run for ``name``: the per-expert path when the FFN has DoRA experts that ``name`` cannot
    compute."""
    path = PATHS[name]
    return path if path.handles_dora or not dora else PATHS[PerExpertDispatch.name]
