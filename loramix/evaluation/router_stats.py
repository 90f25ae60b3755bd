"""Router statistics: per layer, expert and task, the share of routed tokens and the routing entropy.

For each task the model reads its examples (prompt + answer, as in training); for every non-pad token and
every MoE layer the router's softmax ``p`` and its choice of experts (the routing records' ``selected``)
are counted. Reported per layer:

* ``share[e]``: fraction of the (token, slot) choices that went to expert ``e`` (sums to 1; uniform = 1/E);
* ``entropy``: mean over tokens of H(p) in nats (log E = undecided router, 0 = one expert certain);
* ``load_entropy``: H(share) in nats (log E = balanced load, 0 = collapse onto one expert).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch

from ..data import Encoder, Example, collate, pad_token_id
from ..errors import LoramixError
from ..nn.routing import RoutingRecord


class _Accumulator:
    """Running per-layer counts for one task."""

    def __init__(self, layers: int, experts: int) -> None:
        self.counts = torch.zeros(layers, experts, dtype=torch.float64)
        self.entropy = torch.zeros(layers, dtype=torch.float64)
        self.tokens = 0

    def add(self, records: list[RoutingRecord]) -> None:
        """One forward's records (rows of this task only), each with its token mask."""
        for i, record in enumerate(records):
            real = record.token_mask.bool()
            p = torch.softmax(record.logits[real].double(), dim=-1)  # [n, E]
            self.counts[i] += record.selected[real].sum(dim=0).double()
            self.entropy[i] += -(p * p.clamp_min(1e-30).log()).sum()
        self.tokens += int(records[0].token_mask.sum())

    def report(self) -> dict[str, Any]:
        share = self.counts / self.counts.sum(-1, keepdim=True).clamp_min(1)
        load_h = -(share * share.clamp_min(1e-30).log()).sum(-1)
        return {"tokens": self.tokens,
                "layers": [{"share": share[i].tolist(), "entropy": float(self.entropy[i] / max(self.tokens, 1)),
                            "load_entropy": float(load_h[i])} for i in range(share.shape[0])]}


@torch.inference_mode()
def router_statistics(model: Any, encoder: Encoder, examples: list[Example], *, batch_size: int = 8) -> dict[str, Any]:
    """``{"num_experts", "top_k", "max_entropy", "tasks": {task: {"tokens", "layers": [...]}}}``; task "all" pools all."""
    if not hasattr(model, "routing"):
        raise LoramixError("router statistics need a MixLoRA adapter (this model has no routers)")
    cfg = model.mixlora_config
    n_layers = len(model.moe_layers())
    by_task: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_task[ex.task].append(ex)
    acc = {t: _Accumulator(n_layers, cfg.num_experts) for t in [*by_task, "all"]}
    pad = pad_token_id(encoder.tokenizer)
    model.eval()
    device = next(model.parameters()).device
    for task, items in by_task.items():
        for start in range(0, len(items), batch_size):
            feats = [{"input_ids": encoder.encode_train(e)["input_ids"]} for e in items[start:start + batch_size]]
            batch = collate(feats, pad)
            model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            records = [RoutingRecord(r.logits.float().cpu(), None, None, r.selected.cpu(), r.token_mask.cpu())
                       for r in model.routing]
            for key in (task, "all"):
                acc[key].add(records)
    return {"num_experts": cfg.num_experts, "top_k": cfg.top_k, "max_entropy": math.log(cfg.num_experts),
            "tasks": {t: a.report() for t, a in acc.items()}}


def plot_heatmap(stats: dict[str, Any], path: str) -> None:
    """One panel per task: layers (rows) x experts (columns), colour = share of routed tokens."""
    try:
        import matplotlib
    except ImportError:
        raise LoramixError("the router heatmap needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(stats["tasks"])
    n_layers = len(stats["tasks"][tasks[0]]["layers"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(1.2 + 0.45 * stats["num_experts"] * len(tasks),
                                                    1.5 + 0.22 * n_layers), squeeze=False)
    vmax = max(max(max(layer["share"]) for layer in stats["tasks"][t]["layers"]) for t in tasks)
    for ax, task in zip(axes[0], tasks):
        grid = [layer["share"] for layer in stats["tasks"][task]["layers"]]
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(f"{task}\n({stats['tasks'][task]['tokens']} tokens)", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(stats["num_experts"]))
        if ax is not axes[0][0]:
            ax.set_yticks([])
    axes[0][0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="share of routed tokens")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_summary(stats: dict[str, Any]) -> str:
    """Per task: mean routing entropy and load entropy over layers, and the most used expert per layer."""
    lines = [f"{'task':<16} {'tokens':>7}  {'entropy':>7}  {'load H':>6}  (max {stats['max_entropy']:.3f} nats)"]
    for task, r in stats["tasks"].items():
        layers = r["layers"]
        ent = sum(x["entropy"] for x in layers) / len(layers)
        load = sum(x["load_entropy"] for x in layers) / len(layers)
        top = " ".join(str(max(range(len(x["share"])), key=x["share"].__getitem__)) for x in layers)
        lines.append(f"{task:<16} {r['tokens']:>7}  {ent:>7.3f}  {load:>6.3f}  top expert per layer: {top}")
    return "\n".join(lines)
