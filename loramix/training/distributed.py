"""Data-parallel training on several processes: DDP or FSDP through Accelerate, launched by torchrun or
``accelerate launch`` (gloo on CPU, NCCL on GPU). docs/distributed.md has the recipes.

The data stream (train.Plan) is cut into *global micro-batches* of ``G`` examples, ``G`` = processes x
``train.micro_batch_size`` when a run starts; process ``r`` of ``W`` takes a contiguous slice of each. The
loss of a global micro-batch is exactly the loss one process computes on all ``G`` examples at once:

* cross-entropy: the sum over all predicted tokens of all processes divided by their number ``N`` (known
  to every process, which holds the whole tokenised data set). Process ``r`` backpropagates
  ``W * CE_sum_r / N``; DDP averages gradients over the ``W`` processes, giving ``d(CE_sum / N)``.
  (The mean of per-process token means would weight a token by ``1 / (W * N_r)`` instead of ``1 / N``.)
* router loss: pooled over all processes' tokens, as one process pools over its batch. Every process
  all-gathers the router logits (autograd-aware), computes the same global ``routing.auxiliary_loss``,
  and the all-gather's backward sums the ``W`` identical copies' gradients into the owner of each row;
  DDP's average turns that ``W * d aux / d z_r`` back into ``d aux / d z_r``.

So ``W`` processes with batch ``b`` take the same steps as one process with batch ``W * b`` (to fp32
rounding), and a checkpoint can be resumed by any number of processes: ``G`` is stored in it and each
global micro-batch is split over however many processes there are now. Only process 0 writes files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..data import IGNORE_INDEX, collate
from ..errors import LoramixError
from ..io import checkpoint as ckpt
from ..nn.routing import auxiliary_loss, expert_choices

T = TypeVar("T")


def make_accelerator(precision: str, collective_timeout_s: float | None = None) -> Any:
    """This process's Accelerator. Several processes on a machine without a GPU train on CPU with gloo; a
    collective that waits longer than ``collective_timeout_s`` for a process fails instead of hanging."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not several:
        AcceleratorState._reset_state(True)  # one process may train several times with different precisions
    cpu = several and not torch.accelerator.is_available()
    handlers = [InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=collective_timeout_s))] \
        if collective_timeout_s else []
    return Accelerator(cpu=cpu, mixed_precision="bf16" if precision == "bf16" else "no", kwargs_handlers=handlers)


# What gloo and NCCL say when another process died or stopped answering.
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "NCCL", "gloo")


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc``, raised in a multi-process run, is a collective that lost another process."""
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and any(p in str(exc) for p in _LOST_PEER))


def first_sentence(exc: BaseException) -> str:
    """The gist of a communication library's error: its first sentence, without the source location."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    return text.split(". ")[0].rstrip(".")


def predicted_tokens(feature: dict[str, list[int]]) -> int:
    """Tokens of one encoded example that carry a loss (labels shift left by one: the first never does)."""
    return sum(label != IGNORE_INDEX for label in feature["labels"][1:])


