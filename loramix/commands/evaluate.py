"""``loramix eval``: accuracy per task for a MixLoRA adapter, a PEFT LoRA adapter or the bare model; with
``--harness lm-eval``, lm-evaluation-harness tasks on the same models (evaluation/harness.py)."""
from __future__ import annotations

import argparse

from ..errors import LoramixError
from .common import add_data_args, add_model_args, eval_batch_size, loaded_model, run_config, scoring_setup


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="accuracy on commonsense / classification tasks",
                              description="Score each task by the label token at the last prompt position and "
                                          "by the log-likelihood of each choice; print a table, write JSON. "
                                          "With --harness lm-eval, run lm-evaluation-harness tasks instead.")
    add_model_args(p)
    add_data_args(p)
    g = p.add_argument_group("lm-evaluation-harness (pip install 'loramix[eval]')")
    g.add_argument("--harness", choices=["lm-eval"], help="score lm-eval tasks (--tasks) instead of loramix's own")
    g.add_argument("--tasks", help="comma-separated lm-eval task names (its built-in ones, or YAML tasks in "
                                   "--include-path)")
    g.add_argument("--include-path", help="a folder of lm-eval task YAML files (local tasks, offline)")
    g.add_argument("--num-fewshot", type=int, help="lm-eval few-shot examples per item (default: the task's)")
    p.add_argument("--output", help="write the results as JSON to this file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.harness:
        return _run_harness(args)
    if args.tasks or args.include_path or args.num_fewshot is not None:
        raise LoramixError("--tasks, --include-path and --num-fewshot are lm-eval's: add --harness lm-eval")
    from ..evaluation.accuracy import format_table, score, with_average, write_json

    job = scoring_setup(args)
    results = with_average(score(job.model, job.encoder, job.examples, batch_size=job.batch_size,
                                 max_len=job.encoder.cutoff_len))
    print(format_table(results, title=f"adapter: {job.adapter or 'none (base model)'}"))
    if args.output:
        write_json(args.output, {"adapter": job.adapter, "results": results})
        print(f"results written to {args.output}")
    return 0


def _run_harness(args: argparse.Namespace) -> int:
    """The task names and folder are checked before the model loads."""
    if args.task or args.data or args.template or args.cutoff_len:
        raise LoramixError("--task, --data, --template and --cutoff-len are for loramix's own tasks; with "
                           "--harness lm-eval name lm-eval tasks with --tasks")
    tasks = [name.strip() for name in (args.tasks or "").split(",") if name.strip()]
    if not tasks:
        raise LoramixError("--harness lm-eval needs --tasks (comma-separated lm-eval task names)")
    from ..evaluation import harness

    cfg = run_config(args)
    manager = harness.task_manager(tasks, args.include_path)
    model, tokenizer, adapter = loaded_model(args, cfg)
    results = harness.evaluate(model, tokenizer, manager, tasks, batch_size=eval_batch_size(args, cfg),
                               num_fewshot=args.num_fewshot, limit=args.limit)
    print(f"adapter: {adapter or 'none (base model)'}")
    print(harness.format_table(results))
    if args.output:
        harness.write_results(args.output, adapter, results)
        print(f"results written to {args.output}")
    return 0
