"""The grouped path (the default): the (token, expert) pairs sorted by expert, each expert's LoRAs as
matmuls on its contiguous segment, the pair work as one autograd function that recomputes in backward.

A token routed to k experts makes k (token, expert) pairs. Sorted by expert, each expert's pairs form one
contiguous segment. The base input projections run once on all tokens; :class:`PairMix` gathers the
pairs' rows of them and adds each expert's LoRA delta into its segment (``x_rows A_e^T``, then ``B_e``
accumulated into the gathered rows: no delta tensor, no padding). Then, over all pairs at once: the FFN
activation, the weighted activations summed back onto tokens (``mixed``; the shared base output
projection runs once on it, ``sum_e w_e W2 a_e = W2 sum_e w_e a_e``), and the experts' output-projection
LoRAs, per segment, summed onto tokens (``delta``).

Every per-segment product goes through the pairs' own primitive, ``matmul`` and ``matmul_backward`` of a
:class:`SortedPairs`: here :func:`segment_matmul` and its :func:`segment_matmul_backward` over host-side
segments; the ``grouped_mm`` path (grouped_mm.py) runs the same :class:`PairMix` with a grouped-GEMM
primitive over device-side offsets. For backward
:class:`PairMix` keeps the pairs' pre-activation rows and rank-r rows, not the activations or anything per
expert; the activation is recomputed once, with autograd on that op alone (so any activation module works).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..ffn import ExpertFFN


class SortedPairs(Protocol):
    """(token, expert) pairs sorted by expert, and the per-expert matmul over their segments.

    token: ``[P]`` long, each pair's token; order: ``[P]`` positions of the pairs in the flattened ``[T*k]``
    routing.
    """

    token: torch.Tensor
    order: torch.Tensor

    def matmul(self, x: torch.Tensor, weight: torch.Tensor, *, accumulate: torch.Tensor | None = None,
               alpha: float = 1.0) -> torch.Tensor:
        """Per expert segment ``y[seg_e] = x[seg_e] @ weight[e]^T``: x ``[P, n]``, weight ``[E, m, n]`` ->
        ``[P, m]`` in the primitive's compute dtype (x and weight are cast to it); with ``accumulate``
        (``[P, m]``), ``alpha * y`` is added into it in place and it is returned."""
        ...

    def matmul_backward(self, grad: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor, *,
                        need_weight: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The gradients of :meth:`matmul` from ``grad = dL/dy`` ``[P, m]``: ``(grad_x [P, n], grad_weight
        [E, m, n] or None)`` in the compute dtype, ``grad_weight`` zero for experts without pairs; ``x`` is only
        read for it."""
        ...