def token_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy in fp32 (what transformers' causal-LM loss sums before dividing).

    logits ``[B, S, V]``, labels ``[B, S]`` (-100 = no loss) -> scalar.
    """
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@dataclasses.dataclass
class Shard:
    """This process's rows of one global micro-batch."""

    batch: dict[str, torch.Tensor]  # input_ids, attention_mask, labels: [b, S]
    token_mask: torch.Tensor        # [b*S] 1 = a token the router loss counts (0: padding or a stand-in row)
    predicted: int                  # predicted tokens in the whole global micro-batch (all processes)


class RouterLoad:
    """Share of the routing choices per layer and expert over all processes' tokens, between two log lines."""

    def __init__(self) -> None:
        self.counts: torch.Tensor | None = None  # [L, E]

    @torch.no_grad()
    def add(self, logits: list[torch.Tensor], token_mask: torch.Tensor, config: Any) -> None:
        """logits: per layer ``[T, E]``; token_mask ``[T]``; config: the MixLoraConfig (its routing's choices)."""
        choices = torch.stack([expert_choices(z, config) for z in logits])            # [L, T, E]
        counts = (choices * token_mask.float()[None, :, None]).sum(dim=1)            # [L, E]
        self.counts = counts if self.counts is None else self.counts + counts

    def summary(self) -> dict[str, float]:
        """``router_balance``: mean over layers of H(share) / log E (1 = even load, 0 = one expert); resets."""
        if self.counts is None:
            return {}
        share = self.counts / self.counts.sum(-1, keepdim=True).clamp_min(1)
        entropy = -(share * share.clamp_min(1e-30).log()).sum(-1) / torch.log(torch.tensor(float(share.shape[-1])))
        self.counts = None
        return {"router_balance": round(float(entropy.mean()), 6)}


class _GatherRows(torch.autograd.Function):
    """All processes' equally long ``[T, ...]`` tensors concatenated along dim 0. Backward: each process
    gets the sum over processes of the gradient of its own rows."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


class DataParallel:
    """This process's part in a (possibly one-process) data-parallel run, around its Accelerator."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self.rank = accelerator.process_index
        self.world = accelerator.num_processes
        self.load = RouterLoad()
        self._rng_states: list | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """FSDP: each process holds a shard of every parameter and of the optimizer state."""
        return getattr(self.accelerator, "distributed_type", None) == "FSDP"

    def whole_parameters(self, model: Any) -> Any:
        """Context in which process 0 sees whole parameters (FSDP gathers its shards; collective), for saving."""
        if not self.sharded:
            return contextlib.nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(model, writeback=False, rank0_only=True,
                                                           offload_to_cpu=True)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def on_main(self, work: Callable[[], T]) -> T | None:
        """``work()`` on process 0 only (None elsewhere); a LoramixError it raises is raised on every process
        (collective: call on all)."""
        error, result = None, None
        if self.is_main:
            try:
                result = work()
            except LoramixError as e:
                error = e
        if self.world > 1:
            message = [None if error is None else str(error)]
            dist.broadcast_object_list(message, src=0)
            if message[0] is not None and error is None:
                error = LoramixError(message[0])
        if error is not None:
            raise error
        return result

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any process (collective when there are several)."""
        if self.world == 1:
            return flag
        value = torch.tensor(int(flag), device=self.accelerator.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value)

    def seed_processes(self, seed: int) -> None:
        """After the (identical) adapter init: give each process its own dropout/jitter stream."""
        if self.world > 1:
            torch.manual_seed(seed + self.rank)

    # ---- data ---------------------------------------------------------------------------------------
    def global_micro_batch(self, output_dir: str, resume: bool, micro_batch_size: int) -> int:
        """``G``: the resumed checkpoint's, so the data stream and steps stay those of the run it continues;
        else processes x micro_batch_size."""
        found = ckpt.list_checkpoints(output_dir) if resume else []
        if found:
            state = torch.load(os.path.join(found[-1][1], ckpt.STATE_NAME), map_location="cpu", mmap=True,
                               weights_only=False)
            if state.get("sharded_optimizer"):
                raise LoramixError(f"{found[-1][1]}: written by an FSDP run, whose checkpoints keep only process 0's "
                                   "shard of the optimizer state; resume is supported for DDP runs")
            self._rng_states = state.get("rng_processes")
            if "global_micro_batch" in state:
                return int(state["global_micro_batch"])
        return self.world * micro_batch_size

    def rows(self, n: int) -> range:
        """This process's contiguous slice of ``n`` rows (sizes differ by at most one)."""
        return range(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def shard(self, features: list[dict[str, list[int]]], indices: list[int], pad_id: int) -> Shard:
        """Collate this process's rows of the global micro-batch ``indices``. A process left without a row
        (fewer rows than processes) runs a stand-in row that carries no loss, so that every process takes
        part in the step."""
        mine = [features[indices[i]] for i in self.rows(len(indices))]
        stand_in = not mine
        if stand_in:
            mine = [{"input_ids": features[indices[0]]["input_ids"],
                     "labels": [IGNORE_INDEX] * len(features[indices[0]]["input_ids"])}]
        batch = {k: v.to(self.accelerator.device) for k, v in collate(mine, pad_id).items()}
        mask = batch["attention_mask"].reshape(-1) * (0 if stand_in else 1)
        return Shard(batch, mask, sum(predicted_tokens(features[i]) for i in indices))

    # ---- loss -----------------------------------------------------------------------------------------
    def forward_backward(self, model: Any, shard: Shard, *, scale: float, sync: bool) -> tuple[float, float]:
        """One global micro-batch: forward, this process's share of the loss, backward (gradients scaled
        by ``scale``; DDP's all-reduce skipped unless ``sync``). Returns the global (CE, router loss)."""
        acc = self.accelerator
        inner = acc.unwrap_model(model)
        with contextlib.nullcontext() if sync else acc.no_sync(model):
            with acc.autocast():
                output = model(input_ids=shard.batch["input_ids"], attention_mask=shard.batch["attention_mask"])
                ce_sum = token_ce_sum(output.logits, shard.batch["labels"])
                aux = self.router_loss(inner, shard.token_mask)
            loss = ce_sum * (self.world / shard.predicted)
            if aux is not None:
                loss = loss + aux
            acc.backward(loss * scale)
        ce = self.sum(ce_sum.detach()) / shard.predicted
        return float(ce), 0.0 if aux is None else float(aux.detach())

    def router_loss(self, model: Any, token_mask: torch.Tensor) -> torch.Tensor | None:
        """The router loss over the router logits of all processes (None: no routers or the loss is off)."""
        config = getattr(model, "mixlora_config", None)
        if config is None or not config.router_loss:
            return None
        logits = model.router_logits()
        if self.world > 1:
            logits, token_mask = self._gather_rows(logits, token_mask)
        self.load.add(logits, token_mask, config)
        return auxiliary_loss(logits, config, token_mask=token_mask)

    def _gather_rows(self, logits: list[torch.Tensor], token_mask: torch.Tensor
                     ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """All processes' rows, padded to the longest (pads masked out): per layer ``[W*T_max, E]``, ``[W*T_max]``."""
        rows = torch.stack(logits, dim=1)                                      # [T, L, E]
        longest = torch.tensor(rows.shape[0], device=rows.device)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        extra = int(longest) - rows.shape[0]
        rows = torch.cat([rows, rows.new_zeros(extra, *rows.shape[1:])])
        mask = torch.cat([token_mask, token_mask.new_zeros(extra)])
        masks = [torch.empty_like(mask) for _ in range(self.world)]
        dist.all_gather(masks, mask)
        return list(_GatherRows.apply(rows).unbind(1)), torch.cat(masks)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of a tensor over the processes."""
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
        return value

    # ---- checkpoints ----------------------------------------------------------------------------------
    def checkpoint_extra(self, global_micro_batch: int) -> dict[str, Any]:
        """What a checkpoint adds for resuming on any number of processes (collective: call on all)."""
        states = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(states, ckpt.rng_state())
        else:
            states = [ckpt.rng_state()]
        return {"global_micro_batch": global_micro_batch, "processes": self.world, "rng_processes": states,
                "sharded_optimizer": self.sharded}

    def restore_rng(self, seed: int, step: int) -> None:
        """After a resume on process 0's RNG state: each process its own saved stream when the number of
        processes is unchanged, else a fresh stream per process (dropout then differs from the old run)."""
        if self._rng_states is not None and len(self._rng_states) == self.world:
            ckpt.set_rng_state(self._rng_states[self.rank])
        elif self.rank > 0:
            torch.manual_seed(hash((seed, step, self.rank)) % 2**63)


def end_processes() -> None:
    """Close the process group a multi-process run opened, so no communication thread outlives the run
    (gloo threads still running at interpreter exit abort the process: "terminate called ...")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
