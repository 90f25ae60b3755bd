"""Fine-tuning from a RunConfig on Accelerate: optimiser, schedule, accumulation, checkpoints, resume, logs.

The micro-batch stream is a pure function of (seed, step): epoch ``e`` visits the examples in the order
``randperm(N, seed + e)``, and optimizer step ``s`` consumes micro-batches ``s*acc .. s*acc+acc-1`` of that
stream. Together with the saved optimizer/scheduler/RNG state this makes ``resume`` continue exactly where
an uninterrupted run would be.

A run holds its output folder's lock (io/lock.py) from start to end. SIGTERM and Ctrl-C end it after the
current step with a checkpoint (preemption.py); a non-finite loss or gradient norm stops it before the update
(or skips the update, with ``train.skip_nonfinite``); a full disk stops it with what is intact. docs/reliability.md
lists every case.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import time
from typing import Any, Callable

import numpy as np
import torch

from ..data import IGNORE_INDEX, Encoder, load_mixture, pad_token_id
from ..errors import LoramixError
from ..io import checkpoint as ckpt
from ..io.adapter_folder import check_finite
from ..io.atomic import DiskFullError, append_line, atomic_dir, atomic_write
from ..io.base_model import load_base_model, load_tokenizer
from ..io.lock import FolderLock
from ..nn.quantized import model_quantization
from ..runconfig import RunConfig, TrainSpec
from .distributed import DataParallel, first_sentence, lost_peer, make_accelerator
from .kbit import prepare_model_for_kbit_training
from .methods import build_model, method_spec
from .preemption import Interrupted, StopRequest

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
        return build_model(base, method_spec(keys))
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
        """Append one step's record (a whole line or nothing: a full disk raises DiskFullError)."""
        if self.path is None:
            return
        append_line(self.path, json.dumps(record), what=LOG_NAME)
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])
        self.bar.set_postfix({k: "nan" if record[k] is None else f"{record[k]:{f}}"
                              for k, f in (("loss", ".4f"), ("aux_loss", ".4f"), ("lr", ".2e"))})

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
    skipped_steps: int = 0


def train(cfg: RunConfig, *, resume: bool = False, echo: Callable[[str], None] = print, base_model: Any = None,
          tokenizer: Any = None, resume_command: str = "resume=True") -> TrainResult:
    """Run the training described by ``cfg`` (on ``base_model``/``tokenizer`` when given, else loaded from
    ``cfg.model``), holding ``train.output_dir``'s lock throughout (one lock for all processes).

    Stops with a LoramixError (nothing half-written) on a non-finite step (unless ``train.skip_nonfinite``), with
    DiskFullError when the disk fills, with Interrupted after a checkpoint on SIGTERM / Ctrl-C; the messages
    say what is intact and to continue with ``resume_command``.
    """
    t = cfg.train
    dp = DataParallel(make_accelerator(t.precision, t.collective_timeout_s), fsdp=t.fsdp)
    if t.fsdp and cfg.model.quantization:
        raise LoramixError(f"model.quantization {cfg.model.quantization} under FSDP is not supported (the packed "
                           "4-bit/8-bit weights would need sharding); train a quantised base with DDP")
    echo = echo if dp.is_main else (lambda _: None)
    lock = FolderLock(t.output_dir, what="training run", echo=echo)
    dp.on_main(lock.acquire)
    try:
        return _Run(cfg, dp, echo, resume_command).run(resume, base_model, tokenizer)
    finally:
        if dp.is_main:
            lock.release()


def _prepare_output_dir(out: str, resume: bool) -> None:
    if not resume and (ckpt.list_checkpoints(out) or os.path.isfile(os.path.join(out, LOG_NAME))):
        raise LoramixError(f"{out} already holds a run; pass --resume to continue it or choose another "
                           "train.output_dir")
    ckpt.clean_partial(out)  # the lock is ours: .tmp-* folders are a killed run's, never a live one's
    os.makedirs(out, exist_ok=True)


def _forget_logged_steps_after(out: str, step: int) -> None:
    """Drop the log lines of steps after ``step`` (a killed run logged them; the resumed run logs them again)."""
    path = os.path.join(out, LOG_NAME)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if _logged_step(line) <= step]

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
    if len(kept) < len(lines):
        atomic_write(path, write, what=LOG_NAME)


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):  # a line cut off by a kill
        return math.inf


def _number(value: float | None) -> float | None:
    """A log value: None for NaN / Inf (not JSON)."""
    return value if value is None or math.isfinite(value) else None


