"""The pair work of the fast MoE FFN as one autograd function.

A token routed to k experts makes k (token, expert) pairs. Sorted by expert, each expert's pairs form one
contiguous segment. :class:`PairMix` gathers the pairs' rows of the base input projections (computed
once for all tokens by the caller) and, segment by segment, adds the expert's LoRA delta into them with
two small matmuls (``x_rows A_e^T``, then ``B_e`` accumulated into the gathered rows: no delta tensor, no
padding). Then, over all pairs at once: the FFN activation, the weighted activations summed back onto
tokens (``mixed``; the caller runs the shared base output projection once on it, ``sum_e w_e W2 a_e =
W2 sum_e w_e a_e``), and the experts' output-projection LoRAs, per segment, summed onto tokens
(``delta``).

For backward it keeps the pairs' pre-activation rows and rank-r rows, not the activations or anything
per expert; the activation is recomputed once, with autograd on that op alone (so any activation module
works), and the LoRA gradients run per segment as small matmuls with one ``index_add_`` per input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class PairRouting:
    """(token, expert) pairs sorted by expert.

    token: ``[P]`` long, each pair's token; order: ``[P]`` positions of the pairs in the flattened ``[T*k]``
    routing; segments: per expert with pairs, ``(expert, start, end)`` into the sorted pairs.
    """

    token: torch.Tensor
    order: torch.Tensor
    segments: tuple[tuple[int, int, int], ...]


def sort_pairs(experts: torch.Tensor, num_experts: int) -> PairRouting:
    """experts: ``[T, k]`` long -> the pairs sorted by expert (one argsort, one bincount, one host sync)."""
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    segments, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            segments.append((expert, start, start + count))
        start += count
    return PairRouting(token=order // experts.shape[1], order=order, segments=tuple(segments))


@dataclass(frozen=True)
class PairMixSpec:
    """The non-tensor arguments of :class:`PairMix`.

    activate: the FFN activation from the input projections' pair rows (``MixLoraFFN.activate``);
    input_scalings: per input projection, its expert LoRA scaling, or None when it has no expert LoRA;
    output_scaling: the same for the output projection.
    """

    routing: PairRouting
    activate: Callable[[list[torch.Tensor]], torch.Tensor]
    input_scalings: tuple[float | None, ...]
    output_scaling: float | None


class PairMix(torch.autograd.Function):
    """The pair work of one MoE FFN: ``mixed`` ``[T, I]`` and ``delta`` ``[T, D]``, in the weights' dtype (fp32).

    Arguments after ``spec``: ``weight`` ``[P]`` fp32 (pair weights, sorted like the pairs); ``keep``
    ``[T, I]``, the output LoRA's dropout mask (0 or ``1/(1-p)``, one per token, shared by its experts) or
    None; per input projection j its base output ``H_j`` ``[T, out]`` and, with an expert LoRA, its dropped-out fp32
    input ``X_j`` ``[T, D]``, ``A_j`` ``[E, r, D]`` and ``B_j`` ``[E, out, r]``; last, with an output
    LoRA, ``A`` ``[E, r, I]`` and ``B`` ``[E, D, r]``.

    For token t with pairs (t, e) of weight w: ``mixed[t] = sum w a_e`` and ``delta[t] = sum w s B_e A_e
    dropout(a_e)`` (only ``mixed`` is returned without an output LoRA), with
    ``a_e = activate([H_j[t] + s_j B_je A_je X_j[t]])``.
    Saved for backward: the pairs' pre-activation rows and rank-r rows; the activation is recomputed.
    """

    @staticmethod
    def forward(ctx, spec: PairMixSpec, weight: torch.Tensor, keep: torch.Tensor | None, *tensors: torch.Tensor):
        with torch.autocast(weight.device.type, enabled=False):  # dtypes are chosen explicitly here
            return PairMix._forward(ctx, spec, weight, keep, *tensors)

    @staticmethod
    def _forward(ctx, spec: PairMixSpec, weight: torch.Tensor, keep: torch.Tensor | None, *tensors: torch.Tensor):
        weight = weight.to(torch.promote_types(weight.dtype, torch.float32))  # the mixing dtype, fp32 at least
        inputs, output = _unpack(spec, tensors)
        routing, token = spec.routing, spec.routing.token
        num_tokens = inputs[0][0].shape[0]
        pre, in_low = _pair_rows(spec, inputs)
        act = spec.activate(pre)                                                       # [P, I]
        w = weight.unsqueeze(-1)
        delta = out_low = None
        if output is not None:
            A, B = output
            dropped = act if keep is None else act * keep.index_select(0, token)
            out_low = weight.new_empty(weight.shape[0], A.shape[1])
            pair_delta = weight.new_empty(weight.shape[0], B.shape[1])
            for expert, start, end in routing.segments:
                low = torch.matmul(dropped[start:end].to(weight.dtype), A[expert].t(), out=out_low[start:end])
                torch.matmul(low * (w[start:end] * spec.output_scaling), B[expert].t(), out=pair_delta[start:end])
            delta = _sum_onto_tokens(pair_delta, token, num_tokens)
        mixed = _sum_onto_tokens(act.to(weight.dtype) * w, token, num_tokens)
        ctx.spec = spec
        # The base outputs H are not needed in backward (the pre-activation rows are): not saved.
        unsaved = {id(h) for h, _, _, _ in inputs}
        ctx.save_for_backward(weight, keep, out_low, *pre, *in_low,
                              *(None if id(t) in unsaved else t for t in tensors))
        return mixed if delta is None else (mixed, delta)

    @staticmethod
    def backward(ctx, grad_mixed: torch.Tensor, grad_delta: torch.Tensor | None = None):
        with torch.autocast(grad_mixed.device.type, enabled=False):
            return PairMix._backward(ctx, grad_mixed, grad_delta)

    @staticmethod
    def _backward(ctx, grad_mixed: torch.Tensor, grad_delta: torch.Tensor | None):
        spec: PairMixSpec = ctx.spec
        routing, token = spec.routing, spec.routing.token
        count = len(spec.input_scalings)
        weight, keep, out_low, *saved = ctx.saved_tensors
        pre, in_low, tensors = saved[:count], saved[count:2 * count], saved[2 * count:]
        inputs, output = _unpack(spec, tensors)
        grads, pre_rows = [], iter(pre)
        for t, need in zip(tensors, ctx.needs_input_grad[3:]):
            if t is None:  # an H_j, not saved: its gradient is [T, out] like pre_j's rows
                rows = next(pre_rows)
                t = rows.new_empty(grad_mixed.shape[0], rows.shape[1])
            grads.append(torch.zeros_like(t) if need else None)
        grad_inputs, grad_output = _unpack(spec, grads)
        w = weight.unsqueeze(-1)
        with torch.enable_grad():
            pre = [p.detach().requires_grad_() for p in pre]
            act = spec.activate(pre)                                                   # [P, I]
        grad_act = grad_mixed.index_select(0, token)                                   # [P, I] fp32
        grad_weight = torch.linalg.vecdot(grad_act, act.detach().to(weight.dtype))
        grad_act.mul_(w)
        if output is not None:
            A, B = output
            grad_A, grad_B = grad_output
            dropped = act.detach().to(weight.dtype)
            keep_rows = None if keep is None else keep.index_select(0, token)
            if keep_rows is not None:
                dropped = dropped * keep_rows
            back = torch.empty_like(grad_act)
            grad_delta_rows = grad_delta.index_select(0, token)                        # [P, D]
            for expert, start, end in routing.segments:
                weighted = w[start:end] * spec.output_scaling
                low, grad_rows = out_low[start:end], grad_delta_rows[start:end]
                if grad_B is not None:
                    grad_B[expert] = grad_rows.t() @ (low * weighted)
                grad_low = grad_rows @ B[expert]                                       # [n, r]
                grad_weight[start:end] += spec.output_scaling * torch.linalg.vecdot(grad_low, low)
                grad_low.mul_(weighted)
                if grad_A is not None:
                    grad_A[expert] = grad_low.t() @ dropped[start:end]
                torch.matmul(grad_low, A[expert], out=back[start:end])
            grad_act += back if keep_rows is None else back.mul_(keep_rows)
        grad_pre = torch.autograd.grad(act, pre, grad_act.to(act.dtype))
        x_rows = _gathered(inputs, token)
        for scaling, (_, x, A, B), (grad_h, grad_x, grad_A, grad_B), low, grad, rows in zip(
                spec.input_scalings, inputs, grad_inputs, in_low, grad_pre, x_rows):
            if grad_h is not None:
                grad_h.index_add_(0, token, grad)
            if scaling is None:
                continue
            grad = grad.to(x.dtype)
            grad_rows = x.new_empty(grad.shape[0], x.shape[1])
            for expert, start, end in routing.segments:
                if grad_B is not None:
                    grad_B[expert] = grad[start:end].t() @ low[start:end] * scaling
                grad_low = (grad[start:end] @ B[expert]).mul_(scaling)                  # [n, r]
                if grad_A is not None:
                    grad_A[expert] = grad_low.t() @ rows[start:end]
                torch.matmul(grad_low, A[expert], out=grad_rows[start:end])
            if grad_x is not None:
                grad_x.index_add_(0, token, grad_rows)
        return None, grad_weight, None, *grads


def _sum_onto_tokens(rows: torch.Tensor, token: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``out[t] = sum of the pair rows of token t``: rows ``[P, n]`` -> ``[num_tokens, n]``."""
    return torch.zeros(num_tokens, rows.shape[1], device=rows.device, dtype=rows.dtype).index_add_(0, token, rows)


