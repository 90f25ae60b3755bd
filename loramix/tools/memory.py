"""What one GPU holds while training MixLoRA on a LLaMA-shaped base, computed from the shapes.

Weights in 16-bit, or the decoder projections in 4-bit / 8-bit as bitsandbytes stores them
(:func:`quantized_bytes`); adapter parameters (attention LoRAs on q/k/v/o, expert LoRAs on gate/up/down,
routers), their gradients and AdamW's two moments in fp32; DDP adds one fp32 bucket copy of the gradients;
FSDP (``train.fsdp``) divides weights, adapter, gradients and moments by the processes and adds the weights
it gathers whole while they compute. Activations are the tensors autograd keeps for backward, per decoder
layer and token, in loramix's forward with 16-bit weights: each term below is a tensor a saved-tensor hook
lists (tests/test_memory.py holds a real forward to these numbers, quantised ones included).
docs/distributed.md tabulates LLaMA-2-7B and 13B, docs/quantization.md 4-bit against bf16 for 7B, 13B, 70B
and Llama-3-8B.
"""
from __future__ import annotations

import dataclasses
import math

from ..families import FAMILIES, GATED

GIB = 2**30
BLOCK = 64          # bitsandbytes' 4-bit block size (one absmax scale per 64 weights), transformers' default
NESTED_BLOCK = 256  # double quantisation: the absmax scales in 8-bit, blocks of 256 with an fp32 scale each