class _Run:
    """One training run: the data, the model and optimizer, the step loop and its checkpoints."""

    def __init__(self, cfg: RunConfig, dp: DataParallel, echo: Callable[[str], None], resume_command: str) -> None:
        self.cfg, self.t, self.out = cfg, cfg.train, cfg.train.output_dir
        self.dp, self.accelerator, self.echo = dp, dp.accelerator, echo
        self.stop = StopRequest()  # active from the first step to the final adapter: before, a signal just stops
        self.resume_command = resume_command
        self.step = self.skipped = 0

    def intact(self) -> str:
        """What a failed run leaves to resume from."""
        found = ckpt.list_checkpoints(self.out)
        return f"{os.path.basename(found[-1][1])} is intact" if found else "no checkpoint was written yet"

    def run(self, resume: bool, base_model: Any, tokenizer: Any) -> TrainResult:
        dp, out = self.dp, self.out
        dp.on_main(lambda: _prepare_output_dir(out, resume))
        features, tokenizer = self.features(tokenizer)
        self.global_batch = dp.global_micro_batch(out, resume, self.t.micro_batch_size)
        self.plan = make_plan(len(features), dataclasses.replace(self.t, micro_batch_size=self.global_batch))
        model = self.build(base_model)
        if resume:
            self.restore(model)
        self.model, self.optimizer = dp.prepare(model, self.optimizer)
        self.model.train()
        processes = f" ({dp.world} processes)" if dp.world > 1 else ""
        if dp.sharded:
            processes = f" ({dp.world} processes, FSDP: process 0 holds {dp.local_share(self.model):.1%} of the parameters)"
        self.echo(f"training on {self.plan.n_examples} examples: {self.plan.total_steps} steps of "
                  f"{self.t.gradient_accumulation_steps} x {self.global_batch}{processes}")
        final = os.path.join(out, ADAPTER_DIR)
        try:
            with self.stop:
                self.loop(features, pad_token_id(tokenizer))
                self.save(lambda model: atomic_dir(final, model.save_pretrained, what="the final adapter"),
                          "the final adapter")
        except DiskFullError as e:
            raise e.with_detail(f"{self.intact()}: free space and run again with {self.resume_command}") from None
        except RuntimeError as e:
            if dp.world > 1 and lost_peer(e):
                raise LoramixError(f"process {dp.rank}: lost contact with the other processes during step "
                                   f"{self.step + 1} ({first_sentence(e)}): one of them stopped, see its message; "
                                   f"{self.intact()}: run again with {self.resume_command}") from None
            raise
        model = self.accelerator.unwrap_model(self.model)
        self.echo(f"adapter saved to {final}")
        return TrainResult(final, model.eval(), tokenizer, self.step, self.skipped)

    def features(self, tokenizer: Any) -> tuple[list[dict[str, list[int]]], Any]:
        """The encoded training mixture (examples with answer tokens within cutoff_len) and the tokenizer."""
        cfg = self.cfg
        specs = [dataclasses.replace(s, template=s.template or cfg.data.template) for s in cfg.data.datasets]
        try:
            examples = load_mixture(specs, seed=self.t.seed)
        except LoramixError as e:
            raise LoramixError(*(f"{cfg.source}: {line}" for line in e.lines)) from None
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
        encoder = Encoder(tokenizer, cutoff_len=cfg.data.cutoff_len, train_on_inputs=cfg.data.train_on_inputs,
                          add_eos=cfg.data.add_eos)
        features = [f for f in map(encoder.encode_train, examples)
                    if any(x != IGNORE_INDEX for x in f["labels"][1:])]
        if len(features) < len(examples):
            self.echo(f"note: {len(examples) - len(features)} examples have no answer tokens left within "
                      f"cutoff_len={cfg.data.cutoff_len} and are skipped")
        if not features:
            raise LoramixError("no training example has answer tokens within data.cutoff_len")
        return features, tokenizer

    def build(self, base_model: Any) -> Any:
        """The adapter model (seeded init), its optimizer and learning-rate schedule."""
        t = self.t
        set_seed(t.seed)
        base = base_model if base_model is not None else load_base_model(self.cfg.model, self.accelerator.device)
        quantization = model_quantization(base)
        model = build_adapter_model(base, self.cfg.adapter)
        checkpointing = t.gradient_checkpointing if t.gradient_checkpointing is not None else quantization is not None
        if quantization is not None:
            prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
            self.echo(f"{quantization} base: gradient checkpointing {'on' if checkpointing else 'off'} "
                      "(train.gradient_checkpointing)")
        elif checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "set_dispatch"):  # MixLoRA / MixDoRA (the LoRA / DoRA baselines have no MoE layers)
            model.set_dispatch(t.moe_dispatch)
        model.config.use_cache = False
        self.dp.seed_processes(t.seed)
        model = self.dp.shard_model(model)
        self.optimizer = make_optimizer(model, t)
        warmup = t.warmup_steps or math.ceil(t.warmup_ratio * self.plan.total_steps)
        from transformers import get_scheduler  # transformers.trainer_utils imports peft: seconds, only when training

        self.scheduler = get_scheduler(t.lr_scheduler, self.optimizer, num_warmup_steps=warmup,
                                       num_training_steps=self.plan.total_steps)
        return model

    def restore(self, model: Any) -> None:
        """Continue from the newest checkpoint (if any); the log forgets the steps after it."""
        found = ckpt.list_checkpoints(self.out)
        if found:
            state = ckpt.restore_checkpoint(found[-1][1], model, self.optimizer, self.scheduler)
            self.step, self.skipped = int(state["step"]), int(state.get("skipped_nonfinite", 0))
            self.dp.restore_rng(self.t.seed, self.step)
            self.echo(f"resuming from {found[-1][1]} (step {self.step} of {self.plan.total_steps})")
        else:
            self.echo(f"no checkpoint in {self.out}; starting from scratch")
        self.dp.on_main(lambda: _forget_logged_steps_after(self.out, self.step))

    def loop(self, features: list[dict[str, list[int]]], pad: int) -> None:
        """Optimizer steps until the plan's total, logging and checkpointing; stops after a step on a signal."""
        t, dp, plan = self.t, self.dp, self.plan
        logger = _Logger(self.out, plan.total_steps, self.step, t.progress_bar, main=dp.is_main)
        start = time.time()
        try:
            while self.step < plan.total_steps:
                record = self.one_step(features, pad)
                logger.bar.update(1)
                skipped = record["loss"] is None or record["grad_norm"] is None  # always logged
                if self.step % t.logging_steps == 0 or self.step == plan.total_steps or skipped:
                    logger.log({**record, "elapsed_s": round(time.time() - start, 2), **dp.load.summary()})
                stopping = dp.any(self.stop.signum is not None)
                if (t.save_steps and self.step % t.save_steps == 0) or self.step == plan.total_steps or stopping:
                    self.save_checkpoint()
                if stopping:
                    raise self.interrupted()
        finally:
            logger.close()

    def one_step(self, features: list[dict[str, list[int]]], pad: int) -> dict[str, Any]:
        """One optimizer step (skipped when its loss or gradient norm is not finite and train.skip_nonfinite,
        else an error); its log record."""
        t, dp, acc = self.t, self.dp, self.t.gradient_accumulation_steps
        losses, auxes = [], []
        for m in range(self.step * acc, (self.step + 1) * acc):
            shard = dp.shard(features, self.plan.micro_batch(m, self.global_batch, t.seed), pad)
            ce, aux = dp.forward_backward(self.model, shard, scale=1 / acc, sync=m == (self.step + 1) * acc - 1)
            losses.append(ce + aux)
            auxes.append(aux)
        loss = sum(losses) / acc
        grad_norm = float(self.accelerator.clip_grad_norm_([p for _, p in trainable(self.model)],
                                                           t.max_grad_norm or math.inf))
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.optimizer.step()
        elif t.skip_nonfinite:
            self.skipped += 1
        else:
            raise LoramixError(
                f"step {self.step + 1}: the loss is {loss:.4g} and the gradient norm {grad_norm:.4g}; the run "
                f"stops before this update ({self.intact()}, nothing was written for this step): lower "
                "train.learning_rate, check the data, or set train.skip_nonfinite: true to skip such steps")
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        record = {"step": self.step, "epoch": round(self.step * acc / self.plan.micro_per_epoch, 4),
                  "loss": _number(loss), "aux_loss": _number(sum(auxes) / acc), "lr": self.scheduler.get_last_lr()[0],
                  "grad_norm": _number(grad_norm)}
        if t.skip_nonfinite:
            record["skipped_steps"] = self.skipped
        return record

    def interrupted(self) -> Interrupted:
        signum = self.stop.signum or signal.SIGTERM  # a process the signal did not reach follows the others
        return Interrupted(signum, f"stopped by {signal.Signals(signum).name} after step {self.step} of "
                                   f"{self.plan.total_steps}: checkpoint-{self.step} is written; continue with "
                                   f"{self.resume_command}")

    def save(self, write: Callable[[Any], None], what: str) -> None:
        """``write(model)`` on process 0 with whole parameters (gathered from every process under FSDP), refused
        when a trainable tensor is not finite."""
        model = self.accelerator.unwrap_model(self.model)

        def guarded() -> None:
            check_finite(trainable(model), f"{self.out}: {what} not written")
            write(model)
        with ckpt.whole_parameters(model, keep=self.dp.is_main):
            self.dp.on_main(guarded)

    def save_checkpoint(self) -> None:
        """``checkpoint-<step>``: every process takes part (FSDP gathers the adapter and optimizer state),
        process 0 writes it and rotates the old ones."""
        extra = {**self.dp.checkpoint_extra(self.global_batch), "skipped_nonfinite": self.skipped}
        ckpt.save_checkpoint(os.path.join(self.out, f"checkpoint-{self.step}"), self.accelerator.unwrap_model(self.model),
                             optimizer=self.optimizer, scheduler=self.scheduler, step=self.step,
                             run_config=self.cfg.to_dict(), extra=extra, write=self.dp.is_main)
        self.dp.on_main(lambda: ckpt.rotate(self.out, self.t.save_total_limit))
