"""What one GPU holds while training MixLoRA on a LLaMA-shaped base, computed from the shapes.

Weights in 16-bit; adapter parameters (attention LoRAs on q/k/v/o, expert LoRAs on gate/up/down, routers),
their gradients and AdamW's two moments in fp32; DDP adds one fp32 bucket copy of the gradients. Activations
are the tensors autograd keeps for backward, per decoder layer and token, in loramix's forward with 16-bit
weights: each term below is a tensor a saved-tensor hook lists (tests/test_memory.py holds a real forward to
these numbers). docs/distributed.md tabulates LLaMA-2-7B and 13B.
"""
from __future__ import annotations

import dataclasses

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Shape:
    """A LLaMA-style decoder (multi-head attention, gated FFN, untied embeddings)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int


LLAMA2_7B = Shape(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000)
LLAMA2_13B = Shape(hidden=5120, intermediate=13824, layers=40, heads=40, vocab=32000)


def base_parameters(s: Shape) -> int:
    """Per layer q, k, v, o (D x D), gate, up, down (D x I) and two norms; embeddings, LM head, final norm."""
    d, i = s.hidden, s.intermediate
    return s.layers * (4 * d * d + 3 * d * i + 2 * d) + 2 * s.vocab * d + d


def adapter_parameters(s: Shape, *, r: int, experts: int) -> int:
    """Per layer: 4 attention LoRAs r(D + D), E expert LoRAs on gate/up/down r(D + I) each, router E x D."""
    d, i = s.hidden, s.intermediate
    return s.layers * (4 * r * 2 * d + 3 * experts * r * (d + i) + experts * d)


PLANNED_DISPATCHES = ("grouped_mm", "grouped")  # auto's path on a GPU in bf16, and on CPU


def saved_bytes_per_token(s: Shape, *, r: int, experts: int, top_k: int, dropout: bool,
                          checkpointing: bool = False, dispatch: str = "grouped_mm") -> int:
    """Bytes autograd keeps per token and decoder layer (bf16 weights, fp32 LoRA and router math).

    Without checkpointing: 7 fp32 ``[D]`` rows (norms in fp32, the attention LoRAs' fp32 inputs, the
    router's fp32 input) and 4 more with LoRA dropout (the attention LoRAs' dropped copies), 4 bf16 ``[D]``
    (q, k, v, attention output), 2 bf16 ``[k*I]`` (the pairs' pre-activation gate and up rows), 4 bytes per
    FFN unit with dropout (the down-projection LoRA's dropout state), fp32 rank-r rows per attention LoRA,
    fp32 router logits and probabilities, attention log-sum-exp, RMSNorm scales and the routing indices
    and weights. Then what the expert LoRAs keep, by ``dispatch``: ``grouped_mm`` (auto's path on a GPU in
    bf16) runs them in bf16 and keeps the expert LoRAs' input (one bf16 ``[D]`` row shared by gate and up;
    with dropout each one's dropped copy and mask, 4 rows) and 3 bf16 rank-r rows per pair; ``grouped``
    (CPU) keeps the same in fp32, with a copy of the input each for gate and up (2 fp32 rows; 4 with
    dropout). With checkpointing: the layer's bf16 input and the router probabilities the router loss
    keeps outside the checkpointed layers, for either path.
    """
    if dispatch not in PLANNED_DISPATCHES:
        raise ValueError(f"dispatch must be one of {PLANNED_DISPATCHES}, got {dispatch!r}")
    d, i, e, k = s.hidden, s.intermediate, experts, top_k
    if checkpointing:
        return 2 * d + 4 * e + 4
    lora_bytes = 2 if dispatch == "grouped_mm" else 4
    expert_rows = 4 if dropout else (1 if dispatch == "grouped_mm" else 2)
    fp32_rows = 7 + (4 if dropout else 0)
    return (4 * d * fp32_rows + 2 * d * 4 + 2 * k * i * 2 + (4 * i if dropout else 0) + 4 * r * 4
            + lora_bytes * (d * expert_rows + r * 3 * k)
            + 2 * 4 * e + 8 + 4 * s.heads + 2 * 4 + k * (8 + 8 + 4 + 4))


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one GPU, by what holds them."""

    weights: int
    adapter: int
    gradients: int
    optimizer: int
    ddp_buckets: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))

    def gib(self) -> dict[str, float]:
        return {**{k: round(v / GIB, 2) for k, v in dataclasses.asdict(self).items()},
                "total": round(self.total / GIB, 2)}


def estimate(s: Shape, *, batch: int, seq: int, r: int = 16, experts: int = 8, top_k: int = 2,
             dropout: bool = True, checkpointing: bool = False, processes: int = 1,
             weight_bytes: int = 2, dispatch: str = "grouped_mm") -> MemoryEstimate:
    """Per-GPU memory for DDP training with ``batch`` sequences of ``seq`` tokens per GPU, the MoE layers on
    ``dispatch`` (auto's path on a GPU in bf16 by default; see :func:`saved_bytes_per_token`).

    With checkpointing one layer's full activations are alive again while it is recomputed in backward.
    ``logits``: the fp32 log-probabilities ``[T, V]`` the cross-entropy keeps (its gradient, as large, is
    alive briefly at the start of backward and is not counted).
    """
    tokens = batch * seq
    n = adapter_parameters(s, r=r, experts=experts)
    kw = dict(r=r, experts=experts, top_k=top_k, dropout=dropout, dispatch=dispatch)
    activations = s.layers * saved_bytes_per_token(s, checkpointing=checkpointing, **kw) * tokens
    if checkpointing:
        activations += saved_bytes_per_token(s, **kw) * tokens
    return MemoryEstimate(weights=weight_bytes * base_parameters(s), adapter=4 * n, gradients=4 * n,
                          optimizer=8 * n, ddp_buckets=4 * n if processes > 1 else 0, activations=activations,
                          logits=4 * tokens * s.vocab)