@dataclass(frozen=True)
class PairRouting:
    """:class:`SortedPairs` with host-side segments: per expert with pairs, ``(expert, start, end)`` into the
    sorted pairs; the matmuls are :func:`segment_matmul` and :func:`segment_matmul_backward`, in the
    weight's dtype."""

    token: torch.Tensor
    order: torch.Tensor
    segments: tuple[tuple[int, int, int], ...]

    def matmul(self, x: torch.Tensor, weight: torch.Tensor, *, accumulate: torch.Tensor | None = None,
               alpha: float = 1.0) -> torch.Tensor:
        return segment_matmul(x, weight, self, accumulate=accumulate, alpha=alpha)

    def matmul_backward(self, grad: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor, *,
                        need_weight: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        return segment_matmul_backward(grad, x, weight, self, need_weight=need_weight)


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


# ---- the segment-matmul primitive ------------------------------------------------------------------------
def segment_matmul(x: torch.Tensor, weight: torch.Tensor, routing: PairRouting, *,
                   accumulate: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
    """Per expert segment: ``y[seg_e] = x[seg_e] @ weight[e]^T``. x: ``[P, n]``; weight: ``[E, m, n]`` -> ``[P, m]``
    in weight's dtype.

    With ``accumulate`` (``[P, m]``), ``alpha * y`` is added into it in place (in its dtype) and it is returned.
    Rows of experts without pairs do not exist; empty experts cost nothing.
    """
    if accumulate is not None:
        weight = weight.to(accumulate.dtype)
        for expert, start, end in routing.segments:
            accumulate[start:end].addmm_(x[start:end].to(accumulate.dtype), weight[expert].t(), alpha=alpha)
        return accumulate
    x = x.to(weight.dtype)
    y = x.new_empty(x.shape[0], weight.shape[1])
    for expert, start, end in routing.segments:
        torch.matmul(x[start:end], weight[expert].t(), out=y[start:end])
    return y


def segment_matmul_backward(grad: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor, routing: PairRouting,
                            *, need_weight: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gradients of :func:`segment_matmul`: ``(grad_x [P, n], grad_weight [E, m, n] or None)`` in weight's
    dtype from ``grad = dL/dy`` ``[P, m]``. ``grad_weight`` is zero for experts without pairs; ``x`` is only read
    for it."""
    grad = grad.to(weight.dtype)
    if need_weight:
        x = x.to(weight.dtype)
    grad_x = grad.new_empty(grad.shape[0], weight.shape[2])
    grad_weight = torch.zeros_like(weight) if need_weight else None
    for expert, start, end in routing.segments:
        if grad_weight is not None:
            grad_weight[expert] = grad[start:end].t() @ x[start:end]
        torch.matmul(grad[start:end], weight[expert], out=grad_x[start:end])
    return grad_x, grad_weight


# ---- the pair work -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairMixSpec:
    """The non-tensor arguments of :class:`PairMix`.

    activate: the FFN activation from the input projections' pair rows; input_scalings: per input
    projection, its expert LoRA scaling (None without an expert LoRA); output_scaling: the same for the
    output projection.
    """

    routing: SortedPairs
    activate: Callable[[list[torch.Tensor]], torch.Tensor]
    input_scalings: tuple[float | None, ...]
    output_scaling: float | None


@dataclass(frozen=True)
class InputOperands:
    """One input projection's operands: its base output ``H`` ``[T, out]`` and, with an expert LoRA, the
    dropped-out LoRA input ``X`` ``[T, D]`` (in the LoRAs' compute dtype), ``A`` ``[E, r, D]`` and ``B``
    ``[E, out, r]`` (else None)."""

    base_output: torch.Tensor
    lora_input: torch.Tensor | None = None
    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None


@dataclass(frozen=True)
class OutputOperands:
    """The output projection's expert LoRA, ``A`` ``[E, r, I]`` and ``B`` ``[E, D, r]``, or None for both."""

    lora_A: torch.Tensor | None = None
    lora_B: torch.Tensor | None = None


INPUT_FIELDS, OUTPUT_FIELDS = 4, 2  # tensors per record in PairMix's flat argument list


def pair_mix(spec: PairMixSpec, weight: torch.Tensor, keep: torch.Tensor | None, inputs: list[InputOperands],
             output: OutputOperands):
    """:class:`PairMix` on records: ``mixed`` ``[T, I]``, or ``(mixed, delta)`` with an output LoRA."""
    flat = [t for op in inputs for t in (op.base_output, op.lora_input, op.lora_A, op.lora_B)]
    return PairMix.apply(spec, weight, keep, *flat, output.lora_A, output.lora_B)


def _records(tensors) -> tuple[list[InputOperands], OutputOperands]:
    """The records back from :class:`PairMix`'s flat arguments (``INPUT_FIELDS`` per input, then the output)."""
    count = (len(tensors) - OUTPUT_FIELDS) // INPUT_FIELDS
    inputs = [InputOperands(*tensors[INPUT_FIELDS * j:INPUT_FIELDS * (j + 1)]) for j in range(count)]
    return inputs, OutputOperands(*tensors[-OUTPUT_FIELDS:])


class PairMix(torch.autograd.Function):
    """The pair work of one MoE FFN: ``mixed`` ``[T, I]`` in the weights' dtype (fp32) and ``delta`` ``[T, D]``
    in the dtype of the pairs' matmuls (fp32; bf16 for grouped_mm on a bf16 base).

    Arguments after ``spec``: ``weight`` ``[P]`` fp32 (pair weights, sorted like the pairs); ``keep``
    ``[T, I]``, the output LoRA's dropout mask (0 or ``1/(1-p)``, one per token, shared by its experts) or
    None; then the fields of one :class:`InputOperands` per input projection and of the
    :class:`OutputOperands` (None where absent; :func:`pair_mix` builds this list).

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
        inputs, output = _records(tensors)
        routing, token = spec.routing, spec.routing.token
        num_tokens = inputs[0].base_output.shape[0]
        pre, in_low = _pair_rows(spec, inputs)
        act = spec.activate(pre)                                                       # [P, I]
        w = weight.unsqueeze(-1)
        delta = out_low = None
        if output.lora_A is not None:
            dropped = act if keep is None else act * keep.index_select(0, token)
            out_low = routing.matmul(dropped, output.lora_A)                               # [P, r]
            pair_delta = routing.matmul(out_low * (w * spec.output_scaling), output.lora_B)  # [P, D]
            delta = _sum_onto_tokens(pair_delta, token, num_tokens)
        mixed = _sum_onto_tokens(act.to(weight.dtype) * w, token, num_tokens)
        ctx.spec = spec
        # The base outputs H are not needed in backward (the pre-activation rows are): not saved.
        unsaved = {id(op.base_output) for op in inputs}
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
        inputs, output = _records(tensors)
        needs = ctx.needs_input_grad[3:]
        needs_in = [needs[INPUT_FIELDS * j:INPUT_FIELDS * (j + 1)] for j in range(count)]
        need_out_A, need_out_B = needs[-OUTPUT_FIELDS:]
        w = weight.unsqueeze(-1)
        with torch.enable_grad():
            pre = [p.detach().requires_grad_() for p in pre]
            act = spec.activate(pre)                                                   # [P, I]
        grad_act = grad_mixed.index_select(0, token)                                   # [P, I] fp32
        grad_weight = torch.linalg.vecdot(grad_act, act.detach().to(weight.dtype))
        grad_act.mul_(w)
        grad_out_A = grad_out_B = None
        if output.lora_A is not None:
            weighted = w * spec.output_scaling                                         # [P, 1]
            keep_rows = None if keep is None else keep.index_select(0, token)
            dropped = act.detach() if keep_rows is None else act.detach() * keep_rows
            grad_low, grad_out_B = routing.matmul_backward(grad_delta.index_select(0, token), out_low * weighted,
                                                           output.lora_B, need_weight=need_out_B)
            grad_weight += spec.output_scaling * torch.linalg.vecdot(grad_low, out_low)
            grad_low.mul_(weighted)                                                    # [P, r]
            back, grad_out_A = routing.matmul_backward(grad_low, dropped, output.lora_A, need_weight=need_out_A)
            grad_act += back if keep_rows is None else back.mul_(keep_rows)
        grad_pre = torch.autograd.grad(act, pre, grad_act.to(act.dtype))
        grads: list[torch.Tensor | None] = []
        x_rows = _gathered(inputs, token)
        for scaling, op, need, low, grad, rows in zip(spec.input_scalings, inputs, needs_in, in_low, grad_pre,
                                                      x_rows):
            grad_h = grad.new_zeros(grad_mixed.shape[0], grad.shape[1]).index_add_(0, token, grad) if need[0] else None
            grad_x = grad_A = grad_B = None
            if scaling is not None:
                grad_low, grad_B = routing.matmul_backward(grad, low, op.lora_B,
                                                           need_weight=need[3])
                if grad_B is not None:
                    grad_B.mul_(scaling)
                grad_rows, grad_A = routing.matmul_backward(grad_low.mul_(scaling), rows, op.lora_A,
                                                            need_weight=need[2])
                if need[1]:
                    grad_x = grad_rows.new_zeros(op.lora_input.shape).index_add_(0, token, grad_rows)
            grads += [grad_h, grad_x, grad_A, grad_B]
        return None, grad_weight, None, *grads, grad_out_A, grad_out_B


def _sum_onto_tokens(rows: torch.Tensor, token: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``out[t] = sum of the pair rows of token t``: rows ``[P, n]`` -> ``[num_tokens, n]``."""
    return torch.zeros(num_tokens, rows.shape[1], device=rows.device, dtype=rows.dtype).index_add_(0, token, rows)


def _gathered(inputs: list[InputOperands], token: torch.Tensor) -> list[torch.Tensor | None]:
    """Per input projection, its LoRA input's pair rows ``X[token]`` ``[P, D]`` (gathered once per distinct X)."""
    cache: dict[int, torch.Tensor] = {}
    return [None if op.lora_input is None else cache.setdefault(id(op.lora_input), op.lora_input.index_select(0, token))
            for op in inputs]


def _pair_rows(spec: PairMixSpec, inputs: list[InputOperands]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per input projection, the pairs' rows ``H[token] + s B_e A_e X[token]`` ``[P, out]`` (H's dtype) and,
    with an expert LoRA, their rank-r rows ``A_e X[token]`` ``[P, r]`` fp32 (an empty tensor without)."""
    routing = spec.routing
    rows, lows = [], []
    for scaling, op, x_rows in zip(spec.input_scalings, inputs, _gathered(inputs, routing.token)):
        row = op.base_output.index_select(0, routing.token)                           # [P, out]
        low = row.new_empty(0)
        if scaling is not None:
            low = routing.matmul(x_rows, op.lora_A)                                    # [P, r]
            routing.matmul(low, op.lora_B, accumulate=row, alpha=scaling)
        rows.append(row)
        lows.append(low)
    return rows, lows


class GroupedDispatch:
    """Sorted expert segments and :class:`PairMix`: fewest FLOPs and least memory; the CPU's fastest path.

    A subclass changes the dtype the expert LoRAs compute in (:meth:`lora_dtype`) and how the pairs are
    sorted and their matmuls run (:meth:`sort`); the rest of the path is this one.
    """

    name = "grouped"
    handles_dora = False

    def lora_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the expert LoRAs compute in for FFN input x (their parameters are fp32)."""
        return torch.float32

    def sort(self, experts: torch.Tensor, num_experts: int, dtype: torch.dtype) -> SortedPairs:
        """experts: ``[T, k]`` long -> the pairs sorted by expert, with their matmul primitive in ``dtype``."""
        return sort_pairs(experts, num_experts)

    def __call__(self, ffn: ExpertFFN, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        dtype = self.lora_dtype(x)
        routing = self.sort(experts, ffn.num_experts, dtype)
        inputs = []
        for projection in ffn.inputs:
            base_output = projection.module(x)                                           # [T, out]
            lora = projection.lora
            inputs.append(InputOperands(base_output) if lora is None else
                          InputOperands(base_output, lora.dropped_input(x, dtype), lora.lora_A, lora.lora_B))
        out_lora = ffn.output.lora
        output, keep = OutputOperands(), None
        if out_lora is not None:
            output = OutputOperands(out_lora.lora_A, out_lora.lora_B)
            keep = out_lora.dropout_mask(x.shape[0])  # one mask per token, shared by its experts
        spec = PairMixSpec(routing=routing, activate=ffn.activate,
                           input_scalings=tuple(None if p.lora is None else p.lora.scaling for p in ffn.inputs),
                           output_scaling=None if out_lora is None else out_lora.scaling)
        pair_weight = weights.reshape(-1).index_select(0, routing.order)                 # [P] fp32
        outputs = pair_mix(spec, pair_weight, keep, inputs, output)
        mixed = outputs if out_lora is None else outputs[0]                               # [T, I] fp32
        y = ffn.mixed_output(mixed, weights, x.dtype)                                    # [T, D]
        if out_lora is not None:
            y = y + outputs[1].to(y.dtype)
        return y
