"""Benchmark MixLoRA (every dispatch, and ``auto``) against HF PEFT LoRA on one model, one batch, one process.

Every variant wraps its own copy of the same randomly initialised decoder (one seed, one set of weights)
and sees the same inputs. Timings alternate between variants within each repetition (the order rotates),
so a slow phase of a shared machine hits every variant alike; medians are reported, with ratios between
every pair of variants measured in the same run. Three timings: a training step, a prefill (an eval-mode
forward of the batch) and decoding (``generate`` with a KV cache, greedy, a fixed number of new tokens).

Peak memory is an allocator-level count of tensor bytes (what ``torch.cuda.max_memory_allocated``
reports on a GPU): on CPU, ``torch.profiler`` with ``profile_memory=True`` records every allocation and
free of the CPU allocator during one step; the peak of their running sum is the step's extra memory
(activations, temporaries, gradients), to which the bytes of the parameters and buffers are added.
Process RSS would also count the Python runtime, libraries and malloc's retained pages.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, TextIO

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..config import MixLoraConfig
from ..model import get_mixlora_model
from ..nn.dispatch import AUTO, DISPATCHES
from ..nn.dispatch.auto import auto_path, device_major
from ..training.distributed import token_ce_sum

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASELINE = "peft-lora"
MIXLORA_PREFIX = "mixlora-"  # a MixLoRA variant is this prefix and a dispatch name
VARIANTS = (BASELINE, *(MIXLORA_PREFIX + dispatch for dispatch in (AUTO.name, *DISPATCHES)))


@dataclass(frozen=True)
class BenchShape:
    """The model, batch, decoding and adapter sizes of one benchmark run (defaults: the shape
    benchmarks/README.md reports).

    ``kv_heads``: None for as many as ``heads``; ``model_type``: a LLaMA-layout family (``llama``, ``qwen2``).
    Decoding: ``decode_batch`` prompts of ``decode_prompt`` tokens, ``new_tokens`` generated (0: not timed).
    """

    hidden: int = 512
    ffn: int = 1376
    layers: int = 4
    vocab: int = 8000
    heads: int = 8
    kv_heads: int | None = None
    model_type: str = "llama"
    batch: int = 4
    seq: int = 128
    decode_batch: int = 8
    decode_prompt: int = 128
    new_tokens: int = 128
    experts: int = 8
    top_k: int = 2
    rank: int = 16
    dropout: float = 0.05

    @property
    def alpha(self) -> float:
        return 2.0 * self.rank

    @property
    def lora_widths(self) -> set[int]:
        """The widths the expert LoRAs multiply (gate/up: hidden -> FFN, down: FFN -> hidden)."""
        return {self.hidden, self.ffn}


# The layer shapes of the models people fine-tune (their published configs), at 4 of their 28-32 layers.
PRESETS: dict[str, dict] = {
    "llama2-7b": dict(model_type="llama", hidden=4096, ffn=11008, heads=32, kv_heads=32, vocab=32000, layers=4),
    "llama3-8b": dict(model_type="llama", hidden=4096, ffn=14336, heads=32, kv_heads=8, vocab=128256, layers=4),
    "qwen2.5-7b": dict(model_type="qwen2", hidden=3584, ffn=18944, heads=28, kv_heads=4, vocab=152064, layers=4),
}
MODEL_TYPES = ("llama", "qwen2")


def build_base(shape: BenchShape, *, device: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A randomly initialised causal LM of ``shape``, built on ``device`` (identical weights for one seed)."""
    extra = {"use_sliding_window": False} if shape.model_type == "qwen2" else {}
    config = AutoConfig.for_model(
        shape.model_type, hidden_size=shape.hidden, intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads or shape.heads,
        vocab_size=shape.vocab, max_position_embeddings=max(2048, shape.seq, shape.decode_prompt + shape.new_tokens),
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def build_variant(name: str, base: nn.Module, shape: BenchShape, *, seed: int = 0,
                  compile_activation: bool = False) -> nn.Module:
    """One benchmarked model on a copy of ``base``: ``peft-lora``, or ``mixlora-<dispatch>`` for ``auto`` and
    each of ``loramix.DISPATCHES``; ``compile_activation``: MixLoRA's FFN activation through torch.compile."""
    base = copy.deepcopy(base)
    torch.manual_seed(seed + 1)
    if name == BASELINE:
        return get_peft_model(base, LoraConfig(
            r=shape.rank, lora_alpha=shape.alpha, lora_dropout=shape.dropout,
            target_modules=list(LLAMA_PROJECTIONS), task_type="CAUSAL_LM"))
    model = get_mixlora_model(base, MixLoraConfig(
        r=shape.rank, lora_alpha=shape.alpha, lora_dropout=shape.dropout, target_modules=list(LLAMA_PROJECTIONS),
        num_experts=shape.experts, top_k=shape.top_k))
    model.set_dispatch(name.removeprefix(MIXLORA_PREFIX))
    if compile_activation:
        for layer in model.moe_layers():
            layer.base_ffn.compile_activation()
    return model


def random_ids(rows: int, length: int, vocab: int, *, device: str, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (rows, length), generator=generator).to(device)


def make_batch(shape: BenchShape, *, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids ``[batch, seq]`` (no padding), attention mask of ones, labels = ids."""
    ids = random_ids(shape.batch, shape.seq, shape.vocab, device=device, seed=seed)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def make_prompts(shape: BenchShape, *, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """``decode_batch`` random prompts of ``decode_prompt`` tokens, and how many tokens to generate."""
    ids = random_ids(shape.decode_batch, shape.decode_prompt, shape.vocab, device=device, seed=seed + 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "new_tokens": shape.new_tokens}


def train_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """Forward with labels and backward; gradients are dropped afterwards (no optimizer)."""
    model.train()
    model(**batch).loss.backward()
    for param in model.parameters():
        param.grad = None


def prefill(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """Eval-mode forward of the batch without gradients or cache."""
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)


def decode(model: nn.Module, prompts: dict) -> None:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens per prompt, with the KV cache (prefill included)."""
    model.eval()
    new = prompts["new_tokens"]
    with torch.no_grad():
        model.generate(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"], do_sample=False,
                       max_new_tokens=new, min_new_tokens=new, pad_token_id=0, use_cache=True)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_interleaved(models: dict[str, nn.Module], step: Callable, batch: dict, *,
                     reps: int, warmup: int, device: str, clock: Callable[[], float] = time.perf_counter
                     ) -> dict[str, list[float]]:
    """Seconds per call of ``step(model, batch)`` for each model; variants alternate, order rotating.

    ``clock``: wall time by default; ``time.process_time`` (CPU seconds of this process) is steadier on a
    machine shared with other jobs, and equals wall time on one uncontended thread.
    """
    names = list(models)
    for _ in range(warmup):
        for name in names:
            step(models[name], batch)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            _synchronize(device)
            start = clock()
            step(models[name], batch)
            _synchronize(device)
            times[name].append(clock() - start)
    return times


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the model's distinct parameter and buffer storages."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in list(model.parameters()) + list(model.buffers())}
    return sum(storages.values())


def peak_step_bytes(model: nn.Module, step: Callable, batch: dict[str, torch.Tensor], *, device: str) -> int:
    """Peak bytes of tensors allocated during one ``step`` above what was live before it (see module doc)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(model, batch)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(model, batch)
    sizes: list[tuple[int, int]] = []

    def collect(events) -> None:
        for event in events:
            if type(event.extra_fields).__name__ == "_ExtraFields_Allocation":
                sizes.append((event.start_time_ns, event.extra_fields.alloc_size))
            collect(event.children)

    collect(prof.profiler.kineto_results.experimental_event_tree())
    live = peak = 0
    for _, size in sorted(sizes):
        live += size
        peak = max(peak, live)
    return peak


def saved_bytes(model: nn.Module, input_ids: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward in a forward of ``input_ids``
    and the token loss (what a training step holds between forward and backward, temporaries aside), with
    the inputs bitsandbytes' 8-bit matmuls keep on their autograd node (``A``, ``tensors``) outside the hooks."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        loss = token_ce_sum(output.logits, input_ids)
    nodes, seen = [loss.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for t in (getattr(node, "A", None), *(getattr(node, "tensors", None) or ())):
            if isinstance(t, torch.Tensor):
                pack(t)
        nodes.extend(next_node for next_node, _ in node.next_functions)
    return sum(saved.values())


def profile_table(model: nn.Module, step: Callable, batch: dict[str, torch.Tensor], *, rows: int = 25) -> str:
    """A ``torch.profiler`` table (ops by self CPU time, and CUDA time on a GPU) of one ``step``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step(model, batch)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# Per variant: what each ratio compares (seconds: lower is better; decode tokens/s: higher is better).
RATIO_METRICS = {"train_step": "train_step_s", "prefill": "prefill_s", "decode_tokens_per_s": "decode_tokens_per_s",
                 "peak_step_extra": "peak_step_extra_mb", "peak_step_total": "peak_step_total_mb"}


def ratios(results: dict[str, dict]) -> None:
    """Adds ``ratio_to`` to every variant's result: per other variant, each metric of this one over that one's."""
    for res in results.values():
        res["ratio_to"] = {
            other: {metric: res[key] / theirs[key] for metric, key in RATIO_METRICS.items()
                    if res.get(key) is not None and theirs.get(key)}
            for other, theirs in results.items()}


def auto_choice(shape: BenchShape, *, device: str, dtype: torch.dtype) -> str:
    """The path ``auto`` runs for this shape on ``device`` in ``dtype``."""
    torch_device = torch.device(device)
    return auto_path(shape.lora_widths, torch_device.type, dtype, device_major(torch_device))


def run_benchmark(shape: BenchShape = BenchShape(), *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  threads: int | None = 2, reps: int = 10, warmup: int = 2, decode_reps: int = 3,
                  variants: tuple[str, ...] = VARIANTS, seed: int = 0, clock: str = "wall",
                  profile: TextIO | None = None, compile: bool = False) -> dict:
    """Median training-step, prefill and decoding times and the peak training-step memory per variant.

    Returns a JSON-ready dict: the settings, the path ``auto`` runs here, and per variant the medians,
    decode tokens/s (``decode_batch * new_tokens`` over the median ``generate`` time; None with
    ``new_tokens=0``), the peak bytes (step extra and total with resident parameters) and ``ratio_to``
    every variant. ``clock`` is ``"wall"`` or ``"cpu"`` (see :func:`time_interleaved`). With ``profile`` (a
    text stream), a profiler table of one training step per variant is written to it. With ``compile``,
    MixLoRA's FFN activation (the elementwise work on the pair rows) runs through ``torch.compile``; the
    warm-up repetitions absorb the compilation.
    """
    if threads:
        torch.set_num_threads(threads)
    base = build_base(shape, device=device, dtype=dtype, seed=seed)
    models = {name: build_variant(name, base, shape, seed=seed, compile_activation=compile) for name in variants}
    del base
    batch = make_batch(shape, device=device, seed=seed)
    timing = dict(warmup=warmup, device=device, clock=CLOCKS[clock])
    train = time_interleaved(models, train_step, batch, reps=reps, **timing)
    infer = time_interleaved(models, prefill, batch, reps=reps, **timing)
    generated = shape.decode_batch * shape.new_tokens
    decoding = {}
    if generated:
        prompts = make_prompts(shape, device=device, seed=seed)
        decoding = time_interleaved(models, decode, prompts, reps=decode_reps, **{**timing, "warmup": min(warmup, 1)})
    results = {}
    for name, model in models.items():
        if profile is not None:
            print(f"== {name}: one training step ==\n{profile_table(model, train_step, batch)}", file=profile)
        step_bytes = peak_step_bytes(model, train_step, batch, device=device)
        results[name] = {
            "train_step_s": statistics.median(train[name]),
            "prefill_s": statistics.median(infer[name]),
            "decode_tokens_per_s": generated / statistics.median(decoding[name]) if decoding else None,
            "train_step_s_all": [round(t, 5) for t in train[name]],
            "peak_step_extra_mb": step_bytes / 2**20,
            "peak_step_total_mb": (step_bytes + resident_bytes(model)) / 2**20,
        }
    ratios(results)
    return {
        "shape": dataclasses.asdict(shape), "device": device, "dtype": str(dtype).removeprefix("torch."),
        "auto": auto_choice(shape, device=device, dtype=dtype), "threads": torch.get_num_threads(),
        "clock": clock, "reps": reps, "decode_reps": decode_reps, "compile": compile, "torch": torch.__version__,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None, "results": results,
    }
