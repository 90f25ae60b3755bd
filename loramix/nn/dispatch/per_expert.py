"""The per-expert path, straight from the formula: one full expert FFN per expert on the tokens routed to it.

The yardstick every faster path is tested against, and the path DoRA experts take (their magnitude
rescales each expert's projection after it, which breaks the shared-output-projection identity the other
paths rest on). It is what the reference implementation does.
"""

from __future__ import annotations

import torch

from ..ffn import ExpertFFN, ExpertProjection


def _project(projection: ExpertProjection, u: torch.Tensor, expert: int) -> torch.Tensor:
    """Expert ``expert``'s whole projection of u ``[n, in]``: base + delta, or DoRA's rescaled form."""
    if projection.lora is None:
        return projection.module(u)
    return projection.lora.project(projection.module, u, expert)


class PerExpertDispatch:
    """Each expert gathers its tokens and runs every projection (base + its own delta), the output
    projection included."""

    name = "per_expert"
    handles_dora = True

    def __call__(self, ffn: ExpertFFN, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], x.shape[-1], device=x.device, dtype=torch.float32)
        for expert in range(ffn.num_experts):
            token, slot = torch.nonzero(experts == expert, as_tuple=True)
            if token.numel() == 0:
                continue
            u = x[token]
            act = ffn.activate([_project(p, u, expert) for p in ffn.inputs])
            y = _project(ffn.output, act, expert)
            out.index_add_(0, token, y.float() * weights[token, slot].unsqueeze(-1))
        return out.to(x.dtype)
