"""The sync-free path for GPUs: every expert LoRA as one masked matmul over all experts' ranks.

The grouped path sorts the (token, expert) pairs and loops over expert segments: few FLOPs, but one host
sync per layer for the segment sizes and a few small matmuls per expert, which on a GPU leave the step
bound by kernel launches (benchmarks/README.md, "GPU"). Here the pairs stay in token order (pair
``t * k + j`` is token t's j-th choice) and each LoRA runs over all experts at once: the stacked
``A`` ``[E, r, in]`` as one ``[E*r, in]`` matrix on the tokens, each pair's rank rows masked to its own
expert's block, and the stacked ``B`` as one ``[out, E*r]`` matrix on the masked rows. That spends E times
the B-side LoRA FLOPs to make every op a plain dense one with shapes fixed by T and k: no sort, no sync,
no per-expert loop, and ordinary autograd for the backward. It keeps more activations than the grouped
path (benchmarks/README.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..experts import ExpertLoras
from ..ffn import ExpertFFN


def stacked_a(lora: ExpertLoras) -> torch.Tensor:
    """All experts' A as one matrix: ``[E*r, in]`` (rows e*r .. e*r+r-1 are expert e's)."""
    return lora.lora_A.reshape(-1, lora.lora_A.shape[-1])


def stacked_b(lora: ExpertLoras) -> torch.Tensor:
    """All experts' B side by side: ``[out, E*r]`` (columns e*r .. e*r+r-1 are expert e's)."""
    return lora.lora_B.permute(1, 0, 2).reshape(lora.lora_B.shape[1], -1)


def pair_deltas(lora: ExpertLoras, low: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``s B_e (A_e u)`` per pair from the pairs' rows of every expert's rank projection.

    low: ``[P, E*r]`` fp32 (``u A^T`` for each pair's input u); mask: ``[P, E*r]``, 1 on the pair's own
    expert's block, 0 elsewhere -> ``[P, out]`` fp32.
    """
    return (low * mask) @ stacked_b(lora).t() * lora.scaling


def expert_block_mask(experts: torch.Tensor, rank: int, num_experts: int) -> torch.Tensor:
    """experts: ``[T, k]`` -> the block mask ``[T*k, E*r]`` fp32 of each pair's own expert."""
    onehot = F.one_hot(experts.reshape(-1), num_experts).to(torch.float32)             # [P, E]
    return onehot.repeat_interleave(rank, dim=1)


class DenseDispatch:
    """Base input projections once on the tokens, the expert deltas as masked matmuls over all experts in
    fp32, the shared base output projection once on ``sum_e w_e a_e``."""

    name = "dense"
    handles_dora = False

    def __call__(self, ffn: ExpertFFN, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        num_tokens, k = experts.shape
        masks: dict[int, torch.Tensor] = {}

        def mask_for(lora: ExpertLoras) -> torch.Tensor:
            return masks.setdefault(lora.rank, expert_block_mask(experts, lora.rank, ffn.num_experts))

        pre = []
        for projection in ffn.inputs:
            row = projection.module(x).repeat_interleave(k, dim=0)                       # [P, out]
            lora = projection.lora
            if lora is not None:
                low = (lora.dropped_input(x) @ stacked_a(lora).t()).repeat_interleave(k, dim=0)  # [P, E*r]
                row = row + pair_deltas(lora, low, mask_for(lora)).to(row.dtype)
            pre.append(row)
        act = ffn.activate(pre)                                                          # [P, I]
        w = weights.reshape(-1, 1)                                                       # [P, 1] fp32
        mixed = (act.float() * w).view(num_tokens, k, -1).sum(dim=1)                     # [T, I] fp32
        y = ffn.mixed_output(mixed, weights, x.dtype)                                    # [T, D]
        out_lora = ffn.output.lora
        if out_lora is not None:
            dropped = act.float()
            keep = out_lora.dropout_mask(num_tokens)  # one mask per token, shared by its experts
            if keep is not None:
                dropped = dropped * keep.repeat_interleave(k, dim=0)
            deltas = pair_deltas(out_lora, dropped @ stacked_a(out_lora).t(), mask_for(out_lora))  # [P, D]
            y = y + (deltas * w).view(num_tokens, k, -1).sum(dim=1).to(y.dtype)
        return y
