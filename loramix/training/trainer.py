"""Fine-tuning from a RunConfig on Accelerate: optimiser, schedule, accumulation, checkpoints, resume, logs.

The micro-batch stream is a pure function of (seed, step): epoch ``e`` visits the examples in the order
``randperm(N, seed + e)``, and optimizer step ``s`` consumes micro-batches ``s*acc .. s*acc+acc-1`` of that
stream. Together with the saved optimizer/scheduler/RNG state this makes ``resume`` continue exactly where
an uninterrupted run would be.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from typing import Any, Callable

import numpy as np
import torch

from ..data import IGNORE_INDEX, Encoder, load_mixture, pad_token_id
from ..config import MixLoraConfig
from ..errors import LoramixError
from ..io import checkpoint as ckpt
from ..io.atomic import atomic_dir
from ..io.base_model import load_base_model, load_tokenizer
from ..model import get_mixlora_model
from ..nn.quantized import model_quantization
from ..runconfig import RunConfig, TrainSpec
from .distributed import DataParallel, make_accelerator
from .kbit import prepare_model_for_kbit_training
from .methods import build_model, method_spec

LOG_NAME = "log.jsonl"
ADAPTER_DIR = "adapter"


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_adapter_model(base: Any, adapter: dict[str, Any]) -> Any:
    """Wrap the base model with a fresh adapter: ``type: mixlora`` (loramix) or ``type: lora`` (HF PEFT).

    A ``type: mixlora`` section with ``method`` (lora | dora | mixlora | mixdora) builds that method from the
    same keys, as ``loramix.baselines`` defines it (docs/variants.md)."""
    keys = {k: v for k, v in adapter.items() if k != "type"}
    if adapter.get("type", "mixlora") == "mixlora":
        if "method" in keys:
            return build_model(base, method_spec(keys))
        return get_mixlora_model(base, MixLoraConfig.from_dict(keys, source="adapter"))
    from peft import LoraConfig, get_peft_model

    try:
        return get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **keys))
    except TypeError as e:
        raise LoramixError(f"adapter (type lora): {e}") from None


def trainable(model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_optimizer(model: Any, t: TrainSpec) -> torch.optim.Optimizer:
    """AdamW; LoRA+ multiplies the learning rate of ``lora_B`` tensors; 1-D tensors get no weight decay."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in trainable(model):
        lr = t.learning_rate * (t.loraplus_lr_ratio if "lora_B" in name else 1.0)
        wd = t.weight_decay if p.ndim > 1 else 0.0
        groups.setdefault((lr, wd), []).append(p)
    if not groups:
        raise LoramixError("the adapter has no trainable parameters (check adapter.target_modules)")
    return torch.optim.AdamW([{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()],
                             lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)


@dataclasses.dataclass
class Plan:
    """How many examples, micro-batches per epoch and optimizer steps in total."""

    n_examples: int
    micro_per_epoch: int
    total_steps: int

    def micro_batch(self, m: int, mbs: int, seed: int) -> list[int]:
        """Example indices of global micro-batch ``m``."""
        epoch, i = divmod(m, self.micro_per_epoch)
        perm = torch.randperm(self.n_examples, generator=torch.Generator().manual_seed(seed + epoch))
        return perm[i * mbs:(i + 1) * mbs].tolist()


def make_plan(n: int, t: TrainSpec) -> Plan:
    micro = math.ceil(n / t.micro_batch_size)
    total = t.max_steps if t.max_steps else math.ceil(t.epochs * micro / t.gradient_accumulation_steps)
    if total < 1:
        raise LoramixError("training would run 0 steps: raise train.epochs or set train.max_steps")
    return Plan(n, micro, total)


class _Logger:
    """JSON-lines log, TensorBoard when installed, and the progress bar."""

    def __init__(self, output_dir: str, total: int, start: int, show_bar: bool, *, main: bool = True) -> None:
        from tqdm.auto import tqdm

        self.path = os.path.join(output_dir, LOG_NAME) if main else None  # only process 0 writes
        self.bar = tqdm(total=total, initial=start, desc="train", disable=not (show_bar and main), dynamic_ncols=True)
        self.tb = None
        if self.path is None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        except ImportError:
            self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", aux=f"{record['aux_loss']:.4f}", lr=f"{record['lr']:.2e}")

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()


@dataclasses.dataclass
class TrainResult:
    """The final adapter folder and the trained model (in eval mode) with its tokenizer."""

    adapter_dir: str
    model: Any
    tokenizer: Any
    steps: int


def train(cfg: RunConfig, *, resume: bool = False, echo: Callable[[str], None] = print, base_model: Any = None,
          tokenizer: Any = None) -> TrainResult:
    """Run the training described by ``cfg`` (on ``base_model``/``tokenizer`` when given, else loaded from
    ``cfg.model``)."""
    from transformers import get_scheduler

    t = cfg.train
    out = t.output_dir
    accelerator = make_accelerator(t.precision)
    dp = DataParallel(accelerator, fsdp=t.fsdp)
    if t.fsdp and cfg.model.quantization:
        raise LoramixError(f"model.quantization {cfg.model.quantization} under FSDP is not supported (the packed "
                           "4-bit/8-bit weights would need sharding); train a quantised base with DDP")
    echo = echo if dp.is_main else (lambda _: None)
    specs = [dataclasses.replace(s, template=s.template or cfg.data.template) for s in cfg.data.datasets]
    examples = load_mixture(specs, seed=t.seed)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    encoder = Encoder(tokenizer, cutoff_len=cfg.data.cutoff_len, train_on_inputs=cfg.data.train_on_inputs,
                      add_eos=cfg.data.add_eos)
    features = [f for f in map(encoder.encode_train, examples) if any(x != IGNORE_INDEX for x in f["labels"][1:])]
    if len(features) < len(examples):
        echo(f"note: {len(examples) - len(features)} examples have no answer tokens left within "
             f"cutoff_len={cfg.data.cutoff_len} and are skipped")
    if not features:
        raise LoramixError("no training example has answer tokens within data.cutoff_len")
    global_batch = dp.global_micro_batch(out, resume, t.micro_batch_size)
    plan = make_plan(len(features), dataclasses.replace(t, micro_batch_size=global_batch))

    set_seed(t.seed)
    base = base_model if base_model is not None else load_base_model(cfg.model, accelerator.device)
    quantization = model_quantization(base)
    model = build_adapter_model(base, cfg.adapter)
    checkpointing = t.gradient_checkpointing if t.gradient_checkpointing is not None else quantization is not None
    if quantization is not None:
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
        echo(f"{quantization} base: gradient checkpointing {'on' if checkpointing else 'off'} "
             "(train.gradient_checkpointing)")
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "set_dispatch"):  # MixLoRA / MixDoRA (the LoRA / DoRA baselines have no MoE layers)
        model.set_dispatch(t.moe_dispatch)
    model.config.use_cache = False
    dp.seed_processes(t.seed)
    model = dp.shard_model(model)
    optimizer = make_optimizer(model, t)
    warmup = t.warmup_steps or math.ceil(t.warmup_ratio * plan.total_steps)
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=plan.total_steps)

    ckpt.clean_partial(out)
    os.makedirs(out, exist_ok=True)
    step = 0
    if resume:
        found = ckpt.list_checkpoints(out)
        if found:
            step = ckpt.restore_checkpoint(found[-1][1], model, optimizer, scheduler)
            dp.restore_rng(t.seed, step)
            echo(f"resuming from {found[-1][1]} (step {step} of {plan.total_steps})")
        else:
            echo(f"no checkpoint in {out}; starting from scratch")
    elif ckpt.list_checkpoints(out) or os.path.isfile(os.path.join(out, LOG_NAME)):
        raise LoramixError(f"{out} already holds a run; pass --resume to continue it or choose another "
                           "train.output_dir")

    model, optimizer = dp.prepare(model, optimizer)
    model.train()
    pad = pad_token_id(tokenizer)
    acc = t.gradient_accumulation_steps
    processes = f" ({dp.world} processes)" if dp.world > 1 else ""
    if dp.sharded:
        processes = f" ({dp.world} processes, FSDP: process 0 holds {dp.local_share(model):.1%} of the parameters)"
    echo(f"training on {plan.n_examples} examples: {plan.total_steps} steps of {acc} x {global_batch}{processes}")
    logger = _Logger(out, plan.total_steps, step, t.progress_bar, main=dp.is_main)
    start = time.time()
    try:
        while step < plan.total_steps:
            losses, auxes = [], []
            for m in range(step * acc, (step + 1) * acc):
                shard = dp.shard(features, plan.micro_batch(m, global_batch, t.seed), pad)
                ce, aux = dp.forward_backward(model, shard, scale=1 / acc, sync=m == (step + 1) * acc - 1)
                losses.append(ce + aux)
                auxes.append(aux)
            grad_norm = None
            if t.max_grad_norm:
                grad_norm = float(accelerator.clip_grad_norm_([p for _, p in trainable(model)], t.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            logger.bar.update(1)
            if step % t.logging_steps == 0 or step == plan.total_steps:
                logger.log({"step": step, "epoch": round(step * acc / plan.micro_per_epoch, 4),
                            "loss": sum(losses) / acc, "aux_loss": sum(auxes) / acc,
                            "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                            "elapsed_s": round(time.time() - start, 2), **dp.load.summary()})
            if (t.save_steps and step % t.save_steps == 0) or step == plan.total_steps:
                ckpt.save_checkpoint(os.path.join(out, f"checkpoint-{step}"), accelerator.unwrap_model(model),
                                     optimizer=optimizer, scheduler=scheduler, step=step, run_config=cfg.to_dict(),
                                     extra=dp.checkpoint_extra(global_batch), write=dp.is_main)
                if dp.is_main:
                    ckpt.rotate(out, t.save_total_limit)
                dp.barrier()
    finally:
        logger.close()
    final = os.path.join(out, ADAPTER_DIR)
    with ckpt.whole_parameters(model, keep=dp.is_main):
        if dp.is_main:
            atomic_dir(final, accelerator.unwrap_model(model).save_pretrained)
    dp.barrier()
    model = accelerator.unwrap_model(model)
    echo(f"adapter saved to {final}")
    return TrainResult(final, model.eval(), tokenizer, step)