@dataclasses.dataclass(frozen=True)
class Shape:
    """A LLaMA-style decoder (grouped-query attention with ``kv_heads`` key/value heads, gated FFN, untied
    embeddings unless ``tied``); ``kv_heads`` None: multi-head attention."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    kv_heads: int | None = None
    tied: bool = False

    @property
    def kv_width(self) -> int:
        """Output width of the k and v projections."""
        return self.hidden // self.heads * (self.kv_heads or self.heads)

    def projections(self) -> list[tuple[int, int]]:
        """``(in, out)`` of one decoder layer's q, k, v, o, gate, up and down projections."""
        d, kv, i = self.hidden, self.kv_width, self.intermediate
        return [(d, d), (d, kv), (d, kv), (d, d), (d, i), (d, i), (i, d)]

    @classmethod
    def from_hf_config(cls, config) -> "Shape | None":
        """The shape of a LLaMA-shaped transformers config; None for another layout (a family without a gated
        FFN and separate q, k, v, o, or a head width that makes q wider or narrower than the hidden size)."""
        family = FAMILIES.get(getattr(config, "model_type", None))
        if family is None or family.ffn_kind != GATED or len(family.attention_projections) != 4:
            return None
        heads, hidden = config.num_attention_heads, config.hidden_size
        if (getattr(config, "head_dim", None) or hidden // heads) * heads != hidden:
            return None
        return cls(hidden=hidden, intermediate=config.intermediate_size, layers=config.num_hidden_layers,
                   heads=heads, vocab=config.vocab_size, kv_heads=getattr(config, "num_key_value_heads", None),
                   tied=bool(getattr(config, "tie_word_embeddings", False)))


LLAMA2_7B = Shape(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32000)
LLAMA2_13B = Shape(hidden=5120, intermediate=13824, layers=40, heads=40, vocab=32000)
LLAMA2_70B = Shape(hidden=8192, intermediate=28672, layers=80, heads=64, vocab=32000, kv_heads=8)
LLAMA3_8B = Shape(hidden=4096, intermediate=14336, layers=32, heads=32, vocab=128256, kv_heads=8)


def projection_parameters(s: Shape) -> int:
    """The decoder projections' weights: what bitsandbytes quantises (embeddings, LM head and norms stay)."""
    return s.layers * sum(n_in * n_out for n_in, n_out in s.projections())


def base_parameters(s: Shape) -> int:
    """The projections, two norms per layer, embeddings, LM head (unless tied) and the final norm."""
    embeddings = (1 if s.tied else 2) * s.vocab * s.hidden
    return projection_parameters(s) + s.layers * 2 * s.hidden + embeddings + s.hidden


def layer_parameters(s: Shape) -> int:
    """One decoder layer of the base: its projections and two norms."""
    return sum(n_in * n_out for n_in, n_out in s.projections()) + 2 * s.hidden


def quantized_bytes(n_in: int, n_out: int, quantization: str, *, double_quant: bool = False) -> int:
    """Bytes bitsandbytes keeps for one ``[out, in]`` weight.

    ``nf4`` / ``fp4``: two 4-bit codes per byte, an fp32 absmax per block of 64 and the 16-entry fp32 code
    table; ``double_quant``: the absmax in 8-bit with an fp32 scale per 256 blocks, their 256-entry fp32
    code table and one fp32 offset. ``int8``: one byte per weight and an fp32 scale per output row.
    """
    n = n_in * n_out
    if quantization == "int8":
        return n + 4 * n_out
    blocks = math.ceil(n / BLOCK)
    scales = 4 * blocks if not double_quant else blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 * 256 + 4
    return (n + 1) // 2 + scales + 4 * 16


def frozen_weight_bytes(s: Shape, *, quantization: str | None = None, double_quant: bool = False,
                        weight_bytes: int = 2) -> int:
    """The base model's bytes: every weight at ``weight_bytes``, or the projections as ``quantization`` stores
    them and the rest (embeddings, LM head, norms) at ``weight_bytes``."""
    if quantization is None:
        return weight_bytes * base_parameters(s)
    projections = s.layers * sum(quantized_bytes(n_in, n_out, quantization, double_quant=double_quant)
                                 for n_in, n_out in s.projections())
    return projections + weight_bytes * (base_parameters(s) - projection_parameters(s))


def stored_bytes(model) -> int:
    """What a loaded model holds, measured: its parameters' storage and, for bitsandbytes layers, their
    quantisation state (4-bit absmax scales and code tables, 8-bit row scales)."""
    total = sum(p.untyped_storage().nbytes() for p in model.parameters())
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:
            nested = [state.state2.absmax, state.state2.code, state.offset] if state.nested else []
            total += sum(t.nbytes for t in [state.absmax, state.code, *nested])
        elif type(weight).__name__ == "Int8Params":  # the row scales move to the layer's state at its first forward
            total += (module.state.SCB if module.state.SCB is not None else weight.SCB).nbytes
    return total


def adapter_parameters(s: Shape, *, r: int, experts: int) -> int:
    """Per layer: 4 attention LoRAs r(in + out), E expert LoRAs on gate/up/down r(D + I) each, router E x D."""
    d, i = s.hidden, s.intermediate
    attention = sum(r * (n_in + n_out) for n_in, n_out in s.projections()[:4])
    return s.layers * (attention + 3 * experts * r * (d + i) + experts * d)


PLANNED_DISPATCHES = ("grouped_mm", "grouped")  # auto's path on a GPU in bf16, and on CPU


def saved_bytes_per_token(s: Shape, *, r: int, experts: int, top_k: int, dropout: bool,
                          checkpointing: bool = False, dispatch: str = "grouped_mm",
                          quantization: str | None = None) -> int:
    """Bytes autograd keeps per token and decoder layer (bf16 weights, fp32 LoRA and router math).

    Without checkpointing: 7 fp32 ``[D]`` rows (norms in fp32, the attention LoRAs' fp32 inputs, the
    router's fp32 input) and 4 more with LoRA dropout (the attention LoRAs' dropped copies), bf16 q, k, v
    and attention output (``2 D + 2 D_kv``), 2 bf16 ``[k*I]`` (the pairs' pre-activation gate and up rows),
    4 bytes per FFN unit with dropout (the down-projection LoRA's dropout state), fp32 rank-r rows per
    attention LoRA, fp32 router logits and probabilities, attention log-sum-exp, RMSNorm scales and the
    routing indices and weights. Then what the expert LoRAs keep, by ``dispatch``: ``grouped_mm`` (auto's
    path on a GPU in bf16) runs them in bf16 and keeps the expert LoRAs' input (one bf16 ``[D]`` row shared
    by gate and up; with dropout each one's dropped copy and mask, 4 rows) and 3 bf16 rank-r rows per pair;
    ``grouped`` (CPU) keeps the same in fp32, with a copy of the input each for gate and up (2 fp32 rows; 4
    with dropout). A 4-bit base keeps the same (its matmul saves only the packed weight); an 8-bit one also
    keeps the bf16 inputs of its matmuls that nothing else keeps (LLM.int8's backward holds them): the
    attention and FFN inputs ``[D]`` and the down projection's ``[I]``. With checkpointing: the layer's bf16
    input and the router probabilities the router loss keeps outside the checkpointed layers, for any path.
    """
    if dispatch not in PLANNED_DISPATCHES:
        raise ValueError(f"dispatch must be one of {PLANNED_DISPATCHES}, got {dispatch!r}")
    d, i, e, k = s.hidden, s.intermediate, experts, top_k
    if checkpointing:
        return 2 * d + 4 * e + 4
    lora_bytes = 2 if dispatch == "grouped_mm" else 4
    expert_rows = 4 if dropout else (1 if dispatch == "grouped_mm" else 2)
    fp32_rows = 7 + (4 if dropout else 0)
    int8_inputs = 2 * (2 * d + i) if quantization == "int8" else 0
    return (4 * d * fp32_rows + 2 * (2 * d + 2 * s.kv_width) + 2 * k * i * 2 + (4 * i if dropout else 0)
            + 4 * r * 4 + lora_bytes * (d * expert_rows + r * 3 * k)
            + 2 * 4 * e + 8 + 4 * s.heads + 2 * 4 + k * (8 + 8 + 4 + 4) + int8_inputs)


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
    dequantized: int = 0

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))

    def gib(self) -> dict[str, float]:
        return {**{k: round(v / GIB, 2) for k, v in dataclasses.asdict(self).items()},
                "total": round(self.total / GIB, 2)}


