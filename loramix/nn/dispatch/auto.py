"""``auto``, the default dispatch: per call, the path a small table of measurements names for the device,
the dtype the base computes in and the FFN's widths.

The first rule of :data:`AUTO_TABLE` that matches wins. Each rule says what its choice rests on; the
"unmeasured" one follows the reasoning it gives and is to be settled by ``benchmarks/gpu.sh``
(benchmarks/README.md, "GPU"); docs/cli.md tabulates the rules for users.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ..ffn import Dispatch, ExpertFFN
from .grouped_mm import CUTLASS_MAJORS, compute_dtype, gemm_dtype, is_aligned


def lora_widths(ffn: ExpertFFN) -> set[int]:
    """The in and out widths of every adapted projection (the rows the grouped GEMMs multiply)."""
    return {width for p in ffn.projections if p.lora is not None
            for width in (p.lora.lora_A.shape[-1], p.lora.lora_B.shape[1])}


@dataclass(frozen=True)
class AutoRule:
    """Choose ``path`` on device type ``device`` (None: any) for base compute dtypes in ``dtypes`` (None: any),
    on GPUs whose compute-capability major is in ``majors`` (None: any) and, with ``aligned_widths``, only
    when every adapted projection's widths (:func:`lora_widths`) keep the grouped-GEMM alignment in the
    GEMM dtype.
    ``evidence``: the measurement behind the choice, or why it is a guess."""

    device: str | None
    dtypes: tuple[torch.dtype, ...] | None
    majors: tuple[int, ...] | None
    aligned_widths: bool
    path: str
    evidence: str

    def matches(self, widths: set[int], device: str, dtype: torch.dtype, major: int | None) -> bool:
        if self.device not in (None, device) or (self.dtypes is not None and dtype not in self.dtypes):
            return False
        if self.majors is not None and major not in self.majors:
            return False
        return not self.aligned_widths or all(is_aligned(width, gemm_dtype(dtype)) for width in widths)


AUTO_TABLE: tuple[AutoRule, ...] = (
    AutoRule("cpu", None, None, False, "grouped",
             "measured (benchmarks/README.md, CPU: every dispatch): at the default shape grouped_mm is no faster "
             "(fp32: 0-5 % slower per training step; bf16: mixed), dense and per_expert 1.3-1.6x grouped's step"),
    AutoRule("cuda", (torch.bfloat16,), CUTLASS_MAJORS, True, "grouped_mm",
             "unmeasured (benchmarks/gpu.sh settles it): PyTorch's CUTLASS grouped GEMM (bf16, sm90/sm100) "
             "needs no host sync and no per-expert launches, and keeps grouped's FLOPs and memory"),
    AutoRule("cuda", None, None, False, "dense",
             "measured on an H200 against grouped (benchmarks/README.md, GPU: dense 1.22-1.35x PEFT LoRA's step, "
             "grouped 2.08-2.21x); grouped_mm is not chosen here: outside bf16 on sm90/sm100 PyTorch's grouped_mm "
             "is a loop that reads the offsets on the host, and unaligned widths cost copies"),
    AutoRule(None, None, None, False, "dense",
             "unmeasured: other accelerators are launch-bound like CUDA, and dense runs plain dense ops only"),
)


def auto_path(widths: Iterable[int], device: str, dtype: torch.dtype, major: int | None = None) -> str:
    """The concrete path ``auto`` runs for an FFN with these :func:`lora_widths` on device type ``device``, the
    base computing in ``dtype`` (``major``: the GPU's compute-capability major). The last rule of
    :data:`AUTO_TABLE` matches every call."""
    widths = set(widths)
    return next(rule.path for rule in AUTO_TABLE if rule.matches(widths, device, dtype, major))


def device_major(device: torch.device) -> int | None:
    """The compute-capability major of a CUDA device (a cached host query), None elsewhere."""
    return torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else None


class AutoDispatch:
    """Each call runs ``paths[auto_path(...)]`` for x's device and compute dtype."""

    name = "auto"
    handles_dora = False

    def __init__(self, paths: Mapping[str, Dispatch]) -> None:
        self.paths = paths

    def __call__(self, ffn: ExpertFFN, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        path = auto_path(lora_widths(ffn), x.device.type, compute_dtype(x), device_major(x.device))
        return self.paths[path](ffn, x, weights, experts)
