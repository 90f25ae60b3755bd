"""Benchmark MixLoRA (grouped, dense and reference dispatch) against HF PEFT LoRA on one model, one batch, one process.

Every variant wraps its own copy of the same randomly initialised LLaMA (same seed, same weights) and
sees the same batch. Timings alternate between variants within each repetition (the order rotates), so
a slow phase of a shared machine hits every variant alike; medians are reported, with ratios to PEFT
LoRA measured in the same run.

Peak memory is an allocator-level count of tensor bytes (what ``torch.cuda.max_memory_allocated``
reports on a GPU): on CPU, ``torch.profiler`` with ``profile_memory=True`` records every allocation and
free of the CPU allocator during one step; the peak of their running sum is the step's extra memory
(activations, temporaries, gradients), to which the bytes of the parameters and buffers are added.
Process RSS would also count the Python runtime, libraries and malloc's retained pages.
"""

from __future__ import annotations

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
from ..nn.dispatch import DISPATCHES

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASELINE = "peft-lora"
MIXLORA_PREFIX = "mixlora-"  # a MixLoRA variant is this prefix and a dispatch name
VARIANTS = (BASELINE, *(MIXLORA_PREFIX + dispatch for dispatch in DISPATCHES))


@dataclass(frozen=True)
class BenchShape:
    """The model, batch and adapter sizes of one benchmark run (defaults: the shape benchmarks/README.md reports)."""

    hidden: int = 512
    ffn: int = 1376
    layers: int = 4
    vocab: int = 8000
    heads: int = 8
    batch: int = 4
    seq: int = 128
    experts: int = 8
    top_k: int = 2
    rank: int = 16
    dropout: float = 0.05

    @property
    def alpha(self) -> float:
        return 2.0 * self.rank


def build_base(shape: BenchShape, *, device: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of ``shape`` (identical weights for the same seed)."""
    config = AutoConfig.for_model(
        "llama", hidden_size=shape.hidden, intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.heads, vocab_size=shape.vocab,
        max_position_embeddings=max(2048, shape.seq), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(device)


def build_variant(name: str, shape: BenchShape, *, device: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """One benchmarked model: ``peft-lora``, or ``mixlora-<dispatch>`` for each of ``loramix.DISPATCHES``."""
    base = build_base(shape, device=device, dtype=dtype, seed=seed)
    torch.manual_seed(seed + 1)
    if name == BASELINE:
        return get_peft_model(base, LoraConfig(
            r=shape.rank, lora_alpha=shape.alpha, lora_dropout=shape.dropout,
            target_modules=list(LLAMA_PROJECTIONS), task_type="CAUSAL_LM"))
    model = get_mixlora_model(base, MixLoraConfig(
        r=shape.rank, lora_alpha=shape.alpha, lora_dropout=shape.dropout, target_modules=list(LLAMA_PROJECTIONS),
        num_experts=shape.experts, top_k=shape.top_k))
    model.set_dispatch(name.removeprefix(MIXLORA_PREFIX))
    return model


def make_batch(shape: BenchShape, *, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids ``[batch, seq]`` (no padding), attention mask of ones, labels = ids."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, shape.vocab, (shape.batch, shape.seq), generator=generator).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def train_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """Forward with labels and backward; gradients are dropped afterwards (no optimizer)."""
    model.train()
    model(**batch).loss.backward()
    for param in model.parameters():
        param.grad = None


def inference_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """Eval-mode forward without gradients or cache (a prefill)."""
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_interleaved(models: dict[str, nn.Module], step: Callable, batch: dict[str, torch.Tensor], *,
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


def _resident_bytes(model: nn.Module) -> int:
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


def profile_table(model: nn.Module, step: Callable, batch: dict[str, torch.Tensor], *, rows: int = 25) -> str:
    """A ``torch.profiler`` table (ops by self CPU time) of one ``step``: where the time of a step goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step(model, batch)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def run_benchmark(shape: BenchShape = BenchShape(), *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                  threads: int | None = 2, reps: int = 10, warmup: int = 2,
                  variants: tuple[str, ...] = VARIANTS, seed: int = 0, clock: str = "wall",
                  profile: TextIO | None = None, compile: bool = False) -> dict:
    """Median train-step and inference-forward seconds and peak training-step memory per variant.

    Returns a JSON-ready dict: the settings, and per variant the medians, the peak bytes (step extra and
    total with resident parameters) and, when ``peft-lora`` is among the variants, the ratios to it.
    ``clock`` is ``"wall"`` or ``"cpu"`` (see :func:`time_interleaved`). With ``profile`` (a text stream), a
    profiler table of one training step per variant is written to it. With ``compile``, every variant runs
    through ``torch.compile`` (default options; the warm-up repetitions absorb the compilation).
    """
    if threads:
        torch.set_num_threads(threads)
    models = {name: build_variant(name, shape, device=device, dtype=dtype, seed=seed) for name in variants}
    if compile:
        models = {name: torch.compile(model) for name, model in models.items()}
    batch = make_batch(shape, device=device, seed=seed)
    timing = dict(reps=reps, warmup=warmup, device=device, clock=CLOCKS[clock])
    train = time_interleaved(models, train_step, batch, **timing)
    infer = time_interleaved(models, inference_forward, batch, **timing)
    results = {}
    for name, model in models.items():
        if profile is not None:
            print(f"== {name}: one training step ==\n{profile_table(model, train_step, batch)}", file=profile)
        step_bytes = peak_step_bytes(model, train_step, batch, device=device)
        results[name] = {
            "train_step_s": statistics.median(train[name]),
            "inference_forward_s": statistics.median(infer[name]),
            "train_step_s_all": [round(t, 5) for t in train[name]],
            "peak_step_extra_mb": step_bytes / 2**20,
            "peak_step_total_mb": (step_bytes + _resident_bytes(model)) / 2**20,
        }
    if BASELINE in results:
        base = results[BASELINE]
        for name, res in results.items():
            res["ratio_to_peft_lora"] = {
                "train_step": res["train_step_s"] / base["train_step_s"],
                "inference_forward": res["inference_forward_s"] / base["inference_forward_s"],
                "peak_step_extra": res["peak_step_extra_mb"] / base["peak_step_extra_mb"],
                "peak_step_total": res["peak_step_total_mb"] / base["peak_step_total_mb"],
            }
    return {
        "shape": dataclasses.asdict(shape), "device": device, "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "clock": clock, "reps": reps, "compile": compile,
        "torch": torch.__version__,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None, "results": results,
    }