def _unpack(spec: PairMixSpec, tensors) -> tuple[list[tuple], tuple | None]:
    """``[(H, X, A, B) per input projection]`` (X, A, B None without an expert LoRA) and the output
    ``(A, B)`` (None without one), from the flat argument list of :class:`PairMix`."""
    tensors = iter(tensors)
    inputs = [(next(tensors), *((None,) * 3 if scaling is None else (next(tensors), next(tensors), next(tensors))))
              for scaling in spec.input_scalings]
    output = None if spec.output_scaling is None else (next(tensors), next(tensors))
    return inputs, output


def _gathered(inputs: list[tuple], token: torch.Tensor) -> list[torch.Tensor | None]:
    """Per input projection, its LoRA input's pair rows ``X[token]`` ``[P, D]`` (gathered once per distinct X)."""
    cache: dict[int, torch.Tensor] = {}
    return [None if x is None else cache.setdefault(id(x), x.index_select(0, token)) for _, x, _, _ in inputs]


def _pair_rows(spec: PairMixSpec, inputs: list[tuple]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per input projection, the pairs' rows ``H[token] + s B_e A_e X[token]`` ``[P, out]`` (H's dtype) and,
    with an expert LoRA, their rank-r rows ``A_e X[token]`` ``[P, r]`` fp32 (an empty tensor without)."""
    routing = spec.routing
    rows, lows = [], []
    for scaling, (h, _, A, B), x_rows in zip(spec.input_scalings, inputs, _gathered(inputs, routing.token)):
        row = h.index_select(0, routing.token)                                         # [P, out]
        low = row.new_empty(0)
        if scaling is not None:
            low = x_rows.new_empty(x_rows.shape[0], A.shape[1])
            for expert, start, end in routing.segments:
                torch.matmul(x_rows[start:end], A[expert].t(), out=low[start:end])
                row[start:end].addmm_(low[start:end].to(row.dtype), B[expert].t().to(row.dtype), alpha=scaling)
        rows.append(row)
        lows.append(low)
    return rows, lows
