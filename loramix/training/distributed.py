"""Data-parallel training on several processes: DDP or FSDP through Accelerate, launched by torchrun or
``accelerate launch`` (gloo on CPU, NCCL on GPU). docs/distributed.md has the recipes.

The data stream (train.Plan) is cut into *global micro-batches* of ``G`` examples, ``G`` = processes x
``train.micro_batch_size`` when a run starts; process ``r`` of ``W`` takes a contiguous slice of each. The
loss of a global micro-batch is exactly the loss one process computes on all ``G`` examples at once:

* cross-entropy: the sum over all predicted tokens of all processes divided by their number ``N`` (known
  to every process, which holds the whole tokenised data set). Process ``r`` backpropagates
  ``W * CE_sum_r / N``; DDP averages gradients over the ``W`` processes, giving ``d(CE_sum / N)``.
  (The mean of per-process token means would weight a token by ``1 / (W * N_r)`` instead of ``1 / N``.)
* router loss: pooled over all processes' tokens, as one process pools over its batch. The model computes
  it once per forward from its routing records, through a hook (:meth:`DataParallel.attach`) that first
  all-gathers every process's records (autograd-aware): every process computes the same global loss, and
  the all-gather's backward sums the ``W`` identical copies' gradients into the owner of each row; DDP's
  average turns that ``W * d aux / d z_r`` back into ``d aux / d z_r``.

So ``W`` processes with batch ``b`` take the same steps as one process with batch ``W * b`` (to fp32
rounding), and a checkpoint can be resumed by any number of processes: ``G`` is stored in it and each
global micro-batch is split over however many processes there are now. Only process 0 writes files.

With ``train.fsdp`` the model is sharded by FSDP2 (``fully_shard``: each decoder layer, then the root), here
rather than by Accelerate, whose FSDP needs a GPU: the same code runs on CPU processes (gloo) and GPUs. Its
gradient reduce-scatter averages over processes as DDP's all-reduce does, so the loss above is unchanged;
checkpoints stay whole (io/checkpoint.py gathers and re-shards), so they resume with or without FSDP.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import re
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ..data import IGNORE_INDEX, collate
from ..errors import LoramixError
from ..io import checkpoint as ckpt
from ..nn.routing import RoutingRecord

T = TypeVar("T")


def make_accelerator(precision: str, collective_timeout_s: float | None = None) -> Any:
    """This process's Accelerator. Several processes on a machine without a GPU train on CPU with gloo; a
    collective that waits longer than ``collective_timeout_s`` for a process fails instead of hanging.
    Accelerate's own FSDP is refused (it needs a GPU, and loramix shards with ``train.fsdp`` instead)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":  # accelerate launch, FSDP config
        raise LoramixError("the Accelerate config asks for FSDP (distributed_type: FSDP), which loramix does not "
                           "use: set train.fsdp: true in the run config and launch with torchrun or a DDP "
                           "Accelerate config (docs/distributed.md)")
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
    def add(self, records: list[RoutingRecord]) -> None:
        """One forward's records (each layer's ``selected`` ``[T, E]`` and ``token_mask`` ``[T]``)."""
        counts = torch.stack([(r.selected * r.token_mask.float()[:, None]).sum(dim=0) for r in records])  # [L, E]
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

    def __init__(self, accelerator: Any, *, fsdp: bool = False) -> None:
        self.accelerator = accelerator
        self.rank = accelerator.process_index
        self.world = accelerator.num_processes
        self.sharded = fsdp and self.world > 1  # FSDP: each process holds a shard of every parameter
        self.load = RouterLoad()
        self._rng_states: list | None = None
        self._token_mask: torch.Tensor | None = None  # the current shard's, for the routing hook

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- model ----------------------------------------------------------------------------------------
    def shard_model(self, model: Any) -> Any:
        """FSDP: shard every parameter (frozen base and adapter) over the processes with ``fully_shard``, one
        group per decoder layer (gathered while it computes) and one for the rest (embeddings, LM head, final
        norm); the model is moved to this process's device. Without FSDP: the model unchanged. Call before
        building the optimizer (its parameters become this process's shards)."""
        if not self.sharded:
            return model
        layer_classes = {name for m in model.modules() for name in getattr(m, "_no_split_modules", None) or ()}
        layers = [m for m in reversed(list(model.modules())) if type(m).__name__ in layer_classes]  # inner first
        if not layers:
            raise LoramixError(f"train.fsdp: {type(model).__name__} names no decoder layer class "
                               "(_no_split_modules) to shard by")
        mesh = init_device_mesh(self.accelerator.device.type, (self.world,))
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    def local_share(self, model: Any) -> float:
        """Fraction of the model's parameter elements this process holds (1 without FSDP)."""
        local = whole = 0
        for p in model.parameters():
            local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
            whole += p.numel()
        return local / whole

    def prepare(self, model: Any, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        """Accelerate's preparation: DDP wraps the model; an FSDP-sharded model is left as it is (Accelerate
        would wrap it in DDP), only the optimizer is prepared."""
        if self.sharded:
            return model, self.accelerator.prepare(optimizer)
        return self.accelerator.prepare(model, optimizer)

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
    @contextlib.contextmanager
    def _pooled_routing(self, model: Any, token_mask: torch.Tensor) -> Iterator[None]:
        """Within the block, the model's router loss (computed once per forward) is the global one over every
        process's rows with this shard's ``token_mask``, and the router load is counted; the LoRA/DoRA
        baselines have no routers."""
        if not hasattr(model, "routing_hook"):
            yield
            return
        self._token_mask, model.routing_hook = token_mask, self._pool_routing
        try:
            yield
        finally:
            self._token_mask, model.routing_hook = None, None

    def forward_backward(self, model: Any, shard: Shard, *, scale: float, sync: bool) -> tuple[float, float]:
        """One global micro-batch: forward, this process's share of the loss, backward (gradients scaled
        by ``scale``; DDP's all-reduce skipped unless ``sync``). Returns the global (CE, router loss)."""
        acc = self.accelerator
        with contextlib.nullcontext() if sync else acc.no_sync(model):
            with acc.autocast(), self._pooled_routing(acc.unwrap_model(model), shard.token_mask):
                output = model(input_ids=shard.batch["input_ids"], attention_mask=shard.batch["attention_mask"])
                ce_sum = token_ce_sum(output.logits, shard.batch["labels"])
            aux = getattr(output, "aux_loss", None)
            loss = ce_sum * (self.world / shard.predicted)
            if aux is not None:
                loss = loss + aux
            acc.backward(loss * scale)
        ce = self.sum(ce_sum.detach()) / shard.predicted
        return float(ce), 0.0 if aux is None else float(aux.detach())

    def _pool_routing(self, records: list[RoutingRecord]) -> list[RoutingRecord]:
        """This shard's records with its token mask (0 on padding and stand-in rows), gathered over all
        processes when there are several; counted into the router load."""
        records = [r.with_token_mask(self._token_mask) for r in records]
        if self.world > 1:
            records = self._gather_rows(records)
        self.load.add(records)
        return records

    def _gather_rows(self, records: list[RoutingRecord]) -> list[RoutingRecord]:
        """All processes' rows, padded to the longest (pads masked out): per layer ``[W*T_max, E]`` logits and
        selections, ``[W*T_max]`` token mask."""
        logits = torch.stack([r.logits for r in records], dim=1)                         # [T, L, E]
        selected = torch.stack([r.selected for r in records], dim=1)                     # [T, L, E]
        longest = torch.tensor(logits.shape[0], device=logits.device)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        extra = int(longest) - logits.shape[0]
        logits = torch.cat([logits, logits.new_zeros(extra, *logits.shape[1:])])
        selected = torch.cat([selected, selected.new_zeros(extra, *selected.shape[1:])])
        mask = torch.cat([self._token_mask, self._token_mask.new_zeros(extra)])
        masks = [torch.empty_like(mask) for _ in range(self.world)]
        dist.all_gather(masks, mask)
        parts = [torch.empty_like(selected) for _ in range(self.world)]
        dist.all_gather(parts, selected.contiguous())
        token_mask = torch.cat(masks)
        return [RoutingRecord(z, None, None, chosen, token_mask)
                for z, chosen in zip(_GatherRows.apply(logits).unbind(1), torch.cat(parts).unbind(1))]

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
        return {"global_micro_batch": global_micro_batch, "processes": self.world, "rng_processes": states}

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
