"""The straightforward per-expert MixLoRA FFN, straight from the formula (the yardstick for the fast path)."""

from __future__ import annotations

import torch


def reference_expert_mix(ffn, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """``y_t = sum_slot w[t, slot] FFN_{experts[t, slot]}(x_t)``, one full expert FFN per expert.

    ffn: a :class:`~loramix.moe.MixLoraFFN`; x: ``[T, D]``; weights, experts: ``[T, k]``. Each expert
    gathers its tokens with a boolean mask and runs every projection (base + its own delta), the
    output projection included, as the reference implementation does.
    """
    out = torch.zeros(x.shape[0], x.shape[-1], device=x.device, dtype=torch.float32)

    def project(name: str, u: torch.Tensor, expert: int) -> torch.Tensor:
        if name in ffn.experts:  # base + delta, or DoRA's rescaled form
            return ffn.experts[name].project(ffn.projection(name), u, expert)
        return ffn.projection(name)(u)

    for expert in range(ffn.num_experts):
        token, slot = torch.nonzero(experts == expert, as_tuple=True)
        if token.numel() == 0:
            continue
        u = x[token]
        act = ffn.activate([project(name, u, expert) for name in ffn.input_names])
        y = project(ffn.output_name, act, expert)
        out.index_add_(0, token, y.float() * weights[token, slot].unsqueeze(-1))
    return out.to(x.dtype)
