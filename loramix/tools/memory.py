"""What one GPU holds while training MixLoRA on a LLaMA-shaped base, computed from the shapes.

Weights in 16-bit; adapter parameters (attention LoRAs on q/k/v/o, expert LoRAs on gate/up/down, routers),
their gradients and AdamW's two moments in fp32; DDP adds one fp32 bucket copy of the gradients; FSDP
(``train.fsdp``) divides weights, adapter, gradients and moments by the processes and adds the weights it
gathers whole while they compute. Activations
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
    """The decoder layers; embeddings, LM head and final norm."""
    return s.layers * layer_parameters(s) + 2 * s.vocab * s.hidden + s.hidden


def layer_parameters(s: Shape) -> int:
    """One decoder layer of the base: q, k, v, o (D x D), gate, up, down (D x I) and two norms."""
    d, i = s.hidden, s.intermediate
    return 4 * d * d + 3 * d * i + 2 * d


def adapter_parameters(s: Shape, *, r: int, experts: int) -> int:
    """Per layer: 4 attention LoRAs r(D + D), E expert LoRAs on gate/up/down r(D + I) each, router E x D."""
    d, i = s.hidden, s.intermediate
    return s.layers * (4 * r * 2 * d + 3 * experts * r * (d + i) + experts * d)


def saved_bytes_per_token(s: Shape, *, r: int, experts: int, top_k: int, dropout: bool,
                          checkpointing: bool = False) -> int:
    """Bytes autograd keeps per token and decoder layer (16-bit weights, fp32 LoRA and router math).

    Without checkpointing: 9 fp32 ``[D]`` rows (norms in fp32, fp32 LoRA inputs, the router's fp32 input)
    and 6 more with LoRA dropout (each dropped copy), 4 bf16 ``[D]`` (q, k, v, attention output), 2 bf16
    ``[k*I]`` (the pairs' pre-activation gate and up rows), 4 bytes per FFN unit with dropout (the
    down-projection LoRA's dropout state), fp32 rank-r rows (3 per pair, 1 per
    attention LoRA), fp32 router logits and probabilities, attention log-sum-exp, RMSNorm scales and the
    routing indices and weights. With checkpointing: the layer's bf16 input and the router probabilities
    the router loss keeps outside the checkpointed layers.
    """
    d, i, e, k = s.hidden, s.intermediate, experts, top_k
    if checkpointing:
        return 2 * d + 4 * e + 4
    fp32_rows = 9 + (6 if dropout else 0)
    return (4 * d * fp32_rows + 2 * d * 4 + 2 * k * i * 2 + (4 * i if dropout else 0)
            + 4 * r * (3 * k + 4) + 2 * 4 * e + 8 + 4 * s.heads + 2 * 4 + k * (8 + 8 + 4 + 4))


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
    fsdp_gathered: int = 0

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))

    def gib(self) -> dict[str, float]:
        return {**{k: round(v / GIB, 2) for k, v in dataclasses.asdict(self).items()},
                "total": round(self.total / GIB, 2)}


def estimate(s: Shape, *, batch: int, seq: int, r: int = 16, experts: int = 8, top_k: int = 2,
             dropout: bool = True, checkpointing: bool = False, processes: int = 1, fsdp: bool = False,
             weight_bytes: int = 2) -> MemoryEstimate:
    """Per-GPU memory for DDP (or, with ``fsdp``, FSDP) training with ``batch`` sequences of ``seq`` tokens
    per GPU.

    With checkpointing one layer's full activations are alive again while it is recomputed in backward.
    ``logits``: the fp32 log-probabilities ``[T, V]`` the cross-entropy keeps (its gradient, as large, is
    alive briefly at the start of backward and is not counted). Under FSDP over ``processes`` each GPU keeps
    its shard of the weights, adapter, gradients and AdamW moments and no DDP bucket; ``fsdp_gathered``: the
    whole weights it gathers, the root group's (embeddings, LM head, final norm: whole from the start of
    forward to the end of backward) and two decoder layers with their adapters (the one computing and the
    next, prefetched).
    """
    tokens = batch * seq
    n = adapter_parameters(s, r=r, experts=experts)
    per_layer = saved_bytes_per_token(s, r=r, experts=experts, top_k=top_k, dropout=dropout,
                                      checkpointing=checkpointing)
    activations = s.layers * per_layer * tokens
    if checkpointing:
        activations += saved_bytes_per_token(s, r=r, experts=experts, top_k=top_k, dropout=dropout) * tokens
    sharded = fsdp and processes > 1
    shards = processes if sharded else 1
    gathered = 0
    if sharded:
        root = base_parameters(s) - s.layers * layer_parameters(s)
        gathered = weight_bytes * (root + 2 * layer_parameters(s)) + 4 * 2 * n // s.layers
    return MemoryEstimate(weights=weight_bytes * base_parameters(s) // shards, adapter=4 * n // shards,
                          gradients=4 * n // shards, optimizer=8 * n // shards,
                          ddp_buckets=4 * n if processes > 1 and not sharded else 0, activations=activations,
                          logits=4 * tokens * s.vocab, fsdp_gathered=gathered)