def estimate(s: Shape, *, batch: int, seq: int, r: int = 16, experts: int = 8, top_k: int = 2,
             dropout: bool = True, checkpointing: bool = False, processes: int = 1, fsdp: bool = False,
             weight_bytes: int = 2, quantization: str | None = None, double_quant: bool = False,
             dispatch: str = "grouped_mm") -> MemoryEstimate:
    """Per-GPU memory for DDP (or, with ``fsdp``, FSDP) training with ``batch`` sequences of ``seq`` tokens
    per GPU, the MoE layers on ``dispatch`` (auto's path on a GPU in bf16 by default; see
    :func:`saved_bytes_per_token`).

    With checkpointing one layer's full activations are alive again while it is recomputed in backward.
    ``logits``: the fp32 log-probabilities ``[T, V]`` the cross-entropy keeps (its gradient, as large, is
    alive briefly at the start of backward and is not counted). Under FSDP over ``processes`` each GPU keeps
    its shard of the weights, adapter, gradients and AdamW moments and no DDP bucket; ``fsdp_gathered``: the
    whole weights it gathers, the root group's (embeddings, LM head, final norm: whole from the start of
    forward to the end of backward) and two decoder layers with their adapters (the one computing and the
    next, prefetched). ``quantization`` (nf4, fp4, int8): the projections as bitsandbytes stores them;
    ``dequantized``: the largest projection in 16-bit, which a quantised matmul dequantises for its forward
    and again for its backward (one at a time).
    """
    tokens = batch * seq
    n = adapter_parameters(s, r=r, experts=experts)
    kw = dict(r=r, experts=experts, top_k=top_k, dropout=dropout, quantization=quantization, dispatch=dispatch)
    activations = s.layers * saved_bytes_per_token(s, checkpointing=checkpointing, **kw) * tokens
    if checkpointing:
        activations += saved_bytes_per_token(s, **kw) * tokens
    sharded = fsdp and processes > 1
    shards = processes if sharded else 1
    gathered = 0
    if sharded:
        root = base_parameters(s) - s.layers * layer_parameters(s)
        gathered = weight_bytes * (root + 2 * layer_parameters(s)) + 4 * 2 * n // s.layers
    dequantized = 2 * max(n_in * n_out for n_in, n_out in s.projections()) if quantization else 0
    weights = frozen_weight_bytes(s, quantization=quantization, double_quant=double_quant, weight_bytes=weight_bytes)
    return MemoryEstimate(weights=weights // shards, adapter=4 * n // shards, gradients=4 * n // shards,
                          optimizer=8 * n // shards, ddp_buckets=4 * n if processes > 1 and not sharded else 0,
                          activations=activations, logits=4 * tokens * s.vocab, fsdp_gathered=gathered,
                          dequantized=dequantized)
