"""The grouped-GEMM path for GPUs: the grouped path's :class:`~.grouped.PairMix` with every per-expert
product as one ``torch.nn.functional.grouped_mm`` over device-side offsets, so a layer never waits on the host.

The grouped path reads the segment sizes on the host (one sync per layer) and launches a small matmul per
expert and product, which on a GPU leaves the step bound by the host (benchmarks/README.md, "GPU"). Here
the pairs are sorted by expert on the device and the per-expert ends of their segments (``offs``, int32,
cumulative) come from a ``searchsorted`` on the sorted expert ids, also on the device (``bincount`` would
read its maximum on the host on CUDA). Each LoRA product over all experts is then one grouped GEMM: on
CUDA in bf16 on sm90/sm100 PyTorch's CUTLASS kernel; elsewhere its fallback, a loop over the groups (on
CUDA it copies the offsets to the host first, so there it syncs like the grouped path). The base projections run once as in the grouped path;
what backward keeps is the grouped path's (the pairs' pre-activation and rank-r rows, nothing per
expert; the activation is recomputed).

The kernel's rules: both operands in one dtype (fp32, bf16 or fp16; the CUTLASS kernel only in bf16), and
every operand's rows starting on 16-byte boundaries (strides in multiples of 8 bf16 or 4 fp32 elements).
An operand whose row stride is not a multiple is copied into padded rows (the same values, a view into
wider storage): for a rank that costs ``[P, r]`` and ``[E, out, r]`` copies, for a hidden or FFN width a
``[P, width]`` copy per product, which ``auto`` avoids by choosing another path (auto.py). Experts without
pairs get a zero weight gradient explicitly (pytorch/pytorch#172439: not every GPU's kernel writes them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .grouped import GroupedDispatch

ALIGNMENT_BYTES = 16  # the grouped-GEMM kernels' row alignment
CUTLASS_MAJORS = (9, 10)  # compute-capability majors where PyTorch runs bf16 grouped_mm as one CUTLASS kernel


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the base projections compute x in: autocast's on x's device when it is enabled, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def gemm_dtype(compute: torch.dtype) -> torch.dtype:
    """The dtype of the grouped GEMMs when the base computes in ``compute``: bf16 for bf16 (the dtype of the
    CUTLASS kernel), else fp32 (the expert LoRAs' own)."""
    return torch.bfloat16 if compute == torch.bfloat16 else torch.float32


def is_aligned(width: int, dtype: torch.dtype) -> bool:
    """Whether rows of ``width`` elements of ``dtype`` keep the kernel's 16-byte alignment unpadded."""
    return width * dtype.itemsize % ALIGNMENT_BYTES == 0


def _aligned_rows(t: torch.Tensor) -> torch.Tensor:
    """t (2-D or 3-D) if its last dim is contiguous and its rows start on 16-byte boundaries; else the same
    values in rows padded to them (a view into wider, zero-padded storage)."""
    strides = t.stride()[:-1]
    if t.stride(-1) == 1 and all(stride * t.element_size() % ALIGNMENT_BYTES == 0 for stride in strides):
        return t
    step = ALIGNMENT_BYTES // t.element_size()
    width = t.shape[-1]
    padded = t.new_zeros(*t.shape[:-1], -(-width // step) * step)
    padded[..., :width] = t
    return padded[..., :width]


@dataclass(frozen=True)
class OffsetPairs:
    """:class:`~.grouped.SortedPairs` with device-side segment ends: ``offs`` ``[E]`` int32, expert e's pairs
    are ``offs[e-1]:offs[e]`` of the sorted pairs; ``has_pairs`` ``[E]`` bool, the experts with any.

    Every matmul is one ``grouped_mm`` in ``dtype`` (operands are cast to it, so the fp32 LoRA parameters
    are never saved as copies); nothing is read on the host.
    """

    token: torch.Tensor
    order: torch.Tensor
    offs: torch.Tensor
    has_pairs: torch.Tensor
    dtype: torch.dtype

    def matmul(self, x: torch.Tensor, weight: torch.Tensor, *, accumulate: torch.Tensor | None = None,
               alpha: float = 1.0) -> torch.Tensor:
        """``y[seg_e] = x[seg_e] @ weight[e]^T`` in ``dtype``; with ``accumulate``, ``alpha * y`` is added
        into it in place (see :class:`~.grouped.SortedPairs`)."""
        if x.shape[0] == 0:  # no pairs: the kernel's backward rejects a zero-length operand
            y = x.new_zeros(0, weight.shape[1], dtype=self.dtype)
        else:
            y = F.grouped_mm(self._operand(x), self._operand(weight).transpose(-2, -1), offs=self.offs)  # [P, m]
        return y if accumulate is None else accumulate.add_(y, alpha=alpha)

    def matmul_backward(self, grad: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor, *,
                        need_weight: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(grad_x [P, n], grad_weight [E, m, n] or None)`` of :meth:`matmul` from ``grad`` ``[P, m]``."""
        if grad.shape[0] == 0:
            zeros = torch.zeros_like(weight, dtype=self.dtype) if need_weight else None
            return grad.new_zeros(0, weight.shape[2], dtype=self.dtype), zeros
        grad = self._operand(grad)
        grad_x = F.grouped_mm(grad, self._operand(weight), offs=self.offs)                # [P, n]
        grad_weight = None
        if need_weight:
            per_expert = F.grouped_mm(grad.t(), self._operand(x), offs=self.offs)           # [E, m, n]
            grad_weight = torch.where(self.has_pairs.view(-1, 1, 1), per_expert, 0)
        return grad_x, grad_weight

    def _operand(self, t: torch.Tensor) -> torch.Tensor:
        return _aligned_rows(t.to(self.dtype))


def offset_pairs(experts: torch.Tensor, num_experts: int, dtype: torch.dtype) -> OffsetPairs:
    """experts: ``[T, k]`` long -> the pairs sorted by expert and their segment ends, all on the device, with
    matmuls in ``dtype``."""
    expert_ids, order = torch.sort(experts.reshape(-1), stable=True)
    offs = torch.searchsorted(expert_ids, torch.arange(num_experts, device=experts.device), right=True,
                              out_int32=True)
    starts = torch.cat([offs.new_zeros(1), offs[:-1]])
    return OffsetPairs(token=order // experts.shape[1], order=order, offs=offs, has_pairs=offs > starts, dtype=dtype)


class GroupedMMDispatch(GroupedDispatch):
    """The grouped path with each per-expert product as one grouped GEMM over device-side offsets: no host
    sync, no per-expert launches (the GPU path in bf16)."""

    name = "grouped_mm"

    def sort(self, experts: torch.Tensor, num_experts: int, dtype: torch.dtype) -> OffsetPairs:
        return offset_pairs(experts, num_experts, dtype)

    def lora_dtype(self, x: torch.Tensor) -> torch.dtype:
        return gemm_dtype(compute_dtype(x))
